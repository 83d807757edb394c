"""eval_autoattack.py: AutoAttack bounded by natural and PGD accuracy, chunks that resume after a
kill, torchrun shards, per-image results tied to their checkpoint, timing, and one line per bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fire_repro import common
from fire_repro import results
from fire_repro import tables
from conftest import ROOT, PY, cli_error, run_script, write_result
from models import get_model


def test_autoattack_is_bounded_by_natural_and_pgd(fire_run, tmp_path):
    """The standard AutoAttack on a trained digits model: robust accuracy falls (weakly) after
    each attack, never exceeds natural accuracy, and not PGD-20's by more than noise (AutoAttack
    is the stronger attack: a few points of slack for its different random starts)."""
    import eval_autoattack as ea
    out, summary = fire_run
    result_path = tmp_path / "aa.json"
    # 40 images: the full standard AutoAttack (Square's 5000 queries, FAB-T's 9 targets) takes
    # about a minute on two CPU cores even so; one image is 0.025 of accuracy.
    result, = ea.main([str(out / "best.pt"), "--n-examples", "40", "--pgd20", "--cw",
                       "--out", str(result_path)])
    assert json.loads(result_path.read_text())["autoattack"] == result["autoattack"]
    assert result["n_examples"] == 40 and result["aa_version"] == "standard"
    assert result["eps"] == summary["eps"] and result["max_perturbation"] <= result["eps"] + 1e-6
    after = [result["robust_after"][a] for a in ea.STANDARD_ATTACKS]
    assert all(b <= a for a, b in zip(after, after[1:]))
    assert result["autoattack"] == after[-1] <= result["natural"]
    assert result["autoattack"] <= result["pgd20"] + 0.05 and result["autoattack"] <= result["cw"] + 0.05
    assert result["natural"] > 0.5 and result["pgd20"] < result["natural"]  # a model that learnt
    assert result["avg_acc"] == pytest.approx((result["natural"] + result["autoattack"]) / 2)
    assert result["train_time_s"] == pytest.approx(summary["train_time_s"])  # from summary.json


def test_load_model_gives_the_evaluated_network(fire_run):
    """load_model and test_split (README's lines): the trained network in eval mode, images in
    [0, 1] in, logits out; its natural accuracy on the test images is the run's test_nat."""
    import fire_repro
    out, summary = fire_run
    model = fire_repro.load_model(str(out / "best.pt"))
    assert not any(m.training for m in model.modules())
    x, y = fire_repro.test_split("digits")
    assert x.min() >= 0 and x.max() <= 1
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(y), 10)
    assert (logits.argmax(1) == y).float().mean().item() == pytest.approx(summary["test_nat"], abs=1e-9)


def test_autoattack_refuses_train_mode_and_bad_inputs(fire_run, tmp_path):
    import eval_autoattack as ea
    model = get_model("smallcnn", 10)
    with pytest.raises(common.UserError, match="train mode"):
        ea.evaluate_autoattack(model.train(), torch.rand(4, 1, 28, 28), torch.zeros(4).long(), 0.1)
    out, _ = fire_run
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": get_model("smallcnn", 10).state_dict()}, foreign)
    ckpt = torch.load(out / "best.pt", weights_only=True)
    ckpt["args"].update(dataset="mnist", data_dir=str(tmp_path / "no-data"))  # same model shape
    offline = tmp_path / "offline.pt"
    torch.save(ckpt, offline)
    for path, needle in ((foreign, "not a checkpoint"), (offline, "mnist is not in"),
                         (tmp_path / "missing.pt", "missing.pt")):
        r = run_script("eval_autoattack.py", str(path))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle.lower() in lines[0].lower(), r.stderr


# ---- Chunks, shards, identity, per-sample results
EVAL_SMALL = ["--smoke-aa", "--n-examples", "32", "--chunk-size", "16", "--batch-size", "16", "--device", "cpu"]
VOLATILE = ("eval_time_s",)  # compute time: the one field a resumed or sharded run may change


