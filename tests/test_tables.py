"""The paper's tables and figures from result files (python -m fire_repro.tables; figures.py):
mean and sample std over seeds, the paired bootstrap interval against FIRE, and which rows are kept apart."""
import json
import os

import numpy as np
import pytest

from fire_repro import common
from fire_repro import results
from fire_repro import figures, tables
from fire_repro.common import cli
from conftest import METHODS, write_result


def test_summary_table_mean_and_sample_std(tmp_path):

    def record(seed, natural, aa, method="fire", **extra):
        title, order = METHODS[method]
        return dict(format=results.RESULT_FORMAT, defense=title, method=method, method_title=title,
                    method_order=order, train_identity=dict(method=method, seed=seed),
                    dataset="cifar10", model="wrn-34-10", eps=8 / 255, lam=12.0, seed=seed,
                    natural=natural, autoattack=aa, avg_acc=(natural + aa) / 2, n_examples=10000,
                    split="test", aa_version="standard", checkpoint_kind="best",
                    train_time_s=3600 * 11, **extra)
    records = [record(0, 0.80, 0.50), record(1, 0.84, 0.54), record(2, 0.82, 0.55),
               record(0, 0.85, 0.50, method="trades", beta=6.0)]
    for i, r in enumerate(records):
        (tmp_path / f"r{i}.json").write_text(json.dumps(r))
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    table = tables.main([str(tmp_path), "--table-out", str(tmp_path / "t.md")])
    assert (tmp_path / "t.md").read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| FIRE") or line.startswith("| TRADES")]
    assert rows[0].startswith("| TRADES") and rows[1].startswith("| FIRE")  # the paper's order
    fire = [c.strip() for c in rows[1].strip("|").split("|")]
    # natural 80, 84, 82 %: mean 82, sample std 2; AutoAttack 50, 54, 55: mean 53, std 2.65;
    # Avg. Acc. 65, 69, 68.5: mean 67.5, std 2.18
    assert fire[1:4] == ["CIFAR-10", "8/255", "WRN-34-10"]
    assert fire[4] == "82.00 ± 2.00" and fire[5] == "53.00 ± 2.65" and fire[6] == "67.50 ± 2.18"
    assert fire[7] == "11h00" and fire[8] == "3 (0,1,2)"
    trades = [c.strip() for c in rows[0].strip("|").split("|")]
    assert trades[4] == "85.00" and trades[5] == "50.00"  # one seed: no std


def test_pretraining_row_sits_with_the_additional_data_as_in_the_paper(tmp_path):
    """Table 2 lists Pre-training (a run with --init-from) under "With additional data"."""
    common = dict(format=results.RESULT_FORMAT, method="madry", method_title="Madry et al.", method_order=0,
                  train_identity=dict(method="madry", seed=0), dataset="cifar10", model="wrn-28-10",
                  eps=8 / 255, seed=0, natural=0.8, autoattack=0.5, avg_acc=0.65, n_examples=100,
                  split="test", aa_version="standard", checkpoint_kind="best", train_time_s=60.0)
    (tmp_path / "a.json").write_text(json.dumps(dict(common, defense="Pre-training", init_from="p/best.pt")))
    (tmp_path / "b.json").write_text(json.dumps(dict(common, defense="Madry et al.")))
    lines = tables.main([str(tmp_path)]).splitlines()
    where = {name: next(i for i, line in enumerate(lines) if line.startswith(f"| {name}"))
             for name in ("**Without additional data**", "Madry et al.", "**With additional data**", "Pre-training")}
    assert list(where.values()) == sorted(where.values()), lines


def test_paired_bootstrap_interval_on_constructed_inputs():
    rng = np.random.default_rng(1)
    a = rng.random((200, 2)) < 0.5
    assert tables.paired_difference(a, a) == (0.0, 0.0, 0.0)
    b = a.copy()
    b[:40] = True  # robust on the same images and 40 more (at least): strictly better
    m, low, high = tables.paired_difference(b, a)
    assert m == pytest.approx((b.mean(1) - a.mean(1)).mean()) and 0 < low < m < high
    assert tables.paired_difference(b, a) == (m, low, high)  # fixed seed: reproducible
    low2, high2 = tables.paired_difference(a, b)[1:]
    assert low2 == pytest.approx(-high, abs=0.02) and high2 < 0


def table_rows(table):
    return {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")]
                              for line in table.splitlines() if line.startswith("| ") and "---" not in line)}


def summarize(capsys, *argv):
    """`python -m fire_repro.tables argv` in this process: (the table, the exit status, the
    warning lines)."""
    capsys.readouterr()
    try:
        cli(tables.main, [*argv])  # the command line's one error path
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return out, status, err.strip().splitlines()


