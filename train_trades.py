"""TRADES (Zhang et al. 2019) and the paper's other baselines, on FIRE's exact training loop.

    trades: loss = CE(f(x), y) + beta * KL(q(.|x) || q(.|x')),  x' = PGD maximising the KL
    madry:  loss = CE(f(x'), y),  x' = PGD maximising the CE from a uniform random start (Eq. 4)
    mart:   loss = BCE(f(x'), y) + beta * mean_i KL_i(q(.|x) || q(.|x')) * (1 - q(y|x)),
            x' = PGD maximising the CE (Wang et al. 2020)
    trades --self-adaptive: TRADES with the CE on self-adaptive soft targets (Huang et al. 2020)

Commands:
    python train_trades.py                                   # TRADES on digits, CPU: its step costs FIRE's (docs/performance.md)
    python train_trades.py --dataset cifar10                 # WRN-34-10, beta 6; all visible GPUs
    python train_trades.py --dataset cifar10 --loss madry    # "Madry et al." / "Overfitting" rows
    python train_trades.py --dataset cifar10 --self-adaptive # "Self Adaptive" row (Huang et al.)
    torchrun --nproc_per_node=4 train_trades.py --dataset cifar10
    python train_trades.py --dataset cifar10 --norm l2       # L2 threat model (docs/threat-models.md)

Data, schedule, evaluation, checkpoints and the epoch loop live in fire_repro/training.py, shared
with train_fire.py, so the only difference from FIRE is the loss and the attack objective.
"""
import torch
import torch.nn.functional as F

from fire_repro import training
from fire_repro.training import Method, attack_pgd_ce, natural_ce, pgd_step, upcast_half


def get_args(argv=None):
    parser = training.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--loss", type=str, default="trades", choices=list(LOSSES),
                        help="training objective, an entry of LOSSES (the run folder and checkpoint record it)")
    parser.add_argument("--beta", type=float, default=6.0,
                        help=f"weight of the KL term for trades and mart, {training.allowed('beta')} (paper's comparison: 6)")
    training.add_self_adaptive_flags(parser, "Self Adaptive (Table 2), with --loss trades")
    return training.finish_args(parser, argv, LOSSES, "loss")


# ----------------------------------------------------------------------------------------------
# The losses


