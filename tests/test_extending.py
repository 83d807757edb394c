"""Extending the repository as the README says: a regulariser added to train_fire.REGULARISERS is a
method of its own, a training script of a new method with its own weight flag is recorded, tabled and
paired with FIRE like the others, and a data set added as one entry of data.DATASETS trains, is
evaluated and gets its table rows, with no other edit."""
import json
import os

import pytest
import torch

from fire_repro import data
import eval_autoattack
from fire_repro import training
from fire_repro import tables
import train_fire
import train_trades
from train_trades import kl_per_sample

TINY = ["--epochs", "1", "--attack-steps", "1", "--eval-steps", "1", "--device", "cpu"]
EVAL = ["--n-examples", "24", "--batch-size", "24", "--smoke-aa", "--device", "cpu"]


def symmetric_kl(logits_a, logits_b):
    """KL(q_a || q_b) + KL(q_b || q_a): a user's regulariser, per sample."""
    return kl_per_sample(logits_a, logits_b) + kl_per_sample(logits_b, logits_a)


def table_rows(folder):
    table = tables.summarize(tables.find_results([str(folder)])[0])
    return {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}


def test_a_new_regulariser_is_a_method_of_its_own(tmp_path, monkeypatch, few_digits):
    monkeypatch.setitem(train_fire.REGULARISERS, "sym-kl",
                        training.Method("sym-kl", "Symmetric KL", "lam", order=5, fn=symmetric_kl))
    monkeypatch.chdir(tmp_path)  # default run folders: runs/<method>-digits-<settings>-s0
    for distance, method in (("fisher-rao", "fire"), ("sym-kl", "sym-kl")):
        summary = train_fire.main([*TINY, "--distance", distance])
        assert summary["method"] == method
    folders = {m: train_fire.get_args([*TINY, "--distance", d]).out_dir for d, m in (("fisher-rao", "fire"), ("sym-kl", "sym-kl"))}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(os.path.basename(f) for f in folders.values())
    summary = json.loads((tmp_path / folders["sym-kl"] / "summary.json").read_text())
    assert (summary["method"], summary["method_title"]) == ("sym-kl", "Symmetric KL")
    for run in ("fire", "sym-kl"):
        result = eval_autoattack.main([f"{folders[run]}/best.pt", *EVAL])[0]
        assert result["method"] == run
    rows = table_rows(tmp_path / "runs")
    assert list(rows)[1:] == ["Symmetric KL (lam=12)", "FIRE (lam=12)"]  # its own row, before FIRE
    assert rows["FIRE (lam=12)"][-1] == "reference"  # FIRE stays the reference
    assert rows["Symmetric KL (lam=12)"][-1].startswith(("+", "-")) and "[" in rows["Symmetric KL (lam=12)"][-1]


# A method written the way train_trades.py writes its methods, with a weight flag of its own (--gamma):
# MART's loss on TRADES' attack, a stand-in for a researcher's new method in a script of their own.
def gamma_step(args, model, attack_model, x, y, idx, soft_targets=None, x_adv=None):
    if x_adv is None:
        attack_model.eval()
        x_adv = train_trades.attack_trades(attack_model, x, args.eps, args.step_size, args.attack_steps, args.norm)
    model.train()
    logits_nat, logits_adv = model(x), model(x_adv)
    return train_trades.mart_loss(logits_nat, logits_adv, y, args.gamma), logits_nat, x_adv


GAMMA = {"gamma-mart": training.Method("gamma-mart", "Gamma-MART", "gamma", fn=gamma_step)}


def gamma_main(argv):
    parser = training.base_parser("a new method")
    parser.add_argument("--loss", type=str, default="gamma-mart", choices=list(GAMMA))
    parser.add_argument("--gamma", type=float, default=3.0, help="its weight, in [0, 100]")
    training.add_self_adaptive_flags(parser, "none")
    args = training.finish_args(parser, argv, GAMMA, "loss")
    return training.train(args, GAMMA[args.loss].fn)


