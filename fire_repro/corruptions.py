"""Common corruptions (Hendrycks & Dietterich 2019), as RobustBench's corruption leaderboard runs them.

    python -m fire_repro.corruptions runs/c10/best.pt --data-dir data   # reads data/CIFAR-10-C/ -> runs/c10/corruptions.json
    python -m fire_repro.corruptions runs/fire-digits-s0/best.pt        # digits: computed corruptions
    python -m fire_repro.tables runs/ --corruptions                     # per corruption, mean +- std over seeds

CIFAR-10 and CIFAR-100 (RobustBench's boards): the accuracy on each of RobustBench's 15 corruptions
(robustbench.data.CORRUPTIONS) at each of the 5 severities, on the first --n-examples of the 10,000
test images, read from RobustBench's files <data-dir>/CIFAR-10-C/<corruption>.npy (uint8, N x 32 x 32
x 3, severities 1-5 stacked: 50,000 images) and labels.npy, and the mean over all 75: the number of
RobustBench's board. RobustBench's own loader (robustbench.data.load_cifar10c) downloads from Zenodo
when the folder is missing, reads a whole 150 MB file for each severity and takes 10,000 images per
severity as given; here the files are read memory-mapped and checked (shape, dtype, labels), so a
missing or wrong file is one line, and a small stand-in of the same layout (write_standin, the
rehearsal's) is read as the real one.

Other data sets (digits, mnist5k, mnist): no published corrupted files exist, so the corruptions that
need no external data are computed on the test images (COMPUTED, Hendrycks' CIFAR-10-C definitions
and severities; docs/corruptions.md), seeded, stored as the files store them (uint8).
The result goes to <run>/corruptions[-<checkpoint>].json (results.corruptions_out) with the
same fields of identity as an AutoAttack result.
"""
import io
import math
import os
import sys
import time

import numpy as np
import torch

from fire_repro import results, robustbench_io
from fire_repro.checkpoints import load_checkpoint, load_model
from fire_repro.common import (ArgumentParser, Range, UserError, check_output, check_ranges, cli, lock_folder,
                               sha256_file, write_json)
from fire_repro.config import run_identity
from fire_repro.data import DATASETS, REHEARSAL_NOTE, first_images, split_of
from fire_repro.parallel import setup_device
from fire_repro.run_folder import missing_run_file

SEVERITIES = (1, 2, 3, 4, 5)
# RobustBench's corruption boards: data set -> its name in robustbench's enums (BenchmarkDataset).
BOARDS = {"cifar10": "cifar10", "cifar100": "cifar100"}
RANGES = {"n_examples": Range(1, 10**7), "batch_size": Range(1, 65_536), "seed": Range(0, 2**32, high_open=True)}


def board_facts(dataset):
    """(corruption names, folder name, Zenodo record, archive) of RobustBench's corruption board for
    `dataset`, from the robustbench package (robustbench.data)."""
    robustbench_io.robustbench()
    from robustbench.data import CORRUPTIONS_DICT, CORRUPTIONS_DIR_NAMES, ZENODO_CORRUPTIONS_LINKS
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    bd = BenchmarkDataset(BOARDS[dataset])
    record, files = ZENODO_CORRUPTIONS_LINKS[bd]
    return (tuple(CORRUPTIONS_DICT[bd][ThreatModel.corruptions]), CORRUPTIONS_DIR_NAMES[bd][ThreatModel.corruptions],
            record, sorted(files)[0])


# ---- RobustBench's files ------------------------------------------------------------------------
def _load(path, dataset):
    """np.load of one file (memory-mapped), or a one-line UserError saying where to get it."""
    corruptions, folder, record, archive = board_facts(dataset)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: download {archive} from RobustBench's Zenodo record "
                        f"https://zenodo.org/record/{record} and unpack it under --data-dir (docs/corruptions.md)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a .npy file ({str(e).splitlines()[0][:120]}); download it again "
                        f"(https://zenodo.org/record/{record})") from None


