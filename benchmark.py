"""Time FIRE and TRADES training steps against the floor of the passes a training step cannot avoid.

Commands:
    python benchmark.py                                   # SmallCNN, 1x28x28, batch 128, 10 attack steps, CPU
    python benchmark.py --autoattack 200 --checkpoint runs/fire-digits-s0/best.pt   # AutoAttack images/s
    python benchmark.py --autoattack 500 --dataset cifar10 --device cuda   # a fresh WRN-34-10, projected 10,000 images
    python benchmark.py --sweep                           # + step cost over attack steps and batch sizes
    python benchmark.py --model resnet18 --shape 3 32 32 --batch-size 32 --reps 10
    python benchmark.py --norm l2                         # L2 steps, and FIRE / FIRE-Linf in the same rounds
    python benchmark.py --dataset cifar10 --device cuda --batch-size 256 --dtype bfloat16 \
        --channels-last --json-out bench-bf16.json        # the paper's WRN-34-10 on one GPU
    python benchmark.py --dataset cifar10 --device cuda --batch-size 256 --dtype bfloat16 \
        --channels-last --compile --compile-mode reduce-overhead   # + torch.compile with CUDA graphs

Each timed step is the training loop's own step (training.TrainState.step: the script's train_step,
the SGD update, training.EpochStats) on one fixed synthetic batch on the device (data loading is not
timed), with training's CUDA settings (cudnn.benchmark, fused SGD). The floor is the same network work
and nothing else: one forward without gradients, K forwards each with a backward to the input only,
the natural and adversarial training forwards, one backward and an SGD step at lr 0. TRADES-public
recomputes the natural forward at every attack step, as TRADES' public code does; FIRE+AWP and
FIRE+EMA add adversarial weight perturbation (gamma 0.005) and the weight average (decay 0.999). All
share one model and run in interleaved repetitions (their order rotates) in one process; the figures
are medians, and the floor's FLOPs (torch.utils.flop_counter) over its median time give its TFLOP/s.
Details and measurements: docs/performance.md.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import check_model_name, get_model
import train_fire
import train_trades
from fire_repro.autoattack import TEST_SET_SIZE, threat_model, time_autoattack
from fire_repro.checkpoints import load_checkpoint, load_model
from fire_repro.common import ArgumentParser, Range, UserError, check_output, check_ranges, cli, fmt_hours, write_json
from fire_repro.attacks import NORMS
from fire_repro.config import L2_RANGES, TRAIN_RANGES
from fire_repro.data import DATASETS, dataset_shape, first_images, split_of
from fire_repro.training import EpochStats, TrainState
from fire_repro.parallel import Networks
from train_fire import fire_loss
from train_trades import trades_loss

STEPS = ("floor", "FIRE", "TRADES", "TRADES-public")  # TRADES-public: natural forward at every attack step
# The FIRE step with the recipe of docs/modern-recipe.md, as training.train runs it: adversarial weight
# perturbation (gamma 0.005, Wu et al.'s) and the weight average (decay 0.999).
RECIPE_STEPS = ("FIRE+AWP", "FIRE+EMA")
RECIPE = {"FIRE+AWP": dict(awp_gamma=0.005), "FIRE+EMA": dict(ema=0.999)}
# wall: elapsed time. cpu: CPU seconds of this process (all its threads), which do not count the
# time other processes hold the cores: steadier on a shared machine, and meaningless on a GPU.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PROG = "benchmark.py"
# The ranges of the numeric flags, the one place they are written (the help texts quote them): the
# training scripts' for the flags they share, and bounds that keep one step within a machine.
RANGES = {**{k: TRAIN_RANGES[k] for k in ("batch_size", "attack_steps", "eps", "step_size", "lr", "lam",
                                          "beta", "seed")},
          "shape": Range(1, 1024), "num_classes": Range(2, 100_000), "threads": Range(0, os.cpu_count() or 1),
          "reps": Range(1, 10_000), "warmup": Range(0, 1000), "sweep_steps": TRAIN_RANGES["attack_steps"],
          "sweep_batch_sizes": TRAIN_RANGES["batch_size"], "sweep_reps": Range(1, 1000),
          "autoattack": Range(1, 10**6), "aa_batch_size": Range(1, 65_536)}


def get_args(argv=None):
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=str, default="mnist", choices=list(DATASETS),
                   help="preset of model, image shape, classes, normalisation, eps, step size and lr "
                        "(the training scripts' presets); batch size and attack steps are this "
                        "script's own defaults, 128 and 10, whatever the data set")
    p.add_argument("--model", type=str, default=None, help="smallcnn | resnet18 | wrn-D-W (default: preset)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help=f"image shape of the synthetic batch, each {RANGES['shape']} and fit for the "
                        f"model (default: the data set's; SmallCNN takes 28x28 only)")
    p.add_argument("--num-classes", type=int, default=None,
                   help=f"classes, {RANGES['num_classes']} (default: the data set's)")
    p.add_argument("--batch-size", type=int, default=128, help=f"images per training step, {RANGES['batch_size']}")
    p.add_argument("--attack-steps", type=int, default=10,
                   help=f"PGD steps K per training step, {RANGES['attack_steps']}")
    p.add_argument("--norm", type=str, default=None, choices=list(NORMS),
                   help="threat model of the FIRE and TRADES steps, default linf (--norm l2: the data set's L2 "
                        "preset, and the Linf FIRE step, FIRE-Linf, timed in the same rounds); with "
                        "--checkpoint, default its own")
    p.add_argument("--eps", type=float, default=None,
                   help=f"radius in --norm in pixel units, {RANGES['eps']} ({L2_RANGES['eps']} with --norm l2; "
                        f"default: preset)")
    p.add_argument("--step-size", type=float, default=None,
                   help=f"PGD step size, {RANGES['step_size']} (default: preset)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate of the timed SGD steps, {RANGES['lr']} (default: preset)")
    p.add_argument("--lam", type=float, default=12.0, help=f"FIRE's weight of d^2 (Eq. 7), {RANGES['lam']}")
    p.add_argument("--beta", type=float, default=6.0, help=f"TRADES' weight of the KL, {RANGES['beta']}")
    p.add_argument("--dtype", type=str, default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast precision of the forwards, as in training (GradScaler for float16)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels-last memory layout of the model and the batch")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (compilation happens in the warm-up repetitions)")
    p.add_argument("--compile-mode", type=str, default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode, with --compile (reduce-overhead and max-autotune use CUDA "
                        "graphs on a GPU; the training scripts compile with the default)")
    p.add_argument("--fused-sgd", action=argparse.BooleanOptionalAction, default=True,
                   help="fused SGD step on CUDA, as training runs it (--no-fused-sgd: torch's default, "
                        "foreach); no effect on the CPU")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.backends.cudnn.benchmark on CUDA (cuDNN picks the fastest convolutions for "
                        "the fixed shapes in the warm-up), as training runs it; no effect on the CPU")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA when available, else CPU")
    p.add_argument("--threads", type=int, default=0,
                   help=f"CPU threads for torch, {RANGES['threads']} (0: torch's default; at most this "
                        f"machine's cores). On a CPU shared with other jobs use 1: torch's threads wait "
                        f"for each other whenever one loses its core")
    p.add_argument("--clock", type=str, default="wall", choices=sorted(CLOCKS),
                   help="wall = elapsed time; cpu = CPU time of this process (CPU device only: does not "
                        "count time the cores spend on other processes)")
    p.add_argument("--reps", type=int, default=20, help=f"timed repetitions of each step, {RANGES['reps']}")
    p.add_argument("--warmup", type=int, default=3,
                   help=f"untimed repetitions of each step first, {RANGES['warmup']} (allocator, cuDNN "
                        f"autotuning, compile)")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed of the weights and of the synthetic batch, {RANGES['seed']}")
    p.add_argument("--sweep", action="store_true",
                   help="also print a table of step cost over --sweep-steps x --sweep-batch-sizes")
    p.add_argument("--sweep-steps", type=int, nargs="+", default=[0, 1, 5, 10],
                   help=f"attack steps of the sweep, each {RANGES['sweep_steps']}")
    p.add_argument("--sweep-batch-sizes", type=int, nargs="+", default=[32, 128, 256],
                   help=f"batch sizes of the sweep, each {RANGES['sweep_batch_sizes']}")
    p.add_argument("--sweep-reps", type=int, default=7,
                   help=f"timed repetitions per sweep cell, {RANGES['sweep_reps']}")
    p.add_argument("--json-out", type=str, default=None,
                   help="also write every figure to this JSON file (its folder must exist and be writable)")
    g = p.add_argument_group("AutoAttack throughput (instead of the training step)")
    g.add_argument("--autoattack", type=int, default=None, metavar="N",
                   help=f"time the standard AutoAttack on N images, N {RANGES['autoattack']}: images/s and the "
                        f"projected time for 10,000 test images. On the first N images of --checkpoint's "
                        f"split, or on random images of --dataset's shape labelled by the predictions of a "
                        f"freshly initialised --model (every image attacked: an upper bound)")
    g.add_argument("--checkpoint", type=str, default=None,
                   help="with --autoattack: a checkpoint of train_fire.py or train_trades.py, timed at its own "
                        "threat model (--norm, --eps override it) on its test images")
    g.add_argument("--aa-batch-size", type=int, default=500,
                   help=f"images per AutoAttack batch, {RANGES['aa_batch_size']} (eval_autoattack.py's --batch-size)")
    g.add_argument("--smoke-aa", action="store_true",
                   help="time the reduced AutoAttack of eval_autoattack.py --smoke-aa instead of the standard one")
    args = p.parse_args(argv)

    dataset = DATASETS[args.dataset]
    args.norm_given, args.norm = args.norm, args.norm or "linf"
    linf_preset = dataset.training_preset()
    preset = dataset.training_preset(args.norm)
    args.linf_eps, args.linf_step_size = linf_preset["eps"], linf_preset["step_size"]  # FIRE-Linf's
    num_classes, channels, mean, std = dataset_shape(args.dataset)
    args.model = args.model or preset["model"]
    args.shape = args.shape or list(DATASETS[args.dataset].shape)
    args.num_classes = num_classes if args.num_classes is None else args.num_classes
    # The preset's normalisation only fits the preset's channel count.
    args.mean, args.std = (mean, std) if args.shape[0] == channels else (None, None)
    if args.norm == "l2" and "eps" not in dataset.l2_preset and (args.eps is None or args.step_size is None):
        p.error(f"--norm l2 has no preset for {args.dataset}: give --eps and --step-size")
    args.eps_given = args.eps is not None
    for key in ("eps", "step_size", "lr"):  # an explicit flag overrides the preset
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.checkpoint is not None and args.autoattack is None:
        p.error("--checkpoint goes with --autoattack N")
    check_ranges(p, args, dict(RANGES, **(L2_RANGES if args.norm == "l2" else {})))
    if args.compile_mode != "default" and not args.compile:
        p.error(f"--compile-mode {args.compile_mode} needs --compile")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    if not (args.clock == "wall" or args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())):
        p.error("--clock cpu measures the CPU only: use it with --device cpu")
    try:
        check_model_name(args.model)  # the name only: the shape is checked on the built model (Bench)
    except ValueError as e:
        p.error(f"--model: {e}")
    return args


# ----------------------------------------------------------------------------------------------
# The three steps


class Bench:
    """One model, its SGD optimiser and one synthetic batch; `steps(K)` gives the step closures."""

    def __init__(self, args, batch_size, device):
        self.args, self.device = args, device
        gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        if device.type == "cuda":  # as training.train sets it: fixed shapes, so autotuning pays off
            torch.backends.cudnn.benchmark = args.cudnn_benchmark
        model = get_model(args.model, args.num_classes, args.shape[0], args.mean, args.std).to(device)
        check_shape(model, args, device)
        self.x = torch.rand(batch_size, *args.shape, generator=gen).to(device)
        self.y = torch.randint(args.num_classes, (batch_size,), generator=gen).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.model = model
        self.fwd = torch.compile(model, mode=args.compile_mode) if args.compile else model
        # training.train's optimiser: fused on CUDA. fused=None (not False) keeps torch's default,
        # foreach on CUDA, for --no-fused-sgd; on the CPU both are torch's default (neither).
        self.fused = True if device.type == "cuda" and args.fused_sgd else None
        sgd = dict(momentum=0.9, weight_decay=5e-4, nesterov=True, fused=self.fused)
        # The training loop's step (training.TrainState.step) on the shared model: plain, with AWP, with the average
        self.runs = {name: self.training_run(**RECIPE.get(name, {})) for name in ("FIRE", *RECIPE_STEPS)}
        # The floor's optimiser does an SGD step's work (weight decay, momentum, update) at lr 0.
        self.floor_optimizer = torch.optim.SGD(model.parameters(), lr=0.0, **sgd)
        self.amp = (torch.autocast(device.type, dtype=getattr(torch, args.dtype))
                    if args.dtype != "float32" else nullcontext())
        # the training loop's per-step statistics, on the device
        self.stats = EpochStats(device, args.eps, args.step_size, norm=args.norm)

    def training_run(self, awp_gamma=0.0, ema=None):
        """A training.TrainState on the shared model: training's SGD (Nesterov, momentum 0.9, weight decay
        5e-4, fused as --fused-sgd says), gradient scaler and, when asked, AWP and the average."""
        a = self.args
        spec = argparse.Namespace(lr=a.lr, momentum=0.9, weight_decay=5e-4, dtype=a.dtype, schedule="step",
                                  epochs=1, lr_milestones=[1.0], awp_gamma=awp_gamma, ema=ema)
        state = TrainState(spec, self.model, None, self.device)
        for group in state.optimizer.param_groups:
            group["fused"] = self.fused
        return state

    def train_step(self, script, method_args, attack_model=None, run="FIRE"):
        """One step of the training loop (training.train): TrainState.step (AWP's ascent pass, the script's
        train_step under autocast, the SGD update, the average's update) and the on-device
        statistics. Returns the (detached) loss."""
        loss, logits, x_adv, grad_norm = self.runs[run].step(
            method_args, script.train_step, Networks(self.fwd, attack_model or self.fwd), self.x, self.y, None, epoch=0)
        self.stats.add(loss, logits, self.y, grad_norm, self.x, x_adv)
        return loss.detach()

    def floor_step(self, steps, fwd=None):
        """The network passes of a training step and nothing else (see the module docstring);
        `fwd` replaces the (possibly compiled) model, as floor_flops does."""
        model, fwd, x = self.model, fwd or self.fwd, self.x
        model.eval()
        with self.amp:
            with torch.no_grad():
                fwd(x)
            x_in = x.detach().requires_grad_(True)
            for _ in range(steps):
                torch.autograd.grad(fwd(x_in).sum(), x_in)
        model.train()
        with self.amp:
            loss = fwd(x).sum() + fwd(x_in.detach()).sum()
        self.floor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.floor_optimizer.step()

    def floor_flops(self, steps):
        """FLOPs of one floor step as torch's FlopCounterMode counts them: convolutions and matrix
        products (2 per multiply-add), forward and backward (a backward to the input only counts
        only that). Run once, on the eager model (compiled code does the same products). The
        model sees a view of its input: FlopCounterMode's module hooks fail on autograd.grad with
        respect to a leaf that is the input of a module itself (a view costs no FLOPs)."""
        with FlopCounterMode(display=False) as counter:
            self.floor_step(steps, lambda inputs: self.model(inputs.view_as(inputs)))
        return counter.get_total_flops()

    def steps(self, k):
        a = self.args
        # with the training loop's settings of TrainState.step: AWP and the average from the first step, no clipping
        common = dict(eps=a.eps, step_size=a.step_size, attack_steps=k, dtype=a.dtype, clip_grad_norm=None,
                      awp_warmup=1, ema_start=1, norm=a.norm, label_smoothing=0.0)
        fire = argparse.Namespace(**common, lam=a.lam, distance="fisher-rao")
        fire_linf = argparse.Namespace(**dict(common, norm="linf", eps=a.linf_eps, step_size=a.linf_step_size),
                                       lam=a.lam, distance="fisher-rao")
        trades = argparse.Namespace(**common, loss="trades", beta=a.beta)
        public = RecomputeNatural(self.fwd, self.x)
        return {"floor": lambda: self.floor_step(k),
                "FIRE": lambda: self.train_step(train_fire, fire),
                "TRADES": lambda: self.train_step(train_trades, trades),
                "TRADES-public": lambda: self.train_step(train_trades, trades, public),
                "FIRE+AWP": lambda: self.train_step(train_fire, fire, run="FIRE+AWP"),
                "FIRE+EMA": lambda: self.train_step(train_fire, fire, run="FIRE+EMA"),
                "FIRE-Linf": lambda: self.train_step(train_fire, fire_linf)}


def check_shape(model, args, device):
    """One forward of a single zero image of `shape` (eval mode, no gradients): a shape the model
    cannot take (SmallCNN takes 28x28 only; tiny images under the kernels) ends with one line
    naming --shape before any timing, instead of a traceback from inside the first step."""
    shape = " ".join(map(str, args.shape))
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *args.shape, device=device))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--shape {shape} does not fit --model {args.model}: {reason}") from None
    if tuple(out.shape) != (1, args.num_classes):
        raise UserError(f"--shape {shape} does not fit --model {args.model}: it gives outputs of "
                        f"shape {tuple(out.shape[1:])}, not ({args.num_classes},)")


class RecomputeNatural(torch.nn.Module):
    """The model as TRADES' public attack uses it: every attack step also runs f(x) again (their
    loop recomputes the natural softmax; ours computes it once). Only for timing that cost."""

    def __init__(self, model, x):
        super().__init__()
        self.model, self.x = model, x

    def forward(self, inputs):
        if torch.is_grad_enabled() and inputs.requires_grad:  # an attack step, graph recorded
            self.model(self.x)
        return self.model(inputs)


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps, reps, warmup, device, clock="wall"):
    """Seconds of each step over `reps` rounds (after `warmup`); each round runs every step once,
    in an order that rotates every round, so slow phases of a shared machine hit all of them."""
    now = CLOCKS[clock]
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(warmup + reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)  # the only synchronisations: around the timed region, on CUDA
            t0 = now()
            steps[name]()
            sync(device)
            if r >= warmup:
                times[name].append(now() - t0)
    return times


def peak_memory(steps, device):
    """Peak allocated GPU memory (MiB) during one run of each step, weights included; None on CPU."""
    if device.type != "cuda":
        return {name: None for name in steps}
    peaks = {}
    for name, step in steps.items():
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


def time_losses(batch_size, num_classes, lam, beta, device, clock="wall", reps=30, calls=20):
    """Microseconds per forward + backward of fire_loss and of trades_loss on (batch, classes)
    logits: the only work in which a FIRE step differs from a TRADES step (each step evaluates its
    objective K + 1 times). Small enough to time precisely on a busy machine."""
    gen = torch.Generator().manual_seed(0)
    logits_nat = torch.randn(batch_size, num_classes, generator=gen).to(device).requires_grad_(True)
    logits_adv = (logits_nat.detach() + 0.1 * torch.randn(batch_size, num_classes, generator=gen).to(device))
    logits_adv.requires_grad_(True)
    y = torch.randint(num_classes, (batch_size,), generator=gen).to(device)
    losses = {"FIRE": lambda: fire_loss(logits_nat, logits_adv, y, lam),
              "TRADES": lambda: trades_loss(logits_nat, logits_adv, y, beta)}

    def block(loss_fn):
        def run():
            for _ in range(calls):
                torch.autograd.grad(loss_fn(), (logits_nat, logits_adv))
        return run

    times = time_interleaved({name: block(fn) for name, fn in losses.items()}, reps, 2, device, clock)
    return {name: 1e6 * statistics.median(t) / calls for name, t in times.items()}


def quartiles(values):
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def measure(args, batch_size, k, reps, warmup, device, recipe=True):
    """Time floor, FIRE and TRADES (and with `recipe` FIRE with AWP and with the average) at one
    (batch size, K); returns a dict of figures."""
    bench = Bench(args, batch_size, device)
    flops = bench.floor_flops(k)
    names = (STEPS + RECIPE_STEPS if recipe else STEPS) + ("FIRE-Linf",) * (args.norm == "l2")
    steps = {name: step for name, step in bench.steps(k).items() if name in names}
    times = time_interleaved(steps, reps, warmup, device, args.clock)
    peaks = peak_memory(steps, device)
    if bool(bench.stats.first_bad.item() >= 0):
        print(f"warning: a loss became NaN or infinite at batch {batch_size}, K {k}", file=sys.stderr)
    out = dict(batch_size=batch_size, attack_steps=k, reps=reps, warmup=warmup, steps={})
    # Achieved throughput of the floor: its counted FLOPs over its median time.
    out["floor_flops"] = flops
    out["floor_tflops_per_s"] = flops / statistics.median(times["floor"]) / 1e12
    for name in names:
        q1, med, q3 = quartiles(times[name])
        out["steps"][name] = dict(ms=1e3 * med, ms_q1=1e3 * q1, ms_q3=1e3 * q3,
                                  images_per_s=batch_size / med, peak_mib=peaks[name],
                                  all_ms=[1e3 * t for t in times[name]])
    # The ratios are medians of the per-round ratios: the steps of one round ran side by side, so a
    # slow phase of a shared machine cancels out. Ratios of the medians are kept as well.
    pairs = {"FIRE/TRADES": ("FIRE", "TRADES"), "FIRE/floor": ("FIRE", "floor"),
             "TRADES/floor": ("TRADES", "floor"), "TRADES-public/floor": ("TRADES-public", "floor"),
             "FIRE/TRADES-public": ("FIRE", "TRADES-public")}
    if args.norm == "l2":  # the L2 step against the Linf step, in the same rounds
        pairs.update({"FIRE/FIRE-Linf": ("FIRE", "FIRE-Linf"), "FIRE-Linf/floor": ("FIRE-Linf", "floor")})
    if recipe:  # what AWP and the average add to a FIRE step
        for name in RECIPE_STEPS:
            pairs.update({f"{name}/FIRE": (name, "FIRE"), f"{name}/floor": (name, "floor")})
    out["ratios"] = {key: statistics.median(a / b for a, b in zip(times[num], times[den]))
                     for key, (num, den) in pairs.items()}
    out["ratios_of_medians"] = {key: out["steps"][num]["ms"] / out["steps"][den]["ms"]
                                for key, (num, den) in pairs.items()}
    out["loss_us"] = time_losses(batch_size, args.num_classes, args.lam, args.beta, device, args.clock)
    return out


# ----------------------------------------------------------------------------------------------
# Report


def describe(args, device):
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch "
                  f"thread(s), {os.cpu_count()} cores")
    return dict(model=args.model, shape=list(args.shape), num_classes=args.num_classes,
                dtype=args.dtype, channels_last=args.channels_last, compile=args.compile,
                compile_mode=args.compile_mode if args.compile else None,
                fused_sgd=device.type == "cuda" and args.fused_sgd,
                cudnn_benchmark=device.type == "cuda" and args.cudnn_benchmark,
                device=str(device), device_name=where, torch=torch.__version__,
                python=platform.python_version(), lam=args.lam, beta=args.beta, norm=args.norm, eps=args.eps,
                step_size=args.step_size, lr=args.lr, clock=args.clock, threads=torch.get_num_threads())


def main_table(result):
    """Markdown table of one measurement."""
    b = result["batch_size"]
    lines = ["| step | ms per step (median) | [q1, q3] | images/s | vs floor | peak GPU memory |",
             "|---|---|---|---|---|---|"]
    for name in result["steps"]:
        s = result["steps"][name]
        vs = 1.0 if name == "floor" else result["ratios"][f"{name}/floor"]
        mem = "n/a (CPU)" if s["peak_mib"] is None else f"{s['peak_mib']:.0f} MiB"
        lines.append(f"| {name} | {s['ms']:.2f} | [{s['ms_q1']:.2f}, {s['ms_q3']:.2f}] | "
                     f"{b / (s['ms'] / 1e3):.0f} | {vs:.3f} | {mem} |")
    r, m = result["ratios"], result["ratios_of_medians"]
    lines.append("")
    lines.append(f"floor: {result['floor_flops'] / 1e9:.1f} GFLOP per step (convolutions and matrix products, "
                 f"forward and backward, counted by FlopCounterMode), {result['floor_tflops_per_s']:.3f} "
                 f"TFLOP/s achieved")
    lines.append(f"FIRE / TRADES = {r['FIRE/TRADES']:.3f}   FIRE / floor = {r['FIRE/floor']:.3f}   "
                 f"TRADES / floor = {r['TRADES/floor']:.3f}   (medians of the per-round ratios; ratios "
                 f"of the medians: {m['FIRE/TRADES']:.3f}, {m['FIRE/floor']:.3f}, {m['TRADES/floor']:.3f})")
    lines.append(f"FIRE / TRADES-public = {r['FIRE/TRADES-public']:.3f}: TRADES as its public code "
                 f"runs it, with the natural forward recomputed at each of the {result['attack_steps']} "
                 f"attack steps")
    if "FIRE+AWP/FIRE" in r:
        lines.append(f"FIRE+AWP / FIRE = {r['FIRE+AWP/FIRE']:.3f} (AWP, gamma 0.005: one more training forward "
                     f"and backward per step)   FIRE+EMA / FIRE = {r['FIRE+EMA/FIRE']:.3f} (the average's "
                     f"update, decay 0.999, after every step)")
    if "FIRE/FIRE-Linf" in r:
        lines.append(f"FIRE (L2) / FIRE-Linf = {r['FIRE/FIRE-Linf']:.3f} (ratio of the medians "
                     f"{m['FIRE/FIRE-Linf']:.3f}): the L2 step's normalisation and projection against the "
                     f"sign step and clamp")
    us, calls = result["loss_us"], result["attack_steps"] + 1
    lines.append(f"The losses alone (forward + backward on {b} x classes logits, {calls} per step): fire_loss "
                 f"{us['FIRE']:.0f} us, trades_loss {us['TRADES']:.0f} us, a difference of "
                 f"{calls * (us['FIRE'] - us['TRADES']) / 1e3:.2f} ms per step")
    return "\n".join(lines)


def sweep_table(rows):
    lines = ["| batch | K | floor ms | FIRE ms | TRADES ms | FIRE / floor | TRADES / floor | "
             "FIRE / TRADES | FIRE images/s | floor TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s, r = row["steps"], row["ratios"]
        lines.append(f"| {row['batch_size']} | {row['attack_steps']} | {s['floor']['ms']:.2f} | "
                     f"{s['FIRE']['ms']:.2f} | {s['TRADES']['ms']:.2f} | {r['FIRE/floor']:.3f} | "
                     f"{r['TRADES/floor']:.3f} | {r['FIRE/TRADES']:.3f} | "
                     f"{s['FIRE']['images_per_s']:.0f} | {row['floor_tflops_per_s']:.3f} |")
    return "\n".join(lines)


def growth(rows):
    """Per batch size, the least-squares cost of one more attack step (ms) for FIRE and the floor."""
    lines = []
    for b in sorted({row["batch_size"] for row in rows}):
        cells = [row for row in rows if row["batch_size"] == b]
        ks = [row["attack_steps"] for row in cells]
        if len(set(ks)) < 2:
            continue
        k_mean = sum(ks) / len(ks)
        slope = {}
        for name in ("floor", "FIRE"):
            ms = [row["steps"][name]["ms"] for row in cells]
            ms_mean = sum(ms) / len(ms)
            slope[name] = (sum((k - k_mean) * (m - ms_mean) for k, m in zip(ks, ms))
                           / sum((k - k_mean) ** 2 for k in ks))
        k0 = min(cells, key=lambda row: row["attack_steps"])
        lines.append(f"batch {b}: each attack step adds {slope['FIRE']:.2f} ms to a FIRE step "
                     f"({slope['floor']:.2f} ms to the floor); a K={k0['attack_steps']} FIRE step "
                     f"takes {k0['steps']['FIRE']['ms']:.2f} ms")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# AutoAttack's throughput


def autoattack_throughput(args, device):
    """--autoattack N: the timing record of the standard AutoAttack (autoattack.time_autoattack) on N
    images of --checkpoint's test split at its threat model, or on random images labelled by a
    freshly initialised --model's own predictions at --dataset's evaluation radius."""
    if args.checkpoint is not None:
        saved = load_checkpoint(args.checkpoint)["args"]
        norm, eps = threat_model(saved, args.norm_given, args.eps if args.eps_given else None)
        model = load_model(args.checkpoint, device)
        x, y = first_images(split_of(saved, "test"), args.autoattack)
        what = args.checkpoint
    else:
        torch.manual_seed(args.seed)
        norm, dataset = args.norm, DATASETS[args.dataset]
        eps = args.eps if args.eps_given else dataset.evaluation_radius(norm) or args.eps
        model = get_model(args.model, args.num_classes, args.shape[0], args.mean, args.std).to(device).eval()
        x = torch.rand(args.autoattack, *args.shape, generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():  # labels = the model's own predictions: every image is attacked
            y = torch.cat([model(b.to(device)).argmax(1).cpu() for b in x.split(args.aa_batch_size)])
        what = f"random {args.model} on {args.dataset}-shaped images"
    timing = time_autoattack(model, x, y, eps, device, norm, args.aa_batch_size, args.seed, args.smoke_aa)
    print(f"{what}: AutoAttack ({timing['aa_version']}, {norm} eps {eps:g}) on {timing['images']} images in "
          f"{timing['seconds']:.1f}s = {timing['images_per_s']:.2f} images/s on {timing['device']}; "
          f"{TEST_SET_SIZE:,} test images ~ {fmt_hours(timing['projected_test_set_s'])} "
          f"(natural {timing['natural']:.3f}, AutoAttack {timing['autoattack']:.3f})", flush=True)
    return timing


def main(argv=None):
    args = get_args(argv)
    if args.json_out:
        check_output(args.json_out, "--json-out", make_folder=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.autoattack is not None:
        timing = autoattack_throughput(args, device)
        if args.json_out:
            write_json(args.json_out, timing, what="--json-out")
            print(f"wrote {args.json_out}")
        return timing
    config = describe(args, device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    c, h, w = args.shape
    print(f"{args.model}, {c}x{h}x{w} synthetic images, {args.num_classes} classes, batch {args.batch_size}, "
          f"{args.attack_steps} attack steps ({args.norm} eps {args.eps:g}), {args.dtype}{', channels-last' if args.channels_last else ''}"
          f"{f', compiled ({args.compile_mode})' if args.compile else ''}"
          f"{', fused SGD' if config['fused_sgd'] else ''}{', cudnn.benchmark' if config['cudnn_benchmark'] else ''}"
          f"; {config['device_name']}; torch {torch.__version__}; "
          f"{args.reps} interleaved repetitions after {args.warmup} warm-up, {args.clock} clock"
          + (f"; load average {load[0]:.2f} before" if load else ""))
    result = measure(args, args.batch_size, args.attack_steps, args.reps, args.warmup, device)
    print(main_table(result))
    epochs, n = DATASETS[args.dataset].preset["epochs"], DATASETS[args.dataset].train_images
    hours = {name: epochs * n / result["steps"][name]["images_per_s"] / 3600 for name in ("FIRE", "TRADES")}
    print(f"projected {epochs} epochs of {n:,} {args.dataset} training images at batch {args.batch_size}, "
          f"K {args.attack_steps}: FIRE {hours['FIRE']:.1f} h, TRADES {hours['TRADES']:.1f} h "
          f"(training steps only: no data loading, no per-epoch validation)")
    report = dict(config=config, result=result, load_average_before=load,
                  projection=dict(epochs=epochs, train_images=n, hours=hours))
    if args.sweep:
        rows = []
        for b in args.sweep_batch_sizes:
            for k in args.sweep_steps:
                rows.append(measure(args, b, k, args.sweep_reps, max(1, args.warmup), device, recipe=False))
        print()
        print(f"Step cost over attack steps K and batch size ({args.sweep_reps} interleaved "
              f"repetitions per cell, medians):")
        print(sweep_table(rows))
        print(growth(rows))
        report["sweep"] = rows
    report["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average {report['load_average_after'][0]:.2f} after (other processes share these cores)")
    if args.json_out:
        write_json(args.json_out, report, what="--json-out")
        print(f"wrote {args.json_out}")
    return report


if __name__ == "__main__":
    cli(main)