def test_a_method_with_its_own_weight_flag_is_recorded_tabled_and_paired(tmp_path, few_digits):
    """Nothing outside a method's script names it or its weight: a new method weighted by --gamma is
    recorded (summary, result), named by the table from what it records ('Gamma-MART (gamma=3)'),
    ordered by its Method and paired with FIRE, the reference."""
    runs = tmp_path / "runs"
    summary = gamma_main([*TINY, "--out-dir", str(runs / "gamma")])
    assert (summary["method"], summary["method_weight"], summary["gamma"]) == ("gamma-mart", "gamma", 3.0)
    train_fire.main([*TINY, "--out-dir", str(runs / "fire")])
    for run in ("gamma", "fire"):
        result = eval_autoattack.main([str(runs / run / "best.pt"), *EVAL])[0]
    result = json.loads((runs / "gamma" / "autoattack.json").read_text())
    assert (result["method_weight"], result["gamma"], result["defense"]) == ("gamma", 3.0, None)
    rows = table_rows(runs)
    assert list(rows)[1:] == ["Gamma-MART (gamma=3)", "FIRE (lam=12)"], rows
    assert rows["FIRE (lam=12)"][-1] == "reference"
    assert rows["Gamma-MART (gamma=3)"][-1].startswith(("+", "-")) and "[" in rows["Gamma-MART (gamma=3)"][-1]
    assert "Training" not in rows["Defense"]  # --gamma and --lam are each shown by their row's name


def bars(args):
    """A stand-in data set: 28x28 grey images of a horizontal (even classes) or vertical (odd) bar
    in one of five bands of the image (class // 2), with noise; 96 training (incl. validation) and
    32 test images. Ten classes: the standard AutoAttack's targeted attacks use nine targets."""
    gen = torch.Generator().manual_seed(0)
    n = 128
    y = torch.arange(n) % 10
    x = 0.2 * torch.rand(n, 1, 28, 28, generator=gen)
    where = torch.randint(0, 3, (n,), generator=gen) + 5 * (y // 2) + 1
    for i in range(n):
        if y[i] % 2 == 0:
            x[i, 0, where[i]:where[i] + 3, :] = 1.0
        else:
            x[i, 0, :, where[i]:where[i] + 3] = 1.0
    base = torch.utils.data.TensorDataset(x, y)
    return data.hold_out(base, list(range(32, n)), list(range(32)), args.val_size)


def test_a_new_data_set_is_one_entry(tmp_path, monkeypatch):
    entry = data.DataSet(title="Bars", classes=10, shape=(1, 28, 28), mean=(0.5,), std=(0.5,),
                         train_size=96, test_size=32, val_size=16, in_memory=True, load=bars,
                         preset=dict(model="smallcnn", epochs=1, batch_size=16, lr=0.05, schedule="step",
                                     eps=0.1, step_size=0.05, attack_steps=1, eval_steps=1))
    monkeypatch.setitem(data.DATASETS, "bars", entry)
    runs = tmp_path / "runs"
    train_fire.main(["--dataset", "bars", "--device", "cpu", "--out-dir", str(runs / "fire")])
    train_trades.main(["--dataset", "bars", "--device", "cpu", "--out-dir", str(runs / "trades")])
    for run in ("fire", "trades"):
        result = eval_autoattack.main([str(runs / run / "best.pt"), *EVAL])[0]
        assert (result["dataset"], result["n_examples"], result["eps"]) == ("bars", 24, 0.1)
    rows = table_rows(runs)
    assert list(rows)[1:] == ["TRADES (beta=6)", "FIRE (lam=12)"]
    assert all(row[1] == "Bars" for name, row in rows.items() if name != "Defense")


@pytest.mark.parametrize("field", ["classes", "shape", "preset", "val_size"])
def test_the_entry_is_what_the_scripts_read(field):
    """Every script reads a data set's facts from its entry (no copy elsewhere): the parsed
    arguments of a training take its preset and validation size, benchmark.py its shape, a
    checkpoint's model its classes."""
    import benchmark
    from fire_repro.checkpoints import model_from_args
    d = data.DATASETS["mnist5k"]
    args = train_fire.get_args(["--dataset", "mnist5k"])
    if field == "preset":
        assert all(getattr(args, k) == v for k, v in d.preset.items())
    elif field == "val_size":
        assert args.val_size == d.val_size
    elif field == "shape":
        assert benchmark.get_args(["--dataset", "mnist5k"]).shape == list(d.shape)
    else:
        assert model_from_args(vars(args))(torch.zeros(1, *d.shape)).shape == (1, d.classes)