def read_severity(data_dir, dataset, corruption, severity, n=None):
    """(images (n, C, H, W) float in [0, 1], labels (n,) int64) of one corruption at one severity
    from RobustBench's layout <data_dir>/<CIFAR-10-C>/<corruption>.npy + labels.npy: the first n
    images of that severity's block (default all). Checks shape, dtype and labels (UserError)."""
    _, folder, _, _ = board_facts(dataset)
    root = os.path.join(data_dir, folder)
    c, h, w = DATASETS[dataset].shape
    images = _load(os.path.join(root, f"{corruption}.npy"), dataset)
    labels = _load(os.path.join(root, "labels.npy"), dataset)
    path = os.path.join(root, f"{corruption}.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, c) or len(images) % len(SEVERITIES):
        raise UserError(f"{path}: expected uint8 images of shape (5 x N, {h}, {w}, {c}) (severities 1-5 "
                        f"stacked), got {images.dtype} {tuple(images.shape)}")
    per = len(images) // len(SEVERITIES)
    if labels.ndim != 1 or len(labels) not in (per, len(images)) or labels.dtype.kind not in "iu":
        raise UserError(f"{os.path.join(root, 'labels.npy')}: expected {len(images)} (or {per}) integer labels "
                        f"for {path}, got {labels.dtype} {tuple(labels.shape)}")
    n = per if n is None else min(n, per)
    lo = (severity - 1) * per
    x = torch.from_numpy(np.array(images[lo:lo + n])).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(np.asarray(labels[:n]).astype(np.int64))
    if y.min() < 0 or y.max() >= DATASETS[dataset].classes:
        raise UserError(f"{os.path.join(root, 'labels.npy')}: labels outside [0, {DATASETS[dataset].classes})")
    return x, y


def write_standin(data_dir, dataset, n=16, seed=0, corruptions=None):
    """A stand-in of RobustBench's files for `dataset` under <data_dir>/<CIFAR-10-C>/: every
    corruption's .npy (uint8, the same n generated images (data.rehearsal_images) at each of the 5
    severities) and labels.npy (their labels, 5 times). Written into a temporary folder renamed at
    the end: whole or absent."""
    from fire_repro.data import rehearsal_images
    names, folder, _, _ = board_facts(dataset)
    final = os.path.join(data_dir, folder)
    tmp = final + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    images, labels = rehearsal_images(dataset, n, seed)
    for name in corruptions or names:
        np.save(os.path.join(tmp, f"{name}.npy"), np.concatenate([images] * len(SEVERITIES)))
    np.save(os.path.join(tmp, "labels.npy"), np.tile(labels, len(SEVERITIES)).astype(np.uint8))
    os.replace(tmp, final)
    return final


# ---- corruptions computed on images of another data set (no published files) ------------------
# Hendrycks' CIFAR-10-C definitions and severity constants (hendrycks/robustness,
# ImageNet-C/create_c/make_cifar_c.py), on (N, C, H, W) float images in [0, 1], as numpy.
def gaussian_noise(x, s, rng):
    return x + rng.normal(size=x.shape, scale=[0.04, 0.06, .08, .09, .10][s - 1])


def shot_noise(x, s, rng):
    c = [500, 250, 100, 75, 50][s - 1]
    return rng.poisson(x * c) / c


def impulse_noise(x, s, rng):
    """Salt and pepper on a share c of the pixels (skimage.util.random_noise's 's&p', half each)."""
    c = [.01, .02, .03, .05, .07][s - 1]
    flip, salt = rng.random(x.shape) <= c, rng.random(x.shape) <= 0.5
    return np.where(flip, salt.astype(x.dtype), x)


def _disk(radius, alias_blur):
    """make_cifar_c.disk: a disk of the radius on a 17 x 17 grid, normalised, then cv2.GaussianBlur
    with a 3 x 3 kernel of sigma alias_blur (border reflect-101)."""
    from scipy.ndimage import correlate1d
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))
    g /= g.sum()
    return correlate1d(correlate1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")


def defocus_blur(x, s, rng):
    from scipy.ndimage import correlate
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    kernel = _disk(radius, alias)[None, None]
    return correlate(x, kernel, mode="mirror")  # cv2.filter2D's border is reflect-101 = scipy's mirror


def _clipped_zoom(img, factor):
    """make_cifar_c.clipped_zoom on (N, C, H, W): zoom the centre by `factor` (linear), crop to H x W."""
    from scipy.ndimage import zoom
    h = img.shape[-1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    out = zoom(img[..., top:top + ch, top:top + ch], (1, 1, factor, factor), order=1)
    trim = (out.shape[-1] - h) // 2
    return out[..., trim:trim + h, trim:trim + h]


def zoom_blur(x, s, rng):
    factors = np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][s - 1], 0.01)
    return (x + sum(_clipped_zoom(x, z) for z in factors)) / (len(factors) + 1)


def brightness(x, s, rng):
    """+c on HSV's value: on grey images (hue and saturation 0) the value is the pixel itself."""
    if x.shape[1] != 1:
        raise ValueError("brightness is implemented for grey images (HSV's value = the pixel)")
    return x + [.05, .1, .15, .2, .3][s - 1]


