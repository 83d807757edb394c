"""Training curves (plot_runs.py): a figure for one run and for several seeds (mean and band), the
collapse alarm read from metrics.jsonl, and bad input as one line."""
import json
import math
import os
import shutil

import pytest

import plot_runs
import train_fire
from conftest import ROOT, cli_error, run_script

TINY = ["--epochs", "2", "--attack-steps", "1", "--eval-steps", "1"]


def test_one_run_and_seeds_averaged(tmp_path, few_digits):
    """Real runs: seeds 0 and 1 of one experiment are one curve whose mean and std are those of
    their metrics.jsonl; another lam is a curve of its own; a single run is a figure too (PNG),
    several a PDF."""
    for name, extra in [("fire-s0", ["--seed", "0"]), ("fire-s1", ["--seed", "1"]),
                        ("fire-lam5-s0", ["--seed", "0", "--lam", "5"])]:
        train_fire.main(TINY + extra + ["--out-dir", str(tmp_path / "runs" / name)])
    plot_runs.main([str(tmp_path / "runs" / "fire-s0"), "--out", str(tmp_path / "one.png")])
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    runs = [plot_runs.read_run(f) for f in plot_runs.run_folders([str(tmp_path / "runs")])]
    drawn = plot_runs.plot_runs(runs, str(tmp_path / "seeds.pdf"))
    assert (tmp_path / "seeds.pdf").read_bytes()[:5] == b"%PDF-"
    by_label = {c["label"]: c for c in drawn}
    assert sorted(by_label) == ["FIRE (lam=12)", "FIRE (lam=5)"]
    fire = by_label["FIRE (lam=12)"]
    assert fire["seeds"] == [0, 1] and fire["epochs"] == [1, 2] and fire["alarms"] == []
    seeds = [[json.loads(line) for line in open(tmp_path / "runs" / f"fire-s{s}" / "metrics.jsonl")]
             for s in (0, 1)]
    for key in ("val_pgd", "loss", "reg", "grad_norm_max"):
        for e in range(2):
            a, b = seeds[0][e][key], seeds[1][e][key]
            assert fire["mean"][key][e] == pytest.approx((a + b) / 2, abs=1e-12)
            assert fire["std"][key][e] == pytest.approx(abs(a - b) / math.sqrt(2), abs=1e-12)
    assert by_label["FIRE (lam=5)"]["seeds"] == [0]


def test_the_collapse_alarm_is_read_from_the_records(tmp_path, few_digits):
    """An epoch whose record says `collapsed` is the seed's alarm epoch (the first one flagged)."""
    out = tmp_path / "run"
    train_fire.main(TINY + ["--epochs", "3", "--out-dir", str(out)])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    records[1]["collapsed"] = records[2]["collapsed"] = True  # as the alarm writes them
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (c,) = plot_runs.plot_runs([plot_runs.read_run(str(out))], str(tmp_path / "c.png"))
    assert c["alarms"] == [(0, 2)]
    assert "alarm: s0 at 2" in plot_runs.curve_label(c)


