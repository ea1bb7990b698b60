"""A child whose supervisor does not read its log: it keeps serving (docs/operations.md, *Logs*)."""

from __future__ import annotations

import os
import signal
import socket
import struct
from pathlib import Path

from tests.support import ServerProcess, free_port, packet, write_app

# a burst of long lines every millisecond; the broker port answers how many so far
LOUD = """
n = 0
stage.addtask(1, function()
    for i = 1, 100 do n = n + 1; print("tick " .. n .. " " .. string.rep("y", 200)) end
    return 1
end)
broker.ready("tcp://127.0.0.1:{port}", function() return function() return tostring(n) end end)
"""


def ask(port: int, payload: bytes) -> bytes:
    """One framed request to the broker port; its reply (a socket timeout fails the test)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(packet(payload))
        head = client.recv(4, socket.MSG_WAITALL)
        return client.recv(struct.unpack("<I", head)[0], socket.MSG_WAITALL)


def test_a_child_serves_while_its_supervisor_is_not_reading_its_log(tmp_path: Path) -> None:
    port = free_port()
    config = {"#services": {"tcp": [f"127.0.0.1:{port}"]}, "#startup": [["=lua+app"]], "=lua+app": "lua/app"}
    with ServerProcess(write_app(tmp_path, config, {"app": LOUD.replace("{port}", str(port))})) as server:
        server.wait_for(lambda: any("] ready: " in line for line in server.lines), what="ready")
        os.kill(server.process.pid, signal.SIGSTOP)  # a supervisor that reads nothing, as when its stdout stalls
        try:
            stopped = int(ask(port, b"?"))
            for _ in range(2000):  # 10,000 lines (2 MiB) fill the pipe (64 KiB) and the child's buffer
                if int(ask(port, b"?")) > stopped + 10_000:
                    break
            assert int(ask(port, b"?")) > stopped + 10_000
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        server.wait_for(lambda: any("log events dropped" in line for line in server.lines), what="the drop count")
        lines = [line for line in list(server.lines) if " tick " in line]
        assert all(line.endswith("y" * 200) for line in lines)  # whole lines only, though some dropped
        assert server.stop() == 0
