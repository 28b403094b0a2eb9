"""The README's test command, which CI runs, ends with pytest's summary line ("N passed, M skipped")."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest_args(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if "-m pytest" in ln and not ln.lstrip().startswith("#"))
    return line.split("-m pytest", 1)[1].split()


def test_readme_test_command_prints_the_summary_line(tmp_path):
    args = _pytest_args((ROOT / "README.md").read_text())
    assert _pytest_args((ROOT / ".ci" / "run").read_text()) == args  # CI runs the README's command
    (tmp_path / "test_two.py").write_text("import pytest\n\ndef test_a():\n    pass\n\n\n@pytest.mark.skip\n"
                                          "def test_b():\n    pass\n")
    # the same options under the project's own pytest configuration (addopts), on two tiny tests
    options = [a for a in args if a.startswith("-")]
    out = subprocess.run([sys.executable, "-m", "pytest", *options, "-c", str(ROOT / "pyproject.toml"),
                          "--rootdir", str(tmp_path), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^1 passed, 1 skipped in ", out.stdout, re.M), out.stdout
