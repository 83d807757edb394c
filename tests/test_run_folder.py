"""The run folder: a killed run resumes to the uninterrupted result, a refused command leaves the
folder as it was (overwrite, lock, changed settings, unwritable folder), and checkpoints load safely."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fire_repro import checkpoints
from fire_repro import common
from fire_repro import training
from fire_repro import run_folder
import train_fire
from conftest import ROOT, PY, QUICK, cli_error, run_script

# ----------------------------------------------------------------------------------------------
# Resuming after a kill: last.pt is the commit point of an epoch


def test_killed_run_resumes_to_identical_result(fire_run, tmp_path):
    """SIGKILL a run during epoch 3, resume with --resume auto: same weights as never killed."""
    ref_out, ref_summary = fire_run
    cmd = [PY, os.path.join(ROOT, "train_fire.py"), *QUICK, "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) in (2, 3), "kill came too late"
    r = run_script("train_fire.py", *QUICK, "--out-dir", str(tmp_path), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    ref = torch.load(ref_out / "last.pt", weights_only=True)
    new = torch.load(tmp_path / "last.pt", weights_only=True)
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], new["model"][k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in h]  # noqa: E731
    assert strip(ref["history"]) == strip(new["history"])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["test_nat"] == ref_summary["test_nat"]
    assert summary["test_pgd"] == ref_summary["test_pgd"]


def test_ctrl_c_says_how_to_continue(tmp_path):
    """A real SIGINT (Ctrl-C) after the first committed epoch: exit code 130, last.pt kept, and
    the last line of stderr says that --resume auto continues the run."""
    cmd = [PY, os.path.join(ROOT, "train_fire.py"), *COMMIT, "--epochs", "50", "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),  # SIGINT as in a terminal, also when
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # run in the background
    deadline = time.time() + 900  # the first epoch: seconds on an idle CPU, minutes on a loaded one
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "last.pt").exists():
        time.sleep(0.05)
    assert (tmp_path / "last.pt").exists(), "no epoch committed in 900 s"
    proc.send_signal(signal.SIGINT)
    try:
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"{tmp_path}: stopped (Ctrl-C or a stop signal); every committed "
                                            f"epoch is in last.pt: the same command with --resume auto continues it")
    assert checkpoints.load_checkpoint(str(tmp_path / "last.pt"), resuming=True)["epoch"] >= 1


COMMIT = ["--epochs", "2", "--lr", "0.1", "--attack-steps", "2", "--eval-steps", "3", "--batch-size", "64"]


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """A finished 2-epoch digits run whose 2nd epoch is the best one, and a copy of its folder as
    it was after epoch 1 (best.pt of epoch 1)."""
    root = tmp_path_factory.mktemp("commit")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([PY, os.path.join(ROOT, "train_fire.py"), *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=600, cwd=ROOT, env=env)
    r = run(*COMMIT, "--epochs", "1", "--out-dir", str(root / "run"))
    assert r.returncode == 0, r.stderr
    epoch1 = {f: (root / "run" / f).read_bytes() for f in ("best.pt", "metrics.jsonl", "log.txt")}
    r = run(*COMMIT, "--out-dir", str(root / "run"), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["best_epoch"] == 2
    return root / "run", epoch1, summary, run


def test_kill_after_the_commit_point_is_repaired_on_resume(two_epoch_run, tmp_path):
    """The state a SIGKILL leaves right after last.pt of the last epoch is written (best.pt,
    metrics and summary of that epoch missing); resume rebuilds them from last.pt."""
    done, epoch1, summary, run = two_epoch_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    (out / "best.pt").write_bytes(epoch1["best.pt"])
    (out / "metrics.jsonl").write_bytes(epoch1["metrics.jsonl"])
    (out / "summary.json").unlink()
    r = run(*COMMIT, "--out-dir", str(out), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    resumed = json.loads((out / "summary.json").read_text())
    for key in ("best_epoch", "val_pgd", "test_nat", "test_pgd"):
        assert resumed[key] == summary[key], key
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 2


def test_kill_before_the_commit_point_repeats_the_epoch(two_epoch_run, tmp_path):
    """A kill after epoch 2 wrote its metrics and log lines but before last.pt: those lines are
    dropped on resume and the epoch is trained again, to the uninterrupted result."""
    done, epoch1, summary, run = two_epoch_run
    out = tmp_path / "run"
    out.mkdir()
    r = run(*COMMIT, "--epochs", "1", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "uncommitted": True}) + "\n")
    with open(out / "log.txt", "a") as f:
        f.write("epoch   2 | uncommitted\n")
    r = run(*COMMIT, "--out-dir", str(out), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert "uncommitted" not in (out / "metrics.jsonl").read_text() + (out / "log.txt").read_text()
    assert (out / "metrics.jsonl").read_text().count('"epoch": 2') == 1
    assert json.loads((out / "summary.json").read_text())["test_pgd"] == summary["test_pgd"]


def test_kill_before_the_first_commit_restarts_with_resume_auto(two_epoch_run, tmp_path):
    """A kill in epoch 1 after its metrics and log lines, before last.pt: `--resume auto` starts
    over (the uncommitted lines go) instead of refusing a folder that holds no committed run."""
    done, epoch1, summary, run = two_epoch_run
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_bytes(epoch1["metrics.jsonl"])
    (out / "log.txt").write_bytes(epoch1["log.txt"])
    r = run(*COMMIT, "--out-dir", str(out), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["test_pgd"] == summary["test_pgd"]
    (out / "last.pt").unlink()  # best.pt without last.pt is not an uncommitted first epoch
    r = run(*COMMIT, "--out-dir", str(out), "--resume", "auto")
    assert r.returncode == 2 and "already holds a run" in r.stderr


# ----------------------------------------------------------------------------------------------
# Refused commands leave the run folder unchanged; runs side by side


def test_refuses_to_overwrite_a_run(fire_run, tmp_path):
    out, _ = fire_run
    r = run_script("train_fire.py", "--out-dir", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_default_folders_tell_settings_apart():
    """Without --out-dir, the data set's preset run keeps runs/<method>-<dataset>-s<seed> and a run
    of other settings gets a folder of its own; a larger --epochs (which extends a run) does not."""
    folder = lambda *flags: train_fire.get_args(list(flags)).out_dir  # noqa: E731
    assert folder() == os.path.join("runs", "fire-digits-s0") == folder("--epochs", "30")
    assert folder("--norm", "l2") == os.path.join("runs", "fire-digits-l2-s0")
    others = [folder(*f) for f in (["--norm", "l2"], ["--lam", "5"], ["--lr", "0.01"], ["--rehearsal"],
                                   ["--norm", "l2", "--lam", "5"], ["--model", "resnet18"], ["--ema", "0.99"])]
    assert len(set(others)) == len(others) and folder() not in others, others


def test_every_refusal_of_a_folder_names_out_dir(tmp_path, capsys):
    """A folder that holds another run, or that another training or evaluation holds, is refused
    with the fix that keeps that run (--out-dir), never only --overwrite nor 'wait'."""
    held = tmp_path / "held"
    held.mkdir()
    (held / "best.pt").write_bytes(b"a finished run's checkpoint")
    code, lines = cli_error(train_fire.main, ["--out-dir", str(held)], capsys)
    assert code == 2 and len(lines) == 1 and "own --out-dir" in lines[0], lines
    lock = common.lock_folder(str(tmp_path / "busy"), "--out-dir")
    try:
        code, lines = cli_error(train_fire.main, ["--out-dir", str(tmp_path / "busy")], capsys)
    finally:
        lock.close()
    assert code == 2 and len(lines) == 1 and "own --out-dir" in lines[0] and "wait" not in lines[0], lines


def file_bytes(folder):
    """{name: bytes} of the files in a run folder: what a refused command must leave unchanged."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("flags, needle", [(["--val-size", "5000"], "--val-size"),
                                           (["--aux-data", "BAD"], "--aux-data")])
