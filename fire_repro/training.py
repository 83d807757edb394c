"""The training loop shared by train_fire.py and train_trades.py.

A training script supplies its flags and one function,

    train_step(args, model, attack_model, x, y, idx, soft_targets, x_adv=None) -> (loss, logits, x_adv)

that runs its attack (unless x_adv is given: AWP runs the step twice on the x' found once) and its
loss, returning the loss, logits for the training accuracy and x' for the attack diagnostics;
`train(args, train_step)` does everything else, identically for every method, so a FIRE vs TRADES
comparison differs only in the loss and the attack objective. `model` is the network as the
training forward sees it (DataParallel / DDP / compiled) and `attack_model` the same weights
without gradient synchronisation, for the attack.

The other jobs live in files named for them: config.py (flags, presets, run identity), data.py
(data sets), attacks.py (the cross-entropy PGD and the evaluation), checkpoints.py (the checkpoint
format), run_folder.py (a run folder's life), parallel.py (devices, DDP / DataParallel), common.py
(errors, atomic files, locks).
"""
import copy
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from fire_repro.attacks import attack_pgd_ce, evaluate, perturbation_norm, pgd_step, upcast_half  # noqa: F401  (attack_pgd_ce, pgd_step: for the scripts)
from fire_repro.aux_data import load_aux_data
from fire_repro.checkpoints import (checkpoint_state, init_from, load_checkpoint, load_train_state, model_from_args,
                                    save_checkpoint)
from fire_repro.common import OnSignals, UserError, cli, write_atomic  # noqa: F401  (cli: the scripts' command line)
from fire_repro.config import (Method, add_self_adaptive_flags, allowed, base_parser, finish_args,  # noqa: F401  (for the scripts)
                               identity_hash, settings_warnings)
from fire_repro.data import DATASETS, REHEARSAL_NOTE, eval_loader, get_datasets, train_loader
from fire_repro.parallel import is_main, over_all_gpus, setup_device, training_networks
from fire_repro.run_folder import (claim_run_dir, finished_summary, resume_checkpoint, settle_replaced_run,
                        start_run_dir)


# ----------------------------------------------------------------------------------------------
# Pieces of the losses that every method shares


def natural_ce(logits, targets, label_smoothing=0.0):
    """The cross-entropy term of every risk: mean CE for integer labels (B,); for soft targets
    (B, M), self-adaptive training's CE (Huang et al. 2020), -sum_i w_i sum_j t_ij log q_ij / sum_i w_i
    with per-sample weight w_i = max_j t_ij (one-hot targets give the plain mean CE).

    --label-smoothing ls: the CE against (1 - ls) t + ls / M, i.e. (1 - ls) CE + ls mean_j(-log q_j),
    PyTorch's `F.cross_entropy(label_smoothing=ls)` and Wang et al. (2023)'s SmoothCrossEntropyLoss;
    soft targets are smoothed the same way, their weights w_i stay those of the unsmoothed targets."""
    if targets.dim() == 1:
        return F.cross_entropy(upcast_half(logits), targets, label_smoothing=label_smoothing)
    weights = targets.max(dim=1).values
    if label_smoothing:
        targets = (1 - label_smoothing) * targets + label_smoothing / targets.shape[1]
    ce = -(targets * F.log_softmax(upcast_half(logits), dim=1)).sum(dim=1)
    return (weights * ce).sum() / weights.sum()


