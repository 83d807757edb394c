"""Generated data as Wang et al. (2023) train on it (docs/generated-data.md): DM-Improves-AT's .npz
(`image`, `label`) read memory-mapped, never whole; a compressed file refused in one line naming the
command that rewrites it, and that command; their sampler's batch split and epoch; their one-cycle
schedule; the new flags in a run's identity only when they change it; the generator of the bundled
data sets; FIRE and TRADES trained on a published-format file; `REHEARSAL=1 ./run_all.sh generated`
and its full-scale dry run. (Label smoothing's formula: test_losses.py.)"""
import math
import os
import pickle
import re
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fire_repro import aux_data, common, config, data, plan, training
import train_fire
import train_trades
from conftest import PY, ROOT, run_script


def published_npz(path, n=300, seed=0, compressed=False, shape=(28, 28, 1)):
    """A file in DM-Improves-AT's format (np.savez: `image` uint8 NHWC, `label` int64)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    (np.savez_compressed if compressed else np.savez)(path, image=images, label=labels)
    return images, labels


def digits_args(path, *flags):
    return train_fire.get_args(["--aux-data", str(path), *flags])


def test_published_format_is_read_memory_mapped_bit_for_bit(tmp_path):
    """image/label (and this repository's images/labels) come back as the arrays saved; the images
    are a mapping of the file (MappedArray, an np.memmap at the member's offset), not a copy, and a
    pickled AuxData (a spawned DataLoader worker) carries the path, not the pixels."""
    images, labels = published_npz(tmp_path / "gen.npz")
    got_images, got_labels = aux_data.read_aux_file(str(tmp_path / "gen.npz"))
    assert isinstance(got_images, aux_data.MappedArray) and isinstance(got_images.array(), np.memmap)
    assert np.array_equal(got_images.array(), images) and np.array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64
    args = digits_args(tmp_path / "gen.npz")
    aux = aux_data.load_aux_data(args, data.get_datasets(args)[0])
    x, y, i = aux[7]
    assert x.shape == (1, 28, 28) and y == labels[7] and i == -1
    assert torch.equal(x, torch.from_numpy(images[7]).permute(2, 0, 1).float() / 255)
    blob = pickle.dumps(aux.images)
    assert len(blob) < 1000 < images.nbytes and np.array_equal(pickle.loads(blob)[7], images[7])
    np.savez(tmp_path / "ours.npz", images=images[..., 0], labels=labels)  # (N, H, W): one channel
    ours = aux_data.load_aux_data(digits_args(tmp_path / "ours.npz"), data.get_datasets(args)[0])
    assert isinstance(ours.images, aux_data.MappedArray) and torch.equal(ours[7][0], x)


def test_a_large_file_is_not_read_into_memory(tmp_path):
    """A 200 MB published-format file, loaded and 2,560 of its images drawn, in a fresh process: its
    private memory (RssAnon) grows by less than a tenth of the file (np.load would add all of it).
    The file's pages that the kernel maps in count in RssFile: page cache, shared, reclaimable."""
    n = 255_000  # x 784 bytes = 200 MB
    path = tmp_path / "big.npz"
    with open(path, "wb") as f:  # written in pieces: the test's own memory stays small too
        import zipfile
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("image.npy", "w", force_zip64=True) as w:
                np.lib.format.write_array_header_1_0(w, dict(descr="|u1", fortran_order=False, shape=(n, 28, 28, 1)))
                for start in range(0, n, 25_500):
                    w.write(np.full((min(25_500, n - start), 28, 28, 1), start % 251, np.uint8).tobytes())
            with z.open("label.npy", "w", force_zip64=True) as w:
                np.lib.format.write_array(w, np.arange(n, dtype=np.int64) % 10)
    code = (
        "import sys, numpy as np, train_fire\n"
        "from fire_repro import aux_data, data\n"
        "args = train_fire.get_args(['--aux-data', sys.argv[1]]); train = data.get_datasets(args)[0]\n"
        "def anon(): return int(open('/proc/self/status').read().split('RssAnon:')[1].split()[0]) * 1024\n"
        "before = anon(); aux = aux_data.load_aux_data(args, train)\n"
        "xs = [aux[int(i)][0] for i in np.random.default_rng(0).integers(0, len(aux), 2560)]\n"
        "print(anon() - before, len(aux))\n")
    r = subprocess.run([PY, "-c", code, str(path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    grown, count = map(int, r.stdout.split())
    size = os.path.getsize(path)
    path.unlink()
    assert count == n and grown < size / 10, (grown, size)


def test_a_compressed_file_is_one_line_naming_the_rewrite_and_the_rewrite_maps(tmp_path):
    images, labels = published_npz(tmp_path / "zipped.npz", compressed=True)
    args = digits_args(tmp_path / "zipped.npz")
    with pytest.raises(common.UserError, match=r"compressed .* python -m fire_repro.aux_data store "):
        aux_data.load_aux_data(args, data.get_datasets(args)[0])
    r = subprocess.run([PY, "-m", "fire_repro.aux_data", "store", str(tmp_path / "zipped.npz"),
                        str(tmp_path / "stored.npz")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    got_images, got_labels = aux_data.read_aux_file(str(tmp_path / "stored.npz"))
    assert np.array_equal(got_images.array(), images) and np.array_equal(got_labels, labels)
    with np.load(tmp_path / "stored.npz") as raw:  # still an ordinary .npz
        assert np.array_equal(raw["image"], images)


def test_parts_are_joined_into_one_mappable_file(tmp_path):
    """python -m fire_repro.aux_data join: DM-Improves-AT's parts (20m_part1.npz, 20m_part2.npz) as one
    file, the images and labels in order; parts of different shapes are one line."""
    first, second = published_npz(tmp_path / "p1.npz", n=70, seed=1), published_npz(tmp_path / "p2.npz", n=50, seed=2)
    r = subprocess.run([PY, "-m", "fire_repro.aux_data", "join", str(tmp_path / "all.npz"), str(tmp_path / "p1.npz"),
                        str(tmp_path / "p2.npz")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "120 images of 2 parts" in r.stdout, r.stderr
    images, labels = aux_data.read_aux_file(str(tmp_path / "all.npz"))
    assert np.array_equal(images.array(), np.concatenate([first[0], second[0]]))
    assert np.array_equal(labels, np.concatenate([first[1], second[1]]))
    published_npz(tmp_path / "p3.npz", n=10, shape=(32, 32, 3))
    with pytest.raises(common.UserError, match="one shape"):
        aux_data.join(str(tmp_path / "bad.npz"), [str(tmp_path / "p1.npz"), str(tmp_path / "p3.npz")])
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize("damage, needle", [
    ("truncated", "cannot read"), ("float", "uint8"), ("cifar-shaped", "uint8 of shape (N, 28, 28, 1)"),
    ("label 10", "integers in [0, 10)"), ("one-hot", "not one-hot"), ("keys", "expected `images`"),
    ("objects", "cannot read")])
def test_a_damaged_published_file_is_one_line(tmp_path, damage, needle):
    path = tmp_path / "gen.npz"
    images, labels = published_npz(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif damage == "float":
        np.savez(path, image=images.astype(np.float32), label=labels)
    elif damage == "cifar-shaped":
        published_npz(path, shape=(32, 32, 3))
    elif damage == "label 10":
        np.savez(path, image=images, label=np.where(labels == 0, 10, labels))
    elif damage == "one-hot":
        np.savez(path, image=images, label=np.eye(10, dtype=np.int64)[labels])
    elif damage == "keys":
        np.savez(path, img=images, label=labels)
    else:
        np.savez(path, image=np.array([object()] * 4), label=labels[:4])
    r = run_script("train_fire.py", "--aux-data", str(path), "--epochs", "1", "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


def test_the_sampler_splits_and_counts_an_epoch_as_wang_et_al():
    """Batch 512 at --unsup-fraction 0.7: 154 labelled + 358 generated images (their split); with
    --aux-epoch full an epoch is ceil(50,000 / 512) = 98 batches (their sampler: the training set
    before the validation split), else ceil(49,000 / 512) = 96; without extra data the flag is inert."""
    assert data.batch_split(512, 0.7) == (154, 358) and data.batch_split(256, 0.5) == (128, 128)
    full = train_fire.get_args(["--dataset", "cifar10", "--aux-data", __file__, "--batch-size", "512",
                                "--aux-epoch", "full"])
    assert data.epoch_steps(49_000, full) == 98 == math.ceil(50_000 / 512)
    assert plan.run_epoch_steps(full) == 98
    assert data.epoch_steps(49_000, train_fire.get_args(["--dataset", "cifar10", "--aux-data", __file__,
                                                         "--batch-size", "512"])) == 96
    no_aux = train_fire.get_args(["--dataset", "cifar10", "--batch-size", "512", "--aux-epoch", "full"])
    assert data.epoch_steps(49_000, no_aux) == 96
    sampler = data.MixedBatches(1000, 5000, 512, 0.7, torch.Generator().manual_seed(0), steps=98)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 98 and all(len(b) == 512 for b in batches)
    assert all(sum(i < 1000 for i in b) == 154 for b in batches)
    first = [i for b in batches[:6] for i in b if i < 1000]  # 6 x 154 < 1000: distinct labelled images
    assert len(set(first)) == len(first)


def test_new_flags_change_the_identity_only_when_they_change_the_run(capsys):
    """--label-smoothing 0, --aux-epoch train and --schedule onecycle's inert milestones keep every
    identity (so every existing folder); --aux-epoch full without extra data is the run without it,
    with one warning line; with a value that changes the run, the identity changes."""
    def ident(script, *flags):
        return config.identity_hash(vars(script.get_args(list(flags))))
    for script in (train_fire, train_trades):
        assert ident(script, "--label-smoothing", "0") == ident(script)
        assert ident(script, "--label-smoothing", "0.1") != ident(script)
    aux = ["--aux-data", __file__]
    assert ident(train_fire, *aux, "--aux-epoch", "train") == ident(train_fire, *aux)
    assert ident(train_fire, *aux, "--aux-epoch", "full") != ident(train_fire, *aux)
    assert ident(train_fire, "--aux-epoch", "full") == ident(train_fire)
    assert ident(train_fire, "--schedule", "onecycle", "--lr-milestones", "0.5") == \
        ident(train_fire, "--schedule", "onecycle") != ident(train_fire, "--schedule", "cosine")
    capsys.readouterr()
    train_fire.main(["--aux-epoch", "full", "--print-identity"])
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "--aux-epoch full changes nothing without --aux-data" in warnings[0]
    for bad in (["--label-smoothing", "1"], ["--label-smoothing", "-0.1"], ["--aux-epoch", "all"]):
        with pytest.raises(common.UserError):
            train_fire.get_args(bad)


def test_onecycle_is_pytorchs_one_cycle_stepped_per_epoch():
    """--schedule onecycle is OneCycleLR(max_lr=lr, pct_start=0.025, total_steps=epochs), Wang et
    al.'s cosinew: 0.008 at the first of 400 epochs of lr 0.2, 0.2 at the 10th, 8e-7 at the last."""
    for epochs in (400, 100, 15, 2):
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, pct_start=0.025, total_steps=epochs,
                                                  cycle_momentum=False)
        expected = []
        for e in range(epochs):
            expected.append(opt.param_groups[0]["lr"])
            opt.step()
            if e < epochs - 1:
                ref.step()
        factor = training.lr_factor(train_fire.get_args(["--schedule", "onecycle", "--epochs", str(epochs)]))
        assert [0.2 * factor(e) for e in range(epochs)] == pytest.approx(expected, rel=1e-12), epochs
    factor = training.lr_factor(train_fire.get_args(["--schedule", "onecycle", "--epochs", "400"]))
    assert [0.2 * factor(e) for e in (0, 9, 399)] == pytest.approx([0.008, 0.2, 8e-7], rel=1e-9)
    assert training.one_cycle(0, 40) == 1.0  # the warm-up shorter than an epoch: the peak at once


def test_the_generator_writes_class_conditional_digits_in_the_published_format(tmp_path):
    """python -m fire_repro.aux_data generate digits: image (N, 28, 28, 1) uint8 and label int64,
    the same number of each class, labelled by the class they were generated for; the same seed gives
    the same file; load_aux_data reads it."""
    out = tmp_path / "gen.npz"
    cmd = [PY, "-m", "fire_repro.aux_data", "generate", "digits", str(out), "--ratio", "2", "--keep", "0.5",
           "--components", "2", "--dims", "10"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    with np.load(out) as raw:
        assert sorted(raw.files) == ["image", "label"]
        images, labels = raw["image"], raw["label"]
    per_class = round(2 * 1257 / 10)
    assert images.shape == (10 * per_class, 28, 28, 1) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [per_class] * 10 and images.max() > 200
    again = aux_data.generate("digits", ratio=2, keep=0.5, components=2, dims=10, seed=0)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], labels)
    # the images look like their class: a classifier of the real training split agrees with the labels
    train = data.get_datasets(train_fire.get_args([]))[0]
    x, y = data.first_images(train)
    centroids = torch.stack([x[y == c].flatten(1).mean(0) for c in range(10)])
    generated = torch.from_numpy(images).float().flatten(1) / 255
    nearest = torch.cdist(generated, centroids).argmin(1).numpy()
    assert (nearest == labels).mean() > 0.8
    args = digits_args(out)
    assert len(aux_data.load_aux_data(args, train)) == len(labels)


@pytest.mark.parametrize("script, flags", [(train_fire, ["--lam", "12"]), (train_trades, ["--beta", "5"])])
def test_fire_and_trades_train_on_a_published_file_with_the_recipe(script, flags, tmp_path, few_digits):
    """One epoch of the recipe's pieces (70% generated, their epoch, their schedule, label smoothing,
    the average) on a file in DM-Improves-AT's format; the run records the file and the
    recipe, and the epoch's CE is the smoothed one."""
    path = tmp_path / "gen.npz"
    data.write_rehearsal_aux(str(path), "digits", n=400, published=True)
    with np.load(path) as raw:
        assert sorted(raw.files) == ["image", "label"] and raw["label"].dtype == np.int64
    summary = script.main([*flags, "--aux-data", str(path), "--unsup-fraction", "0.7", "--aux-epoch", "full",
                           "--schedule", "onecycle", "--label-smoothing", "0.1", "--ema", "0.9", "--epochs", "1",
                           "--attack-steps", "1", "--eval-steps", "1", "--out-dir", str(tmp_path / "run")])
    assert summary["aux_data"] == str(path) and summary["ema"] == 0.9
    saved = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["args"]
    assert (saved["label_smoothing"], saved["aux_epoch"], saved["unsup_fraction"]) == (0.1, "full", 0.7)


def test_the_epoch_statistics_record_the_smoothed_ce():
    logits, y = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), torch.arange(8)
    stats = training.EpochStats("cpu", eps=0.1, step_size=0.02, label_smoothing=0.2)
    stats.add(torch.tensor(0.0), logits, y, torch.tensor(1.0), torch.zeros(8, 1), torch.zeros(8, 1))
    assert stats.sums[1].item() == pytest.approx(8 * F.cross_entropy(logits, y, label_smoothing=0.2).item(), rel=1e-6)


def run_all(*blocks, timeout=600, **env):
    return subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), *blocks], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, PYTHON=PY, **env))


def test_rehearsal_of_the_generated_block_builds_its_table_on_a_published_format_stand_in(tmp_path):
    """REHEARSAL=1 ./run_all.sh generated: the stand-in is written in DM-Improves-AT's format (image,
    label), TRADES beta 5 and FIRE lam 12 train on it with the recipe's flags (and FIRE's lam sweep),
    AutoAttack evaluates them, and the table quotes Wang et al.'s and Bartoldson et al.'s rows."""
    env = dict(REHEARSAL="1", SEEDS="0", SWEEP_SEEDS="0", JOBS="1", OUT_DIR=str(tmp_path))
    r = run_all("generated", **env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with np.load(tmp_path / "rehearsal_generated.npz") as raw:
        assert sorted(raw.files) == ["image", "label"] and raw["image"].shape[1:] == (32, 32, 3)
    trained = re.findall(r"^  train  \S+/runs/(\S+)-s0-[0-9a-f]{12} ", r.stdout, re.M)
    assert trained == ["trades-cifar10-beta5", "fire-cifar10-lam12", "fire-cifar10-lam6", "fire-cifar10-lam24"]
    table = (tmp_path / "tables" / "generated.md").read_text()
    assert "REHEARSAL" in table and "| FIRE (lam=12) + extra data + EMA |" in table, table
    for row in ("Wang et al. 2023, 1M generated images", "Bartoldson et al. 2024, 300M generated images"):
        assert row in table
    command = next((tmp_path / "runs").glob("fire-cifar10-lam12-*/command.txt")).read_text()
    for flag in ("--label-smoothing 0.1", "--unsup-fraction 0.7", "--aux-epoch full", "--schedule onecycle"):
        assert flag in command, command


def test_the_generated_block_is_priced_at_wang_et_als_steps(tmp_path):
    """DRY_RUN=1 ./run_all.sh generated with GENERATED_DATA present: per seed TRADES beta 5 and FIRE
    lam 12, FIRE lam 6 and 24 per sweep seed, each 98 steps of 512 (154 labelled + 358 generated) x
    400 epochs, priced at the WRN-28-10 images per hour of the paper's extra-data run; nothing is
    created. Without the file the block is skipped in one line."""
    gen = tmp_path / "1m.npz"
    gen.write_bytes(b"")
    r = run_all("generated", DRY_RUN="1", SEEDS="0", SWEEP_SEEDS="0", GENERATED_DATA=str(gen),
                OUT_DIR=str(tmp_path / "out"), timeout=300)
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"would train  \S+/(\S+?)-s0-\w+  \(.*\)\n    (.*)", r.stdout)
    assert [tag for tag, _ in rows] == ["trades-cifar10-beta5", "fire-cifar10-lam12", "fire-cifar10-lam6",
                                        "fire-cifar10-lam24"]
    d = data.DATASETS["cifar10"]
    measured = plan.steps_per_epoch(d.train_images, 256) * 256 * 200  # the paper's FIRE + 500K run
    lo, hi = (4 * h * 98 * 512 * 400 / measured for h in d.aux_paper_hours)
    for _, line in rows:
        assert line == (f"98 steps/epoch x 400 epochs of 512 images (154 labelled + 358 extra images each), "
                        f"{plan.hours(lo)}-{plan.hours(hi)} GPU-hours"), line
    assert not (tmp_path / "out").exists()
    skipped = run_all("generated", DRY_RUN="1", GENERATED_DATA=str(tmp_path / "none.npz"),
                      OUT_DIR=str(tmp_path / "out"), timeout=300)
    assert skipped.returncode == 0 and "SKIP generated" in skipped.stdout