def kl_per_sample(logits_p, logits_q):
    """KL(p || q) between softmax(logits_p) and softmax(logits_q), summed over classes; shape (B,)."""
    log_p = F.log_softmax(upcast_half(logits_p), dim=1)
    log_q = F.log_softmax(upcast_half(logits_q), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def trades_loss(logits_nat, logits_adv, targets, beta, label_smoothing=0.0):
    """TRADES: CE on the natural logits + beta * KL(q_nat || q_adv) averaged over the batch.

    `targets` are labels (B,), or soft targets (B, M) for self-adaptive training (Huang et al.'s
    TRADES-based version; see training.natural_ce). --label-smoothing smooths the CE's labels, not
    the KL (Wang et al. 2023's TRADES)."""
    return natural_ce(logits_nat, targets, label_smoothing) + beta * kl_per_sample(logits_nat, logits_adv).mean()


def madry_loss(logits_adv, y, label_smoothing=0.0):
    """Adversarial cross-entropy, Eq. 4 (with --label-smoothing, against the smoothed labels)."""
    return F.cross_entropy(upcast_half(logits_adv), y, label_smoothing=label_smoothing)


def mart_loss(logits_nat, logits_adv, y, beta, label_smoothing=0.0):
    """MART: boosted CE on x' + beta * mean of KL(q_nat || q_adv) weighted by 1 - q_nat(y).

    Boosted CE = -log q'(y) - log(1 - max_{j != y} q'(j)) (the margin term pushes down the most
    likely wrong class). Probabilities come from log-softmax, so no 1e-12 fudge is needed.
    --label-smoothing smooths the labels of its CE term, -log q'(y), and leaves the margin term and
    the weight 1 - q_nat(y), which name the true class, as they are.
    """
    log_q_adv = F.log_softmax(upcast_half(logits_adv), dim=1)
    wrong = log_q_adv.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    ce = F.cross_entropy(upcast_half(logits_adv), y, label_smoothing=label_smoothing)
    boosted_ce = ce - torch.log1p(-wrong.exp()).mean()
    q_nat_y = F.softmax(upcast_half(logits_nat), dim=1).gather(1, y[:, None]).squeeze(1)
    return boosted_ce + beta * (kl_per_sample(logits_nat, logits_adv) * (1 - q_nat_y)).mean()


# ----------------------------------------------------------------------------------------------
# The attacks and the training step


def attack_trades(model, x, eps, step_size, steps, norm="linf"):
    """PGD in the `norm` eps-ball (attacks.pgd_step) maximising KL(q(.|x) || q(.|x')) from
    x + 0.001 * N(0, 1), as TRADES' code does in both norms; returns x'.

    The natural logits are computed once (TRADES' code recomputes them at every step: same
    result in eval mode, K extra forwards). Caller sets eval mode.
    """
    with torch.no_grad():
        logits_nat = model(x)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        objective = kl_per_sample(logits_nat, model(x_adv)).sum()
        grad, = torch.autograd.grad(objective, x_adv)
        x_adv = pgd_step(x_adv.detach(), grad, x, eps, step_size, norm)
    return x_adv.detach()


# Each method's training step (training.train runs it): x' by its attack, unless x_adv is given (AWP
# runs a step twice on the x' found once), then its loss. Returns (loss, logits for the training
# accuracy, x'); training.train does the backward pass and the SGD step. Every attack runs in eval
# mode: no dropout, BatchNorm uses its running statistics and does not update them.

def trades_step(args, model, attack_model, x, y, idx, soft_targets=None, x_adv=None):
    """TRADES: x' maximises the KL from x + 0.001 N(0, 1); CE on the natural logits + beta KL."""
    if x_adv is None:
        attack_model.eval()
        x_adv = attack_trades(attack_model, x, args.eps, args.step_size, args.attack_steps, args.norm)
    model.train()
    logits_nat, logits_adv = model(x), model(x_adv)
    # Self-adaptive training (Huang et al. 2020) replaces the labels by soft targets; same loss.
    targets = y if soft_targets is None else soft_targets.update(idx, logits_nat)
    return trades_loss(logits_nat, logits_adv, targets, args.beta, args.label_smoothing), logits_nat, x_adv


def madry_step(args, model, attack_model, x, y, idx, soft_targets=None, x_adv=None):
    """Madry et al.: x' maximises the CE from a uniform random start in the eps-ball; CE on x'."""
    if x_adv is None:
        attack_model.eval()
        x_adv = attack_pgd_ce(attack_model, x, y, args.eps, args.step_size, args.attack_steps, norm=args.norm)
    model.train()
    logits_adv = model(x_adv)
    return madry_loss(logits_adv, y, args.label_smoothing), logits_adv, x_adv


def mart_step(args, model, attack_model, x, y, idx, soft_targets=None, x_adv=None):
    """MART: x' maximises the CE from x + 0.001 N(0, 1) (MART's code); its loss on both logits."""
    if x_adv is None:
        attack_model.eval()
        x_adv = attack_pgd_ce(attack_model, x, y, args.eps, args.step_size, args.attack_steps,
                              start="normal", norm=args.norm)
    model.train()
    logits_nat, logits_adv = model(x), model(x_adv)
    return mart_loss(logits_nat, logits_adv, y, args.beta, args.label_smoothing), logits_nat, x_adv


# --loss: the method each objective's runs are (config.Method: run folder, table rows' title and order,
# the variant --self-adaptive trains) and its training step (fn).
LOSSES = {
    "trades": Method("trades", "TRADES", "beta", order=2, aux_title="RST-adv", fn=trades_step,  # Carmon et al.'s name with extra data
                     self_adaptive=Method("trades-sa", "Self Adaptive", "beta", order=1)),     # Table 2's name for it
    "madry": Method("madry", "Madry et al.", None, order=0, fn=madry_step,
                    # Table 2: its last epoch is "Madry et al.", its checkpoint chosen on validation
                    # robust accuracy (early stopping, Rice et al. 2020) "Overfitting"
                    checkpoint_rows=(("last", "Madry et al.", 0), ("best", "Overfitting (Madry, early stopping)", 5))),
    "mart": Method("mart", "MART", "beta", order=1, fn=mart_step),
}


def train_step(args, model, attack_model, x, y, idx, soft_targets=None, x_adv=None):
    """One step of --loss on a batch: its entry's step in LOSSES."""
    return LOSSES[args.loss].fn(args, model, attack_model, x, y, idx, soft_targets, x_adv)


def main(argv=None):
    args = get_args(argv)
    return training.train(args, train_step)


if __name__ == "__main__":
    training.cli(main)
