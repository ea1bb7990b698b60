"""The shipped systemd unit (etc/stagetx.service): ``systemd-analyze verify`` finds nothing to say
about it (where that tool exists), and its ``ExecStart`` is a command line ``twistd stage`` takes."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import env_path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "etc" / "stagetx.service"
INSTALLED = "/opt/stagetx"


def _here(tmp_path: Path) -> Path:
    """The unit with its install paths pointing at this checkout and this test's twistd."""
    twistd = str(Path(sys.executable).with_name("twistd"))
    text = UNIT.read_text().replace(f"{INSTALLED}/.venv/bin/twistd", twistd).replace(INSTALLED, str(ROOT))
    path = tmp_path / "stagetx.service"
    path.write_text(text)
    return path


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("no systemd-analyze on this machine")
    done = subprocess.run(
        [tool, "verify", "--man=no", str(_here(tmp_path))], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")


def test_its_command_line_is_one_twistd_stage_takes(tmp_path: Path) -> None:
    unit = _here(tmp_path).read_text()
    (command,) = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(command)
    assert argv[argv.index("-c") + 1] == str(ROOT / "etc" / "stage.json")
    done = subprocess.run(
        [*argv, "--check"],
        cwd=ROOT / "etc",
        env={**os.environ, "PYTHONPATH": env_path()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
    assert done.stdout.startswith("config OK\n")