def test_summarize_pairs_each_row_with_fire_on_the_same_images(tmp_path):
    base = np.arange(100) < 50
    for seed in (0, 1):
        write_result(tmp_path / f"fire{seed}", "aa", base, seed=seed)
        write_result(tmp_path / f"trades{seed}", "aa", base | (np.arange(100) < 70), method="trades", seed=seed)
        write_result(tmp_path / f"mart{seed}", "aa", base, method="mart", seed=seed, npz=False)
        write_result(tmp_path / f"hel{seed}", "aa", base, method="hellinger", seed=seed,
                     index=np.arange(100) + 100)  # other images: nothing to pair
    rows = table_rows(tables.main([str(tmp_path)]))
    assert rows["Defense"][-1] == "ΔAA vs FIRE [95% CI]" and rows["FIRE"][-1] == "reference"
    delta = rows["TRADES"][-1]  # robust on 20 more of 100 images in both seeds: +20 points
    assert delta.startswith("+20.00 [+") and float(delta.split("[")[1].split(",")[0]) > 0, delta
    assert rows["MART"][-1] == "-" and rows["Hellinger"][-1] == "-"


def test_summarize_keys_rows_by_every_setting_and_says_so(tmp_path):
    robust = np.arange(10) < 5
    write_result(tmp_path / "a", "aa", robust)
    write_result(tmp_path / "b", "aa", robust, eps=0.05)  # differs only in the evaluation eps
    table = tables.main([str(tmp_path)])
    rows = [line for line in table.splitlines() if line.startswith("| FIRE")]
    assert len(rows) == 2 and all("| 1 (0) |" in row for row in rows)  # not "2 (0,0)"
    assert "differ in evaluation ε;" in table
    write_result(tmp_path / "c", "aa", np.arange(20) < 5)  # more images
    table = tables.main([str(tmp_path)])
    assert "| Images |" in table and "evaluation ε, number of images" in table
    assert len([line for line in table.splitlines() if line.startswith("| FIRE")]) == 3
    curves = figures.plot_sweep(tables.find_results([str(tmp_path)])[0], str(tmp_path / "f.png"))
    assert len(curves) == 3  # eps 0.05 and 8/255, 10 and 20 images: never averaged into one point
    # an L2 evaluation at the same number, and an L2-trained run evaluated in Linf: curves of their own
    write_result(tmp_path / "e", "aa-l2", robust, norm="l2")
    write_result(tmp_path / "f", "aa", robust, training=dict(norm="l2"))
    curves = figures.plot_sweep(tables.find_results([str(tmp_path)])[0], str(tmp_path / "f.png"))
    assert len(curves) == 5
    # a single setting: no extra columns, no note; a fine-tuned run shows its pre-training time
    write_result(tmp_path / "d" / "x", "aa", robust, pretrain_time_s=40 * 3600.0, train_time_s=1200.0)
    table = tables.main([str(tmp_path / "d"), "--quoted", "table2"])
    assert "Note:" not in table and "| Images |" not in table
    assert "| 40h00 + 0h20 |" in table
    quoted = table_rows(table)["UAT (quoted from the paper)"]
    assert quoted[1:8] == ["CIFAR-10", "8/255", "WRN-106-8", "86.46", "56.03", "71.24", "-"]


def test_summarize_never_averages_runs_trained_with_other_settings(tmp_path, capsys):
    """FIRE at lr 0.1 and at lr 0.01, two seeds each: two rows, each showing its lr, and a note;
    a result that records no training settings is not a result: left out with one warning line."""
    robust = np.arange(10) < 5
    for seed in (0, 1):
        write_result(tmp_path / f"a{seed}", "aa", robust, seed=seed)
        write_result(tmp_path / f"b{seed}", "aa", robust, seed=seed, training=dict(lr=0.01))
    table = tables.main([str(tmp_path)])
    rows = [line for line in table.splitlines() if line.startswith("| FIRE")]
    assert len(rows) == 2 and all("| 2 (0,1) |" in row for row in rows), table
    assert sorted(row.split("|")[5].strip() for row in rows) == ["--lr 0.01", "--lr 0.1"]
    assert all(row.endswith("| reference |") for row in rows)  # each FIRE row is its own reference
    assert "training settings (--lr: column Training)" in table
    assert capsys.readouterr().err == ""
    old = write_result(tmp_path / "old", "aa", robust, seed=2)
    del old["train_identity"]
    (tmp_path / "old" / "aa.json").write_text(json.dumps(old))
    table, status, err = summarize(capsys, str(tmp_path))
    assert status == 3 and len(err) == 1 and "'train_identity' missing" in err[0] and "old" in err[0]
    assert "| 1 (2) |" not in table


