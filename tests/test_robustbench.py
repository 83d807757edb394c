"""RobustBench in and out (robustbench_io.py, export_robustbench.py, eval_autoattack.py
robustbench:<dataset>/<threat>/<name>), offline: our WideResNet's weights in RobustBench's class give
our logits, the model_info JSON has every field, an evaluation off the protocol is refused, and a
zoo entry in RobustBench's model-folder layout (random weights written here) is evaluated and
summarised beside a FIRE run on the same images, at the radius RobustBench used for it; weights and
entries that cannot be evaluated end in one line; RobustBench's own benchmark() agrees with our
evaluation on stand-in CIFAR-10 files."""
import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fire_repro import data
import eval_autoattack
import export_robustbench
from fire_repro import robustbench_io, tables
import train_fire
from conftest import ROOT, FakeCIFAR, cli_error
from models import get_model


TORCHVISION_SPLIT = data._torchvision_split  # torchvision's reader, which fake_cifar_module replaces

# Every key of the leaderboard's model_info files (RobustBench's repository, model_info/{cifar10,
# cifar100}/{Linf,L2}/*.json, commit 78fcc9e48a07: 158 files; `external` in 22, `footnote` in 98,
# `unreliable` in 117, the others in all).
LEADERBOARD_FIELDS = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                      "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "external",
                      "unreliable"}


