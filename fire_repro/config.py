"""The training scripts' command line: shared flags and their ranges, the data set's preset,
what a method is (Method), and a run's identity.

    base_parser(description)      the flags both training scripts take
    finish_args(parser, argv, methods, key)   parse, pick the Method, apply the data set's preset, check
    Method                        a method's run name, row title, weight flag, row order, reference
    run_identity, identity_hash   the settings that define what a run computes, and their hash
"""
import argparse
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from fire_repro.attacks import EPS_RANGES, NORMS
from fire_repro.common import ArgumentParser, Range, check_input_file, check_ranges
from fire_repro.data import DATASETS
from fire_repro.parallel import rank_and_world
from models import check_model_name


@dataclass(frozen=True)
class Method:
    """What a training objective is, recorded with every run and result (as args.method and the
    args.method_* fields) so that the tables and figures read it and never name a method:

    name        its run folders (runs/<name>-<dataset>-s<seed>) and its results' `method`
    title       its rows in tables and figures
    weight      the flag that weights its regulariser (lam, beta; None for none)
    order       its place among a table's rows (the paper's: Madry 0, MART and Self Adaptive 1, TRADES
                2, Hellinger 3, FIRE + Self-Adaptive 4, FIRE 6; a new method comes before FIRE)
    reference   the weight at which its rows are the reference of the tables' paired comparisons
                (FIRE at the paper's lam 12)
    aux_title   its rows' title when trained with extra data (--aux-data), if another
    checkpoint_rows  ((checkpoint, title, order), ...): checkpoints whose rows carry their own title
                instead of "<title> [<checkpoint>]" (Madry's last epoch and its best checkpoint, which
                is early stopping: two rows of Table 2)
    self_adaptive    the method it becomes with --self-adaptive (its CE on self-adaptive soft
                targets), or None when it has no such variant
    fn          what the training script calls for it (train_fire.py: the regulariser; train_trades.py:
                the training step); not recorded
    """
    name: str
    title: str
    weight: Optional[str] = None
    order: int = 5
    reference: Optional[float] = None
    aux_title: Optional[str] = None
    checkpoint_rows: tuple = ()
    self_adaptive: Optional["Method"] = None
    fn: Optional[Callable] = field(default=None, compare=False)

    def record(self):
        """The fields every run and result records (args.method, args.method_title, ...)."""
        return dict(method=self.name, method_title=self.title, method_weight=self.weight,
                    method_order=self.order, method_reference=self.reference, method_aux_title=self.aux_title,
                    method_checkpoint_rows=[list(row) for row in self.checkpoint_rows])


TRAIN_RANGES = {
    "val_size": Range(1, 10**7), "epochs": Range(1, 10_000), "batch_size": Range(1, 65_536),
    "lr": Range(0, 10, low_open=True), "momentum": Range(0, 1, high_open=True),
    "weight_decay": Range(0, 1), "lr_milestones": Range(0, 1, low_open=True),
    "eps": EPS_RANGES["linf"], "step_size": Range(0, 1, low_open=True), "attack_steps": Range(0, 1000),
    "eval_steps": Range(0, 1000), "unsup_fraction": Range(0, 1, low_open=True, high_open=True),
    "seed": Range(0, 2**32, high_open=True), "workers": Range(0, 256), "log_every": Range(1, 10**6),
    "lam": Range(0, 1e4), "beta": Range(0, 1e4), "sa_alpha": Range(0, 1, high_open=True),
    "sa_start": Range(1, 10_000), "clip_grad_norm": Range(0, 1e6, low_open=True),
    "awp_gamma": Range(0, 1, high_open=True), "awp_warmup": Range(1, 10_000),
    "ema": Range(0, 1, low_open=True, high_open=True), "ema_start": Range(1, 10_000),
    "label_smoothing": Range(0, 1, high_open=True),
}
# --norm l2: an L2 radius and step may exceed 1 (attacks.EPS_RANGES)
L2_RANGES = {"eps": EPS_RANGES["l2"], "step_size": Range(0, EPS_RANGES["l2"].high, low_open=True)}


