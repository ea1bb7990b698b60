"""``#log`` files of a real server under disk faults: full, removed at SIGHUP (docs/operations.md, *Logs*)."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.e2e.test_index_crash import fill, small_tmpfs
from tests.e2e.test_operations_e2e import ADMIN, Console, admin_ports
from tests.support import ServerProcess, write_app

TICKER = """
n = 0
stage.addtask(5, function() n = n + 1; print("tick " .. n); return 5 end)
"""


def ticks(path: Path) -> int:
    """How many tick lines ``path`` holds (0 when it is missing)."""
    return path.read_text().count(" tick ") if path.exists() else 0


def test_a_full_log_disk_is_reported_once_the_server_serves_and_the_file_resumes(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "logs", "256k") as directory:
        log = directory / "app.log"
        config = {
            "#startup": [["=lua+app"]],
            "#admin": ADMIN,
            "=lua+app": "lua/app",
            "#log": {"stage.app": {"file": str(log)}},
        }
        with ServerProcess(write_app(tmp_path, config, {"app": TICKER})) as server:
            console = Console(admin_ports(server)["console"])
            try:
                server.wait_for(lambda: ticks(log) > 0, what="ticks in the log file")
                filler = fill(directory)
                server.wait_for(
                    lambda: any("No space left on device" in line for line in server.lines), what="the report"
                )
                before = int(console.ask("eval app n")[0])
                server.wait_for(lambda: int(console.ask("eval app n")[0]) > before + 50, what="ticks while full")
                assert sum("No space left on device" in line for line in server.lines) == 1
                assert not any("Traceback" in line or "disabling observer" in line for line in server.lines)
                filler.unlink()
                server.wait_for(lambda: any("writing again" in line for line in server.lines), what="the resume line")
                written = ticks(log)
                server.wait_for(lambda: ticks(log) > written + 10, what="ticks written after the disk was freed")
            finally:
                console.close()
            assert server.stop() == 0


def test_a_log_directory_gone_at_sighup_is_reported_and_written_again_at_the_next(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    config = {"#startup": [["=lua+app"]], "=lua+app": "lua/app", "#log": {"stage.app": {"file": str(log)}}}
    with ServerProcess(write_app(tmp_path, config, {"app": TICKER})) as server:
        server.wait_for(lambda: ticks(log) > 0, what="ticks in the log file")
        log.parent.rename(tmp_path / "rotated")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(lambda: any("No such file or directory" in line for line in server.lines), what="the report")
        log.parent.mkdir()
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(lambda: ticks(log) > 10, what="ticks in the new file")
        assert any("writing again" in line for line in server.lines)
        assert not any("Traceback" in line or "disabling observer" in line for line in server.lines)
        assert server.stop() == 0