def eval_env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def comparable(path):
    record = json.loads(path.read_text())
    return {k: v for k, v in record.items() if k not in VOLATILE}


def npz_arrays(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def eval_reference(fire_run, tmp_path_factory):
    """An uninterrupted one-process evaluation of fire_run's best.pt: 32 images, 2 chunks of 16."""
    out = tmp_path_factory.mktemp("aa-reference") / "aa.json"
    r = subprocess.run([PY, os.path.join(ROOT, "eval_autoattack.py"), str(fire_run[0] / "best.pt"),
                        *EVAL_SMALL, "--out", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=eval_env())
    assert r.returncode == 0, r.stderr[-2000:]
    return fire_run[0] / "best.pt", out


def test_eval_killed_after_a_chunk_resumes_to_the_identical_result(eval_reference, tmp_path):
    ckpt, reference = eval_reference
    out = tmp_path / "aa.json"
    cmd = [PY, os.path.join(ROOT, "eval_autoattack.py"), str(ckpt), *EVAL_SMALL, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=eval_env())
    first = tmp_path / "aa.chunks" / "chunk-00000.npz"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not out.exists()  # killed between its first chunk and the end
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=eval_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "chunk 1/2" not in r.stdout and "chunk 2/2" in r.stdout  # the finished chunk was not attacked again
    assert comparable(out) == comparable(reference)
    got, want = npz_arrays(tmp_path / "aa.npz"), npz_arrays(reference.with_suffix(".npz"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert not (tmp_path / "aa.chunks").exists() and not list(tmp_path.glob("*.tmp*"))


def test_eval_torchrun_two_processes_equal_one(eval_reference, tmp_path):
    ckpt, reference = eval_reference
    out = tmp_path / "aa.json"
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "eval_autoattack.py"), str(ckpt), *EVAL_SMALL, "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=eval_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "over 2 processes" in r.stdout and r.stdout.count("-> ") == 1  # rank 0 merges and reports
    assert comparable(out) == comparable(reference)
    got, want = npz_arrays(tmp_path / "aa.npz"), npz_arrays(reference.with_suffix(".npz"))
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_eval_per_sample_npz_matches_the_json(eval_reference):
    import eval_autoattack as ea
    _, reference = eval_reference
    record = json.loads(reference.read_text())
    arrays = npz_arrays(reference.with_suffix(".npz"))
    assert record["per_sample"] == "aa.npz"
    assert list(arrays) == ["index", "label", "natural", *ea.STANDARD_ATTACKS]
    assert np.array_equal(arrays["index"], np.arange(32)) and record["n_examples"] == 32
    assert arrays["natural"].mean() == record["natural"] and arrays["square"].mean() == record["autoattack"]
    for before, attack in zip(["natural", *ea.STANDARD_ATTACKS], ea.STANDARD_ATTACKS):
        assert arrays[attack].dtype == bool and arrays[attack].mean() == record["robust_after"][attack]
        assert not (arrays[attack] & ~arrays[before]).any()  # each attack only removes robust images
    assert record["settings"] == dict(eps=record["eps"], split="test", n_examples=32, seed=0, smoke_aa=True,
                                      attacks=list(ea.STANDARD_ATTACKS), batch_size=16, chunk_size=16)
    assert record["natural"] > 0.5 and record["autoattack"] < record["natural"]  # the attack did work
    assert list(record["aa_checks"]) == list(ea.AA_CHECKS)  # each check's outcome, in chunks or not
    assert all(v == "passed" or any(v.startswith(m) for m in record["aa_warnings"]) for v in record["aa_checks"].values())


def test_eval_is_tied_to_its_checkpoint(fire_run, tmp_path, capsys):
    """--overwrite retrains beside an old result: the result names the checkpoint's SHA-256, so
    the tables leave it out with a warning and a new evaluation replaces it; the same checkpoint
    and settings are not evaluated twice."""
    import eval_autoattack as ea
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((fire_run[0] / "best.pt").read_bytes())
    small = ["--smoke-aa", "--n-examples", "8", "--batch-size", "8", "--device", "cpu"]
    first, = ea.main([str(run / "best.pt"), *small])
    assert first["checkpoint_sha256"] == ea.sha256_file(str(run / "best.pt"))
    again, = ea.main([str(run / "best.pt"), *small])
    assert "already evaluated" in capsys.readouterr().out and again == json.loads((run / "autoattack.json").read_text())
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["epoch"] += 1  # "retrained": other bytes
    torch.save(ckpt, run / "best.pt")
    write_result(tmp_path / "other", "aa", np.arange(10) < 5)
    with pytest.raises(SystemExit) as status:  # the table is written, a result was left out
        tables.main([str(tmp_path)])
    table, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert status.value.code == 3 and "1 result file left out" in table
    assert len(err) == 1 and "left out" in err[0] and "autoattack.json" in err[0] and "changed" in err[0]
    assert "| 1 (0) |" in table and table.count("| FIRE") == 1
    redone, = ea.main([str(run / "best.pt"), *small])
    out = capsys.readouterr().out
    assert "already evaluated" not in out and "replacing" in out and "another checkpoint" in out
    assert redone["checkpoint_sha256"] != first["checkpoint_sha256"] and redone["epoch"] == first["epoch"] + 1
    (run / "best.pt").unlink()
    tables.find_results([str(tmp_path)])
    assert "does not exist" in capsys.readouterr().err


def test_eval_default_names_keep_splits_and_radii_apart(fire_run, tmp_path):
    import eval_autoattack as ea
    run = str(tmp_path / "best.pt")
    assert ea.default_out(run, 0.1, 0.1) == str(tmp_path / "autoattack.json")
    assert ea.default_out(run, 0.1, 0.1, "val") == str(tmp_path / "autoattack-val.json")
    assert ea.default_out(str(tmp_path / "last.pt"), 8 / 255, 0.031, "val") == str(tmp_path / "autoattack-last-eps8-255-val.json")
    assert ea.default_out(run, 0.05, 0.1) == str(tmp_path / "autoattack-eps0.05.json")
    (tmp_path / "best.pt").write_bytes((fire_run[0] / "best.pt").read_bytes())
    small = ["--smoke-aa", "--n-examples", "4", "--batch-size", "4", "--device", "cpu"]
    test, = ea.main([run, *small])
    val, = ea.main([run, *small, "--split", "val"])
    assert json.loads((tmp_path / "autoattack.json").read_text()) == test and test["split"] == "test"
    assert json.loads((tmp_path / "autoattack-val.json").read_text()) == val and val["split"] == "val"


# ---- Bad input: one line, exit 2, nothing written


def eval_error(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["eval_autoattack.py", *argv])
    import eval_autoattack as ea
    with pytest.raises(SystemExit) as e:
        common.cli(ea.main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval_autoattack.py: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case,needle", [
    (["--chunk-size", "0"], "--chunk-size"), (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 32)], "--seed"),
    (["--eps", "nan"], "--eps"), (["--eps", "2"], "--eps"), (["--n-examples", "0"], "--n-examples"),
    (["--out", "DIR/aa.npz"], ".json"), (["--n-examples", "1000000000"], "--n-examples"),
    (["--chunk-size", "1000000000"], "--chunk-size"), (["--batch-size", "1000000000"], "--batch-size"),
    (["OUT_IS_DIR"], "is a folder"), (["OUT_UNDER_FILE"], "cannot write --out"),
    (["NO_MODEL"], "no model name"), (["STRING_EPS"], "eps must be a number"), (["NO_EPS"], "eps must be a number"),
    (["BAD_MODEL"], "6n+4"), (["BAD_DATASET"], "unknown dataset"),
    (["--transfer-from", "DIR/x.pt"], "goes with --sanity"), (["--sanity-n", "0"], "--sanity-n"),
    (["--sanity", "--transfer-from", "DIR/none.pt"], "--transfer-from"),
    (["L3_NORM"], "norm must be one of linf, l2"),
    (["NAN_WEIGHTS"], "weights are not finite"), (["HUGE_MODEL"], "does not match model 'wrn-256-32'"),
    # the modes that are other commands now: one line naming the command
    (["--summarize", "DIR"], "use python -m fire_repro.tables"), (["--plot-sweep", "DIR"], "use python -m fire_repro.tables"),
    (["--time-images", "2"], "use python benchmark.py --autoattack"), (["--time-model=smallcnn"], "use python benchmark.py --autoattack"),
])
def test_eval_bad_input_catalogue(case, needle, fire_run, tmp_path, monkeypatch, capsys):
    """Each user mistake: one line, exit 2, before any attack runs, and no file left behind."""
    best = str(fire_run[0] / "best.pt")
    (tmp_path / "file.txt").write_text("")
    write_result(tmp_path / "results", "aa", np.arange(4) < 2)
    saved = torch.load(best, weights_only=True)
    edits = {"NO_MODEL": lambda a: a.pop("model"), "STRING_EPS": lambda a: a.update(eps="0.1"),
             "NO_EPS": lambda a: a.pop("eps"), "BAD_MODEL": lambda a: a.update(model="wrn-35-10"),
             "BAD_DATASET": lambda a: a.update(dataset="svhn"), "L3_NORM": lambda a: a.update(norm="l3"),
             "NAN_WEIGHTS": lambda a: [v.fill_(math.nan) for v in saved["model"].values() if v.is_floating_point()],
             "HUGE_MODEL": lambda a: a.update(model="wrn-256-32")}  # 4 billion parameters: never built
    argv = []
    for word in case:
        if word in edits:
            edits[word](saved["args"])
            torch.save(saved, tmp_path / "bad.pt")
            argv.append(str(tmp_path / "bad.pt"))
        else:
            argv.append({"OUT_IS_DIR": best, "OUT_UNDER_FILE": best}.get(
                word, word.replace("UNDER_FILE", str(tmp_path / "file.txt")).replace("DIR", str(tmp_path))))
    if "OUT_IS_DIR" in case:
        (tmp_path / "dir.json").mkdir()
        argv += ["--out", str(tmp_path / "dir.json")]
    if "OUT_UNDER_FILE" in case:
        argv += ["--out", str(tmp_path / "file.txt" / "aa.json")]
    if not argv[0].endswith(".pt"):
        argv.insert(0, best)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert needle in eval_error(monkeypatch, capsys, argv)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert not list(fire_run[0].glob("autoattack*")) and not list(fire_run[0].glob("*.chunks"))