class SelfAdaptiveTargets:
    """Soft targets t <- alpha t + (1 - alpha) softmax(f(x)), one row per training image, updated
    from epoch `start` (1-based) on; one-hot before. Saved in checkpoints, so resume is exact."""

    def __init__(self, labels, num_classes, alpha, start, device):
        self.targets = F.one_hot(labels, num_classes).float().to(device)
        self.alpha, self.start, self.epoch = alpha, start, 0
        self.writable = True

    def set_epoch(self, epoch):
        """The 0-based epoch being trained (as DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def update(self, idx, logits_nat):
        """Move the rows `idx` towards softmax(logits_nat) (from epoch `start` on) and return them."""
        idx = idx.to(self.targets.device)
        if self.epoch + 1 >= self.start:
            probs = F.softmax(upcast_half(logits_nat).detach(), dim=1)
            moved = self.alpha * self.targets[idx] + (1 - self.alpha) * probs
            if not self.writable:
                return moved
            self.targets[idx] = moved
        return self.targets[idx]

    def read_only(self):
        """The same targets, for a pass that must not move them (AWP's ascent pass): update()
        returns what it would set and writes nothing."""
        view = copy.copy(self)
        view.writable = False
        return view

    def state_dict(self):
        return {"targets": self.targets.cpu()}

    def load_state_dict(self, state):
        self.targets.copy_(state["targets"])


class Logger:
    """Prints and appends to <out-dir>/log.txt (main process only)."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "log.txt")

    def __call__(self, message):
        if is_main():
            tqdm.write(message)
            with open(self.path, "a") as f:
                f.write(message + "\n")


def lr_factor(args):
    """--lr's factor at epoch e (0-based; the schedule steps once per epoch)."""
    if args.schedule == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * e / args.epochs))
    if args.schedule == "onecycle":
        return lambda e: one_cycle(e, args.epochs)
    milestones = [round(m * args.epochs) for m in args.lr_milestones]
    return lambda e: 0.1 ** sum(e >= m for m in milestones)


def one_cycle(e, epochs, warmup=0.025, div=25.0, final_div=1e4):
    """PyTorch's OneCycleLR(max_lr=1, pct_start=warmup, total_steps=epochs) at step e, stepped once per
    epoch, as Wang et al. (2023)'s `--scheduler cosinew` trains: from 1/div, a half cosine up to 1 at
    epoch warmup * epochs, then a half cosine down to 1 / (div * final_div) at the last epoch (lr 0.2,
    400 epochs: 0.008 at epoch 1, 0.2 at epoch 10, 8e-7 at epoch 400). Their OneCycleLR also cycles
    SGD's momentum (0.95 -> 0.85 -> 0.95); here the momentum stays --momentum."""
    low, peak = 1 / div, warmup * epochs - 1  # the epoch (0-based) at which the factor is 1

    def cosine(start, end, share):
        return end + (start - end) / 2 * (math.cos(math.pi * share) + 1)
    if e <= peak:
        return cosine(low, 1.0, e / peak) if peak > 0 else 1.0
    return cosine(1.0, low / final_div, (e - peak) / (epochs - 1 - peak))