def contrast(x, s, rng):
    c = [.75, .5, .4, .3, 0.15][s - 1]
    means = x.mean(axis=(2, 3), keepdims=True)
    return (x - means) * c + means


def _per_image_pil(x, op):
    from PIL import Image
    out = np.empty_like(x)
    for i, img in enumerate(np.uint8(x * 255)):
        mode_img = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        arr = np.asarray(op(mode_img), dtype=np.float64) / 255
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out


def pixelate(x, s, rng):
    from PIL import Image
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    h = x.shape[-1]
    return _per_image_pil(x, lambda im: im.resize((int(h * c), int(h * c)), Image.BOX).resize((h, h), Image.BOX))


def jpeg_compression(x, s, rng):
    from PIL import Image

    def jpeg(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=[80, 65, 58, 50, 40][s - 1])
        return Image.open(buf)
    return _per_image_pil(x, jpeg)


# The corruptions computed for data sets without published files: 9 of RobustBench's 15, those that
# need no external data (motion blur and snow need ImageMagick's motion blur, frost Hendrycks'
# frost photographs; fog, glass blur and elastic transform are not implemented here).
COMPUTED = {f.__name__: f for f in (gaussian_noise, shot_noise, impulse_noise, defocus_blur, zoom_blur,
                                    brightness, contrast, pixelate, jpeg_compression)}


def corrupt(images, name, severity, seed):
    """`images` (N, C, H, W) in [0, 1] under corruption `name` of COMPUTED at `severity`, seeded by
    (seed, corruption, severity), clipped to [0, 1] and truncated to uint8 as Hendrycks' files are
    (np.uint8 of the float image x 255), back in [0, 1] as float32."""
    rng = np.random.default_rng([seed, list(COMPUTED).index(name), severity])
    out = COMPUTED[name](images.numpy().astype(np.float64), severity, rng)
    return torch.from_numpy(np.uint8(np.clip(out, 0, 1) * 255).astype(np.float32) / 255)


# ---- the evaluation ----------------------------------------------------------------------------
def source_of(dataset):
    """'robustbench-files' for a data set of RobustBench's corruption boards, else 'computed'."""
    return "robustbench-files" if dataset in BOARDS else "computed"


def corruption_names(dataset):
    return board_facts(dataset)[0] if dataset in BOARDS else tuple(COMPUTED)


@torch.no_grad()
def accuracy(model, x, y, batch_size, device):
    correct = 0
    for lo in range(0, len(x), batch_size):
        correct += (model(x[lo:lo + batch_size].to(device)).argmax(1).cpu() == y[lo:lo + batch_size]).sum().item()
    return correct / len(x)


def settings_of(args, dataset, n):
    """What besides the checkpoint changes the numbers (the batch size does not: no randomness)."""
    return dict(source=source_of(dataset), corruptions=list(corruption_names(dataset)),
                severities=list(SEVERITIES), n_examples=n,
                **({"seed": args.seed} if dataset not in BOARDS else {}))


def files_per_severity(data_dir, dataset):
    """Images per severity in RobustBench's files of `dataset` under data_dir (its first corruption's)."""
    names, folder, _, _ = board_facts(dataset)
    read_severity(data_dir, dataset, names[0], 1, n=1)  # checked
    return len(_load(os.path.join(data_dir, folder, f"{names[0]}.npy"), dataset)) // len(SEVERITIES)


def finished(path, args, saved):
    """(result file, finished result or None, its key) of the corruption evaluation of checkpoint `path`
    (training arguments `saved`) with the command's `args`, RobustBench's files present: the one
    answer to "is it done", for the command and for the plan of run_all.sh."""
    out = args.out or results.corruptions_out(path)
    data_dir = args.data_dir or saved.get("data_dir") or "data"
    n = min(args.n_examples or math.inf, files_per_severity(data_dir, saved["dataset"]))
    key = dict(checkpoint_sha256=sha256_file(path), settings=settings_of(args, saved["dataset"], n))
    return out, results.finished_corruptions(out, **key), key


