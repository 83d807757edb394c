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
    """Were accepted: a 10^9-image batch failed allocating, 10^9 epochs or steps ran until killed."""
    with pytest.raises(SystemExit) as e:
        train_fire.get_args([flag, value])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and (flag in lines[0] or "depth" in lines[0]), lines


def parser_of(get_args, monkeypatch):
    """The ArgumentParser that a script's get_args builds, caught when it parses."""
    built = []

    def catch(self, *args, **kwargs):
        built.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        get_args([])
    return built[0]


@pytest.mark.parametrize("script", ["train_fire", "train_trades", "eval_autoattack", "benchmark", "gaussian_demo"])
def test_every_numeric_flag_states_its_range_in_its_help(script, monkeypatch):
    parser = parser_of(importlib.import_module(script).get_args, monkeypatch)
    numeric = [a for a in parser._actions if a.type in (int, float) or getattr(a.type, "__name__", "") == "parse_eps"]
    unbounded = [a.option_strings[0] for a in numeric if not re.search(r"in \[|in \(", a.help or "")]
    assert numeric and not unbounded