def sgd_update(loss, optimizer, scaler, clip=None):
    """Backward pass and optimiser step (the GradScaler is a no-op unless --dtype float16), with
    the gradient's global norm clipped to `clip` first when given (--clip-grad-norm; the true
    gradient: unscaled under float16). Returns the global gradient norm before clipping, on the
    device (scaled under float16 without clipping)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if clip is None:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        scaler.unscale_(optimizer)  # a no-op without float16
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()
    return grad_norm


BAD_QUANTITY = ("", "the natural logits", "the loss", "the gradient")


STAT_KEYS = ("loss", "ce", "train_nat", "images", "grad_norm", "attack_dist", "attack_stuck", "margin")


class EpochStats:
    """Per-epoch sums (STAT_KEYS) of the loss, the cross-entropy of the returned logits (natural,
    except Madry's adversarial ones; label-smoothed as the loss's, with --label-smoothing), correct predictions, images, the gradient norm, the training
    attack's displacement ||x' - x|| / eps in --norm, the samples it left stuck (displacement under one
    step: every step had a zero gradient, bar the 0.001 N(0, 1) start), the logit margin (top-1
    minus top-2: softmax saturates in float32 beyond ~17); the largest gradient norm; the first
    non-finite batch and what was non-finite in it (BAD_QUANTITY); with --clip-grad-norm, the
    steps it clipped. Kept on the device: the loop syncs with the host every --log-every batches."""

    def __init__(self, device, eps, step_size, check_grad=True, clip=None, norm="linf", label_smoothing=0.0):
        self.eps, self.step_size, self.norm = eps, step_size, norm  # the training attack's, for its displacement
        self.label_smoothing = label_smoothing  # the loss's CE term, so that `reg` = loss - ce stays the rest
        self.clip = clip  # --clip-grad-norm: count the steps whose gradient norm was above it
        self.clipped = torch.zeros((), device=device)
        self.sums = torch.zeros(len(STAT_KEYS), device=device)
        self.grad_max = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, device=device)
        self.bad_kind = torch.zeros((), dtype=torch.long, device=device)
        self.check_grad = check_grad  # float16: the GradScaler skips non-finite gradients itself
        self.batches = 0

    def add(self, loss, logits, y, grad_norm, x, x_adv):
        loss, logits = loss.detach(), upcast_half(logits.detach())
        kind = torch.where(~torch.isfinite(logits).all(), 1, torch.where(~torch.isfinite(loss), 2, 0))
        if self.check_grad:
            kind = torch.where((kind == 0) & ~torch.isfinite(grad_norm), 3, kind)
        new_bad = (self.first_bad < 0) & (kind > 0)
        self.first_bad = torch.where(new_bad, self.batches, self.first_bad)
        self.bad_kind = torch.where(new_bad, kind, self.bad_kind)
        n = len(y)
        correct = (logits.argmax(1) == y).sum().float()
        moved = perturbation_norm(x_adv.detach() - x, self.norm).float()
        top2 = logits.topk(min(2, logits.shape[1]), dim=1).values
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.sums += torch.stack([loss * n, ce * n, correct,
                                  torch.ones_like(loss) * n, grad_norm.detach() * n,
                                  moved.sum() / max(self.eps, 1e-12),
                                  (moved < self.step_size).sum().float(),
                                  (top2[:, 0] - top2[:, -1]).sum()])
        self.grad_max = torch.maximum(self.grad_max, grad_norm.detach())
        if self.clip is not None:
            self.clipped += grad_norm.detach() > self.clip
        self.batches += 1

    def check_finite(self, epoch):
        """Raise UserError naming the first non-finite quantity (one host-device sync)."""
        if self.first_bad.item() >= 0:
            raise UserError(f"{BAD_QUANTITY[self.bad_kind.item()]} became NaN or infinite at epoch "
                            f"{epoch + 1}, batch {self.first_bad.item() + 1}: lower --lr or check the data")


def robustness_collapsed(val_pgds, patience=2):
    """The collapse alarm, on the validation PGD accuracies so far (this epoch's last): the last
    `patience` epochs all below half the best before them, once that best has reached 0.2. Set
    from measured runs (docs/mnist5k-stability.md): in 26 mnist5k runs on a GPU, the five collapses fell
    from 0.51-0.87 to 0.01-0.10 and stayed below half their best for 4 to 29 epochs, while the
    one-epoch dips that recovered (0.84 -> 0.37 -> 0.85, 0.73 -> 0.08 -> 0.83) never lasted two."""
    if len(val_pgds) <= patience:
        return False
    best = max(val_pgds[:-patience])
    return best >= 0.2 and all(v < 0.5 * best for v in val_pgds[-patience:])



# ----------------------------------------------------------------------------------------------
# The training loop: train(args, train_step) and its steps, in the order they run


class WeightPerturbation:
    """Adversarial weight perturbation (AWP; Wu, Xia & Wang, "Adversarial Weight Perturbation Helps
    Robust Generalization", NeurIPS 2020), for any method's loss.

    perturb(): the ascent pass. The script's train_step runs once at the weights w (its attack finds
    x'), and every conv/linear weight (dimension > 1; not biases, BatchNorm or normalisation)
    moves by v = gamma * ||w|| * g / ||g||, layer by layer, g the gradient of the method's loss.
    The training step then takes its gradient at w + v on the same x', and restore() subtracts v
    after the optimiser step, so the weights become w + (the SGD update computed at w + v).
    The pass leaves BatchNorm's running statistics and the self-adaptive targets as they were,
    takes its gradient without DDP's hooks (on the network without synchronisation; the ranks'
    gradients are summed here) and outside the GradScaler's bookkeeping (each layer's direction is
    normalised, so the loss scale only keeps float16 gradients from underflowing)."""

    def __init__(self, model, gamma):
        self.model, self.gamma = model, gamma
        self.weights = [p for p in model.parameters() if p.dim() > 1]
        self.v = None

    def perturb(self, train_step, args, net, x, y, idx, soft_targets, scaler):
        """w += v; returns x' (found at w) for the training step."""
        running = [b.clone() for b in self.model.buffers()]  # BatchNorm statistics
        targets = None if soft_targets is None else soft_targets.read_only()
        loss, _, x_adv = train_step(args, net, net, x, y, idx, targets)
        grads = torch.autograd.grad(scaler.scale(loss), self.weights)
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), running):
                b.copy_(saved)
            if dist.is_initialized():  # the whole batch's direction: sum the ranks' gradients
                flat = torch.cat([g.flatten() for g in grads])
                dist.all_reduce(flat)
                grads = [g.view_as(w) for g, w in zip(flat.split([w.numel() for w in self.weights]),
                                                       self.weights)]
            w_norms, g_norms = torch._foreach_norm(self.weights), torch._foreach_norm(grads)
            ok = torch.isfinite(torch.stack(g_norms)).all()  # float16 overflow: no perturbation this step
            self.v = [torch.where(ok, self.gamma * w_norm / (g_norm + 1e-20) * g, 0.0)
                      for g, w_norm, g_norm in zip(grads, w_norms, g_norms)]
            torch._foreach_add_(self.weights, self.v)
        return x_adv

    def restore(self):
        with torch.no_grad():
            torch._foreach_sub_(self.weights, self.v)
        self.v = None


