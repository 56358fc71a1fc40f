"""Every code block of the README runs: Python blocks as scripts, shell blocks line by line.

The two install commands at the top: the part after `pip install ... &&` runs here (the package is
installed), and .ci/run must run the same install and test commands.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)
PY = [b for lang, b in BLOCKS if lang == "python"]
SH = [b for lang, b in BLOCKS if lang == "bash"]


def test_readme_has_the_two_commands_first():
    install_run, install_test = SH[0].strip(), SH[1].strip()
    assert install_run.startswith("pip install . && wasmchord generate")
    assert install_test.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    for part in install_test.split(" && "):
        if part.startswith("pip install"):
            assert part.replace("pip install", "python -m pip install -q") in ci, part
    assert "python -m pytest -q" in ci


def test_install_and_run_command_generates_text():
    cmd = SH[0].strip().split(" && ", 1)[1]
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # seeded: the same continuation every run


@pytest.mark.parametrize("i", range(len(PY)))
def test_python_block_runs(i, tmp_path):
    r = subprocess.run([sys.executable, "-c", PY[i]], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()


@pytest.mark.parametrize("line", [ln for b in SH[2:] for ln in b.strip().splitlines()])
def test_shell_line_runs(line, tmp_path):
    r = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()
