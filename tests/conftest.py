"""Fixtures and helpers that several test files share (each test_<subject>.py holds one subject).
Run the suite with `python -m pytest -q -n 2` (CPU, about ten minutes on two cores)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

# The suite runs in two processes side by side (`pytest -n 2`, README): one torch thread each, also
# in the scripts they start, so that two processes share the two cores without oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402  (after the thread setting)

import benchmark
from fire_repro import common
from fire_repro import data
from fire_repro import training
from fire_repro import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
PY = sys.executable


# ---- Scripts run as their users run them, and the digits run that several files check
QUICK = ["--epochs", "4", "--lr", "0.1", "--attack-steps", "5", "--eval-steps", "10"]


def run_script(script, *args, timeout=600):
    return subprocess.run([PY, os.path.join(ROOT, script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def fire_run(tmp_path_factory):
    """(run folder, summary) of a finished 4-epoch FIRE run on digits, built once per test process and
    shared by the training, run-folder and evaluation tests."""
    out = tmp_path_factory.mktemp("fire")
    r = run_script("train_fire.py", *QUICK, "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def few_digits(monkeypatch):
    """Trainings run in this test process (script.main(argv)) use the first 192 of the 1,257 digits
    training images: real runs, six times shorter, for tests of the loop rather than of learning."""
    real = data.get_datasets

    def first_images(args):
        train, val, test = real(args)
        return data.Indexed(train.base, train.indices[:192], train.transform), val, test
    monkeypatch.setattr(training, "get_datasets", first_images)


class FakeCIFAR(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 yields (PIL images, integer labels): the real cifar10 code path
    of data.get_datasets without the download."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 10, n).tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image
        return Image.fromarray(self.data[i]), self.targets[i]


def cli_error(main, argv, capsys):
    """Run a script's main() as its command line does: (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as e:
        common.cli(lambda: main(argv))
    return e.value.code, capsys.readouterr().err.strip().splitlines()


# ---- Inputs built for a test: an Imagenet32 folder, a result JSON, a benchmark step


def imagenet32_folder(data_dir, per_file=8, n_val=16):
    """A tiny stand-in of the Imagenet32 .npz release in <data_dir>/imagenet32: the ten training
    files and val_data.npz, uint8 rows (N, 3072) in CHW order, 1-based labels."""
    folder = data_dir / "imagenet32"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in data.IMAGENET32_FILES:
        n = n_val if name == "val_data.npz" else per_file
        np.savez(folder / name, data=rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 labels=rng.integers(1, 1001, n))
    return folder


METHODS = {"fire": ("FIRE", 6), "trades": ("TRADES", 2), "hellinger": ("Hellinger", 3), "madry": ("Madry et al.", 0),
           "mart": ("MART", 1)}  # (title, row order) of train_fire.py's and train_trades.py's entries


def write_result(folder, name, robust, method="fire", seed=0, index=None, npz=True, training=None, **extra):
    """A hand-made result JSON (no checkpoint) with its per-image .npz; `training` updates the
    recorded training identity (e.g. lr=0.01)."""
    folder.mkdir(parents=True, exist_ok=True)
    robust = np.asarray(robust, bool)
    lam, beta = 12.0 if method == "fire" else None, 6.0 if method == "trades" else None
    identity = dict(method=method, dataset="cifar10", model="wrn-34-10", eps=0.031, lam=lam, beta=beta,
                    seed=seed, epochs=100, lr=0.1, batch_size=256)
    identity.update(training or {})
    title, order = METHODS[method]
    record = dict(format=results.RESULT_FORMAT, defense=extra.pop("defense", title), method=method,
                  method_title=title, method_order=order, method_weight="lam" if lam else "beta" if beta else None,
                  method_reference=12.0 if method == "fire" else None,
                  method_flags=["distance" if method in ("fire", "hellinger") else "loss", "self_adaptive"],
                  dataset="cifar10", model="wrn-34-10", eps=8 / 255, train_eps=0.031,
                  lam=lam, beta=beta, seed=seed, natural=0.9, autoattack=robust.mean().item(),
                  avg_acc=(0.9 + robust.mean().item()) / 2, n_examples=len(robust), split="test",
                  aa_version="standard", checkpoint_kind="best", train_time_s=3600.0,
                  per_sample=f"{name}.npz", train_identity=identity)
    record.update(extra)
    (folder / f"{name}.json").write_text(json.dumps(record))
    if npz:
        np.savez(folder / f"{name}.npz", index=np.arange(len(robust)) if index is None else index,
                 square=robust)
    return record


def make_bench(*flags, batch_size=16):
    """A Bench (SmallCNN, 1x28x28) whose last layer is random, so that outputs differ between
    inputs (TRADES' SmallCNN starts with a zero last layer: every output uniform, every distance 0)."""
    args = benchmark.get_args(["--dataset", "mnist", *flags])
    bench = benchmark.Bench(args, batch_size, torch.device("cpu"))
    last = bench.model[1].classifier[-1]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        last.weight.copy_(0.3 * torch.randn(last.weight.shape, generator=gen))
    return bench
