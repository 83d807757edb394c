"""run_all.sh under a real SLURM (LAUNCHER=slurm, docs/cluster.md): a rehearsed block run through SLURM
gives the local launcher's table, a training requeued in the middle of its run resumes to the same
summary.json, a second invocation while the jobs are queued submits nothing, the dry run lists
what a run starts, and a bad partition is one line.

These tests need a SLURM cluster that takes jobs (sbatch, sinfo): `.ci/slurm install`, then
`DIR=$(.ci/slurm start); export SLURM_CONF=$DIR/slurm.conf` starts a one-node cluster on this
machine (as root). Without one they are skipped, saying why; CI (.ci/run) starts one and sets
REQUIRE_SLURM=1, which turns the skip into a failure."""
import json
import os
import re
import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest

from conftest import ROOT, PY

RUN_ALL = os.path.join(ROOT, "run_all.sh")
# One seed of the rehearsed Table 1 on MNIST's stand-in (TRADES, FIRE lam 12, FIRE lam 5): its 2
# epochs, of 32 steps of 2 images with PGD-8 (seconds each), so that a training can be requeued
# between them.
BLOCK = dict(REHEARSAL="1", DATASETS="mnist", SEEDS="0", TRAIN_FLAGS="--batch-size 2 --attack-steps 8", PYTHON=PY)


def slurm_or_skip():
    """Skip (or under REQUIRE_SLURM=1 fail) unless a SLURM controller answers and a node is up."""
    reason = None
    if shutil.which("sbatch") is None:
        reason = ("sbatch not on PATH: no SLURM here (.ci/slurm install; DIR=$(.ci/slurm start); "
                  "export SLURM_CONF=$DIR/slurm.conf)")
    else:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=60)
        states = set(r.stdout.split())
        if r.returncode != 0 or not states & {"idle", "mix", "alloc"}:
            said = (r.stderr or r.stdout).strip().splitlines() or ["no node"]
            reason = (f"no SLURM node takes jobs (sinfo: {said[-1][:200]}): "
                      f"start a test cluster with .ci/slurm start and export SLURM_CONF")
    if reason:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def run_all(out_dir, *blocks, timeout=900, **env):
    r = subprocess.run(["bash", RUN_ALL, *blocks], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=dict(os.environ, OUT_DIR=str(out_dir), **BLOCK, **env))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def listed(stdout, verb):
    """The run folders (trainings) or checkpoints (evaluations) after `verb` on run_all.sh's lines."""
    return sorted(re.findall(rf"^  {verb}\s+(\S+?)(?::| |$)", stdout, re.M))


def our_jobs(out_dir):
    ids = {open(f).read().strip() for f in (out_dir / "slurm").glob("*.jobid")}
    r = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60)
    return ids & set(r.stdout.split())


def table_numbers(path):
    """Table rows without the RunTime column (wall time differs between two runs)."""
    rows = [line.split("|") for line in path.read_text().splitlines() if line.startswith("| ")]
    return [[cell for i, cell in enumerate(row) if i != 8] for row in rows]


def run_block(tmp_path):
    """The rehearsed block run locally and through SLURM, with what each step printed. One training job
    is requeued (`scontrol requeue`) after its first epoch is committed."""
    t0 = time.time()
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    b = SimpleNamespace(local=local, cluster=cluster)
    b.local_dry = run_all(local, "table1", DRY_RUN="1")
    b.local_run = run_all(local, "table1", JOBS="2")
    b.local_seconds = time.time() - t0
    b.dry = run_all(cluster, "table1", DRY_RUN="1", LAUNCHER="slurm")
    t1 = time.time()
    b.submit = run_all(cluster, "table1", LAUNCHER="slurm")
    b.queued_before = our_jobs(cluster)
    b.again = run_all(cluster, "table1", LAUNCHER="slurm")
    b.queued_after = our_jobs(cluster)

    # Requeue the first training once its first epoch is committed (metrics.jsonl has a record;
    # last.pt follows in the same commit, during which the stop signal waits).
    b.requeued = listed(b.submit, "submit train")[0]
    run = cluster / "runs" / os.path.basename(b.requeued)
    job = (cluster / "slurm" / f"train-{run.name}.jobid").read_text().strip()
    deadline = time.time() + 600
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert not (run / "summary.json").exists(), "the training finished before it could be requeued"
        assert time.time() < deadline, (run / "train.out").read_text()
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    b.requeued_at_epochs = len((run / "metrics.jsonl").read_text().splitlines())

    deadline = time.time() + 1200
    while our_jobs(cluster):
        assert time.time() < deadline, subprocess.run(["squeue"], capture_output=True, text=True).stdout
        time.sleep(2)
    b.finished = run_all(cluster, "table1", LAUNCHER="slurm")
    b.seconds = time.time() - t0
    print(f"\nthe rehearsed block: locally {b.local_seconds:.0f} s (its dry run included), through SLURM "
          f"{time.time() - t1:.0f} s (from the submission to the rebuilt table), {b.seconds:.0f} s in all")
    return b


