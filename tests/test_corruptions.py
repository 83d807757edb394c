"""Common corruptions (fire_repro.corruptions): RobustBench's CIFAR-10-C layout read and checked on
stand-in files written here, the corruptions computed for other data sets, the result file and its
tables."""
import json

import numpy as np
import pytest
import torch

import train_fire
from fire_repro import corruptions, results, tables
from fire_repro.common import UserError, sha256_file
from conftest import cli_error, write_result

TINY = ["--rehearsal", "--model", "wrn-10-1", "--epochs", "1", "--batch-size", "32", "--val-size", "16",
        "--attack-steps", "1", "--eval-steps", "1", "--workers", "0", "--device", "cpu"]


def write_file(folder, name, blocks):
    """<folder>/<name>.npy: severity s's block of n images all of value blocks[s-1] (uint8 NHWC)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 6
    np.save(folder / f"{name}.npy", np.concatenate(
        [np.full((n, 32, 32, 3), v, np.uint8) for v in blocks]))
    np.save(folder / "labels.npy", np.tile(np.arange(n) % 10, 5).astype(np.uint8))


def test_reader_takes_each_severity_block_of_robustbenchs_layout(tmp_path):
    """Severity s is the s-th block of N images of <corruption>.npy (NHWC uint8 -> NCHW in [0, 1]),
    its labels the first N of labels.npy (which repeats them for every severity)."""
    write_file(tmp_path / "CIFAR-10-C", "fog", [10, 20, 30, 40, 50])
    for s in corruptions.SEVERITIES:
        x, y = corruptions.read_severity(str(tmp_path), "cifar10", "fog", s)
        assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
        assert torch.allclose(x, torch.full_like(x, 10 * s / 255), atol=1e-7)
        assert y.tolist() == [0, 1, 2, 3, 4, 5]
    x, y = corruptions.read_severity(str(tmp_path), "cifar10", "fog", 3, n=2)
    assert len(x) == len(y) == 2


def test_missing_and_malformed_files_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"CIFAR-100-C/fog\.npy not found: download CIFAR-100-C\.tar from "
                                        r"RobustBench's Zenodo record https://zenodo.org/record/3555552"):
        corruptions.read_severity(str(tmp_path), "cifar100", "fog", 1)
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    np.save(folder / "fog.npy", np.zeros((10, 32, 32), np.uint8))   # no channel axis
    np.save(folder / "labels.npy", np.zeros(10, np.uint8))
    with pytest.raises(UserError, match=r"fog\.npy: expected uint8 images of shape \(5 x N, 32, 32, 3\)"):
        corruptions.read_severity(str(tmp_path), "cifar10", "fog", 1)
    np.save(folder / "fog.npy", np.zeros((10, 32, 32, 3), np.float32))  # not uint8
    with pytest.raises(UserError, match="expected uint8"):
        corruptions.read_severity(str(tmp_path), "cifar10", "fog", 1)
    np.save(folder / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    np.save(folder / "labels.npy", np.zeros(7, np.uint8))  # neither 2 nor 10 labels
    with pytest.raises(UserError, match=r"labels\.npy: expected 10 \(or 2\) integer labels"):
        corruptions.read_severity(str(tmp_path), "cifar10", "fog", 1)


def test_the_boards_corruptions_come_from_robustbench():
    from robustbench.data import CORRUPTIONS
    names, folder, _, _ = corruptions.board_facts("cifar10")
    assert names == tuple(CORRUPTIONS) and len(names) == 15 and folder == "CIFAR-10-C"
    assert corruptions.board_facts("cifar100")[1] == "CIFAR-100-C"


def test_computed_corruptions_are_seeded_on_the_uint8_grid_and_grow_with_severity():
    x = torch.rand(8, 1, 28, 28)
    for name in corruptions.COMPUTED:
        out = [corruptions.corrupt(x, name, s, seed=0) for s in corruptions.SEVERITIES]
        for o in out:
            assert o.shape == x.shape and o.min() >= 0 and o.max() <= 1
            assert torch.equal(o * 255, (o * 255).round())   # stored as uint8, as the files are
        assert torch.equal(out[2], corruptions.corrupt(x, name, 3, seed=0))
        change = [(o - x).abs().mean().item() for o in out]
        assert change[4] > change[0], name   # severity 5 distorts more than severity 1
    # brightness on grey images: + c on HSV's value, the pixel itself (c = 0.3 at severity 5)
    grey = torch.full((1, 1, 28, 28), 0.2)
    assert torch.allclose(corruptions.corrupt(grey, "brightness", 5, 0), torch.full_like(grey, 127 / 255))


@pytest.fixture(scope="module")
def c10_run(tmp_path_factory):
    """A 1-epoch rehearsal FIRE run on stand-in CIFAR-10 images, and a stand-in of CIFAR-10-C."""
    root = tmp_path_factory.mktemp("c10c")
    train_fire.main(["--dataset", "cifar10", *TINY, "--out-dir", str(root / "fire")])
    corruptions.write_standin(str(root / "data"), "cifar10", n=8)
    return root


def test_result_file_holds_every_corruption_and_severity_and_the_mean(c10_run):
    ckpt = c10_run / "fire" / "best.pt"
    r = corruptions.main([str(ckpt), "--data-dir", str(c10_run / "data"), "--device", "cpu"])[0]
    saved = json.loads((c10_run / "fire" / "corruptions.json").read_text())
    assert saved["format"] == results.CORRUPTIONS_FORMAT and saved["mean"] == r["mean"]
    assert list(saved["accuracy"]) == list(corruptions.board_facts("cifar10")[0])
    values = [a for v in saved["accuracy"].values() for a in v]
    assert len(values) == 75 and saved["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert saved["checkpoint_sha256"] == sha256_file(ckpt) and saved["n_examples"] == 8
    assert saved["method"] == "fire" and saved["lam"] == 12.0 and saved["train_identity"]["rehearsal"]
    assert results.corruption_problem(saved, str(c10_run / "fire" / "corruptions.json")) is None
    # the same command again: finished, nothing evaluated
    mtime = (c10_run / "fire" / "corruptions.json").stat().st_mtime_ns
    corruptions.main([str(ckpt), "--data-dir", str(c10_run / "data"), "--device", "cpu"])
    assert (c10_run / "fire" / "corruptions.json").stat().st_mtime_ns == mtime


def test_command_stops_in_one_line_without_the_files(c10_run, capsys):
    code, err = cli_error(corruptions.main, [str(c10_run / "fire" / "best.pt"), "--data-dir",
                                             str(c10_run / "nowhere"), "--device", "cpu"], capsys)
    assert code == 2 and len(err) == 1 and "CIFAR-10-C/shot_noise.npy not found" in err[0] and "zenodo" in err[0]


def test_tables_show_corruptions_beside_autoattack_and_per_corruption(c10_run, tmp_path):
    ckpt = c10_run / "fire" / "best.pt"
    corruptions.main([str(ckpt), "--data-dir", str(c10_run / "data"), "--device", "cpu"])
    mean = json.loads((c10_run / "fire" / "corruptions.json").read_text())["mean"]
    folder = tmp_path / "runs"
    (folder / "fire").mkdir(parents=True)
    for f in ("best.pt", "corruptions.json"):
        (folder / "fire" / f).write_bytes((c10_run / "fire" / f).read_bytes())
    write_result(folder / "fire", "autoattack", [True, False], checkpoint_sha256=sha256_file(ckpt))
    write_result(folder / "trades", "autoattack", [False, True], method="trades")   # no corruption result
    table = tables.main([str(folder)])
    header = next(line for line in table.splitlines() if line.startswith("| Defense"))
    assert "| Corruptions |" in header
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    col = header.split(" | ").index("Corruptions")
    assert cells["FIRE"][col] == f"{100 * mean:.2f}" and cells["TRADES"][col] == "-"
    per = tables.main([str(folder), "--corruptions", "--quoted", "corruptions"])
    assert "| shot_noise |" in per and "Addepalli2022Efficient_WRN_34_10" in per and "80.12" in per
