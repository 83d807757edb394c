"""The training scripts' command-line contract: every bad flag or input is one error line and exit
code 2 before any work, and a model name is checked without building the network."""
import argparse
import importlib
import re

import pytest

import train_fire
import train_trades
from conftest import cli_error, run_script


# The command line itself, in a fresh process: an argparse error, a range, a model name (a
# UserError through common.cli), a missing file. The catalogue below runs the same main() in-process.
@pytest.mark.parametrize("script,args,needle", [
    ("train_fire.py", ["--dataset", "imagenet"], "--dataset"),
    ("train_fire.py", ["--eps", "nan"], "--eps"),
    ("train_fire.py", ["--model", "vgg99"], "vgg99"),
    ("train_trades.py", ["--resume", "/no/such/last.pt"], "does not exist"),
])
def test_bad_flags_exit_with_one_line(script, args, needle):
    r = run_script(script, *args, "--out-dir", "/tmp/never-used-fire")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "error" in lines[0]


@pytest.mark.parametrize("script,args,needle", [
    ("train_fire.py", ["--eps", "-0.1"], "--eps"),
    ("train_fire.py", ["--lam", "-1"], "--lam"),
    ("train_fire.py", ["--epochs", "0"], "--epochs"),
    ("train_fire.py", ["--batch-size", "0"], "--batch-size"),
    ("train_fire.py", ["--step-size", "0"], "--step-size"),
    ("train_trades.py", ["--beta", "-6"], "--beta"),
    ("train_trades.py", ["--loss", "kl"], "--loss"),
    ("train_fire.py", ["--eps", "5"], "--eps"),
    ("train_fire.py", ["--attack-steps", "-1"], "--attack-steps"),
    ("train_fire.py", ["--eval-steps", "-2"], "--eval-steps"),
    ("train_fire.py", ["--lr", "-0.1"], "--lr"),
    ("train_fire.py", ["--epochs", "-5"], "--epochs"),
    ("train_fire.py", ["--batch-size", "-3"], "--batch-size"),
    ("train_fire.py", ["--val-size", "0"], "--val-size"),
    ("train_fire.py", ["--unsup-fraction", "1.5"], "--unsup-fraction"),
    ("train_fire.py", ["--sa-alpha", "1"], "--sa-alpha"),
    ("train_fire.py", ["--distance", "kl"], "--distance"),
    ("train_fire.py", ["--aux-data", "/no/such/file.npz"], "--aux-data"),
    ("train_fire.py", ["--resume", "/no/such/last.pt"], "does not exist"),
    ("train_fire.py", ["--out-dir", "/etc/hostname/run"], "--out-dir"),
    ("train_fire.py", ["--epochs", "two"], "--epochs"),
    # more ranges, network shapes, paths that are folders and flag combinations
    ("train_fire.py", ["--val-size", "1437"], "--val-size"),  # the whole digits training split
    ("train_fire.py", ["--model", "wrn-10-0"], "widen factor"),
    ("train_fire.py", ["--model", "wrn-11-2"], "depth"),
    ("train_fire.py", ["--momentum", "-1"], "--momentum"),
    ("train_fire.py", ["--weight-decay", "-1"], "--weight-decay"),
    ("train_fire.py", ["--seed", "-1"], "--seed"),
    ("train_fire.py", ["--seed", "99999999999"], "--seed"),
    ("train_trades.py", ["--sa-start", "0"], "--sa-start"),
    ("train_trades.py", ["--workers", "-1"], "--workers"),
    ("train_fire.py", ["--resume", "/"], "is a directory"),
    ("train_fire.py", ["--aux-data", "/"], "is a directory"),
    ("train_trades.py", ["--eps", "-1"], "--eps"),
    ("train_trades.py", ["--step-size", "-0.01"], "--step-size"),
    ("train_trades.py", ["--dataset", "svhn"], "--dataset"),
    ("train_trades.py", ["--model", "wrn-35-10"], "6n+4"),
    ("train_trades.py", ["--loss", "madry", "--self-adaptive"], "--loss trades"),
])
def test_bad_argument_catalogue(script, args, needle, tmp_path, capsys):
    """Each script's main() as its command line runs it (common.cli), in this process."""
    argv = list(args) if "--out-dir" in args else [*args, "--out-dir", str(tmp_path / "run")]
    main = {"train_fire.py": train_fire.main, "train_trades.py": train_trades.main}[script]
    code, lines = cli_error(main, argv, capsys)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_model_name_is_checked_without_building_it(monkeypatch):
    """--model wrn-250-32 (about 4 billion parameters) is validated by name only."""
    import models
    monkeypatch.setattr(models.WideResNet, "__init__", lambda *a, **k: pytest.fail("built the network"))
    args = train_fire.get_args(["--model", "wrn-250-32"])
    assert args.model == "wrn-250-32"