def test_eval_out_folder_fails_at_once_on_the_command_line(fire_run, tmp_path):
    """An --out that is a folder is refused before the attack runs, and nothing is left in it."""
    folder = tmp_path / "aa.json"
    folder.mkdir()
    r = subprocess.run([PY, os.path.join(ROOT, "eval_autoattack.py"), str(fire_run[0] / "best.pt"),
                        "--out", str(folder)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=eval_env())
    assert r.returncode == 2 and r.stdout == "" and list(tmp_path.iterdir()) == [folder]
    assert list(folder.iterdir()) == []
    assert r.stderr.strip().splitlines() == [f"eval_autoattack.py: error: --out {str(folder)!r} is a folder, not a file"]


# ---- A finished result is never replaced by a different one unasked; damaged files; the lock
SMALL = ["--smoke-aa", "--n-examples", "8", "--batch-size", "8", "--device", "cpu"]


def copied_checkpoint(fire_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((fire_run[0] / "best.pt").read_bytes())
    return run / "best.pt"


def results_in(folder):
    return {p.name: p.read_bytes() for p in folder.glob("autoattack*")}


def interrupted_before_the_merge(monkeypatch, argv):
    """Run an evaluation that is stopped after its chunks, before the result is written."""
    import eval_autoattack as ea

    def stop(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(ea, "merge_chunks", stop)
    with pytest.raises(KeyboardInterrupt):
        ea.main(argv)
    monkeypatch.undo()


def test_eval_with_other_settings_never_replaces_an_evaluation(fire_run, tmp_path, monkeypatch, capsys):
    """A quick check (fewer images) of an evaluated checkpoint stops in one line and leaves the
    result as it was (nothing is replaced before the attack); --out writes it
    elsewhere and --overwrite replaces. An interrupted evaluation's chunks are kept the same way."""
    import eval_autoattack as ea
    ckpt = copied_checkpoint(fire_run, tmp_path)
    ea.main([str(ckpt), *SMALL])
    before = results_in(ckpt.parent)
    line = eval_error(monkeypatch, capsys, [str(ckpt), *SMALL, "--n-examples", "4"])
    assert "other settings (n_examples 8 -> 4)" in line and "--overwrite" in line
    assert results_in(ckpt.parent) == before
    quick, = ea.main([str(ckpt), *SMALL, "--n-examples", "4", "--out", str(tmp_path / "quick.json")])
    assert quick["n_examples"] == 4 and results_in(ckpt.parent) == before
    replaced, = ea.main([str(ckpt), *SMALL, "--n-examples", "4", "--overwrite"])
    assert json.loads((ckpt.parent / "autoattack.json").read_text())["n_examples"] == replaced["n_examples"] == 4
    out = str(tmp_path / "part.json")
    interrupted_before_the_merge(monkeypatch, [str(ckpt), *SMALL, "--chunk-size", "4", "--out", out])
    chunks = results_in(tmp_path / "part.chunks")
    line = eval_error(monkeypatch, capsys, [str(ckpt), *SMALL, "--chunk-size", "8", "--out", out])
    assert "other settings (chunk_size 4 -> 8)" in line and results_in(tmp_path / "part.chunks") == chunks


def test_eval_damaged_chunk_or_per_image_file_is_computed_again(fire_run, tmp_path, monkeypatch, capsys):
    """A truncated chunk file is attacked again, not a zipfile.BadZipFile at every rerun; a truncated
    per-image .npz is not 'already evaluated' but evaluated again, to the same result."""
    import eval_autoattack as ea
    ckpt = copied_checkpoint(fire_run, tmp_path)
    argv = [str(ckpt), *SMALL, "--chunk-size", "4"]
    interrupted_before_the_merge(monkeypatch, argv)
    capsys.readouterr()
    chunk = ckpt.parent / "autoattack.chunks" / "chunk-00000.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])
    result, = ea.main(argv)
    out = capsys.readouterr().out
    assert "chunk 1/2" in out and "chunk 2/2" not in out  # the damaged chunk again, the whole one kept
    npz = ckpt.parent / "autoattack.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    again, = ea.main(argv)
    out = capsys.readouterr().out
    assert "already evaluated" not in out and "per-image file" in out and "is damaged; evaluate again" in out
    assert results.read_per_image(again, str(ckpt.parent / "autoattack.json")) is not None
    assert {k: v for k, v in again.items() if k not in VOLATILE} == {k: v for k, v in result.items() if k not in VOLATILE}


def test_eval_and_training_share_the_run_folder_lock(fire_run, tmp_path, monkeypatch, capsys):
    """An evaluation meets a training (or another evaluation) of its run folder: one line, exit 2,
    nothing written (the one run-folder lock: no two processes write one chunk folder); and a training meets
    an evaluation the same way."""
    import eval_autoattack as ea
    import train_fire
    ckpt = copied_checkpoint(fire_run, tmp_path)
    lock = common.lock_folder(str(ckpt.parent), "--out-dir")
    try:
        line = eval_error(monkeypatch, capsys, [str(ckpt), *SMALL])
    finally:
        lock.close()
    assert "is in use" in line and results_in(ckpt.parent) == {}
    job = ea.Evaluation(str(ckpt), ea.get_args([str(ckpt), *SMALL]), None)
    locks = ea.lock_folders([job], [job.out])
    try:
        code, lines = cli_error(train_fire.main, ["--epochs", "1", "--out-dir", str(ckpt.parent)], capsys)
    finally:
        for lock in locks:
            lock.close()
    assert code == 2 and len(lines) == 1 and "is in use" in lines[0]
