"""A stand-in for ``stagetx.child`` that follows the supervisor contract and nothing else.

Reads the bootstrap line, reports it, answers every connection on a shared ``#services`` socket
with ``pid group\\n``, exits 0 on SIGTERM or when stdin reaches EOF (the supervisor is gone).
Environment knobs for tests: ``STANDIN_EXIT`` (exit at once with that status),
``STANDIN_LONG_LINE`` (print one line of that many characters), ``STANDIN_IGNORE_TERM``.
"""

import json
import os
import select
import signal
import socket
import sys


def main() -> int:
    bootstrap = json.loads(sys.stdin.readline())
    ignore_term = os.environ.get("STANDIN_IGNORE_TERM")
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else lambda n, f: sys.exit(0))
    group = bootstrap["group"]
    listeners = [socket.socket(fileno=fd) for fd in bootstrap["services"].values()]
    ports = [listener.getsockname()[1] for listener in listeners]
    print(
        f"standin ready group={group} pid={os.getpid()} rundir={bootstrap['rundir']} ports={ports}",
        flush=True,
    )
    if os.environ.get("STANDIN_LONG_LINE"):
        print("x" * int(os.environ["STANDIN_LONG_LINE"]), flush=True)
    if os.environ.get("STANDIN_EXIT") is not None:
        return int(os.environ["STANDIN_EXIT"])
    while True:
        readable, _, _ = select.select([sys.stdin, *listeners], [], [])
        for source in readable:
            if source is sys.stdin:
                if not sys.stdin.readline():
                    return 0
                continue
            try:
                conn, _ = source.accept()
            except BlockingIOError:  # a sibling process took this connection
                continue
            with conn:
                conn.sendall(f"{os.getpid()} {group}\n".encode())


if __name__ == "__main__":
    sys.exit(main())