class TrainState:
    """Everything a training carries from epoch to epoch (checkpoints.checkpoint_state writes it,
    checkpoints.load_train_state reads it back): the model, its optimiser, schedule, gradient scaler, AWP,
    the weight average, the self-adaptive targets, the epoch, the best validation accuracy, time
    and history."""

    def __init__(self, args, model, soft_targets, device):
        self.model, self.soft_targets = model, soft_targets
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay, nesterov=True,
                                         fused=device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(args))
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
        self.awp = WeightPerturbation(model, args.awp_gamma) if args.awp_gamma > 0 else None
        self.ema = None  # --ema: the averaged copy (parameters and BatchNorm buffers), kept on the model's device
        if args.ema is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
        self.epoch, self.best, self.best_epoch, self.train_time, self.history = 0, -1.0, 0, 0.0, []

    def step(self, args, train_step, nets, x, y, idx, epoch):
        """One training step on a batch in `epoch` (0-based): AWP's ascent pass (from
        --awp-warmup on), the script's train_step, the SGD update (clipped with --clip-grad-norm),
        AWP's restore, the average's update (--ema; before --ema-start it restarts at the model).
        `nets`: parallel.Networks (train, attack). Returns (loss, logits, x', the
        gradient norm)."""
        train_model, attack_model = nets
        awp = self.awp if self.awp is not None and epoch + 1 >= args.awp_warmup else None
        x_adv = None
        with autocast(args.dtype, x.device):
            if awp is not None:
                x_adv = awp.perturb(train_step, args, attack_model, x, y, idx, self.soft_targets, self.scaler)
            loss, logits, x_adv = train_step(args, train_model, attack_model, x, y, idx, self.soft_targets, x_adv)
        grad_norm = sgd_update(loss, self.optimizer, self.scaler, args.clip_grad_norm)
        if awp is not None:
            awp.restore()
        if self.ema is not None:
            if epoch + 1 < args.ema_start:
                self.ema.n_averaged.zero_()  # the next update copies the model
            self.ema.update_parameters(self.model)
        return loss, logits, x_adv, grad_norm

    def evaluated_model(self):
        """The network that validation, best.pt and the test evaluate: the average with --ema."""
        return self.model if self.ema is None else self.ema.module


def eval_network(state, nets, device):
    """The network validation and the test run through: the attack's view of the model (under
    torchrun the unwrapped model: every rank evaluates everything), or with --ema the average,
    over all visible GPUs of one process."""
    if state.ema is None:
        return state.model if dist.is_initialized() else nets.attack
    return over_all_gpus(state.ema.module, device)


def autocast(dtype, device):
    """torch.autocast for --dtype bfloat16/float16; nothing for float32."""
    return torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()


