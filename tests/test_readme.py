"""The README's code is the files' code: its train_step snippet stands line for line in train_fire.py,
and its "your own code" snippet runs from outside the repository with the package as
`pip install -e .` installs it (a wheel of pyproject.toml, unpacked: the same files)."""
import os
import re
import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT, PY


def readme_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_the_train_step_snippet_is_train_fire_code():
    with open(os.path.join(ROOT, "train_fire.py")) as f:
        code = f.read()
    snippet, = [b for b in readme_blocks() if "def train_step" in b]
    lines = [line.split("#")[0].rstrip() for line in snippet.splitlines()]
    missing = [line.strip() for line in lines if line.strip() and "..." not in line and line.strip() not in code]
    assert not missing, missing
    assert len([line for line in lines if line.strip()]) >= 8  # the step itself, not a fragment of it


def test_your_own_code_snippet_runs_outside_the_repository(fire_run, tmp_path):
    """The README's snippet: a model, a data set's test split and the PGD attack, in three lines of
    a user's own code, in a folder of their own with runs/fire-digits-s0/best.pt in it."""
    snippet, = [b for b in readme_blocks() if "from fire_repro import" in b]
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside pyproject.toml
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "runs", "data", "tests", "docs", "__pycache__"))
    wheel = subprocess.run([PY, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr
    site = tmp_path / "site"
    zipfile.ZipFile(next((tmp_path / "dist").glob("fire_repro-*.whl"))).extractall(site)
    assert (site / "fire_repro" / "training.py").is_file() and (site / "models.py").is_file()
    user = tmp_path / "project"
    (user / "runs" / "fire-digits-s0").mkdir(parents=True)
    (user / "runs" / "fire-digits-s0" / "best.pt").write_bytes((fire_run[0] / "best.pt").read_bytes())
    (user / "mine.py").write_text(snippet)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); "
                        "exec(open('mine.py').read())"], cwd=user, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    robust = float(re.search(r"tensor\(([0-9.]+)\)", r.stdout).group(1))
    assert 0 < robust < fire_run[1]["test_nat"], r.stdout  # robust accuracy under PGD-20, below natural