# Defaults of the settings that only matter when another setting is on (INERT_UNLESS); run_identity
# puts an inert one back to its default, so the flags and the identity read them from here.
DEFAULTS = {"awp_warmup": 10, "ema_start": 1, "sa_alpha": 0.9, "sa_start": 70, "unsup_fraction": 0.5,
            "lr_milestones": [0.75, 0.9], "aux_epoch": "train"}


def allowed(name):
    """A training flag's range as its help text gives it, e.g. 'in [1, 10000]'."""
    return str(TRAIN_RANGES[name]) + (f" ({L2_RANGES[name]} with --norm l2)" if name in L2_RANGES else "")


def base_parser(description):
    """Flags shared by both training scripts; None means 'take the dataset preset'."""
    p = ArgumentParser(description=description)
    p.add_argument("--dataset", type=str, default="digits", choices=list(DATASETS),
                   help="data set and preset of the paper's settings (digits: bundled, no download)")
    p.add_argument("--data-dir", type=str, default="data",
                   help="where torchvision data live / go; imagenet32 reads <data-dir>/imagenet32/*.npz")
    p.add_argument("--val-size", type=int, default=None,
                   help=f"training images held out for model selection, {allowed('val_size')} and below "
                        f"the training set's size (default 1000; digits 180, mnist5k 500, imagenet32 10000)")
    p.add_argument("--model", type=str, default=None,
                   help="smallcnn | resnet18 | wrn-D-W (default: preset)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs, {allowed('epochs')} (default: preset)")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch size, {allowed('batch_size')} (default: preset)")
    p.add_argument("--lr", type=float, default=None, help=f"initial learning rate, {allowed('lr')} (default: preset)")
    p.add_argument("--momentum", type=float, default=0.9, help=f"SGD momentum (Nesterov), {allowed('momentum')}")
    p.add_argument("--weight-decay", type=float, default=5e-4, help=f"SGD weight decay, {allowed('weight_decay')}")
    p.add_argument("--schedule", type=str, default=None, choices=["step", "cosine", "onecycle"],
                   help="lr schedule, stepped once per epoch: step = /10 at each milestone, cosine = cosine "
                        "decay to 0, onecycle = PyTorch's OneCycleLR as Wang et al. (2023) train (their "
                        "cosinew): a half cosine from lr/25 up to lr over the first 2.5%% of the epochs, "
                        "then down to lr/25e4")
    p.add_argument("--lr-milestones", type=float, nargs="+", default=list(DEFAULTS["lr_milestones"]),
                   help=f"step schedule milestones as fractions of --epochs, each {allowed('lr_milestones')} "
                        f"(0.75 0.9 = epochs 75, 90 of 100)")
    p.add_argument("--augment", type=str, default="crop-flip", choices=["crop-flip", "authors"],
                   help="CIFAR training augmentation: crop-flip = random crop of the 4-pixel-padded "
                        "image + horizontal flip (TRADES); authors = + ColorJitter(0.25, 0.25, 0.25) "
                        "+ RandomRotation(15), as FIRE's public code trains")
    p.add_argument("--norm", type=str, default="linf", choices=list(NORMS),
                   help="threat model of the training attack and the validation/test PGD: linf = "
                        "max-pixel radius, sign steps (the paper); l2 = L2 radius per image, "
                        "normalised-gradient steps, with the data set's L2 preset (docs/threat-models.md)")
    p.add_argument("--eps", type=float, default=None,
                   help=f"radius in --norm in pixel units of [0, 1], {allowed('eps')} (default: preset)")
    p.add_argument("--step-size", type=float, default=None, help=f"PGD step size during training, {allowed('step_size')} (default: preset)")
    p.add_argument("--attack-steps", type=int, default=None, help=f"PGD steps during training, {allowed('attack_steps')} (default: preset)")
    p.add_argument("--eval-steps", type=int, default=None,
                   help=f"steps of the CE PGD used for validation/test (step 2.5 * eps / steps), "
                        f"{allowed('eval_steps')} (default: preset)")
    p.add_argument("--aux-data", type=str, default=None,
                   help="extra labelled images mixed into every batch: an uncompressed .npz (np.savez) with "
                        "`images` (N, H, W, C) uint8 and `labels` (N,), or DM-Improves-AT's generated data "
                        "(`image`, `label`: Wang et al. 2023's 1m.npz ... 50m_part*.npz), memory-mapped, "
                        "never read whole; or Carmon et al.'s 500K pickle (--trust-pickle). With cifar10 the "
                        "preset becomes WRN-28-10, cosine, 200 epochs (docs/generated-data.md)")
    p.add_argument("--unsup-fraction", type=float, default=DEFAULTS["unsup_fraction"],
                   help=f"share of each batch drawn from --aux-data, {allowed('unsup_fraction')} "
                        f"(Carmon et al.: 0.5; Wang et al.: 0.7)")
    p.add_argument("--aux-epoch", type=str, default=DEFAULTS["aux_epoch"], choices=["train", "full"],
                   help="with --aux-data, one epoch is ceil(N / batch size) batches of mixed images: N = the "
                        "training images after the validation split (train), or the whole training set "
                        "before it (full: Carmon et al.'s and Wang et al.'s code, 50,000 for CIFAR-10)")
    p.add_argument("--label-smoothing", type=float, default=0.0, metavar="LS",
                   help=f"smooth the labels of every method's cross-entropy term, {allowed('label_smoothing')}: "
                        "CE against (1 - LS) one-hot + LS / classes (Wang et al. 2023: 0.1). 0 = off")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow --aux-data in the public pickle format (unpickling runs code: "
                        "only for files you trust; prefer converting to .npz)")
    p.add_argument("--init-from", type=str, default=None, metavar="CHECKPOINT",
                   help="start from another run's weights (same --model): the classifier is new when "
                        "the class counts differ, the normalisation is this data set's (Hendrycks et "
                        "al.'s fine-tuning); ignored by --resume, which continues this run")
    p.add_argument("--seed", type=int, default=0, help=f"seed of every random number generator, {allowed('seed')}")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA (all visible GPUs) when available, else CPU")
    p.add_argument("--workers", type=int, default=4, help=f"data-loader worker processes (CIFAR), {allowed('workers')}")
    p.add_argument("--dtype", type=str, default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast precision of training forwards and attacks; evaluation is float32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels-last memory layout (faster convolutions on recent GPUs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model")
    p.add_argument("--out-dir", type=str, default=None,
                   help="run folder (default runs/<method>-<dataset>[-<settings>]-s<seed>: <settings> "
                        "names what differs from the data set's preset, e.g. runs/fire-digits-l2-s0)")
    p.add_argument("--resume", type=str, default=None,
                   help="checkpoint to resume from, or 'auto' = <out-dir>/last.pt if it exists")
    p.add_argument("--overwrite", action="store_true", help="allow replacing a finished run's files")
    p.add_argument("--log-every", type=int, default=50, help=f"batches between progress/NaN checks, {allowed('log_every')}")
    p.add_argument("--rehearsal", action="store_true",
                   help="train on generated images of the data set's shape and classes instead of its "
                        "data (data.load_rehearsal): checks a plan's names, presets and radii on a CPU. "
                        "Part of the run's identity: a rehearsal never shares a folder or a row with a real run")
    p.add_argument("--print-identity", action="store_true",
                   help="print the hash of the run's identity (every setting that changes what it "
                        "computes, presets applied) and exit; run_all.sh names run folders by it")
    p.add_argument("--planned", type=str, action="append", default=None, metavar="FILE",
                   help="with --print-identity: an input file (--init-from, --aux-data) that a run planned "
                        "before this one will write, e.g. a pre-training's best.pt; it need not exist yet. "
                        "Every other input file is checked as a training checks it. Repeatable")
    p.add_argument("--stop-on-collapse", action="store_true",
                   help="end the run when validation PGD accuracy stays below half its best for 2 "
                        "epochs (the collapse alarm; best.pt is kept). Without it the alarm is only logged")
    # Today's recipe on top of any method's loss (docs/modern-recipe.md); all off by default.
    p.add_argument("--clip-grad-norm", type=float, default=None, metavar="C",
                   help=f"clip the global gradient norm of every step to C, {allowed('clip_grad_norm')} (the "
                        "true norm, unscaled under float16); the share of clipped steps is logged per epoch. Default: off")
    p.add_argument("--awp-gamma", type=float, default=0.0, metavar="G",
                   help=f"adversarial weight perturbation (Wu et al. 2020), G {allowed('awp_gamma')}: before "
                        "each step every conv/linear weight w moves by G * ||w|| up the gradient of the method's own "
                        "loss on the x' found, and back after the step. 0 = off; Wu et al.: 0.005")
    p.add_argument("--awp-warmup", type=int, default=DEFAULTS["awp_warmup"], metavar="E",
                   help=f"first epoch (1-based) with AWP, {allowed('awp_warmup')}, as Wu et al.'s code counts (10: epochs 1-9 "
                        "train without it)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help=f"keep an exponential moving average of the weights and BatchNorm statistics, "
                        f"updated after every step with this decay per step, {allowed('ema')} (0.999: a horizon of about "
                        "1,000 steps); validation, best.pt, the test and eval_autoattack.py use it. "
                        "Default: off")
    p.add_argument("--ema-start", type=int, default=DEFAULTS["ema_start"], metavar="EPOCH",
                   help=f"first epoch (1-based) of averaging, {allowed('ema_start')}, with --ema: before it the average is the model")
    return p


def finish_args(parser, argv, methods, key):
    """The run's arguments as the training script resolves them: parsed, its Method picked, the data
    set's preset filled in where a flag was not given, every value and input file checked. Prints
    nothing and raises UserError on bad input (under cli(): one line, exit 2); the plan of run_all.sh
    calls it through the script's get_args to learn a run's identity (identity_hash).

    `methods` is the script's registry of methods ({value of --`key`: Method}); --self-adaptive
    picks the entry's self_adaptive variant. The Method is recorded as args.method, args.method_*
    (Method.record) and args.method_flags (the flags that choose and weight the script's methods,
    which a table row's name shows)."""
    args = parser.parse_args(argv)
    m = methods[getattr(args, key)]
    if args.self_adaptive:
        if m.self_adaptive is None:
            with_it = [k for k, v in methods.items() if v.self_adaptive is not None]
            parser.error(f"--self-adaptive works with --{key} {' or '.join(with_it)}, not {getattr(args, key)}")
        m = m.self_adaptive
    weights = sorted({w.weight for v in methods.values() for w in (v, v.self_adaptive) if w and w.weight})
    vars(args).update(m.record(), method_flags=[key, "self_adaptive", *weights])
    dataset = DATASETS[args.dataset]
    if args.norm == "l2" and not dataset.l2_preset and (args.eps is None or args.step_size is None):
        parser.error(f"--norm l2 has no preset for {args.dataset}: give --eps and --step-size (L2 "
                     f"radius and step), or add an l2_preset to its entry in data.py")
    for name, value in dataset.training_preset(args.norm, bool(args.aux_data)).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.val_size is None:
        args.val_size = dataset.val_size
    if args.out_dir is None:
        args.out_dir = default_out_dir(parser, args, key)
    check_ranges(parser, args, dict(TRAIN_RANGES, **(L2_RANGES if args.norm == "l2" else {})))
    checks = [
        (args.augment == "crop-flip" or dataset.authors_augment,
         f"--augment authors is for {', '.join(k for k, d in DATASETS.items() if d.authors_augment)} "
         f"(the authors' MNIST code does not augment)"),
        (not (args.self_adaptive and args.aux_data),
         "--self-adaptive with --aux-data is not supported (the paper uses neither together)"),
        (not (args.self_adaptive and rank_and_world()[1] > 1),
         "--self-adaptive keeps per-image targets in one process: use DataParallel, not torchrun"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    inputs = ((args.aux_data, "--aux-data"), (args.resume, "--resume"), (args.init_from, "--init-from"))
    planned = {os.path.normpath(path) for path in args.planned or ()}
    if planned and not args.print_identity:
        parser.error("--planned goes with --print-identity (a training reads its inputs now)")
    unknown = planned - {os.path.normpath(path) for path, _ in inputs if path is not None}
    if unknown:
        parser.error(f"--planned {sorted(unknown)[0]!r} is not an input of this run (--init-from or --aux-data)")
    try:
        check_model_name(args.model)  # the name only: no network is built here
    except ValueError as e:
        parser.error(str(e))
    for path, flag in inputs:
        # a file that a run planned before this one writes need not exist yet (--planned)
        if path is not None and not (flag == "--resume" and path == "auto") and os.path.normpath(path) not in planned:
            check_input_file(path, flag)
    return args


def default_out_dir(parser, args, key):
    """runs/<method>-<dataset>[-<settings>]-s<seed>, the folder of a run without --out-dir. The data
    set's preset run has no <settings> (runs/fire-digits-s0); any other value of what the run
    computes (run_identity) is named there, e.g. l2, lam5, lr0.01 (runs/fire-digits-l2-lam5-s0), or
    by a hash of those values when their names are long: runs of different settings never share a
    default folder. --epochs is not named: --resume auto with a larger --epochs extends the run."""
    preset = vars(parser.parse_args([]))  # every flag at its default, with the data set's preset:
    preset.update({k: v for k, v in vars(args).items() if k not in preset or k in (key, "self_adaptive", "dataset", "seed")})
    preset.update(DATASETS[args.dataset].training_preset(args.norm, bool(args.aux_data)),
                  val_size=DATASETS[args.dataset].val_size)
    here, there = run_identity(vars(args)), run_identity(preset)
    named = {k: here.get(k) for k in sorted(set(here) | set(there))
             if k not in ("method", "epochs") and here.get(k) != there.get(k)}
    tag = "-".join(setting_name(k, v) for k, v in named.items())
    if len(tag) > 48:
        tag = "settings" + hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join("runs", "-".join([args.method, args.dataset, *([tag] if tag else []), f"s{args.seed}"]))


def setting_name(key, value):
    """A setting as a default folder names it: the norm or a choice by its value (l2, cosine,
    wrn-28-10), a switch by its flag (rehearsal), a file by its stem (aux-1m), a number after its
    flag (lam5, lr0.01, no-ema)."""
    flag = key.replace("_", "-")
    if key in IDENTITY_PATHS:
        text = f"{flag.split('-')[0]}-{os.path.splitext(os.path.basename(value))[0]}"
    elif isinstance(value, bool):
        text = flag if value else f"no-{flag}"
    elif value is None:
        text = f"no-{flag}"
    elif isinstance(value, str):
        text = value
    else:
        values = value if isinstance(value, list) else [value]
        text = flag + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return re.sub(r"[^A-Za-z0-9.,_-]", "_", text)


# The settings that start at an epoch: (setting, what starts, whether it is on). One past --epochs
# is a warning, not an error: a later --resume with a larger --epochs reaches it.
STARTS = [("awp_warmup", "AWP", lambda a: (a.get("awp_gamma") or 0) > 0),
          ("ema_start", "the average (--ema)", lambda a: a.get("ema") is not None),
          ("sa_start", "the self-adaptive targets' updates", lambda a: bool(a.get("self_adaptive")))]


def never_starts(saved):
    """[(setting, what)] for the settings of `saved` (a run's arguments) that are on but start
    after its last epoch, e.g. ('awp_warmup', 'AWP') for --awp-gamma 0.005 --awp-warmup 10 --epochs 2."""
    return [(key, what) for key, what, on in STARTS
            if on(saved) and key in saved and saved[key] > saved.get("epochs", saved[key])]


def settings_warnings(saved):
    """One line for each setting of `saved` that changes nothing in this run: inert without another
    (INERT_UNLESS; left out of the identity), or starting past --epochs."""
    flag = lambda key: "--" + key.replace("_", "-")  # noqa: E731
    lines = [f"{flag(k)} {saved[k]} changes nothing without {needs}: this is the run without it "
             f"(same identity, folder and table row)" for k, needs in inert_settings(saved)]
    lines += [f"{flag(k)} {saved[k]} is past --epochs {saved['epochs']}: {what} never starts in this run "
              f"(its table row does not name it)" for k, what in never_starts(saved)]
    return lines


def add_self_adaptive_flags(parser, row):
    parser.add_argument("--self-adaptive", action="store_true",
                        help=f"{row}: CE on soft targets (self-adaptive training, Huang et al. 2020)")
    parser.add_argument("--sa-alpha", type=float, default=DEFAULTS["sa_alpha"],
                        help=f"soft-target momentum, {allowed('sa_alpha')}")
    parser.add_argument("--sa-start", type=int, default=DEFAULTS["sa_start"],
                        help=f"first epoch (1-based) of target updates, {allowed('sa_start')}")


# A run's arguments fix what it computes, except these: where its files and data live, the devices
# and how fast it runs, how often it logs, whether the collapse alarm ends it, and what the run
# records about itself. Every other argument, a new flag included, is the run's identity: --resume
# refuses to change it (bar --epochs, which extends a run), run_all.sh names run folders by it
# (--print-identity) and a table never averages runs whose identities differ beyond the seed.
NOT_IDENTITY = frozenset({"out_dir", "resume", "overwrite", "data_dir", "device", "workers",
                          "log_every", "compile", "channels_last", "trust_pickle", "stop_on_collapse",
                          "print_identity", "planned", "init_from_sha256", "pretrain_time_s"})
# and every args.method_* field but `method` itself: what the method is called and shown as
# Settings left out of the identity at these values, the paper's threat model, real data, no label
# smoothing and the extra data's epoch as it was always counted: an identity names --norm, --rehearsal,
# --label-smoothing and --aux-epoch only when a run uses another value (so the runs without them keep
# their folders).
DEFAULT_IDENTITY = {"norm": "linf", "rehearsal": False, "label_smoothing": 0.0, "aux_epoch": "train"}
# Input files enter the identity by what they are, not where they lie, so that moving DATA_DIR or
# OUT_DIR, or spelling either absolutely, keeps every folder: the extra data by their file name
# (written data/NAME, as under the default DATA_DIR), a checkpoint to start from by its run folder's
# name and its file (RUN/best.pt), since a run folder's name holds its own identity.
IDENTITY_PATHS = {"aux_data": lambda p: os.path.join("data", os.path.basename(os.path.normpath(p))),
                  "init_from": lambda p: os.path.join(*os.path.normpath(os.path.abspath(p)).split(os.sep)[-2:])}


# Settings that change nothing unless another one is on: (setting, the flags that make it matter,
# whether they are on). In a run's identity an inert setting reads as its default (DEFAULTS), so
# `--awp-warmup 3` without AWP is the run without it: same identity, folder and table row.
INERT_UNLESS = [
    ("awp_warmup", "--awp-gamma > 0", lambda a: (a.get("awp_gamma") or 0) > 0),
    ("ema_start", "--ema", lambda a: a.get("ema") is not None),
    ("sa_alpha", "--self-adaptive", lambda a: bool(a.get("self_adaptive"))),
    ("sa_start", "--self-adaptive", lambda a: bool(a.get("self_adaptive"))),
    ("unsup_fraction", "--aux-data", lambda a: bool(a.get("aux_data"))),
    ("aux_epoch", "--aux-data", lambda a: bool(a.get("aux_data"))),
    ("lr_milestones", "--schedule step", lambda a: a.get("schedule") not in ("cosine", "onecycle")),
]


def inert_settings(saved):
    """[(setting, what would make it matter)] for the settings in `saved` (a run's arguments) that
    differ from their default and change nothing, e.g. ('awp_warmup', '--awp-gamma > 0')."""
    return [(key, needs) for key, needs, on in INERT_UNLESS
            if key in saved and saved[key] != DEFAULTS[key] and not on(saved)]


def run_identity(saved):
    """The settings that define what a run computes: its arguments (a dict) minus NOT_IDENTITY
    and minus the DEFAULT_IDENTITY values, with each inert setting (INERT_UNLESS) at its default."""
    identity = {k: v for k, v in sorted(saved.items()) if k not in NOT_IDENTITY and not k.startswith("method_")}
    for key, _ in inert_settings(identity):
        identity[key] = DEFAULTS[key]
    identity = {k: v for k, v in identity.items() if not (k in DEFAULT_IDENTITY and v == DEFAULT_IDENTITY[k])}
    for key, what in IDENTITY_PATHS.items():
        if isinstance(identity.get(key), str):
            identity[key] = what(identity[key])
    return identity


def identity_hash(saved):
    """12 hex digits of the SHA-256 of run_identity(saved): equal for equal experiments."""
    text = json.dumps(run_identity(saved), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
