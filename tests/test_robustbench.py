"""RobustBench in and out (robustbench_io.py, export_robustbench.py, eval_autoattack.py
robustbench:<dataset>/<threat>/<name>), offline: our WideResNet's weights in RobustBench's class give
our logits, the model_info JSON has every field, an evaluation off the protocol is refused, and a
zoo entry in RobustBench's model-folder layout (random weights written here) is evaluated and
summarised beside a FIRE run on the same images."""
import argparse
import json

import pytest
import torch

from fire_repro import data
import eval_autoattack
import export_robustbench
from fire_repro import robustbench_io, tables
import train_fire
from conftest import FakeCIFAR, cli_error
from models import get_model


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
    assert tuple(info) == robustbench_io.INFO_FIELDS
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