def test_an_attack_run_on_some_seeds_only_says_which(tmp_path):
    """PGD-20 on seed 1 only: the cell is seed 1's value and says so, not a silent 'mean'."""
    write_result(tmp_path / "s0", "aa", np.arange(10) < 5, seed=0)
    write_result(tmp_path / "s1", "aa", np.arange(10) < 5, seed=1, pgd20=0.62)
    fire = table_rows(tables.main([str(tmp_path)]))["FIRE"]
    assert fire[-4] == "62.00 (only seed 1)" and fire[-2] == "2 (0,1)"


def test_damaged_result_files_are_named_and_left_out(tmp_path, capsys):
    """A truncated per-image .npz or result JSON: one warning line naming the file, the rest
    of the table as it would be without it (no zipfile.BadZipFile), and the table and exit status
    3 say so."""
    robust = np.arange(10) < 5
    write_result(tmp_path / "good", "aa", robust)
    write_result(tmp_path / "npz", "aa", robust, seed=1)
    write_result(tmp_path / "json", "aa", robust, seed=2)
    npz = tmp_path / "npz" / "aa.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    (tmp_path / "json" / "aa.json").write_text((tmp_path / "json" / "aa.json").read_text()[:50])
    table, status, err = summarize(capsys, str(tmp_path))
    assert status == 3 and len(err) == 2 and all(line.count("left out") == 1 for line in err), err
    assert any(str(npz) in line and "damaged" in line for line in err)
    assert any("json" in line and "not whole JSON" in line for line in err)
    assert table_rows(table)["FIRE"][-2] == "1 (0)"


@pytest.mark.parametrize("edit", [dict(natural=7.5), dict(autoattack=float("nan")), dict(avg_acc=-3),
                                  dict(n_examples=0), dict(eps=2.0), dict(seed=1.5), dict(seed=True),
                                  dict(pgd20=float("inf")), dict(train_time_s=-1.0), dict(defense=5),
                                  dict(aa_checks=["passed"]), dict(aa_checks={"randomized": 1}),
                                  dict(sanity="flagged"), dict(sanity={"checks": {"radius": True}})])
def test_a_result_is_validated_before_it_counts(edit, tmp_path, capsys):
    """An impossible value of the right type (an accuracy of 7.5, NaN, n_examples 0, a seed of
    1.5) is not a result for any reader: in a folder it is left out with one warning line, the
    table says so and the exit status is 3; named on the command line it is an error (one line,
    exit 2, no table written); results.finished (the plan's question) does not take it."""
    write_result(tmp_path / "good", "aa", np.arange(10) < 5)
    bad = write_result(tmp_path / "bad", "aa", np.arange(10) < 5, **{"seed": 1, **edit})
    path = str(tmp_path / "bad" / "aa.json")
    table, status, err = summarize(capsys, str(tmp_path))
    assert status == 3 and len(err) == 1 and "left out" in err[0] and path in err[0], err
    assert table_rows(table)["FIRE"][-2] == "1 (0)"
    assert f"**Note: 1 result file left out (damaged or not valid; see the warnings): {path}.**" in table
    _, status, err = summarize(capsys, str(tmp_path / "good" / "aa.json"), path, "--table-out", str(tmp_path / "t.md"))
    assert status == 2 and len(err) == 1 and err[0].startswith("tables.py: error: ") and path in err[0]
    assert not (tmp_path / "t.md").exists()
    bad.update(checkpoint_sha256="0" * 64, settings={})
    (tmp_path / "bad" / "aa.json").write_text(json.dumps(bad))
    assert results.finished(path, "0" * 64, {}) == (None, results.value_problem(bad))
    with pytest.raises(SystemExit) as e:  # a figure too
        tables.main([str(tmp_path), "--plot-out", str(tmp_path / "f.png")])
    assert e.value.code == 3 and (tmp_path / "f.png").exists() and "1 result file left out" in capsys.readouterr().out


@pytest.mark.parametrize("edit, message", [
    (dict(natural=0.4), "AutoAttack accuracy 0.5 above the natural one 0.4"),
    (dict(autoattack=0.3, avg_acc=0.6), "autoattack 0.3 is not its per-image file's 0.5"),
    (dict(avg_acc=0.5), "not the mean of natural and AutoAttack"),
    (dict(natural=0.9, natural_images=np.arange(10) >= 1), "robust to AutoAttack but misclassified"),
    (dict(format="fire-repro-autoattack/2"), "format 'fire-repro-autoattack/2'")])