@pytest.mark.parametrize("flag, value", [
    ("--epochs", "1000000000"), ("--batch-size", "1000000000"), ("--attack-steps", "1000000000"),
    ("--eval-steps", "1000000000"), ("--workers", "1000000"), ("--val-size", "1000000000"),
    ("--log-every", "1000000000"), ("--lr", "1e308"), ("--lam", "1e308"), ("--weight-decay", "1e308"),
    ("--step-size", "2"), ("--sa-start", "1000000000"), ("--model", "wrn-1000000-10")])
def test_training_flags_have_upper_bounds(flag, value, capsys):
    """Each flag has an upper bound: a 10^9-image batch would fail allocating, 10^9 epochs run until killed."""
    code, lines = cli_error(train_fire.get_args, [flag, value], capsys)
    assert code == 2 and len(lines) == 1 and (flag in lines[0] or "depth" in lines[0]), lines


def parser_of(get_args, monkeypatch):
    """The ArgumentParser that a script's get_args builds, caught when it parses."""
    built = []

    def catch(self, *args, **kwargs):
        built.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        get_args(["x"])  # a positional argument for the scripts that need one
    return built[0]


@pytest.mark.parametrize("script", ["train_fire", "train_trades", "eval_autoattack", "benchmark", "gaussian_demo"])
def test_every_numeric_flag_states_its_range_in_its_help(script, monkeypatch):
    parser = parser_of(importlib.import_module(script).get_args, monkeypatch)
    numeric = [a for a in parser._actions if a.type in (int, float) or getattr(a.type, "__name__", "") == "parse_eps"]
    unbounded = [a.option_strings[0] for a in numeric if not re.search(r"in \[|in \(", a.help or "")]
    assert numeric and not unbounded


# ---- A run's identity: what --print-identity prints and run_all.sh names run folders by

def identity(script, flags, capsys):
    """The hash `script.py FLAGS --print-identity` prints (in this process), which is the hash of the
    arguments as get_args resolves them (the plan of run_all.sh computes it from get_args)."""
    from fire_repro.config import identity_hash
    capsys.readouterr()
    assert script.main([*flags, "--print-identity"]) is None
    out, err = capsys.readouterr()
    assert out.strip() == identity_hash(vars(script.get_args([*flags, "--print-identity"]))), err
    return out.strip()


# Printed by the code that named the existing run folders (train_*.py FLAGS --print-identity):
# a change of the identity's rules must leave every default run where it is.
FOLDER_HASHES = [
    (train_fire, [], "5c3a5dac0066"), (train_fire, ["--distance", "hellinger"], "aae68c598fce"),
    (train_fire, ["--self-adaptive"], "45164ed9ceed"), (train_trades, [], "9704e61df6a3"),
    (train_trades, ["--loss", "madry"], "fe2dd503d67e"), (train_trades, ["--loss", "mart"], "7c92396e0cae"),
    (train_trades, ["--self-adaptive"], "f1c291c78301"), (train_fire, ["--dataset", "mnist"], "229fddc8ff8e"),
    (train_fire, ["--dataset", "cifar10"], "18cf6f5ac353"), (train_trades, ["--dataset", "cifar10"], "fd9ea5f2abf5"),
    (train_trades, ["--dataset", "cifar10", "--loss", "madry"], "6033f161299a"),
    (train_trades, ["--dataset", "cifar10", "--loss", "mart"], "d24d920ec861"),
    (train_trades, ["--dataset", "cifar10", "--self-adaptive"], "a72733d86234"),
    (train_fire, ["--dataset", "cifar10", "--self-adaptive"], "5341d49e3e33"),
    (train_fire, ["--dataset", "cifar10", "--distance", "hellinger"], "9d5e42f88519"),
    # settings that do change the run keep their hashes too
    (train_fire, ["--awp-gamma", "0.005"], "a2e0b56ed9d3"),
    (train_fire, ["--awp-gamma", "0.005", "--awp-warmup", "3"], "047acd10e390"),
    (train_fire, ["--ema", "0.999"], "7ee548df983a"), (train_fire, ["--ema", "0.999", "--ema-start", "3"], "4879ea0bab38"),
    (train_trades, ["--self-adaptive", "--sa-start", "5", "--sa-alpha", "0.8"], "8b89a132979f"),
    (train_fire, ["--schedule", "cosine"], "ad46902a2a4a"),
]