def randomise_batchnorm(model, seed=0):
    """Running statistics and affine parameters away from their initial 0/1, so that a key mapped to
    the wrong BatchNorm shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, low, high in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                                 (m.weight.data, 0.5, 1.5), (m.bias.data, -0.2, 0.2)):
                t.copy_(low + (high - low) * torch.rand(t.shape, generator=gen))
    return model


@pytest.mark.parametrize("name, classes", [("wrn-16-2", 10), ("wrn-10-1", 100)])
def test_our_wideresnet_in_robustbench_class_gives_our_logits(name, classes):
    torch.manual_seed(0)
    ours = randomise_batchnorm(get_model(name, classes, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))).eval()
    theirs = robustbench_io.robustbench_network(name, classes)
    theirs.load_state_dict(robustbench_io.export_weights(ours.state_dict(), name, classes)["state_dict"],
                           strict=True)
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(theirs.eval()(x), ours(x), atol=1e-5)


# ---- a tiny CIFAR-10 L2 run, its evaluation, the export and a zoo entry beside it


@pytest.fixture(scope="module")
def fake_cifar_module():
    real = data._torchvision_split
    data._torchvision_split = lambda cls, root, train: FakeCIFAR(1010 if train else 16, seed=int(train))
    yield
    data._torchvision_split = real


@pytest.fixture(scope="module")
def l2_cifar(fake_cifar_module, tmp_path_factory):
    """(folder, result) of a 1-epoch FIRE wrn-10-1 run in L2 on 10 stand-in CIFAR-10 images (the
    other 1,000 are the validation split a zoo entry's evaluation also holds out), evaluated with the
    reduced AutoAttack at RobustBench's radius 0.5 on the first 4 test images (few: every image a
    model gets right is attacked, and a zoo WideResNet's FAB-T is slow on the CPU)."""
    root = tmp_path_factory.mktemp("rb")
    train_fire.main(["--dataset", "cifar10", "--norm", "l2", "--model", "wrn-10-1", "--epochs", "1",
                     "--val-size", "1000", "--batch-size", "10", "--attack-steps", "1", "--eval-steps", "1",
                     "--workers", "0", "--device", "cpu", "--out-dir", str(root / "fire")])
    result = eval_autoattack.main([str(root / "fire" / "best.pt"), "--eps", "0.5", "--smoke-aa",
                                   "--n-examples", "4", "--device", "cpu"])[0]
    return root, result


def export_argv(result_path, out_dir, *extra):
    return [str(result_path), "--name", "Test2026Fire", "--link", "https://example.org/paper",
            "--paper", "A paper", "--authors", "A. Author", "--venue", "Nowhere 2026",
            "--out-dir", str(out_dir), *extra]


def test_export_refuses_an_evaluation_off_the_protocol(l2_cifar, capsys):
    root, _ = l2_cifar
    path = root / "fire" / "autoattack-l2-eps0.5.json"
    code, lines = cli_error(export_robustbench.main, export_argv(path, root / "out"), capsys)
    assert code == 2 and len(lines) == 1 and "not the standard AutoAttack" in lines[0], lines
    assert not (root / "out" / "models").exists()


def test_export_writes_model_info_and_weights_robustbench_loads(l2_cifar, tmp_path, capsys):
    root, result = l2_cifar
    # The evaluation at the protocol, as a full run would have written it (10,000 test images,
    # standard AutoAttack): the same result about the same checkpoint; no per-image file.
    record = dict(result, aa_version="standard", n_examples=10_000, per_sample="none.npz")
    (tmp_path / "protocol.json").write_text(json.dumps(record))
    info_path, weights_path = export_robustbench.main(export_argv(tmp_path / "protocol.json", tmp_path / "out",
                                                                  "--reported", "70.5"))
    info = json.loads(open(info_path).read())
    assert tuple(info) == robustbench_io.INFO_FIELDS and set(info) == LEADERBOARD_FIELDS - {"external"}
    assert info["unreliable"] is False  # AutoAttack did not warn
    assert info["dataset"] == "cifar10" and info["eps"] == "0.5" and info["architecture"] == "WideResNet-10-1"
    assert info["clean_acc"] == f"{100 * result['natural']:.2f}" and info["reported"] == "70.50"
    assert info["additional_data"] is False and info["number_forward_passes"] == 1
    assert weights_path.endswith("models/cifar10/L2/Test2026Fire.pt") and "model_info/cifar10/L2" in info_path
    # the file loads, as RobustBench's load_model reads it, into its class and gives our logits
    theirs = robustbench_io.robustbench_network("wrn-10-1")
    theirs.load_state_dict(torch.load(weights_path, weights_only=True)["state_dict"], strict=True)
    from fire_repro.checkpoints import load_model
    ours, x = load_model(str(root / "fire" / "best.pt")), torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(theirs.eval()(x), ours(x), atol=1e-5)
    # AutoAttack's warnings make the entry "unreliable"; a stronger evaluation goes to `external`
    (tmp_path / "warned.json").write_text(json.dumps(dict(record, aa_warnings=["it seems to be a randomized defense!"])))
    info_path, _ = export_robustbench.main(export_argv(tmp_path / "warned.json", tmp_path / "o3", "--external", "40"))
    info = json.loads(open(info_path).read())
    assert info["unreliable"] is True and info["external"] == "40.00" and set(info) == LEADERBOARD_FIELDS
    # so does a check of the masking report that was flagged
    flagged = {"checks": {"radius": {"flagged": True, "detail": "accuracy rose from 2x to 4x eps"}}}
    (tmp_path / "masked.json").write_text(json.dumps(dict(record, sanity=flagged)))
    info_path, _ = export_robustbench.main(export_argv(tmp_path / "masked.json", tmp_path / "o4"))
    assert json.loads(open(info_path).read())["unreliable"] is True
    # another radius is refused
    (tmp_path / "other.json").write_text(json.dumps(dict(record, eps=1.0)))
    code, lines = cli_error(export_robustbench.main, export_argv(tmp_path / "other.json", tmp_path / "o2"), capsys)
    assert code == 2 and len(lines) == 1 and "radius is 0.5" in lines[0], lines


def test_zoo_entry_evaluated_offline_and_summarised_beside_fire(l2_cifar):
    root, fire = l2_cifar
    robustbench_io.robustbench()
    from robustbench.model_zoo.cifar10 import Ding2020MMANet  # WRN-28-4, on RobustBench's L2 board
    folder = root / "models" / "cifar10" / "L2"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    net = Ding2020MMANet()  # random weights, and a classifier that answers one class the first 4
    # test images do not hold: AutoAttack has nothing to attack (a WRN-28-4's FAB-T takes minutes
    # on this CPU; the attacks' path is the checkpoints', tested in test_evaluation.py)
    labels = [int(data.get_datasets(argparse.Namespace(dataset="cifar10", val_size=1000, data_dir="data"))[2][i][1])
              for i in range(4)]
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(min(set(range(10)) - set(labels))), 10))
    torch.save(net.state_dict(), folder / "Ding2020MMA.pt")
    zoo = eval_autoattack.main(["robustbench:cifar10/L2/Ding2020MMA", "--robustbench-dir", str(root / "models"),
                                "--smoke-aa", "--n-examples", "4", "--device", "cpu"])[0]
    assert tables.result_row_name(zoo) == "Ding2020MMA (RobustBench)" and zoo["norm"] == "l2" and zoo["eps"] == 0.5
    assert zoo["natural"] == 0 and zoo["n_examples"] == 4 and zoo["seed"] is None
    assert (folder / "autoattack-Ding2020MMA-l2.json").is_file() and (folder / "autoattack-Ding2020MMA-l2.npz").is_file()
    table = tables.main([str(root / "fire"), str(root / "models")])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if "L2 0.5" in line}
    assert set(rows) == {tables.result_row_name(fire), "Ding2020MMA (RobustBench)"}, table
    paired = rows["Ding2020MMA (RobustBench)"].split(" | ")[-1]
    assert "[" in paired, table  # a paired difference to FIRE on the same 4 images
    # a name outside the zoo, and an entry whose weights are not there offline: one line each
    for spec, needle in (("robustbench:cifar10/L2/NoSuchModel", "not in robustbench"),
                         ("robustbench:cifar10/Linf/Ding2020MMA", "could not download")):
        with pytest.raises(Exception, match=needle):
            eval_autoattack.main([spec, "--robustbench-dir", str(root / "models"), "--device", "cpu"])