def test_a_result_contradicting_itself_or_of_another_version_is_named(edit, message, tmp_path, capsys):
    """Totals that contradict the result's own per-image file or each other, and a result of
    another format version, are left out of a folder's table with one line naming the file."""
    write_result(tmp_path / "good", "aa", np.arange(10) < 5)
    natural = edit.pop("natural_images", None)
    write_result(tmp_path / "bad", "aa", np.arange(10) < 5, seed=1, **edit)
    if natural is not None:
        np.savez(tmp_path / "bad" / "aa.npz", index=np.arange(10), square=np.arange(10) < 5, natural=natural)
    table, status, err = summarize(capsys, str(tmp_path))
    assert status == 3 and len(err) == 1 and "bad" in err[0] and message in err[0], err
    assert table_rows(table)["FIRE"][-2] == "1 (0)"


def test_a_fifo_or_a_deeply_nested_json_is_one_line(tmp_path, capsys):
    """A FIFO named *.json does not block the table; JSON nested past the parser's depth is damaged."""
    write_result(tmp_path / "good", "aa", np.arange(10) < 5)
    os.mkfifo(tmp_path / "good" / "pipe.json")
    (tmp_path / "good" / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert common.read_json(str(tmp_path / "good" / "deep.json")) is None
    table, status, err = summarize(capsys, str(tmp_path))
    assert status == 3 and len(err) == 2 and table_rows(table)["FIRE"][-2] == "1 (0)", err
    assert any("pipe.json" in line and "not a regular file" in line for line in err)
    assert any("deep.json" in line and "not whole JSON" in line for line in err)
    _, status, err = summarize(capsys, str(tmp_path / "good" / "pipe.json"))
    assert status == 2 and len(err) == 1 and "not a regular file" in err[0], err


def test_a_copied_result_counts_once(tmp_path, capsys):
    """A result copied into another folder (the same checkpoint evaluated the same way), also with
    its seed field edited, is one result with one warning, not a second seed."""
    sha = dict(checkpoint_sha256="a" * 64, settings={"n_examples": 10})
    write_result(tmp_path / "run", "aa", np.arange(10) < 5, **sha)
    write_result(tmp_path / "copy", "aa", np.arange(10) < 5, **sha)
    write_result(tmp_path / "edited", "aa", np.arange(10) < 5, seed=1, **sha)
    table, status, err = summarize(capsys, str(tmp_path))
    assert status == 0 and table_rows(table)["FIRE"][-2] == "1 (0)", (table, err)
    assert len(err) == 2 and all("counted once" in line for line in err), err


@pytest.mark.parametrize("text", ["[1, 2]", '"str"', '{"x": 1}', "7", "null", '{"format": "fire-repro-autoattack/1"'])
def test_a_named_file_that_is_not_a_result_is_an_error(text, tmp_path, capsys):
    """run_all.sh names the result files of a table: one that is not a result (any JSON value, or
    no whole JSON) stops the table with one line and exit 2 instead of a table without it."""
    write_result(tmp_path, "good", np.arange(10) < 5)
    (tmp_path / "x.json").write_text(text)
    _, status, err = summarize(capsys, str(tmp_path / "good.json"), str(tmp_path / "x.json"))
    assert status == 2 and len(err) == 1 and "x.json" in err[0] and "error" in err[0], err


def test_summarize_names_the_runs_not_evaluated_yet(tmp_path, capsys):
    """A run folder (best.pt or summary.json) without a result JSON: named in one warning line;
    the table is whole for what exists (exit 0)."""
    write_result(tmp_path / "done", "autoattack", np.arange(10) < 5)
    (tmp_path / "done" / "summary.json").write_text("{}")
    for run in ("fire-s1", "fire-s2"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "summary.json").write_text(json.dumps({"epochs": 1}))
    (tmp_path / "fire-s2" / "best.pt").write_bytes(b"")
    table, status, err = summarize(capsys, str(tmp_path))
    assert status == 0 and table_rows(table)["FIRE"][-2] == "1 (0)"
    assert len(err) == 1 and err[0].endswith(f"warning: not evaluated yet (a run without a result JSON): "
                                             f"{tmp_path / 'fire-s1'}, {tmp_path / 'fire-s2'}")


def test_results_of_runs_that_differ_in_inert_settings_are_one_row(tmp_path, capsys):
    """A result recorded with a setting that changes nothing (--awp-warmup without AWP, --ema-start
    without an average: a run trained before identities left them out) is averaged with the run
    without it: one row of two seeds, no Training column; a setting that does something stays apart."""
    robust = np.arange(10) < 5
    write_result(tmp_path / "s0", "aa", robust, seed=0, training=dict(awp_gamma=0.0, awp_warmup=10, ema=None, ema_start=1))
    write_result(tmp_path / "s1", "aa", robust, seed=1, training=dict(awp_gamma=0.0, awp_warmup=3, ema=None, ema_start=4))
    table, status, err = summarize(capsys, str(tmp_path))
    assert status == 0 and not err and table_rows(table)["FIRE"][-2] == "2 (0,1)" and "Training" not in table
    write_result(tmp_path / "s2", "aa", robust, seed=2, training=dict(awp_gamma=0.005, awp_warmup=3, ema=None, ema_start=1))
    table, status, err = summarize(capsys, str(tmp_path))
    assert len([line for line in table.splitlines() if line.startswith("| FIRE")]) == 2 and "--awp-gamma" in table


@pytest.mark.parametrize("argv,needle", [
    (["RESULTS", "--table-out", "UNDER_FILE/t.md"], "--table-out"),
    (["RESULTS", "--plot-out", "DIR/x.foo"], "--plot-out"), (["RESULTS", "--plot-out", "UNDER_FILE/x.png"], "--plot-out"),
    (["RESULTS", "--plot-out", "DIR/x.png", "--quoted", "table2"], "--quoted"), (["DIR/missing"], "does not exist"),
])
def test_tables_bad_input_is_one_line(argv, needle, tmp_path, capsys):
    """python -m fire_repro.tables: each mistake one line, exit 2, nothing written."""
    write_result(tmp_path / "results", "aa", np.arange(4) < 2)
    (tmp_path / "file.txt").write_text("")
    argv = [a.replace("RESULTS", str(tmp_path / "results")).replace("UNDER_FILE", str(tmp_path / "file.txt"))
            .replace("DIR", str(tmp_path)) for a in argv]
    before = sorted(tmp_path.rglob("*"))
    _, status, err = summarize(capsys, *argv)
    assert status == 2 and len(err) == 1 and err[0].startswith("tables.py: error: ") and needle in err[0], err
    assert sorted(tmp_path.rglob("*")) == before


def test_a_row_whose_results_carry_warnings_is_marked_and_named(tmp_path):
    """A result with a warned AutoAttack check, or (written before aa_checks) with aa_warnings, or
    with a flagged masking-report check, still counts in its row, and the row is marked with a note
    naming the result file and the warning; a clean row (checks passed) is not marked."""
    robust = np.arange(100) < 50
    passed = dict.fromkeys(["randomized", "range_output", "dynamic", "n_classes", "zero_gradients",
                            "square_sr"], "passed")
    write_result(tmp_path / "fire0", "aa", robust, seed=0, aa_checks=passed, aa_warnings=[])
    write_result(tmp_path / "fire1", "aa", robust, seed=1, aa_warnings=[],
                 aa_checks=dict(passed, randomized="it seems to be a randomized defense!"))
    write_result(tmp_path / "trades0", "aa", robust, method="trades", seed=0, aa_warnings=["zero gradient!"])
    write_result(tmp_path / "mart0", "aa", robust, method="mart", seed=0, aa_checks=passed, aa_warnings=[],
                 sanity={"checks": {"radius": {"flagged": True, "detail": "robust 0.40 at the box radius"},
                                    "transfer": {"flagged": False, "detail": "ok"}}})
    write_result(tmp_path / "hel0", "aa", robust, method="hellinger", seed=0, aa_checks=passed, aa_warnings=[])
    table = tables.main([str(tmp_path)])
    rows = table_rows(table)
    assert rows["FIRE"][5] == "50.00 ± 0.00 ⚠3"  # both seeds count; one carries a warning
    assert rows["TRADES"][5].endswith("⚠2") and rows["MART"][5].endswith("⚠1")
    assert rows["Hellinger"][5] == "50.00"
    notes = {line.split()[1]: line for line in table.splitlines() if line.startswith("- ⚠")}
    assert "1 of 2 result(s)" in notes["⚠3"] and str(tmp_path / "fire1" / "aa.json") in notes["⚠3"]
    assert "check randomized: it seems to be a randomized defense!" in notes["⚠3"]
    assert "fire0" not in notes["⚠3"]
    assert "AutoAttack: zero gradient!" in notes["⚠2"]
    assert "masking report, radius: robust 0.40 at the box radius" in notes["⚠1"] and "transfer" not in notes["⚠1"]