@pytest.mark.parametrize("script,flags,expected", FOLDER_HASHES)
def test_existing_run_folders_keep_their_identity(script, flags, expected, capsys):
    assert identity(script, flags, capsys) == expected


@pytest.mark.parametrize("script,inert,base", [
    (train_fire, ["--awp-warmup", "3"], []),                      # AWP is off
    (train_fire, ["--ema-start", "3"], []),                       # no average
    (train_trades, ["--sa-alpha", "0.5", "--sa-start", "2"], []),  # no self-adaptive targets
    (train_fire, ["--unsup-fraction", "0.3"], []),                # no extra data
    (train_fire, ["--lr-milestones", "0.5"], ["--schedule", "cosine"]),  # cosine has no milestones
    (train_fire, ["--trust-pickle"], []),                         # how a file is read, not what the run computes
])
def test_a_setting_that_changes_nothing_leaves_the_identity_alone(script, inert, base, capsys):
    """A setting with no effect without another is the run without it (same identity, so the same
    folder and table row), and training says so in one warning line; with the other setting on,
    it is a different run."""
    assert identity(script, [*base, *inert], capsys) == identity(script, base, capsys)
    script.main([*base, *inert, "--print-identity"])
    warnings = capsys.readouterr().err.strip().splitlines()
    flags = [f for f in inert if f.startswith("--") and f != "--trust-pickle"]
    assert len(warnings) == len(flags) and all(f in w for f, w in zip(flags, warnings)), warnings
    assert all("warning" in w and "changes nothing" in w for w in warnings)
    enable = {"--awp-warmup": ["--awp-gamma", "0.005"], "--ema-start": ["--ema", "0.99"],
              "--sa-alpha": ["--self-adaptive"], "--lr-milestones": ["--schedule", "step"]}.get(inert[0])
    if enable:
        assert identity(script, [*base, *enable, *inert], capsys) != identity(script, [*base, *enable], capsys)


@pytest.mark.parametrize("flags,what", [
    (["--awp-gamma", "0.005", "--awp-warmup", "5", "--epochs", "2"], "AWP"),
    (["--ema", "0.99", "--ema-start", "3", "--epochs", "2"], "the average"),
    (["--self-adaptive", "--epochs", "15"], "self-adaptive"),  # --sa-start 70 of the paper's 100 epochs
])
def test_a_start_past_the_last_epoch_is_a_warning(flags, what, capsys):
    """Checked with the other settings before anything is created: one warning line (not an error:
    --resume with a larger --epochs reaches the start), and the table row does not name what never ran."""
    from fire_repro import tables
    train_fire.main([*flags, "--print-identity"])
    args = train_fire.get_args(flags)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "past --epochs" in lines[0] and what in lines[0], lines
    name = tables.row_name(vars(args), "best.pt")
    assert "AWP" not in name and "EMA" not in name
    args.epochs = 100
    assert ("+ AWP" in tables.row_name(vars(args), "best.pt")) == ("--awp-gamma" in flags)


def test_print_identity_checks_input_files_but_a_planned_one(tmp_path, capsys):
    """--print-identity checks --init-from and --aux-data as a training does; a file that a planned
    run will write is named with --planned, and only that one may be missing."""
    source = str(tmp_path / "pre" / "best.pt")
    for flags in (["--init-from", source], ["--aux-data", str(tmp_path / "aux.npz")],
                  ["--init-from", source, "--aux-data", str(tmp_path / "aux.npz"), "--planned", source]):
        code, lines = cli_error(train_trades.main, [*flags, "--print-identity"], capsys)
        assert code == 2 and len(lines) == 1 and "does not exist" in lines[0], lines
    planned = identity(train_trades, ["--init-from", source, "--planned", str(tmp_path / "pre" / ".." / "pre" / "best.pt")], capsys)
    assert planned == identity(train_trades, ["--init-from", source, "--planned", source], capsys)
    for flags, needle in ((["--planned", source], "not an input"), (["--init-from", source, "--planned", source, "--epochs", "1"], "--print-identity")):
        argv = flags + ["--print-identity"] * ("not an input" in needle)
        code, lines = cli_error(train_trades.main, argv, capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