# ---- a zoo entry at its own radius; entries and weights files that are refused in one line


def test_zoo_entry_is_evaluated_at_the_radius_robustbench_used(fake_cifar_module, tmp_path, monkeypatch):
    # RobustBench evaluated these Linf entries at 0.031 (their model_info's eps), the others at 8/255
    at_0031 = {"Zhang2019Theoretically", "Huang2020Self", "Cui2020Learnable_34_10", "Cui2020Learnable_34_20"}
    robustbench_io.robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    for name in model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]:
        eps = robustbench_io.zoo_radius("cifar10", "linf", name)
        assert eps == (0.031 if name in at_0031 else 8 / 255), name
    assert robustbench_io.zoo_radius("cifar10", "l2", "Wu2020Adversarial") == 0.5
    # the planned evaluation of such an entry (stand-in weights: a WRN-34-10 is not built here)
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    (folder / "Zhang2019Theoretically.pt").write_bytes(b"stand-in")
    monkeypatch.setattr(robustbench_io, "load_zoo_model", lambda *a: torch.nn.Identity())
    args = eval_autoattack.get_args(["robustbench:cifar10/Linf/Zhang2019Theoretically", "--robustbench-dir",
                                     str(tmp_path), "--device", "cpu"])
    job = eval_autoattack.Evaluation(args.checkpoints[0], args, None)
    assert job.eps == 0.031 and job.key["settings"]["eps"] == 0.031 and job.out.endswith("autoattack-Zhang2019Theoretically.json")


