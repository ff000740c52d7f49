"""Skips are visible and fail the run unless tests/conftest.py's ALLOWED_SKIPS says why
they are legitimate: each case runs a small pytest session with the suite's conftest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

UNEXPECTED = "skips this machine should not have"


def run(tmp_path: Path, tests: str, conftest: str = "") -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_case.py").write_text(tests)
    (tmp_path / "conftest.py").write_text(conftest)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", "test_case.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("tests", [
    "import pytest\n\ndef test_skips():\n    pytest.skip('storage stand-in unavailable: gone')\n",
    # A fixture that skips (as the stand-in fixtures do) skips in setup.
    "import pytest\n\n@pytest.fixture\ndef standin():\n"
    "    pytest.skip('storage stand-in unavailable: gone')\n\n"
    "def test_uses(standin):\n    pass\n",
    # A whole module skipped while it is collected.
    "import pytest\n\npytest.skip('storage stand-in unavailable: gone', allow_module_level=True)\n",
], ids=["in-test", "in-fixture", "module"])
def test_a_skip_for_a_missing_stand_in_fails_the_run_and_names_the_test(
        tmp_path: Path, tests: str) -> None:
    done = run(tmp_path, tests + "\ndef test_passes():\n    pass\n")
    assert done.returncode == 1, done.stdout + done.stderr
    assert UNEXPECTED in done.stdout
    assert "test_case.py" in done.stdout and "storage stand-in unavailable: gone" in done.stdout
    assert "scripts/bootstrap" in done.stdout and "ALLOWED_SKIPS" in done.stdout


def test_an_allowed_skip_passes_and_says_why(tmp_path: Path) -> None:
    done = run(tmp_path,
               "import pytest\n\ndef test_gpu():\n    pytest.skip('no GPU on this host')\n",
               conftest="import tests.conftest as suite\n\n"
                        "suite.ALLOWED_SKIPS[r'^no GPU'] = 'machines of this kind have no GPU'\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert UNEXPECTED not in done.stdout
    assert "no GPU on this host (allowed: machines of this kind have no GPU)" in done.stdout


def test_no_skip_and_xfail_leave_the_run_green(tmp_path: Path) -> None:
    done = run(tmp_path, "import pytest\n\ndef test_passes():\n    pass\n\n"
                         "@pytest.mark.xfail(reason='known', strict=True)\n"
                         "def test_known():\n    assert False\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert UNEXPECTED not in done.stdout


def test_scripts_test_reports_skip_reasons() -> None:
    pytest_line = next(line for line in (REPO / "scripts" / "test").read_text().splitlines()
                       if "-m pytest" in line)
    assert " -rs" in pytest_line
