"""run_all.sh: a rehearsed block trains, evaluates and builds its table (as its dry run listed), and
skips finished work when run again; bad settings are one line before anything is created; run
folders are named by the runs' identity, not by where the data live; a Python without torch is one
line. The SLURM launcher against a real SLURM: test_slurm.py."""
import os
import re
import subprocess

import pytest

from conftest import ROOT, PY
from fire_repro.data import IMAGENET32_FILES

RUN_ALL = os.path.join(ROOT, "run_all.sh")


def run_all(*blocks, timeout=120, **env):
    return subprocess.run(["bash", RUN_ALL, *blocks], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=dict(os.environ, PYTHON=PY, **env))


def test_run_all_rehearsed_block_trains_evaluates_summarises_and_skips(tmp_path):
    """`REHEARSAL=1 DATASETS=mnist ./run_all.sh table3`: Hellinger and FIRE (the paper's lam 12 and the
    authors' code's lam 5) on MNIST's stand-in, one seed each, AutoAttack, the table. Run again, it
    finds every run and result finished and whole, starts nothing and only rebuilds the table.
    (CI rehearses every block: `REHEARSAL=1 ./run_all.sh` in .ci/run.)"""
    env = dict(os.environ, REHEARSAL="1", DATASETS="mnist", SEEDS="0", OUT_DIR=str(tmp_path), PYTHON=PY)
    dry = subprocess.run(["bash", RUN_ALL, "table3"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=dict(env, DRY_RUN="1"))
    assert dry.returncode == 0 and not any(tmp_path.iterdir()), dry.stdout + dry.stderr  # creates nothing
    r = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "table3"], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # the dry run listed exactly the trainings that the run started
    assert re.findall(r"^  would train  (\S+)", dry.stdout, re.M) == re.findall(r"^  train  (\S+)", r.stdout, re.M)
    assert "3 trainings: 0 done, 0 queued, 3 to start (no GPU); 3 evaluations" in dry.stdout
    table = (tmp_path / "tables" / "table3.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| Hellinger", "| FIRE"))]
    assert len(rows) == 3 and all("| 1 (0) |" in row for row in rows), table
    assert [row.split("|")[1].strip() for row in rows] == ["Hellinger (lam=12)", "FIRE (lam=5)", "FIRE (lam=12)"]
    assert len(list(tmp_path.glob("runs/*/autoattack.json"))) == 3
    again = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "table3"], capture_output=True,
                           text=True, timeout=300, cwd=ROOT, env=env)
    # every run and every result is finished and whole (results.finished): nothing is started
    assert again.returncode == 0 and again.stdout.count("  done ") == 3 + 3, again.stdout
    assert "train " not in again.stdout and "  evaluate " not in again.stdout, again.stdout
    assert (tmp_path / "tables" / "table3.md").read_text() == table
    # a finished run's damaged files: metrics.jsonl is written again from last.pt's history; a cut
    # best.pt is named as damaged with the command that trains the run again (in the dry run too)
    runs = sorted(p.parent for p in tmp_path.glob("runs/*/summary.json"))
    metrics = runs[0] / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole[:-30])
    best = runs[1] / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    dry = subprocess.run(["bash", RUN_ALL, "table3"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=dict(env, DRY_RUN="1"))
    assert dry.returncode == 0 and f"would repair {metrics} is damaged (line 2 is not whole JSON)" in dry.stdout, dry.stdout
    assert f"DAMAGED {best} of a finished run is damaged (truncated" in dry.stdout, dry.stdout
    assert "another checkpoint" not in dry.stdout and metrics.read_text() != whole
    redo = subprocess.run(["bash", RUN_ALL, "table3"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert redo.returncode == 1 and metrics.read_text() == whole, redo.stdout + redo.stderr
    assert f"  repaired {metrics}" in redo.stdout and "train " not in redo.stdout
    line = next(line for line in redo.stderr.splitlines() if line.startswith(f"DAMAGED: {best}"))
    command = re.search(r"train the run again with `python (.*)`", line).group(1).split()
    assert command[-1] == "--overwrite" and command[command.index("--out-dir") + 1] == str(runs[1])
    ident = subprocess.run([PY, *command, "--print-identity"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert runs[1].name.endswith("-" + ident.stdout.strip()), ident.stdout + ident.stderr
    bad = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "table9"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT, env=env)
    assert bad.returncode == 2 and "unknown block 'table9'" in bad.stderr


def test_run_all_finds_the_environment_or_says_how(tmp_path):
    """run_all.sh with a Python that has no torch says so in one line."""
    r = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "table3"], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHON="/usr/bin/false", REHEARSAL="1",
                                          OUT_DIR=str(tmp_path / "out")), timeout=60)
    assert r.returncode == 2 and "PYTHON=" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("env, message", [
    (dict(JOBS="abc"), "JOBS must be a whole number in [1, 1024], got 'abc'"),
    (dict(NPROC="abc"), "NPROC must be a whole number in [1, 64], got 'abc'"),
    (dict(JOBS="0"), "JOBS must be a whole number in [1, 1024], got '0'"),
    (dict(JOBS="9223372036854775808"), "JOBS must be a whole number in [1, 1024], got '9223372036854775808'"),
    (dict(LAUNCHER="slurm", SIGNAL_SECONDS="99999999999"), "SIGNAL_SECONDS must be a whole number in [1, 65535]"),
    (dict(SEEDS="0 4294967296"), "SEEDS: seed '4294967296' must be in [0, 4294967295]"),
    (dict(REHEARSAL="1", DATASETS=" "), "DATASETS must be data set names separated by spaces"),
    (dict(REHEARSAL="1", DATASETS="*"), "DATASETS must be data set names separated by spaces, e.g. \"mnist cifar10\"; got '*'"),
    (dict(DATASETS="mnist *"), "got 'mnist *'"),
    (dict(TRAIN_FLAGS="-h"), "TRAIN_FLAGS may not hold -h: it adds flags to every training"),
    (dict(TRAIN_FLAGS="--he"), "TRAIN_FLAGS may not hold --he"),
    (dict(TRAIN_FLAGS="--eps abc"), "plan.py: error: argument --eps: invalid float value: 'abc'"),
    (dict(SEEDS=""), "SEEDS is set but empty"),
    (dict(DATASETS=""), "DATASETS is set but empty"),
    (dict(SWEEP_SEEDS="0,1"), "SWEEP_SEEDS must be seeds separated by spaces"),
    (dict(OUT_DIR=""), "OUT_DIR is set but empty"),
    (dict(SMOKE="1"), "SMOKE is not read: REHEARSAL=1 runs every block on the CPU with the real names"),
    (dict(REHEARSAL="yes"), "REHEARSAL must be one of: 0 1"),
    (dict(REHEARSAL="1", AUX_DATA="x.npz"), "AUX_DATA is not used with REHEARSAL=1"),
    (dict(GPUS="0;1"), "GPUS must be GPU ids separated by commas"),
    (dict(LAUNCHER="pbs"), "LAUNCHER must be one of: local slurm"),
    (dict(LAUNCHER="slurm", GPUS_PER_TRAINING="four"), "GPUS_PER_TRAINING must be a whole number in [0, 64]"),
    (dict(LAUNCHER="slurm", TIME_LIMIT="ten hours"), "TIME_LIMIT must be a SLURM time"),
    (dict(LAUNCHER="slurm", GPUS="0"), "GPUS picks GPUs of this machine"),
    (dict(LAUNCHER="slurm", NPROC="4", GPUS_PER_TRAINING="2"), "set GPUS_PER_TRAINING=4"),
    (dict(LAUNCHER="slurm", PATH="/nonexistent"), "LAUNCHER=slurm needs sbatch on PATH"),
    (dict(), "unknown block 'table9'"),
])
def test_run_all_bad_settings_are_one_line_before_anything_is_created(tmp_path, env, message):
    """A bad variable, a set-but-empty list, a setting REHEARSAL=1 would ignore or an unknown block:
    one line, exit 2, and OUT_DIR is not created."""
    env = dict(dict(OUT_DIR=str(tmp_path / "out")), **env)
    if env.get("PATH") == "/nonexistent":  # no sbatch: a PATH with only what run_all.sh needs before it
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for tool in ("dirname", "realpath"):
            os.symlink(subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True,
                                      text=True).stdout.strip(), bin_dir / tool)
        env["PATH"] = str(bin_dir)
    r = subprocess.run(["/bin/bash", RUN_ALL, "table1", *(["table9"] if message.startswith("unknown") else [])],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ, PYTHON=PY, **env))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr and r.stderr.count("error:") == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_run_all_names_run_folders_by_identity_not_by_data_dir(tmp_path):
    """The same experiment keeps its folder when DATA_DIR moves or is written ./data; a flag that
    changes the run (TRAIN_FLAGS=--eps) gives new folders, one that does not (--workers) does not."""
    def planned(**env):
        r = run_all("table1", timeout=300, DRY_RUN="1", DATASETS="mnist", SEEDS="0",
                    OUT_DIR=str(tmp_path / "out"), **env)
        assert r.returncode == 0, r.stderr
        return re.findall(r"^  would train  (\S+)", r.stdout, re.M)
    runs = planned(DATA_DIR="data")
    assert len(runs) == 3 and all(re.search(r"-s0-[0-9a-f]{12}$", run) for run in runs)
    assert planned(DATA_DIR="./data", TRAIN_FLAGS="--workers 2") == runs
    assert planned(DATA_DIR="/somewhere/else") == runs
    assert not set(planned(TRAIN_FLAGS="--eps 0.2")) & set(runs)
    assert not (tmp_path / "out").exists()


