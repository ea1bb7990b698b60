"""A stage type from another package: the docs/internals.md example, installed from a temporary
folder on PYTHONPATH, found through ``twisted.plugin`` by a real server and called from Lua."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ServerProcess, env_path

DOCS = Path(__file__).resolve().parents[2] / "docs" / "internals.md"
CLIENT = """
stage.waitfor("got", function(prefix, text, n)
  log4cxx.info(string.format("GOT %s%s %d", prefix, text, n))
end)
stage.addtask(200, function() stage.signal("e:q=got", "hello", 7) end)
"""


def install_example(root: Path) -> None:
    """Write each ```python block of docs/internals.md whose first line is ``# PATH`` to ``root/PATH``."""
    blocks = re.findall(r"```python\n# (\S+\.py)\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert {path for path, _ in blocks} == {"twisted/plugins/echo_stage_type.py", "echo_stage.py"}
    for path, code in blocks:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(code)


def test_a_stage_type_from_another_package_runs_and_answers_lua(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "package"
    install_example(package)
    monkeypatch.setenv("PYTHONPATH", str(package))
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.lua").write_text(CLIENT)
    config = {
        "#startup": [["=echo+e"], ["=lua+client"]],
        "=echo+e": {"prefix": "echo:"},
        "=lua+client": {"=lua+client": "client"},
    }
    (app / "stage.json").write_text(json.dumps(config))
    with ServerProcess(app / "stage.json") as server:
        server.wait_for(lambda: "GOT echo:hello 7" in server.stage_lines("client"), 30.0, "the echo's answer")
        assert "echo stage started" in server.stage_lines("e")


def test_a_plugin_stage_type_checks_its_settings_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "package"
    install_example(package)
    monkeypatch.setenv("PYTHONPATH", str(package))
    (tmp_path / "stage.json").write_text(json.dumps({"#startup": [["=echo+e"]], "=echo+e": {"prefix": 5}}))
    result = subprocess.run(
        [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=", "stage", "-c", "stage.json", "--check"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": env_path()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == 'stage: =echo+e: expected {"prefix": "text"}\n'


def test_finding_the_stage_types_imports_no_reactor_and_no_stage_code() -> None:
    """Plugin discovery runs in twistd before it installs its reactor, and for every type."""
    code = (
        "import sys; from stagetx.stages.registry import stage_types; print(sorted(stage_types())); "
        "print(sorted(m for m in sys.modules if m == 'twisted.internet.reactor' or m == 'lupa' "
        "or m.startswith('stagetx.stages.') and m.endswith('.stage')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": env_path()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.splitlines() == ["['curl', 'index', 'lua', 'luajit', 'route', 'ticket']", "[]"], result.stderr