class StopSignals(OnSignals):
    """SLURM stops a job with SIGTERM (preemption, `scontrol requeue`) or with the signal asked for
    by `sbatch --signal` (run_all.sh: SIGUSR1 before the time limit). Inside `with StopSignals()`
    either stops the training at once as Ctrl-C does (exit 130; --resume auto continues), except
    inside `held()` (an epoch's commit), whose end it waits for. The previous handlers come back on exit.
    A flag rather than pthread_sigmask: a mask set in the main thread does not hold a signal
    delivered to another thread."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.holding, self.pending = False, None

    def stop(self, signum, frame):
        if self.holding:
            self.pending = signum
        else:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            self.stop(self.pending, None)


def train(args, train_step):
    """Train with the script's `train_step(args, model, attack_model, x, y, idx, soft_targets,
    x_adv=None) -> (loss, logits, x_adv)` (a given x_adv skips the attack), choose the checkpoint
    on validation PGD accuracy, report test accuracy. Returns the summary dict (also written to
    <out-dir>/summary.json). A finished run given again with --resume is left as it is (one line;
    its summary is returned). With --print-identity, prints the run's identity hash and returns None.

    First, one warning line for each setting that changes nothing in this run (config.settings_warnings)."""
    if is_main():
        for line in settings_warnings(vars(args)):
            print(f"{os.path.basename(sys.argv[0])}: warning: {line}", file=sys.stderr, flush=True)
    if args.print_identity:
        print(identity_hash(vars(args)))
        return None
    device = setup_device(args)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: cuDNN's autotuning pays off
    lock = claim_run_dir(args)
    try:
        ckpt = resume_checkpoint(args) if args.resume else None
        summary = finished_summary(args, ckpt)
        if summary is None:
            with StopSignals() as signals:
                summary = train_and_test(args, train_step, device, ckpt, signals)
    except BaseException as e:
        if lock is not None:  # a new run that stops before its first commit gives the old one back
            settle_replaced_run(args.out_dir)
        if isinstance(e, KeyboardInterrupt) and is_main():
            print(f"\n{args.out_dir}: stopped (Ctrl-C or a stop signal); every committed epoch is in "
                  f"last.pt: the same command with --resume auto continues it", file=sys.stderr, flush=True)
        raise
    finally:
        if lock is not None:
            lock.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def train_and_test(args, train_step, device, ckpt, signals):
    """The run from its start, or from `ckpt` (a checked --resume checkpoint), to --epochs, each
    epoch committed (a stop signal waits for the commit's end), then the test of best.pt. Returns
    the summary (written to summary.json)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_set, val_set, test_set = get_datasets(args)
    if args.aux_data:
        train_set = torch.utils.data.ConcatDataset([train_set, load_aux_data(args, train_set)])
    state = new_train_state(args, train_set, device)
    if ckpt is not None:
        load_train_state(state, ckpt, args.resume, device, lr_factor(args))
    if is_main():  # every input is checked: only now may an old run's files go (--overwrite)
        start_run_dir(args, ckpt)
    log = Logger(args.out_dir)
    log(json.dumps(vars(args), sort_keys=True))
    log(f"{len(train_set)} train / {len(val_set)} val / {len(test_set)} test images, "
        f"{sum(p.numel() for p in state.model.parameters()):,} parameters, device {device}")
    horizon = ema_horizon_warning(args, len(train_loader(train_set, args, 0, device)))
    if horizon:
        log(f"warning: {horizon}")

    nets = training_networks(state.model, args, device)
    eval_model = eval_network(state, nets, device)
    val_loader = eval_loader(val_set, args, device)
    for epoch in range(state.epoch, args.epochs):
        t0 = time.time()
        lr = state.optimizer.param_groups[0]["lr"]  # this epoch's learning rate
        stats = train_epoch(state, args, train_step, nets, train_set, epoch, device)
        epoch_time = time.time() - t0
        val_nat, val_pgd = evaluate(eval_model, val_loader, args.eps, args.eval_steps, device, args.norm)
        record = epoch_record(state, stats, epoch, lr, val_nat, val_pgd, epoch_time)
        log(epoch_line(record, args, state))
        with signals.held():
            commit_epoch(state, args, record, log)
        if record["collapsed"] and args.stop_on_collapse:
            raise UserError(f"stopped at epoch {epoch + 1} (--stop-on-collapse): validation PGD accuracy "
                            f"{val_pgd:.4f} has been below half its best, {state.best:.4f} at epoch "
                            f"{state.best_epoch}, for 2 epochs; best.pt is kept (at high lr this is usually "
                            f"an optimisation blow-up: try --clip-grad-norm 5 or a lower --lr; docs/modern-recipe.md)")
    summary = final_test(state, args, eval_model, test_set, device)
    if args.rehearsal:
        summary["rehearsal"] = REHEARSAL_NOTE
    if is_main():
        write_atomic(os.path.join(args.out_dir, "summary.json"), lambda f: json.dump(summary, f, indent=1))
        log(json.dumps(summary))
    return summary



EMA_HORIZON_SHARE = 0.2  # an average whose horizon is more of the run than this is mostly its start
EMA_SUGGESTED_SHARE = 0.1  # the horizon suggested instead (docs/modern-recipe.md measures it)


def ema_horizon_warning(args, steps_per_epoch):
    """The warning line for an --ema whose horizon, 1 / (1 - decay) steps, is more than
    EMA_HORIZON_SHARE of the steps it averages (from --ema-start to --epochs), naming the decay of
    a horizon of EMA_SUGGESTED_SHARE of them; None when it is short enough or there is no --ema."""
    steps = steps_per_epoch * max(args.epochs - args.ema_start + 1, 0)
    if args.ema is None or steps == 0:  # (an --ema-start past --epochs: config.settings_warnings)
        return None
    horizon = 1 / (1 - args.ema)
    if horizon <= EMA_HORIZON_SHARE * steps:
        return None
    suggested = 1 - 1 / max(EMA_SUGGESTED_SHARE * steps, 1)
    return (f"--ema {args.ema:g} averages over about {horizon:,.0f} steps, {horizon / max(steps, 1):.0%} of "
            f"the {steps:,} steps it sees: the average is mostly the early model (--ema {suggested:.3g} "
            f"averages over {EMA_SUGGESTED_SHARE:.0%} of them; docs/modern-recipe.md)")


def new_train_state(args, train_set, device):
    """The model (from --init-from's weights when given, unless resuming), its optimiser, schedule,
    gradient scaler and the self-adaptive targets, as at the start of epoch 1."""
    model = model_from_args(vars(args)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not args.resume:  # a resumed run keeps its checkpoint's record (resume_checkpoint)
        args.init_from_sha256 = args.pretrain_time_s = None
        if args.init_from:  # another run's weights
            init_from(model, args)
    soft_targets = None
    if getattr(args, "self_adaptive", False):
        soft_targets = SelfAdaptiveTargets(train_set.labels(), DATASETS[args.dataset].classes,
                                           args.sa_alpha, args.sa_start, device)
    return TrainState(args, model, soft_targets, device)



def train_epoch(state, args, train_step, nets, train_set, epoch, device):
    """One pass over the training set: TrainState.step (the script's train_step, then the SGD step) on
    every batch. Returns the epoch's EpochStats (summed over processes under torchrun)."""
    loader = train_loader(train_set, args, epoch, device)
    if state.soft_targets is not None:
        state.soft_targets.set_epoch(epoch)
    stats = EpochStats(device, args.eps, args.step_size, check_grad=args.dtype != "float16",
                       clip=args.clip_grad_norm, norm=args.norm, label_smoothing=args.label_smoothing)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
               disable=None if is_main() else True)
    for i, (x, y, idx) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, logits, x_adv, grad_norm = state.step(args, train_step, nets, x, y, idx, epoch)
        stats.add(loss, logits, y, grad_norm, x, x_adv)
        if (i + 1) % args.log_every == 0 or i + 1 == len(loader):
            stats.check_finite(epoch)  # the only host-device sync, once per log_every batches
            bar.set_postfix(loss=f"{(stats.sums[0] / stats.sums[3]).item():.4f}")
    state.scheduler.step()
    if dist.is_initialized():  # (gradients, hence clipping, are the same on every rank)
        dist.all_reduce(stats.sums)
        dist.all_reduce(stats.grad_max, op=dist.ReduceOp.MAX)
    return stats


def epoch_record(state, stats, epoch, lr, val_nat, val_pgd, epoch_time):
    """The epoch's metrics.jsonl record; updates the run's epoch, best accuracy, time and history."""
    collapsed = robustness_collapsed([r["val_pgd"] for r in state.history] + [val_pgd])
    is_best = val_pgd > state.best
    state.best = max(state.best, val_pgd)
    means = dict(zip(STAT_KEYS, (stats.sums / stats.sums[3]).tolist()))
    del means["images"]
    weight_norm = torch.nn.utils.get_total_norm([p.detach() for p in state.model.parameters()]).item()
    record = dict(epoch=epoch + 1, lr=lr, **means, reg=means["loss"] - means["ce"],
                  val_nat=val_nat, val_pgd=val_pgd, grad_norm_max=stats.grad_max.item(),
                  weight_norm=weight_norm, epoch_time_s=epoch_time, best=is_best, collapsed=collapsed)
    if stats.clip is not None:  # --clip-grad-norm: the share of this epoch's steps it clipped
        record["clipped"] = stats.clipped.item() / max(stats.batches, 1)
    state.epoch, state.train_time = epoch + 1, state.train_time + epoch_time
    state.history.append(record)
    return record


def epoch_line(record, args, state):
    """The epoch's line of the console and log.txt."""
    clipped = f"clipped {record['clipped']:.0%} | " if "clipped" in record else ""
    return (f"epoch {record['epoch']:3d} | lr {record['lr']:.4g} | loss {record['loss']:.4f} | "
            f"reg {record['reg']:.4f} | attack moved {record['attack_dist']:.2f} eps, "
            f"stuck {record['attack_stuck']:.3f} | |grad| {record['grad_norm']:.3g} | {clipped}"
            f"train nat {record['train_nat']:.4f} | val nat {record['val_nat']:.4f} | val PGD-"
            f"{args.eval_steps} {record['val_pgd']:.4f}{' *' if record['best'] else ''} | "
            f"{record['epoch_time_s']:.1f}s"
            + (f" | ROBUSTNESS COLLAPSE: val PGD below half its best ({state.best:.4f}, epoch "
               f"{state.best_epoch}) for 2 epochs" if record["collapsed"] else ""))


def commit_epoch(state, args, record, log):
    """Write the epoch (main process): its metrics.jsonl record, then last.pt, the commit point
    (a kill after it is repaired on resume by start_run_dir, one before it repeats the epoch),
    then best.pt when the epoch is the best."""
    if not is_main():
        return
    with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if record["best"]:
        state.best_epoch = record["epoch"]
    ckpt = checkpoint_state(state, args, log_bytes=os.path.getsize(log.path))
    save_checkpoint(ckpt, os.path.join(args.out_dir, "last.pt"))
    settle_replaced_run(args.out_dir)  # the first commit: an old run set aside by --overwrite goes
    if record["best"]:
        save_checkpoint(ckpt, os.path.join(args.out_dir, "best.pt"))


def final_test(state, args, eval_model, test_set, device):
    """The test-split natural and PGD accuracy of best.pt (chosen on validation; with --ema the
    average, and `ema` says so), as the summary."""
    if dist.is_initialized():
        dist.barrier()
    best_ckpt = load_checkpoint(os.path.join(args.out_dir, "best.pt"), resuming=True)
    state.evaluated_model().load_state_dict(best_ckpt["model"])  # with --ema, the average
    test_nat, test_pgd = evaluate(eval_model, eval_loader(test_set, args, device), args.eps,
                                  args.eval_steps, device, args.norm)
    weight = {args.method_weight: getattr(args, args.method_weight)} if args.method_weight else {}
    return dict(method=args.method, method_title=args.method_title, method_weight=args.method_weight, **weight,
                dataset=args.dataset, model=args.model, norm=args.norm, eps=args.eps, aux_data=args.aux_data, seed=args.seed, epochs=args.epochs, best_epoch=best_ckpt["epoch"],
                val_nat=best_ckpt["history"][-1]["val_nat"], val_pgd=best_ckpt["best_val_pgd"],
                test_nat=test_nat, test_pgd=test_pgd, eval_steps=args.eval_steps, ema=args.ema,
                collapsed=any(r.get("collapsed", False) for r in state.history),
                train_time_s=state.train_time, out_dir=args.out_dir, init_from=args.init_from,
                pretrain_time_s=args.pretrain_time_s)
