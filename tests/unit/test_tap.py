"""``twistd stage`` options: a config is required, broken ones stop start-up, --check reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.application.service import IService
from twisted.python import usage

from stagetx.admin.service import AdminService
from stagetx.supervisor import Supervisor
from stagetx.tap import Options, makeService


def test_config_is_required() -> None:
    with pytest.raises(usage.UsageError, match="-c/--config FILE is required"):
        Options().parseOptions([])


def test_broken_config_exits_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "stage.json"
    path.write_text(json.dumps({"#startup": [["=lau+x"]]}))
    with pytest.raises(SystemExit) as caught:
        Options().parseOptions(["-c", str(path)])
    assert caught.value.code == 'stage: #startup[0][0]: unknown stage type "=lau"'


def test_check_prints_groups_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stage.json"
    path.write_text(json.dumps({"#startup": [["=route+a"], ["=route+r", "=curl+c"]]}))
    with pytest.raises(SystemExit) as caught:
        Options().parseOptions(["-c", str(path), "--check"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == "config OK\nprocess 1: =route+a\nprocess 2: =route+r =curl+c\n"


def test_make_service_starts_nothing_before_start_service(tmp_path: Path) -> None:
    path = tmp_path / "stage.json"
    path.write_text(json.dumps({"#startup": [["=route+a"]]}))
    options = Options()
    options.parseOptions(["-c", str(path)])
    root = makeService(options)
    supervisor, admin = list(IService(root))  # type: ignore[call-overload]
    assert isinstance(supervisor, Supervisor) and isinstance(admin, AdminService)
    assert admin.processes is supervisor and admin.control is None
    assert not root.running and supervisor.rundir is None
    assert [s.pid for s in supervisor.status()] == [None]
    assert supervisor.config.stages[0].name == "=route+a"


def test_restart_delay_sets_the_first_back_off(tmp_path: Path) -> None:
    path = tmp_path / "stage.json"
    path.write_text(json.dumps({"#startup": [["=route+a"]]}))
    options = Options()
    options.parseOptions(["-c", str(path), "--restart-delay", "5"])
    supervisor, _ = list(IService(makeService(options)))  # type: ignore[call-overload]
    assert supervisor._backoff == (5.0, 60.0)
    with pytest.raises(usage.UsageError, match="--restart-delay must be positive"):
        Options().parseOptions(["-c", str(path), "--restart-delay", "0"])
