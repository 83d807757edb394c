"""run_all.sh: the smoke block trains, evaluates and builds its table, and skips finished work when run
again; a Python without torch is one line."""
import os
import subprocess

from conftest import HERE, PY


def test_run_all_smoke_block_trains_evaluates_summarises_and_skips(tmp_path):
    """`SMOKE=1 ./run_all.sh table3`: Hellinger and FIRE (the paper's lam 12 and the authors' code's
    lam 5) on digits, 2 seeds each, AutoAttack, the table. Run again, it finds every run and result
    finished and only rebuilds the table.
    (CI runs every block: `SMOKE=1 ./run_all.sh` in .ci/run.)"""
    env = dict(os.environ, SMOKE="1", SEEDS="0 1", OUT_DIR=str(tmp_path), PYTHON=PY)
    r = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "table3"], capture_output=True,
                       text=True, timeout=600, cwd=HERE, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = (tmp_path / "tables" / "table3.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| Hellinger", "| FIRE"))]
    assert len(rows) == 3 and all("| 2 (0,1) |" in row for row in rows), table
    assert [row.split("|")[1].strip() for row in rows] == ["Hellinger (lam=12)", "FIRE (lam=5)", "FIRE (lam=12)"]
    assert len(list(tmp_path.glob("runs/*/autoattack.json"))) == 6
    again = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "table3"], capture_output=True,
                           text=True, timeout=300, cwd=HERE, env=env)
    assert again.returncode == 0 and again.stdout.count("  done ") == 6, again.stdout
    # eval_autoattack.py is called again and finds every result tied to its unchanged checkpoint
    assert "train " not in again.stdout and again.stdout.count("already evaluated") == 6, again.stdout
    assert "AutoAttack Linf eps" not in again.stdout
    assert (tmp_path / "tables" / "table3.md").read_text() == table
    bad = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "table9"], capture_output=True,
                         text=True, timeout=60, cwd=HERE, env=env)
    assert bad.returncode == 2 and "unknown block 'table9'" in bad.stderr


def test_run_all_finds_the_environment_or_says_how(tmp_path):
    """run_all.sh with a Python that has no torch says so in one line."""
    r = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "table3"], capture_output=True, text=True,
                       cwd=HERE, env=dict(os.environ, PYTHON="/usr/bin/false", SMOKE="1",
                                          OUT_DIR=str(tmp_path / "out")), timeout=60)
    assert r.returncode == 2 and "PYTHON=" in r.stderr and len(r.stderr.strip().splitlines()) == 1
