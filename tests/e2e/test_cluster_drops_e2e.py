"""Messages lost in a failover are named and counted (docs/operations.md, docs/cluster.md): real
``twistd`` servers on loopback; the one a server sends to is killed, and what was queued for it
is dropped once its routing expires."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from tests.e2e.test_cluster_e2e import app
from tests.e2e.test_operations_e2e import ADMIN, admin_ports, http
from tests.support import ServerProcess, free_port

W = """
stage.waitfor("where", function(i) log4cxx.info("where", i) end)
"""

# sends "w:where" to the server at port P every 40 ms, by its address: no other server may take it
S = """
local i = 0
stage.addtask(50, function()
    i = i + 1
    stage.signal({"w:where", "127.0.0.1:%(port_p)d"}, i)
    return 40
end)
"""


def test_messages_dropped_with_a_gone_server_are_logged_with_their_target_and_counted(tmp_path: Path) -> None:
    port_p, port_s = free_port(), free_port()
    path_p = app(tmp_path, "p", {"#cluster": [port_p], "#startup": [["=lua+w"]]}, {"w": W})
    path_s = app(
        tmp_path,
        "s",
        {"#cluster": [port_s, f"127.0.0.1:{port_p}"], "#startup": [["=lua+s"]], "#admin": ADMIN},
        {"s": S % {"port_p": port_p}},
    )
    with ServerProcess(path_s) as s:
        ports = admin_ports(s)
        p = ServerProcess(path_p)
        try:
            p.wait_for(lambda: len(p.logged("w", "where")) >= 3, 30, "messages from the other server")
        finally:
            p.process.send_signal(signal.SIGKILL)  # gone without a word: what S queues for it waits
            p.stop()
        dropped = re.compile(r"(\d+) message\(s\) queued for server \S+ dropped: (.*)")
        s.wait_for(lambda: any(dropped.search(line) for line in s.lines), 60, "the failover's drop line")
        found = next(m for m in map(dropped.search, s.lines) if m)
        count, named = int(found.group(1)), found.group(2)
        assert count >= 1 and named.split(", ")[0] == "w:where", named
        metric = f'stagetx_cluster_messages_dropped_total{{process="1"}} {float(count)}'
        s.wait_for(lambda: metric in http(ports["http"], "/metrics")[1].decode(), 10, "the dropped count")