class RunsCode:
    """Pickles to a call that creates `marker`: a weights file that runs code when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_zoo_weights_that_cannot_be_loaded_end_in_one_line(tmp_path, capsys, monkeypatch):
    robustbench_io.robustbench()
    from robustbench.model_zoo.cifar10 import Ding2020MMANet, Rice2020OverfittingNet
    path = tmp_path / "cifar10" / "L2" / "Ding2020MMA.pt"
    path.parent.mkdir(parents=True)
    whole = tmp_path / "whole.pt"
    torch.save(Ding2020MMANet().state_dict(), whole)
    marker = tmp_path / "pickle-ran"
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load's default is then a full unpickling
    cases = {"truncated": whole.read_bytes()[: whole.stat().st_size // 2], "empty": b"",
             "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))}
    for what, content in cases.items():
        path.write_bytes(content)
        code, lines = cli_error(eval_autoattack.main, ["robustbench:cifar10/L2/Ding2020MMA", "--robustbench-dir",
                                                       str(tmp_path), "--device", "cpu"], capsys)
        assert code == 2 and len(lines) == 1 and "cannot load RobustBench weights" in lines[0], (what, lines)
    for what, obj, needle in (("another architecture", Rice2020OverfittingNet(depth=10, widen_factor=1).state_dict(),
                               "do not fit Ding2020MMA's network"),
                              ("a pickle", {"state_dict": RunsCode(str(marker))}, "cannot load RobustBench weights"),
                              ("not tensors", {"state_dict": {"fc.weight": [1.0]}}, "not a state dict")):
        torch.save(obj, path)
        code, lines = cli_error(eval_autoattack.main, ["robustbench:cifar10/L2/Ding2020MMA", "--robustbench-dir",
                                                       str(tmp_path), "--device", "cpu"], capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0], (what, lines)
    assert not marker.exists()  # the pickle's code never ran
    # what training scripts save beside the weights (numpy scalars, argparse arguments) is read as data
    net = Ding2020MMANet().eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "best_acc": np.float64(0.5),
                "args": argparse.Namespace(lr=0.1)}, path)
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    entry = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("L2")]["Ding2020MMA"]
    loaded, x = robustbench_io.load_zoo_model(entry, "Ding2020MMA", "cifar10", str(path)), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_zoo_entries_not_evaluated_here_are_refused_in_one_line(tmp_path, capsys):
    # stand-in files where RobustBench would keep the weights: an ensemble's <name>.pt_m<i>.pt
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"Chen2020Adversarial.pt_m{i}.pt").write_bytes(b"stand-in")
    (folder / "Debenedetti2022Light_XCiT-S12.pt").write_bytes(b"stand-in")
    for spec, needle in (("robustbench:cifar100/L2/Wu2020Adversarial", "RobustBench has no cifar100 L2 leaderboard"),
                         ("robustbench:cifar10/Linf/Chen2020Adversarial", "is an ensemble of 3 networks"),
                         ("robustbench:cifar10/Linf/Debenedetti2022Light_XCiT-S12", "is a timm model")):
        code, lines = cli_error(eval_autoattack.main, [spec, "--robustbench-dir", str(tmp_path), "--device", "cpu"], capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0], (spec, lines)


def test_importing_robustbench_prints_no_deprecation_warnings():
    code = ("import warnings; warnings.simplefilter('default'); from fire_repro import robustbench_io; "
            "robustbench_io.robustbench()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "pkg_resources" not in r.stderr and "torch.jit.interface" not in r.stderr, r.stderr


# ---- RobustBench's own benchmark() on a model of ours agrees with eval_autoattack.py


def write_cifar10_files(root, train_images, test_images, test_labels, seed=0):
    """Stand-in CIFAR-10 in torchvision's layout (<root>/cifar-10-batches-py: data_batch_1..5,
    test_batch, batches.meta; pickled dicts of uint8 rows (N, 3072) in CHW order and labels)."""
    import pickle
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {f"data_batch_{i}": (rng.integers(0, 256, (train_images // 5, 3072), dtype=np.uint8),
                                   rng.integers(0, 10, train_images // 5).tolist()) for i in range(1, 6)}
    batches["test_batch"] = test_images, list(test_labels)
    for name, (x, y) in batches.items():
        (folder / name).write_bytes(pickle.dumps({"data": x, "labels": y}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))


def test_robustbench_benchmark_agrees_with_our_evaluation(tmp_path, monkeypatch):
    """benchmark() (RobustBench's data loading, clean accuracy, AutoAttack and accuracy of x_adv)
    through leaderboard_benchmark, and eval_autoattack.py, on the same 8 stand-in test images of a
    1-epoch wrn-10-1 of ours, the same attacks (the reduced AutoAttack of --smoke-aa on both sides:
    the standard one takes minutes on this CPU) and seed, in one batch: the same clean and robust
    accuracy (to 1e-9, float rounding: the same attacks on the same points)."""
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)  # stand-in files: no MD5
    monkeypatch.setattr(data, "_torchvision_split", TORCHVISION_SPLIT)  # the files, not fake_cifar_module's images
    rng = np.random.default_rng(1)
    test_x = rng.integers(0, 256, (8, 3072), dtype=np.uint8)
    write_cifar10_files(tmp_path / "data", 40, test_x, [0] * 8)
    train_fire.main(["--dataset", "cifar10", "--model", "wrn-10-1", "--epochs", "1", "--val-size", "20",
                     "--batch-size", "20", "--attack-steps", "1", "--eval-steps", "1", "--workers", "0",
                     "--device", "cpu", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")])
    from fire_repro.checkpoints import load_model
    model = load_model(str(tmp_path / "run" / "best.pt"))
    x = torch.tensor(test_x).reshape(8, 3, 32, 32).float() / 255
    with torch.no_grad():
        labels = model(x).argmax(1).tolist()
    write_cifar10_files(tmp_path / "data", 40, test_x, labels)  # every image right: each one is attacked
    eps = 1 / 255
    ours = eval_autoattack.main([str(tmp_path / "run" / "best.pt"), "--eps", "1/255", "--n-examples", "8",
                                 "--batch-size", "8", "--seed", "0", "--smoke-aa", "--device", "cpu"])[0]
    with robustbench_io.leaderboard_benchmark(seed=0, smoke=True) as benchmark:
        clean, robust = benchmark(model, n_examples=8, dataset="cifar10", threat_model="Linf", eps=eps,
                                  data_dir=str(tmp_path / "data"), batch_size=8, device=torch.device("cpu"))
    assert ours["natural"] == 1.0 and abs(clean - ours["natural"]) < 1e-9
    assert abs(robust - ours["autoattack"]) < 1e-9, (robust, ours["robust_after"])
    assert 0 < ours["autoattack"] < 1, ours["robust_after"]  # some images fooled, some not


def test_quoted_robustbench_rows_carry_the_radius_robustbench_used():
    """Each row quoted from RobustBench is labelled with the radius of its entry's model_info (the
    TRADES row at 0.031, not 8/255)."""
    entries = {("modern", "TRADES (beta=6), Zhang et al. 2019"): "Zhang2019Theoretically",
               ("modern", "TRADES + AWP, Wu et al. 2020"): "Wu2020Adversarial",
               ("l2", "Gowal et al. 2020"): "Gowal2020Uncovering",
               ("l2", "TRADES + AWP, Wu et al. 2020"): "Wu2020Adversarial",
               ("l2", "Engstrom et al. 2019 (robustness library)"): "Engstrom2019Robustness",
               ("l2", "Overfitting, Rice et al. 2020"): "Rice2020Overfitting",
               ("generated", "Wang et al. 2023, 20M generated images"): "Wang2023Better_WRN-28-10",
               ("generated", "Wang et al. 2023, 50M generated images"): "Wang2023Better_WRN-70-16",
               ("generated", "Bartoldson et al. 2024, 300M generated images"): "Bartoldson2024Adversarial_WRN-94-16"}
    quoted = [(block, q) for block, rows in tables.QUOTED.items() for q in rows
              if q.get("source") == "RobustBench" and block not in tables.QUOTED_CORRUPTIONS]  # AutoAttack rows
    assert {(block, q["defense"]) for block, q in quoted} == set(entries)
    for block, q in quoted:
        eps = robustbench_io.zoo_radius(q["dataset"], tables.norm_of(q), entries[block, q["defense"]])
        assert q["eps"] == eps, (block, q["defense"], q["eps"], eps)


def test_export_never_replaces_an_earlier_export_unless_overwrite(l2_cifar, tmp_path, capsys):
    root, result = l2_cifar
    record = dict(result, aa_version="standard", n_examples=10_000, per_sample="none.npz")
    (tmp_path / "protocol.json").write_text(json.dumps(record))
    paths = export_robustbench.main(export_argv(tmp_path / "protocol.json", tmp_path / "out"))
    before = [open(p, "rb").read() for p in paths]
    code, lines = cli_error(export_robustbench.main,
                            export_argv(tmp_path / "protocol.json", tmp_path / "out", "--reported", "70"), capsys)
    assert code == 2 and len(lines) == 1 and "--overwrite" in lines[0], lines
    assert [open(p, "rb").read() for p in paths] == before
    export_robustbench.main(export_argv(tmp_path / "protocol.json", tmp_path / "out", "--reported", "70", "--overwrite"))
    assert json.loads(open(paths[0]).read())["reported"] == "70.00"


@pytest.mark.parametrize("change, message", [
    (dict(checkpoint=None), "names no evaluated 'checkpoint'"),  # a result typed by hand
    (dict(model="wrn-16-1"), "its checkpoint"),  # the result's model is not its checkpoint's
])
def test_export_of_a_result_that_does_not_match_its_checkpoint_is_one_line(l2_cifar, tmp_path, capsys, change, message):
    _, result = l2_cifar
    record = dict(result, aa_version="standard", n_examples=10_000, per_sample="none.npz", **change)
    record = {k: v for k, v in record.items() if v is not None}
    (tmp_path / "r.json").write_text(json.dumps(record))
    code, lines = cli_error(export_robustbench.main, export_argv(tmp_path / "r.json", tmp_path / "out"), capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()
