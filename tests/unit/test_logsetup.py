"""``#log``: per-group levels on the main stream, and a file for a group that names one."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from twisted.logger import Logger, LogLevel

from stagetx.config import LOG_LEVELS, LogGroup
from stagetx.logsetup import ReopenableFile, level_named, log_observers, reopen_log_files


def emit_to(observers: list, namespace: str, level: str, text: str) -> None:
    log = Logger(namespace=namespace, observer=lambda event: [o(event) for o in observers])
    getattr(log, level)("{message}", message=text)


def test_group_levels_filter_the_main_stream_and_others_log_at_info(tmp_path: Path) -> None:
    stream = io.StringIO()
    observers, _ = log_observers({"stage.quiet": LogGroup(level="warn")}, stream)
    emit_to(observers, "stage.quiet", "info", "hidden")
    emit_to(observers, "stage.quiet", "warn", "shown-warn")
    emit_to(observers, "stage.other", "debug", "hidden-debug")
    emit_to(observers, "stage.other", "info", "shown-info")
    text = stream.getvalue()
    assert "shown-warn" in text and "shown-info" in text
    assert "hidden" not in text


def test_a_group_with_a_file_also_writes_there_and_only_its_own_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    path = tmp_path / "audit.log"
    observers, _ = log_observers({"audit": LogGroup(level="info", file=str(path))}, stream)
    emit_to(observers, "audit", "info", "paid {braces} 10")
    emit_to(observers, "stage.a", "info", "not audit")
    for observer in observers:
        getattr(getattr(observer, "_observer", None), "_outFile", io.StringIO()).flush()
    content = path.read_text()
    assert "paid {braces} 10" in content and "not audit" not in content
    assert "paid {braces} 10" in stream.getvalue()


def test_the_returned_predicate_changes_levels_at_run_time() -> None:
    stream = io.StringIO()
    observers, predicate = log_observers({}, stream)
    from twisted.logger import LogLevel

    predicate.setLogLevelForNamespace("stage.a", LogLevel.debug)
    emit_to(observers, "stage.a", "debug", "now-visible")
    assert "now-visible" in stream.getvalue()


def test_every_configurable_level_name_is_its_own_level() -> None:
    """``critical`` (the config's name) and ``fatal`` (log4cxx's) both keep only critical lines;
    no accepted name falls back to another level."""
    assert {name: level_named(name) for name in LOG_LEVELS} == {
        "trace": LogLevel.debug,
        "debug": LogLevel.debug,
        "info": LogLevel.info,
        "warn": LogLevel.warn,
        "error": LogLevel.error,
        "critical": LogLevel.critical,
        "fatal": LogLevel.critical,
    }


def group_file(stream: io.StringIO, path: Path) -> list:  # type: ignore[type-arg]
    """The observers of one group ``audit`` that writes to ``path``."""
    observers, _ = log_observers({"audit": LogGroup(level="info", file=str(path))}, stream)
    return observers


def test_a_file_whose_directory_is_gone_at_sighup_is_written_again_once_it_is_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stream, path = io.StringIO(), tmp_path / "logs" / "audit.log"
    path.parent.mkdir()
    observers = group_file(stream, path)
    emit_to(observers, "audit", "info", "before")
    shutil.rmtree(path.parent)
    reopen_log_files()
    emit_to(observers, "audit", "info", "while gone")
    assert "No such file or directory" in capsys.readouterr().err
    path.parent.mkdir()
    reopen_log_files()
    emit_to(observers, "audit", "info", "after")
    assert [line.split("] ", 1)[1] for line in path.read_text().splitlines()] == ["after"]
    assert "Traceback" not in stream.getvalue()
    assert "writing again (1 events dropped)" in capsys.readouterr().err


def test_an_unopenable_file_is_tried_again_after_the_retry_delay(tmp_path: Path) -> None:
    now, reports = [0.0], []
    handle = ReopenableFile(str(tmp_path / "gone" / "a.log"), reports.append, lambda: now[0], retry=5.0)
    (tmp_path / "gone").mkdir()
    handle.write("dropped\n")
    now[0] = 5.0
    handle.write("kept\n")
    assert (tmp_path / "gone" / "a.log").read_text() == "kept\n"
    assert len(reports) == 2 and "1 events dropped" in reports[1]