def test_overwrite_checks_every_input_before_deleting(two_epoch_run, tmp_path, flags, needle):
    """--overwrite with an input that is then rejected leaves the finished run intact."""
    done, _, _, run = two_epoch_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    before = file_bytes(out)
    (tmp_path / "bad.npz").write_bytes(b"\x00" * 64)
    flags = [str(tmp_path / "bad.npz") if f == "BAD" else f for f in flags]
    r = run(*COMMIT, *flags, "--overwrite", "--out-dir", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert file_bytes(out) == before


def test_overwrite_keeps_the_old_run_when_the_new_one_fails(two_epoch_run, tmp_path, monkeypatch, capsys):
    """--overwrite of a finished run by a run whose loss is not finite at the first batch: one
    line, and the old run is whole again (every file, not log.txt alone)."""
    done = two_epoch_run[0]
    out = tmp_path / "run"
    shutil.copytree(done, out)
    before = file_bytes(out)
    step = train_fire.train_step

    def not_finite(*args):
        loss, logits, x_adv = step(*args)
        return loss * float("inf"), logits, x_adv
    monkeypatch.setattr(train_fire, "train_step", not_finite)
    code, lines = cli_error(train_fire.main, [*COMMIT, "--overwrite", "--out-dir", str(out)], capsys)
    assert code == 2 and len(lines) == 1 and "the loss became NaN or infinite" in lines[0], lines
    assert file_bytes(out) == before and not (out / run_folder.REPLACED).exists()


def test_overwrite_killed_before_its_first_commit_gives_the_old_run_back(two_epoch_run, tmp_path):
    """SIGKILL of an --overwrite run in its first epoch: the next command in the folder finds the
    old run whole (here --resume auto, which then finds it finished and leaves it)."""
    done, _, _, run = two_epoch_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    before = file_bytes(out)
    cmd = [PY, os.path.join(ROOT, "train_fire.py"), *COMMIT, "--attack-steps", "10", "--overwrite",
           "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while not (out / run_folder.REPLACED).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / run_folder.REPLACED).exists(), "the run never set the old one aside"
    assert not (out / "last.pt").exists() or (out / "last.pt").read_bytes() == before["last.pt"], "kill came too late"
    r = run(*COMMIT, "--out-dir", str(out), "--resume", "auto")
    assert r.returncode == 0 and "already finished" in r.stdout, r.stderr
    assert file_bytes(out) == before and not (out / run_folder.REPLACED).exists()


def test_resume_leaves_a_finished_run_alone(two_epoch_run, tmp_path, capsys):
    """--resume auto of a finished run: one line, no file touched (no second
    test, summary.json and log.txt as they were); a smaller --epochs is refused."""
    done, _, summary, _ = two_epoch_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    again = train_fire.main([*COMMIT, "--resume", "auto", "--out-dir", str(out)])
    assert again == summary and capsys.readouterr().out.strip().endswith("nothing to do")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    code, lines = cli_error(train_fire.main, [*COMMIT, "--epochs", "1", "--resume", "auto", "--out-dir", str(out)], capsys)
    assert code == 2 and len(lines) == 1 and "not shortened" in lines[0]


def test_a_run_folder_in_use_is_refused(tmp_path):
    """A second training into a folder whose lock is held stops with one line."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_script("train_fire.py", "--epochs", "1", "--out-dir", str(out))
    assert r.returncode == 2 and "in use" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("flags, needle", [(["--eps", "0.2"], "--eps"), (["--lam", "6"], "--lam"),
                                           (["--seed", "1"], "--seed"), (["--val-size", "100"], "--val-size"),
                                           (["--resume", "OTHER"], "not in --out-dir")])
def test_resume_refuses_a_changed_run(two_epoch_run, tmp_path, flags, needle):
    """Resuming must not change what the run computes, nor adopt another folder's run."""
    done, _, _, run = two_epoch_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    before = file_bytes(out)
    other = tmp_path / "other"
    shutil.copytree(done, other)
    flags = [str(other / "last.pt") if f == "OTHER" else f for f in flags]
    resume = [] if "--resume" in flags else ["--resume", "auto"]
    r = run(*COMMIT, "--epochs", "3", *flags, *resume, "--out-dir", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert file_bytes(out) == before


def test_unwritable_folder_mid_run_is_one_line(tmp_path, monkeypatch, capsys):
    """The output folder failing mid-run (here: the first checkpoint write) ends in one
    line and exit 2, not a traceback."""
    def refuse(state, path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(training, "save_checkpoint", refuse)
    monkeypatch.setattr(sys, "argv", ["train_fire.py"])
    with pytest.raises(SystemExit) as exit_info:
        common.cli(lambda: train_fire.main(["--epochs", "1", "--attack-steps", "1", "--eval-steps", "1",
                                             "--out-dir", str(tmp_path / "run")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied" in err[0] and "last.pt" in err[0]


def test_concurrent_runs_do_not_interfere(tmp_path):
    cmd = lambda d: [PY, os.path.join(ROOT, "train_fire.py"), "--epochs", "1", "--attack-steps", "1",  # noqa: E731
                     "--eval-steps", "1", "--out-dir", str(tmp_path / d)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two runs side by side on a small machine
    procs = [subprocess.Popen(cmd(d), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                              env=env) for d in ("a", "b")]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not list(tmp_path.glob("*/*.tmp*"))  # no temporary files left behind


# ----------------------------------------------------------------------------------------------
# Loading checkpoints safely: hostile, broken and foreign files


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this runs a shell command that creates `marker`
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_does_not_run_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "last.pt"
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "payload": _Evil(marker)}, evil)
    r = run_script("train_fire.py", "--resume", str(evil), "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot load checkpoint" in r.stderr
    assert not marker.exists()


def test_broken_and_foreign_checkpoints(fire_run, tmp_path):
    out, _ = fire_run
    good = (out / "last.pt").read_bytes()
    cases = {"truncated.pt": good[: len(good) // 2], "garbage.pt": b"not a checkpoint" * 10}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["args"]["model"] = "resnet18"  # weights of a smallcnn under another architecture's name
    torch.save(ckpt, tmp_path / "mislabelled.pt")
    for name, needle in [("truncated.pt", "cannot load"), ("garbage.pt", "cannot load"),
                         ("foreign.pt", "not a checkpoint"), ("mislabelled.pt", "model")]:
        r = run_script("train_fire.py", *QUICK, "--resume", str(tmp_path / name), "--out-dir", str(tmp_path / name) + ".run")
        assert r.returncode == 2, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, (name, r.stderr)
    with pytest.raises(common.UserError, match="does not match"):
        saved = torch.load(tmp_path / "mislabelled.pt", weights_only=True)
        checkpoints.load_model_state(checkpoints.model_from_args(saved["args"]), saved, "mislabelled.pt")
    r = run_script("train_trades.py", "--resume", str(out / "last.pt"), "--out-dir", str(tmp_path / "t"))
    assert r.returncode == 2 and "method='fire'" in r.stderr  # a FIRE run cannot resume as TRADES


@pytest.mark.parametrize("damage, needle", [
    ("model", "'model' is missing or not a dict of tensors"), ("args", "no training arguments"),
    ("args-string", "no training arguments"), ("optimizer", "'optimizer' is missing")])
def test_incomplete_checkpoints_are_one_line_for_every_reader(two_epoch_run, tmp_path, capsys, damage, needle):
    """A checkpoint of the right format with a piece missing or of the wrong kind: --resume,
    --init-from and the evaluation (one reader, checkpoints.load_checkpoint) each stop in one line
    naming it, never a KeyError or AttributeError traceback. The optimiser only matters to --resume."""
    import eval_autoattack as ea
    ckpt = torch.load(two_epoch_run[0] / "last.pt", weights_only=True)
    if damage == "args-string":
        ckpt["args"] = "lr=0.1"
    else:
        del ckpt[damage]
    out = tmp_path / "run"
    out.mkdir()
    torch.save(ckpt, out / "last.pt")
    readers = [(train_fire.main, [*COMMIT, "--resume", "auto", "--out-dir", str(out)])]
    if damage != "optimizer":
        readers += [(train_fire.main, [*COMMIT, "--init-from", str(out / "last.pt"), "--out-dir", str(tmp_path / "ft")]),
                    (ea.main, [str(out / "last.pt"), "--smoke-aa", "--n-examples", "4", "--device", "cpu"])]
    for main, argv in readers:
        code, lines = cli_error(main, argv, capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, lines)


def test_a_folder_being_replaced_is_named_so(two_epoch_run, tmp_path, capsys):
    """While an --overwrite run has not committed its first epoch, the old run's files are in
    .replaced/: evaluating the folder's checkpoint, or summarising a result of it, says the run is
    being replaced and since when (was: "does not exist")."""
    import eval_autoattack
    from fire_repro import tables
    from conftest import write_result
    out = tmp_path / "run"
    shutil.copytree(two_epoch_run[0], out)
    write_result(out, "autoattack", [True, False], checkpoint=str(out / "best.pt"),
                 checkpoint_sha256=common.sha256_file(str(out / "best.pt")))
    run_folder.set_old_run_aside(str(out))  # as a killed or running --overwrite leaves the folder
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime((out / run_folder.REPLACED).stat().st_mtime))
    code, lines = cli_error(eval_autoattack.main, [str(out / "best.pt"), "--device", "cpu"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"is being replaced by a run started at {started}" in lines[0] and "does not exist" not in lines[0]
    with pytest.raises(common.UserError, match="no usable"):
        tables.find_results([str(out)])
    warning, = capsys.readouterr().err.strip().splitlines()
    assert "autoattack.json" in warning and f"being replaced by a run started at {started}" in warning
    run_folder.settle_replaced_run(str(out))  # no new commit: the old run is back
    code, lines = cli_error(eval_autoattack.main, [str(tmp_path / "none" / "best.pt"), "--device", "cpu"], capsys)
    assert code == 2 and lines[0].endswith("does not exist"), lines
