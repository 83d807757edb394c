"""fire_repro/plan.py, the plan of run_all.sh: the rehearsal of a block on generated stand-in data of the real
data sets (every planned result file is the one eval_autoattack.py writes, a run that trains at
its evaluation radius included; a second invocation starts nothing; a damaged result is evaluated
again), the full-scale dry run's step counts and costs, settings checked against each other,
TRAIN_FLAGS that would override run_all.sh's own flags, and a failing table step.
(CI rehearses every block: `REHEARSAL=1 ./run_all.sh` in .ci/run.)"""
import json
import math
import os
import re
import signal
import subprocess
import time

import pytest

from fire_repro import launchers, plan
from fire_repro.common import UserError
from conftest import ROOT, PY
from fire_repro.data import DATASETS, IMAGENET32_FILES, steps_per_epoch

RUN_ALL = os.path.join(ROOT, "run_all.sh")


def run_all(*blocks, timeout=600, **env):
    return subprocess.run(["bash", RUN_ALL, *blocks], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=dict(os.environ, PYTHON=PY, **env))


def test_rehearsal_of_a_block_writes_what_the_plan_waits_for_and_runs_once(tmp_path):
    """REHEARSAL=1 ./run_all.sh modern: FIRE and TRADES on CIFAR-10's stand-in with the recipe,
    trained at 8/255, their evaluation radius: each result is autoattack.json (the name
    eval_autoattack.py gives it), not autoattack-eps8-255.json, and the table is written. Every
    result the dry run names is written, the table says it is a rehearsal, a second invocation
    starts nothing, and a damaged result is evaluated again. (CI rehearses every block.)"""
    env = dict(REHEARSAL="1", SEEDS="0", OUT_DIR=str(tmp_path))
    dry = run_all("modern", DRY_RUN="1", **env)
    assert dry.returncode == 0 and not any(tmp_path.iterdir()), dry.stdout + dry.stderr
    r = run_all("modern", timeout=1200, **env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trained = re.findall(r"^  train  (\S+)", r.stdout, re.M)
    assert re.findall(r"^  would train  (\S+)", dry.stdout, re.M) == trained and len(trained) == 3
    planned = [line.split()[2] for line in dry.stdout.splitlines()
               if line.startswith("  would evaluate") and line.split()[2].endswith(".pt")]   # not corruptions.json
    written = sorted(str(p) for p in tmp_path.glob("runs/*/autoattack*.json"))
    # the plan's result files (results.default_out at the data set's radius) are eval_autoattack.py's
    expected = []
    for ckpt in planned:
        record = json.loads(open(os.path.join(os.path.dirname(ckpt), "autoattack.json")).read())
        assert record["eps"] == record["train_eps"] == DATASETS["cifar10"].eval_eps == 8 / 255
        expected.append(plan.results.default_out(ckpt, record["eps"], record["train_eps"]))
    assert sorted(expected) == written and len(written) == 3, (expected, written)
    table = (tmp_path / "tables" / "modern.md").read_text()
    assert "REHEARSAL" in table and table.count("| FIRE (lam=12) + AWP + EMA") == 1, table
    # the corrupt step: each run's corruptions.json from the stand-in CIFAR-10-C files the plan wrote
    assert len(list(tmp_path.glob("runs/*/corruptions.json"))) == 3
    assert (tmp_path / "rehearsal_corruptions" / "CIFAR-10-C" / "labels.npy").is_file()
    assert "| Corruptions |" in table and "shot_noise" in (tmp_path / "tables" / "modern-corruptions.md").read_text()
    again = run_all("modern", **env)
    assert again.returncode == 0 and "  train  " not in again.stdout and "  evaluate " not in again.stdout
    assert again.stdout.count("  done   ") == 3 + 3 + 3 + 1, again.stdout   # + corruptions, stand-in files
    with open(written[0], "r+") as f:  # a damaged result: evaluated again, the table whole
        f.truncate(100)
    redo = run_all("modern", **env)
    assert redo.returncode == 0 and redo.stdout.count("  evaluate ") == 1, redo.stdout + redo.stderr
    assert "  train  " not in redo.stdout and json.loads(open(written[0]).read())["format"]
    assert (tmp_path / "tables" / "modern.md").read_text() == table


def test_full_scale_dry_run_counts_the_extra_data_epoch_as_carmon_and_prices_it(tmp_path):
    """DRY_RUN=1 at the paper's scale: an extra-data row trains steps_per_epoch(49,000, 256) steps
    per epoch for 200 epochs (half of each batch extra data), and its GPU-hours are 4 V100s x the
    paper's 18h30-22h12 for that protocol; ImageNet32's pre-training is priced by its images."""
    aux = tmp_path / "aux.npz"
    aux.write_bytes(b"")
    imagenet = tmp_path / "data" / "imagenet32"
    imagenet.mkdir(parents=True)
    for name in IMAGENET32_FILES:
        (imagenet / name).write_bytes(b"")
    r = run_all("table2", DRY_RUN="1", SEEDS="0", DATASETS="cifar10", AUX_DATA=str(aux),
                DATA_DIR=str(tmp_path / "data"), OUT_DIR=str(tmp_path / "out"), timeout=300)
    assert r.returncode == 0, r.stderr
    d = DATASETS["cifar10"]
    steps = steps_per_epoch(d.train_images, 256)
    assert steps == math.ceil(49000 / 256)
    lo, hi = (4 * h for h in d.aux_paper_hours)
    rows = re.findall(r"would train  \S+/(\S+?)-s0-\w+  \(.*--aux-data.*\)\n    (.*)", r.stdout)
    assert len(rows) == 3, r.stdout
    for _, line in rows:
        assert line == (f"{steps} steps/epoch x 200 epochs of 256 images (half labelled, half extra data), "
                        f"{plan.hours(lo)}-{plan.hours(hi)} GPU-hours"), line
    pre = re.search(r"pretrain-imagenet32-s0-\w+  .*\n    (\d+) steps/epoch x 100 epochs of 256 images, ([\d,]+)-", r.stdout)
    images = DATASETS["imagenet32"].train_images
    assert int(pre.group(1)) == math.ceil(images / 256)
    per_image = lo / (steps * 256 * 200)  # the same network (WRN-28-10), the same attack
    assert int(pre.group(2).replace(",", "")) == round(per_image * math.ceil(images / 256) * 256 * 100)
    assert not (tmp_path / "out").exists()


def test_full_scale_dry_run_prices_the_corruption_step_or_says_where_the_files_are(tmp_path):
    """DRY_RUN=1: a CIFAR-10 run's corrupt step reads DATA_DIR/CIFAR-10-C (75 x 10,000 images,
    priced as forward passes); without the folder, one SKIP line says where to download it."""
    env = dict(DRY_RUN="1", SEEDS="0", DATASETS="cifar10", OUT_DIR=str(tmp_path / "out"))
    missing = run_all("fig7", SWEEP_SEEDS="0", DATA_DIR=str(tmp_path / "none"), timeout=300, **env)
    assert missing.returncode == 0, missing.stderr
    assert "SKIP the corruption evaluations of cifar10: " in missing.stdout and "zenodo.org/record/2535967" in missing.stdout
    assert "corruptions.json" not in missing.stdout
    (tmp_path / "data" / "CIFAR-10-C").mkdir(parents=True)
    r = run_all("fig7", SWEEP_SEEDS="0", DATA_DIR=str(tmp_path / "data"), timeout=300, **env)
    lines = re.findall(r"would evaluate \S+/corruptions\.json: 750,000 corrupted images from \S+CIFAR-10-C, "
                       r"about (\d+) GPU-minutes", r.stdout)
    assert len(lines) == 10, r.stdout   # Fig. 7: ten values of lambda
    per = plan.hours_per_image("wrn-34-10")[1]
    assert int(lines[0]) == round(60 * 750_000 * 4 * per / 3)
    assert "would write  " + str(tmp_path / "out" / "tables" / "fig7-corruptions.md") in r.stdout


@pytest.mark.parametrize("limit, seconds", [("10", 600), ("5:30", 330), ("1:00:00", 3600), ("2-3", 183600),
                                            ("1-0:10", 87000), ("1-00:00:05", 86405), ("UNLIMITED", None)])
def test_slurm_time_formats(limit, seconds):
    """SLURM's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, UNLIMITED."""
    assert launchers.slurm_seconds(limit) == seconds


@pytest.mark.parametrize("env, message", [
    (dict(LAUNCHER="slurm", TIME_LIMIT="1", SIGNAL_SECONDS="300"), "SIGNAL_SECONDS=300 must be shorter than TIME_LIMIT=1 (60 s)"),
    (dict(LAUNCHER="slurm", TIME_LIMIT="0:05:00"), "SIGNAL_SECONDS=300 must be shorter than TIME_LIMIT=0:05:00 (300 s)"),
    (dict(LAUNCHER="slurm", TIME_LIMIT="ten hours"), "TIME_LIMIT must be a SLURM time"),
    (dict(TRAIN_FLAGS="--dtype bfloat16 --seed 5"), "TRAIN_FLAGS may not set --seed"),
    (dict(TRAIN_FLAGS="--lam=3"), "TRAIN_FLAGS may not set --lam"),
    (dict(TRAIN_FLAGS="--out 3"), "TRAIN_FLAGS may not set --out-dir"),
    (dict(REHEARSAL="1", OUT_DIR="runs/paper"), "REHEARSAL=1 would write its rehearsal into runs/paper"),
    (dict(REHEARSAL="1", SMOKE="1"), "SMOKE is not read: REHEARSAL=1 runs every block on the CPU"),
])
def test_settings_checked_against_each_other_in_one_line(tmp_path, env, message):
    """A stop signal at or past the time limit (every job would be stopped at its start), a flag
    that run_all.sh sets itself in TRAIN_FLAGS, a rehearsal into the folder of real runs: one line,
    exit 2, nothing created."""
    env = dict(dict(OUT_DIR=str(tmp_path / "out"), DATASETS="mnist", SEEDS="0"), **env)
    r = run_all("table1", timeout=120, **env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_failing_table_fails_its_block_and_the_others_carry_on(tmp_path):
    """A table step that exits non-zero (python -m fire_repro.tables: 3 when it left results
    out) fails its block; the next block still runs, and the exit status (1) and the last line
    name the incomplete block."""
    out = tmp_path / "out"
    text = "\0".join(["block\x1ffirst", "\x1f".join(["table", "broken", "a title", str(tmp_path / "missing.json")]),
                      "block\x1fsecond", "\x1f".join(["step", str(tmp_path / "ok.txt"), "bash", "-c",
                                                      f"echo ok > {tmp_path}/ok.txt"])]) + "\0"
    r = subprocess.run([PY, "-m", "fire_repro.plan"], input=text, capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, OUT_DIR=str(out), LAUNCHER="local", JOBS="1"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert (tmp_path / "ok.txt").read_text() == "ok\n"
    assert r.stderr.strip().splitlines()[-1].startswith("run_all.sh: incomplete: first ("), r.stderr


def test_plan_refuses_owned_flags_directly():
    """train_flags: the flag's own name, an abbreviation argparse would accept, or --flag=value."""
    for flags in ("--seed 1", "--se 1", "--aux-data=x.npz", "--init 3", "--planned x"):
        os.environ["TRAIN_FLAGS"] = flags
        try:
            with pytest.raises(UserError, match="TRAIN_FLAGS may not set"):
                plan.train_flags()
        finally:
            del os.environ["TRAIN_FLAGS"]
    os.environ["TRAIN_FLAGS"] = "--dtype bfloat16 --workers 8 --step-size 0.01"
    try:
        assert plan.train_flags() == ["--dtype", "bfloat16", "--workers", "8", "--step-size", "0.01"]
    finally:
        del os.environ["TRAIN_FLAGS"]


@pytest.mark.parametrize("files", [
    {"command.txt": "train_fire.py --dataset mnist --seed 0 --lam 12\n"},            # the local launcher's
    {"log.txt": json.dumps({"dataset": "mnist", "rehearsal": False}) + "\n3 epochs\n"},  # SLURM's: no command.txt
    {"log.txt": json.dumps({"dataset": "mnist"}) + "\n"},                            # arguments from before --rehearsal
    {"log.txt": "\x00garbled\n"},                                                    # cannot tell: refused
    {"tables/table3.md": "| FIRE (lam=12) | 99.1 |\n"},                              # a real table, no run
])
def test_rehearsal_refuses_a_folder_of_real_runs(tmp_path, files):
    """REHEARSAL=1 into an OUT_DIR that holds a real run, known by what every launcher writes (the
    arguments line of its log.txt; the local launcher's command.txt) or a table without the
    rehearsal's note: one line, exit 2, the folder left as it was. A rehearsal's own run is no
    obstacle (see the next test)."""
    run = tmp_path / "runs" / "fire-mnist-lam12-s0-0123456789ab"
    run.mkdir(parents=True)
    for name, text in files.items():
        path = tmp_path / name if "/" in name else run / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    r = run_all("table3", timeout=300, REHEARSAL="1", DATASETS="mnist", OUT_DIR=str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "holds real" in r.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_rehearsal_guard_passes_a_rehearsal_run():
    """plan.real_run: a rehearsal's log.txt or command.txt is not a real run; an empty folder neither."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        assert not plan.real_run(d)
        with open(os.path.join(d, "log.txt"), "w") as f:
            f.write(json.dumps({"dataset": "mnist", "rehearsal": True}) + "\n")
        assert not plan.real_run(d)
        os.remove(os.path.join(d, "log.txt"))
        with open(os.path.join(d, "command.txt"), "w") as f:
            f.write("train_fire.py --dataset mnist --rehearsal\n")
        assert not plan.real_run(d)


@pytest.mark.parametrize("flags", ["--norm linf", "--norm=linf", "--nor linf"])
def test_train_flags_may_not_override_a_flag_of_the_block(tmp_path, flags):
    """TRAIN_FLAGS="--norm linf" ./run_all.sh l2 would fill the L2 table with Linf runs: one line,
    exit 2, nothing created; a flag the block leaves alone (--norm in table1) is the user's."""
    r = run_all("l2", timeout=120, DRY_RUN="1", SEEDS="0", TRAIN_FLAGS=flags, OUT_DIR=str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "TRAIN_FLAGS may not set --norm: block l2 sets it" in r.stderr, r.stderr
    ok = run_all("table1", timeout=300, DRY_RUN="1", SEEDS="0", DATASETS="mnist", TRAIN_FLAGS=flags,
                 OUT_DIR=str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "out").exists()


def processes_under(folder):
    """PIDs of the processes whose command line names `folder` (the plan's jobs write there)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(folder).encode() in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            pass
    return pids


def wait_until(predicate, timeout=600):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.5)


def test_a_signal_to_run_all_stops_its_jobs_and_says_how_to_continue(tmp_path):
    """run_all.sh is the planner's process (exec): SIGTERM to its PID, or SIGINT to its process group
    (Ctrl-C), stops the plan and its running trainings, exit 128 + the signal, one line saying how to
    continue; SIGKILL to it leaves no training behind (each gets SIGTERM when the planner dies); a
    second run_all.sh on the same OUT_DIR is one line while the first runs; each attempt of a job is
    appended to its train.out under its own header."""
    env = dict(os.environ, PYTHON=PY, REHEARSAL="1", DATASETS="mnist", SEEDS="0", JOBS="2", OUT_DIR=str(tmp_path),
               TRAIN_FLAGS="--epochs 400 --batch-size 2 --attack-steps 8")

    def start():
        proc = subprocess.Popen(["bash", RUN_ALL, "table1"], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: len(list(tmp_path.glob("runs/*/log.txt"))) >= 2 and len(processes_under(tmp_path)) >= 2)
        return proc

    for how in ("TERM", "INT to the group", "KILL"):
        proc = start()
        if how == "TERM":
            other = subprocess.run(["bash", RUN_ALL, "table1"], cwd=ROOT, env=env, capture_output=True,
                                   text=True, timeout=300)
            assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
            assert "another run_all.sh holds OUT_DIR" in other.stderr
            proc.send_signal(signal.SIGTERM)
        elif how == "KILL":
            proc.kill()
        else:
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        wait_until(lambda: not processes_under(tmp_path), timeout=120)  # no job outlives it
        if how != "KILL":
            assert proc.returncode == 128 + (signal.SIGTERM if how == "TERM" else signal.SIGINT), err[-2000:]
            assert err.strip().splitlines()[-1].startswith("run_all.sh: stopped by SIG"), err[-2000:]
            assert "run the same command again to continue" in err
    logs = list(tmp_path.glob("runs/*/train.out"))
    assert len(logs) == 2 and all(log.read_text().count("== attempt at ") == 3 for log in logs), \
        [log.read_text()[:3000] for log in logs]


def test_planned_evaluations_run_the_masking_report_with_a_transfer_from_a_run_without_the_regulariser(tmp_path):
    """A planned evaluation runs eval_autoattack.py --sanity; where the plan trains a run of the
    same data set and norm without the regulariser (Madry et al.) before it, its best.pt is the
    --transfer-from source and its training a step the evaluation waits for; that run's own
    evaluation has no other source and runs the report without a transfer."""
    S = "\x1f"
    lines = ["block" + S + "x",
             S.join(["train", "@1", "fire-digits-s0", "train_fire.py", "--dataset", "digits"]),
             S.join(["train", "@2", "madry-digits-s1", "train_trades.py", "--dataset", "digits", "--loss", "madry",
                     "--seed", "1"]),
             S.join(["evaluate", "@1/best.pt", "--smoke-aa"]), S.join(["evaluate", "@2/best.pt", "--smoke-aa"])]
    p = plan.Plan(lines, str(tmp_path))
    fire, madry = p.folders["1"], p.folders["2"]
    step = p.evals[os.path.join(fire, "best.pt")]
    assert step.command[-4:] == ["--smoke-aa", "--sanity", "--transfer-from", os.path.join(madry, "best.pt")]
    assert p.by_key[("train", madry)] in step.needs
    assert p.evals[os.path.join(madry, "best.pt")].command[-2:] == ["--smoke-aa", "--sanity"]