def test_bad_input_is_one_line(tmp_path, capsys, few_digits):
    run = tmp_path / "run"
    train_fire.main(TINY[:1] + ["1"] + TINY[2:] + ["--out-dir", str(run)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    cases = [([str(tmp_path / "nothing")], "does not exist"),
             ([str(tmp_path / "empty")], "holds no run folder"),
             ([str(run), "--out", str(tmp_path / "c.xyz")], "unknown figure format 'xyz'"),
             ([str(run), "--out", str(tmp_path / "c")], "unknown figure format '(no extension)'"),
             ([str(run), "--out", str(tmp_path / "file" / "c.png")], "cannot write --out"),
             ([str(run), "--out", str(tmp_path / "folder.png")], "is a folder")]
    for argv, message in cases:
        argv = argv if "--out" in argv else argv + ["--out", str(tmp_path / "c.png")]
        code, err = cli_error(plot_runs.main, argv, capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "val_')  # a damaged record
    code, err = cli_error(plot_runs.main, [str(run), "--out", str(tmp_path / "c.png")], capsys)
    assert code == 2 and len(err) == 1 and "line 2 is not whole JSON" in err[0]
    os.remove(run / "log.txt")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    code, err = cli_error(plot_runs.main, [str(run), "--out", str(tmp_path / "c.png")], capsys)
    assert code == 2 and len(err) == 1 and "log.txt does not hold the run's arguments" in err[0]
    assert not (tmp_path / "c.png").exists()
    r = run_script("plot_runs.py", str(tmp_path / "nothing"), "--out", str(tmp_path / "c.png"))
    assert r.returncode == 2 and r.stderr.strip() == f"plot_runs.py: error: {str(tmp_path / 'nothing')!r} does not exist"


def test_a_run_reached_twice_is_one_seed(tmp_path, few_digits, capsys):
    """A run given again through a symlink, or copied to another folder, is not a second seed."""
    run = tmp_path / "runs" / "fire-s0"
    train_fire.main(TINY[:1] + ["1"] + TINY[2:] + ["--out-dir", str(run)])
    os.symlink(run, tmp_path / "link")
    shutil.copytree(run, tmp_path / "copy")
    assert plot_runs.run_folders([str(run), str(tmp_path / "link")]) == [str(run)]
    runs = [plot_runs.read_run(f) for f in plot_runs.run_folders([str(run), str(tmp_path / "copy")])]
    (c,) = plot_runs.curves(runs)
    assert c["seeds"] == [0] and "copy" in capsys.readouterr().err


def test_damaged_records_and_arguments_are_one_line(tmp_path, capsys, few_digits):
    """Values of the wrong type in metrics.jsonl or log.txt's arguments end in one line naming them."""
    run = tmp_path / "run"
    train_fire.main(TINY[:1] + ["1"] + TINY[2:] + ["--out-dir", str(run)])
    record = json.loads((run / "metrics.jsonl").read_text())
    log = (run / "log.txt").read_text().splitlines(keepends=True)
    args = json.loads(log[0])
    cases = [(dict(record, val_pgd="0.5"), None, "'val_pgd' is '0.5', not a number"),
             (dict(record, loss=[1.0]), None, "'loss' is [1.0], not a number"),
             (dict(record, val_nat=1.7), None, "'val_nat' is 1.7, not an accuracy in [0, 1]"),
             (dict(record, epoch=-3), None, "epoch -3 (epochs count from 1)"),
             ({**{k: v for k, v in record.items() if k != "val_pgd"}, "collapsed": True}, None, "without its 'val_pgd'"),
             (b'{"epoch": 1, "note": "\xff\xfe"}\n', None, "line 1 is not whole JSON"),
             (record, {k: v for k, v in args.items() if k != "method"}, "no method name"),
             (record, dict(args, seed="0"), "no integer seed"),
             (record, dict(args, clip_grad_norm="5"), "'clip_grad_norm' is not a number")]
    for i, (metrics, arguments, message) in enumerate(cases):
        folder = tmp_path / f"case{i}"
        shutil.copytree(run, folder)
        data = metrics if isinstance(metrics, bytes) else (json.dumps(metrics) + "\n").encode()
        (folder / "metrics.jsonl").write_bytes(data)
        if arguments is not None:
            (folder / "log.txt").write_text(json.dumps(arguments) + "\n" + "".join(log[1:]))
        code, err = cli_error(plot_runs.main, [str(folder), "--out", str(tmp_path / "c.png")], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (message, err)


def test_the_recorded_collapse_is_drawn(tmp_path):
    """The records kept in docs/records (FIRE at lr 0.05, seed 0, with and without clipping, CPU):
    the unclipped run's alarm fired in epoch 15, the clipped run's never; two curves, one seed each."""
    folders = plot_runs.run_folders([os.path.join(ROOT, "docs", "records")])
    drawn = {c["label"]: c for c in plot_runs.plot_runs([plot_runs.read_run(f) for f in folders],
                                                          str(tmp_path / "collapse.png"))}
    assert drawn["FIRE (lam=12)"]["alarms"] == [(0, 15)]
    assert drawn["FIRE (lam=12) + clip 5"]["alarms"] == []
    plain, clipped = drawn["FIRE (lam=12)"]["mean"]["val_pgd"], drawn["FIRE (lam=12) + clip 5"]["mean"]["val_pgd"]
    assert plain[:13] == clipped[:13] and plain[13] < 0.5 * plain[12] <= clipped[13]


def test_rehearsal_curves_of_several_data_sets_say_so_one_panel_set_each(tmp_path, monkeypatch):
    """Rehearsal runs of two data sets (one of them trained under Linf and L2): one panel set per
    data set, titled by it; the figure's title starts with REHEARSAL; the labels inside a data set
    say what tells its rows apart (--norm linf / --norm l2, never '--norm -') and name no data set."""
    import matplotlib
    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # text stays text in the SVG
    (folder,) = plot_runs.run_folders([os.path.join(ROOT, "docs", "records", "fire-lr0.05-s0")])
    base = plot_runs.read_run(folder)
    runs = []
    for dataset, norm in (("mnist", "linf"), ("cifar10", "linf"), ("cifar10", "l2")):
        runs.append(dict(base, args=dict(base["args"], dataset=dataset, norm=norm, rehearsal=True)))
    out = tmp_path / "curves.svg"
    drawn = plot_runs.plot_runs(runs, str(out), "Table 1: KL vs Fisher-Rao")
    assert [c["label"] for c in drawn] == ["FIRE (lam=12)", "FIRE (lam=12) (--norm linf)", "FIRE (lam=12) (--norm l2)"]
    svg = out.read_text()
    assert "REHEARSAL: Table 1: KL vs Fisher-Rao" in svg
    assert "REHEARSAL: MNIST" in svg and "REHEARSAL: CIFAR-10" in svg, svg[:2000]
    assert "--norm -" not in svg and svg.count("validation natural accuracy") == 2