def evaluate(path, args, device):
    """Evaluate one checkpoint on every corruption and severity; writes and returns the result."""
    if not os.path.lexists(path):
        raise UserError(f"checkpoint {path!r} {missing_run_file(path)}")
    ckpt = load_checkpoint(path)
    saved = ckpt["args"]
    dataset = saved["dataset"]
    data_dir = args.data_dir or saved.get("data_dir") or "data"
    out = args.out or results.corruptions_out(path)
    check_output(out, "--out" if args.out else "result file")
    names = corruption_names(dataset)
    if dataset in BOARDS:  # every file checked before the first image is evaluated
        for name in names:
            read_severity(data_dir, dataset, name, 1, n=1)
        clean = None
        out, done, key = finished(path, args, saved)
        n = key["settings"]["n_examples"]
    else:
        clean = first_images(split_of(saved, "test", args.data_dir), args.n_examples)
        n = len(clean[1])
        key = dict(checkpoint_sha256=sha256_file(path), settings=settings_of(args, dataset, n))
        done = results.finished_corruptions(out, **key)
    if done is not None:
        print(f"{path}: already evaluated (same checkpoint SHA-256 and settings) -> {out}", flush=True)
        return done
    model = load_model(path, device).float()
    t0 = time.time()
    acc = {}
    for name in names:
        acc[name] = []
        for s in SEVERITIES:
            x, y = (read_severity(data_dir, dataset, name, s, n) if clean is None
                    else (corrupt(clean[0], name, s, args.seed), clean[1]))
            acc[name].append(accuracy(model, x, y, args.batch_size, device))
        print(f"  {name:<18} " + " ".join(f"{a:.4f}" for a in acc[name]), flush=True)
    natural = None if clean is None else accuracy(model, clean[0], clean[1], args.batch_size, device)
    weight = saved.get("method_weight")
    from importlib.metadata import version
    result = dict(
        format=results.CORRUPTIONS_FORMAT, defense=args.defense,
        **{k: v for k, v in saved.items() if k.startswith("method")}, **({weight: saved.get(weight)} if weight else {}),
        dataset=dataset, model=saved["model"], train_norm=saved.get("norm", "linf"), train_eps=saved["eps"],
        aux_data=saved.get("aux_data"), init_from=saved.get("init_from"), seed=saved["seed"],
        epochs=saved.get("epochs"), ema=saved.get("ema"), lr=saved.get("lr"), checkpoint=os.path.abspath(path),
        checkpoint_kind=os.path.splitext(os.path.basename(path))[0], epoch=ckpt.get("epoch"),
        split="test", n_examples=n, natural=natural, accuracy=acc,
        corruption_mean={k: float(np.mean(v)) for k, v in acc.items()},
        mean=float(np.mean([a for v in acc.values() for a in v])),  # over every corruption and severity
        **key, train_identity=run_identity(saved), eval_time_s=time.time() - t0, device=device.type,
        torch=torch.__version__, robustbench=version("robustbench"),
        **({"rehearsal": REHEARSAL_NOTE} if saved.get("rehearsal") else {}))
    write_json(out, result)
    print((f"{REHEARSAL_NOTE}: " if saved.get("rehearsal") else "")
          + (f"natural {natural:.4f} | " if natural is not None else "")
          + f"mean over {len(names)} corruptions x {len(SEVERITIES)} severities {result['mean']:.4f} -> {out}", flush=True)
    return result


def get_args(argv=None):
    p = ArgumentParser(prog="python -m fire_repro.corruptions", description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="best.pt / last.pt of train_fire.py or train_trades.py")
    p.add_argument("--data-dir", type=str, default=None,
                   help="folder holding CIFAR-10-C/ or CIFAR-100-C/ (RobustBench's files); for other data sets "
                        "where the test images live (default: the checkpoint's --data-dir)")
    p.add_argument("--n-examples", type=int, default=None,
                   help=f"first N test images of each corruption and severity, {RANGES['n_examples']} (default: "
                        f"all; RobustBench: 10,000)")
    p.add_argument("--batch-size", type=int, default=500, help=f"images per forward pass, {RANGES['batch_size']}")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed of the computed corruptions' noise, {RANGES['seed']} (not used with RobustBench's files)")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when available")
    p.add_argument("--defense", type=str, default=None, help="name of the table row (default: from the checkpoint)")
    p.add_argument("--out", type=str, default=None, help="result JSON (default: <run>/corruptions[-<checkpoint>].json)")
    args = p.parse_args(argv)
    if args.out and len(args.checkpoints) > 1:
        p.error("--out needs exactly one checkpoint")
    check_ranges(p, args, RANGES)
    return args


def main(argv=None):
    args = get_args(argv)
    device = setup_device(args)
    out = []
    for path in args.checkpoints:
        folder = os.path.dirname(os.path.abspath(path))
        lock = lock_folder(folder, "run folder") if os.access(folder, os.W_OK) else None
        try:
            out.append(evaluate(path, args, device))
        finally:
            if lock is not None:
                lock.close()
    return out


if __name__ == "__main__":
    cli(main)
