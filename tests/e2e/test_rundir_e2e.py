"""The run directory removed under a running server (a tmp cleaner): its sockets come back."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import stat
from pathlib import Path

from tests.support import ServerProcess, write_app

A = 'n = 0\nstage.addtask(50, function() n = n + 1; stage.signal("b:ping", n); return 50 end)\n'
B = 'stage.waitfor("ping", function(n) print("got", n) end)\n'


def test_a_removed_run_directory_is_made_again_and_a_restarted_process_links_and_reports(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    config = {"#startup": [["=lua+a"], ["=lua+b"]], "=lua+a": "lua/a", "=lua+b": "lua/b"}
    path = write_app(tmp_path, config, {"a": A, "b": B})
    os.environ["TMPDIR"] = str(tmp)  # the run directory is made under the supervisor's TMPDIR
    try:
        server = ServerProcess(path)
    finally:
        del os.environ["TMPDIR"]
    with server:
        server.wait_for(lambda: any("] ready: 2 processes" in line for line in server.lines), what="ready")
        (rundir,) = glob.glob(str(tmp / "stagetx-*"))
        shutil.rmtree(rundir)
        sockets = ["control.sock", "g0.sock", "g1.sock"]
        server.wait_for(lambda: os.path.isdir(rundir) and sorted(os.listdir(rundir)) == sockets, what="the sockets")
        assert stat.S_IMODE(os.stat(rundir).st_mode) == 0o700
        server.wait_for(lambda: sum("was removed: listening there again" in line for line in server.lines) == 3)
        os.kill(server.pids(1)[-1], signal.SIGKILL)
        server.wait_for(lambda: len(server.pids(1)) == 2, what="process 2 restarted")
        new = server.pids(1)[-1]
        server.wait_for(lambda: any(f"process 2 ready, pid {new}" in line for line in server.lines), what="ready")
        server.wait_for(lambda: any(f"p2[{new}] got\t" in line for line in server.lines), what="a message to it")
        assert server.stop() == 0
    assert not any("Traceback" in line for line in server.lines)