def test_rehearsed_block_through_slurm(tmp_path):
    """One scenario (one test, so that `pytest -n 2` runs it once): the rehearsed Table 1 locally, its
    dry run, then through SLURM, the same command again while its jobs are queued, a requeue in the
    middle of a training, and the command once more after every job has finished."""
    slurm_or_skip()
    block = run_block(tmp_path)
    check_same_table(block)
    check_requeued_training_resumes(block)
    check_rerun_submits_nothing(block)
    check_dry_run_lists_what_a_run_starts(block)


def check_same_table(block):
    """Every training, evaluation and the table ran as SLURM jobs (trainings first, evaluations
    after their training, the table after the evaluations) and the table has the local numbers."""
    assert len(listed(block.submit, "submit train")) == 3 and len(listed(block.submit, "submit evaluate")) == 3
    assert "submit " + str(block.cluster / "tables" / "table1.md") in block.submit
    local, cluster = block.local / "tables" / "table1.md", block.cluster / "tables" / "table1.md"
    assert table_numbers(cluster) == table_numbers(local), cluster.read_text() + local.read_text()
    assert sum(line.startswith("| ") for line in cluster.read_text().splitlines()) == 4  # header, 3 rows


def check_requeued_training_resumes(block):
    """The requeued training came back as the same job, continued from last.pt (its second start
    trains epoch 2 only) and ends with the uninterrupted local run's summary.json numbers."""
    run = os.path.basename(block.requeued)
    out = (block.cluster / "runs" / run / "train.out").read_text()
    assert block.requeued_at_epochs == 1
    starts = out.split("== job ")[1:]
    assert len(starts) >= 2 and ", start 2," in out, out
    resumed = starts[-1]
    assert "epoch   1 |" not in resumed and "epoch   2 |" in resumed, out
    epochs = [json.loads(line)["epoch"] for line in
              (block.cluster / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    ours, theirs = (json.loads((d / "runs" / run / "summary.json").read_text())
                    for d in (block.cluster, block.local))
    for key in ("train_time_s", "out_dir"):
        ours.pop(key), theirs.pop(key)
    assert ours == theirs


def check_rerun_submits_nothing(block):
    """The same command while the jobs are queued or running finds each of them by its job id and
    submits nothing; after they have finished it only rebuilds the table."""
    assert block.queued_before and block.queued_after <= block.queued_before
    assert "submitted 0 job(s)" in block.again and "  submit " not in block.again, block.again
    assert len(listed(block.again, "queued train")) + block.again.count("  done   ") >= 3, block.again
    assert "submitted 0 job(s)" in block.finished and "  submit " not in block.finished
    assert block.finished.count("  done   ") == 6 and "| FIRE (lam=12)" in block.finished, block.finished


def check_dry_run_lists_what_a_run_starts(block):
    """DRY_RUN=1 lists exactly the trainings and evaluations that the run then started, locally
    and through SLURM, and creates nothing."""
    assert listed(block.local_dry, "would train") == listed(block.local_run, "train")
    assert len(listed(block.local_run, "train")) == 3
    assert listed(block.dry, "would train") == listed(block.submit, "submit train")
    assert listed(block.dry, "would evaluate") == listed(block.submit, "submit evaluate")
    assert re.search(r"table1 +3 trainings: 0 done, 0 queued, 3 to start \(no GPU\); 3 evaluations", block.dry)


def test_slurm_refuses_an_unknown_partition_in_one_line(tmp_path):
    """An unknown partition: SLURM's own message, shortened to one line, exit 2, nothing created."""
    slurm_or_skip()
    r = subprocess.run(["bash", RUN_ALL, "table1"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=dict(os.environ, **BLOCK, LAUNCHER="slurm", PARTITION="no-such-partition",
                                OUT_DIR=str(tmp_path / "out")))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "partition" in r.stderr.lower() and "no-such-partition" in r.stderr
    assert not (tmp_path / "out").exists()


def test_stop_signal_during_a_commit_waits_for_last_pt(tmp_path):
    """SIGTERM (SLURM's preemption) that arrives while an epoch is being committed stops the
    training only once last.pt is written (exit 130, as Ctrl-C), and --resume auto goes on with the
    next epoch. Needs no SLURM."""
    code = ("import os, signal, sys, train_fire\nfrom fire_repro import training\n"
            "commit = training.commit_epoch\n"
            "def commit_after_a_stop(*args):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the commit\n"
            "    commit(*args)\n"
            "training.commit_epoch = commit_after_a_stop\n"
            "training.cli(lambda: train_fire.main(sys.argv[1:]))\n")
    flags = ["--epochs", "2", "--attack-steps", "1", "--eval-steps", "1", "--val-size", "60",
             "--device", "cpu", "--out-dir", str(tmp_path), "--resume", "auto"]
    r = subprocess.run([PY, "-c", code, *flags], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 130, r.stderr[-2000:]
    assert (tmp_path / "last.pt").is_file() and not list(tmp_path.glob("*.tmp*"))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    r = subprocess.run([PY, "train_fire.py", *flags], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "epoch   1 |" not in r.stdout + r.stderr and "epoch   2 |" in (tmp_path / "log.txt").read_text()
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def wait_for(out_dir, seconds=900):
    deadline = time.time() + seconds
    while our_jobs(out_dir):
        assert time.time() < deadline, subprocess.run(["squeue"], capture_output=True, text=True).stdout
        time.sleep(2)


def test_damaged_result_and_job_id_files_are_recovered(tmp_path):
    """Under SLURM a result cut short is evaluated again as a job and the table waits for it
    (never rebuilt without it); an empty or garbled .jobid file is reported in one warning line
    and recovered (the queue is asked by job name; a finished job's file is dropped), never a
    bash error."""
    slurm_or_skip()
    out = tmp_path / "out"
    run_all(out, "table3", LAUNCHER="slurm")
    wait_for(out)
    whole = run_all(out, "table3", LAUNCHER="slurm")
    assert "submitted 0 job(s)" in whole and whole.count("  done   ") == 6, whole
    table = (out / "tables" / "table3.md").read_text()
    results = sorted(out.glob("runs/*/autoattack.json"))
    with open(results[0], "r+") as f:
        f.truncate(100)
    ids = sorted((out / "slurm").glob("eval-*.jobid"))
    ids[0].write_text("")
    ids[1].write_text("12ab\n")
    r = subprocess.run(["bash", RUN_ALL, "table3"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(os.environ, OUT_DIR=str(out), LAUNCHER="slurm", **BLOCK))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert listed(r.stdout, "submit evaluate") == [str(results[0].parent / "best.pt")], r.stdout
    assert "submit " + str(out / "tables" / "table3.md") in r.stdout, r.stdout
    assert sum("is damaged" in line for line in r.stderr.splitlines()) == 2, r.stderr
    wait_for(out)
    again = run_all(out, "table3", LAUNCHER="slurm")
    assert "submitted 0 job(s)" in again and again.count("  done   ") == 6, again
    assert json.loads(results[0].read_text())["format"]
    assert table_numbers(out / "tables" / "table3.md") == [
        row for row in table_numbers_of(table)], (out / "tables" / "table3.md").read_text()


def table_numbers_of(text):
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ")]
    return [[cell for i, cell in enumerate(row) if i != 8] for row in rows]