def test_run_all_modern_block_plans_the_recipe_at_full_scale(tmp_path):
    """The modern block trains FIRE (lam 12), TRADES beta 6 and beta 10 per seed on CIFAR-10 with
    TRADES-AWP's schedule and AWP + weight averaging, evaluates each best.pt at 8/255 and builds
    one table with RobustBench's rows quoted; its dry run creates nothing."""
    r = run_all("modern", timeout=300, DRY_RUN="1", SEEDS="0 1", OUT_DIR=str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    trainings = re.findall(r"^  would train  \S+/(\S+)-s(\d)-[0-9a-f]{12}  \((.*)\)$", r.stdout, re.M)
    assert [(tag, seed) for tag, seed, _ in trainings] == [
        (tag, seed) for seed in "01" for tag in ("fire-cifar10-lam12", "trades-cifar10-beta6", "trades-cifar10-beta10")]
    for _, _, command in trainings:
        assert ("--epochs 200 --batch-size 128 --lr 0.1 --schedule step --lr-milestones 0.5 0.75" in command
                and "--awp-gamma 0.005 --awp-warmup 10 --ema 0.999 --ema-start 1" in command), command
    assert len(re.findall(r"^  would evaluate \S+/best\.pt at eps 8/255$", r.stdout, re.M)) == 6
    assert re.search(r"would write  \S+/tables/modern\.md", r.stdout)
    assert not (tmp_path / "out").exists()


def test_run_folders_do_not_depend_on_how_paths_and_seeds_are_spelled(tmp_path):
    """Table 2 with its extra-data rows and the pre-training fine-tunes: OUT_DIR written absolutely
    or relatively, DATA_DIR moved or absolute (AUX_DATA follows it), SEEDS="0 00": the same run
    folders, seed 0 once; at the full scale and in the rehearsal (whose extra data lie in OUT_DIR)."""
    def planned(out, data, seeds="0", **env):
        r = run_all("table2", timeout=300, DRY_RUN="1", DATASETS="cifar10", SEEDS=seeds, OUT_DIR=out,
                    **({} if env.get("REHEARSAL") else {"DATA_DIR": data}), **env)
        assert r.returncode == 0, r.stderr
        return [os.path.basename(f) for f in re.findall(r"^  would train  (\S+)", r.stdout, re.M)]
    for where in ("data", "moved/data"):
        (tmp_path / where / "imagenet32").mkdir(parents=True)
        (tmp_path / where / "ti_500K_pseudo_labeled.npz").write_bytes(b"")
        for name in IMAGENET32_FILES:
            (tmp_path / where / "imagenet32" / name).write_bytes(b"")
    out = tmp_path / "out"
    runs = planned(str(out), str(tmp_path / "data"))
    assert len(runs) == 5 + 3 + 1 + 1 and sum("-s0-" in r for r in runs) == len(runs), runs
    assert planned(os.path.relpath(out, ROOT), os.path.relpath(tmp_path / "moved" / "data", ROOT), seeds="0 00") == runs
    rehearsal = planned(str(out), None, REHEARSAL="1")
    assert planned(os.path.relpath(out, ROOT), None, seeds="00 0", REHEARSAL="1") == rehearsal
    assert any("fire-cifar10-lam12-s0" in r for r in rehearsal) and len(rehearsal) == len(set(rehearsal))
    assert not out.exists()
