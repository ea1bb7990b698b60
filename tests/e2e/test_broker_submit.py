"""broker.submit and sockets used from worker threads: real loopback sockets, the real
reactor, real worker threads; and once through a real ``twistd -n stage`` server."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from stagetx.broker.framing import PacketFraming
from stagetx.lua.workers import process_queue
from tests.support import (
    RunningStage,
    ServerProcess,
    connect,
    free_port,
    packet,
    wait_for,
    write_app,
)

WAIT = 10.0


def worker_queue_idle(run: RunningStage) -> Callable[[], bool]:
    """True once no job of the stage's process waits (on a re-run timer too) or runs: then no
    job can run again until a new one is submitted."""
    queue = process_queue(run.server.hosts[0].process, reactor, (4, 1000))
    return lambda: queue.waiting == 0 and queue.running == 0


# Each frame becomes a job of its socket that holds a worker thread for 40 ms, then commits from
# the worker thread "data t0 t1 same" (its interval on the monotonic clock; whether broker.f(id)
# gave the table passed in).
ORDERED = """
broker.ready("tcp://127.0.0.1:{port}?packet", function(socket)
    return function(s, data)
        broker.submit(s, function(sock, data, hold)
            local t0 = process.tick
            while process.tick < t0 + hold do end
            local same = broker.f(sock.id) == sock
            broker.f(sock.id).commit(string.format("%s %.6f %.6f %s", data, t0, process.tick, same))
        end, data, 0.04)
    end
end)
"""


@pytest_twisted.ensureDeferred
async def test_jobs_of_one_socket_in_order_never_overlapping_and_sockets_in_parallel(tmp_path: Path) -> None:
    port = free_port()
    async with RunningStage(tmp_path, ORDERED.replace("{port}", str(port)), threads=(4, 1000)):
        clients = [await connect(port) for _ in range(3)]
        for n, client in enumerate(clients):
            client.send(*(f"c{n}-{i}".encode() for i in range(5)))
        await wait_for(lambda: all(len(c.frames()) == 5 for c in clients), WAIT, "five replies per socket")
        intervals = []
        for n, client in enumerate(clients):
            replies = [frame.decode().split() for frame in client.frames()]
            assert [r[0] for r in replies] == [f"c{n}-{i}" for i in range(5)]  # FIFO per socket
            assert all(r[3] == "true" for r in replies)  # broker.f(id) in the sandbox: the same table
            spans = [(float(r[1]), float(r[2])) for r in replies]
            for (_, end), (start, _) in zip(spans, spans[1:]):
                assert end <= start  # one job per socket at a time
            intervals.append(spans)
        overlapping = [
            (a, b)
            for i, x in enumerate(intervals)
            for y in intervals[i + 1 :]
            for a in x
            for b in y
            if a[0] < b[1] and b[0] < a[1]
        ]
        assert overlapping  # different sockets ran at the same time


RERUN = """
broker.ready("tcp://127.0.0.1:{port}?packet", function(socket)
    return function(s, data)
        broker.submit(s, function(sock, limit)
            local n = stage.v("runs " .. sock.id, function(n) return (n or 0) + 1 end)
            log4cxx.info("run", sock.id, n)
            sock.commit(string.format("%d %.6f", n, process.tick))
            if limit == 0 or n < limit then return 30 end
        end, tonumber(data))
    end
end)
"""


@pytest_twisted.ensureDeferred
async def test_return_value_reruns_the_job_until_done_or_the_socket_closed(tmp_path: Path) -> None:
    port = free_port()
    async with RunningStage(tmp_path, RERUN.replace("{port}", str(port)), threads=(4, 1000)) as run:
        counted = await connect(port)
        counted.send(b"3")  # runs 3 times, 30 ms apart
        await wait_for(lambda: len(counted.frames()) == 3, WAIT, "three runs")
        runs = [frame.split() for frame in counted.frames()]
        assert [r[0] for r in runs] == [b"1", b"2", b"3"]
        times = [float(r[1]) for r in runs]
        assert all(later - earlier >= 0.029 for earlier, later in zip(times, times[1:]))
        idle = worker_queue_idle(run)
        await wait_for(idle, WAIT, "the job done")
        assert len(counted.frames()) == 3 and run.text().count("run\t") == 3  # returned nothing: done

        forever = await connect(port)
        forever.send(b"0")  # asks to run again every time
        await wait_for(lambda: len(forever.frames()) >= 3, WAIT, "a periodic job")
        forever.transport.loseConnection()
        await wait_for(lambda: forever.closed, WAIT, "the close")
        # it asks for a re-run every time: the queue empties only if none happens once the socket
        # has closed (a run already under way or waiting on its timer ends it)
        await wait_for(idle, WAIT, "no re-run once the socket has closed")


ERRORS = """
broker.ready("tcp://127.0.0.1:{port}?packet", function(socket)
    return function(s, data)
        broker.submit(s, function(sock, data)
            if data == "bad" then
                local t = nil
                return t.field
            end
            sock.commit("ok " .. data)
        end, data)
    end
end)
"""


@pytest_twisted.ensureDeferred
async def test_an_error_is_logged_with_file_and_line_and_later_jobs_still_run(tmp_path: Path) -> None:
    port = free_port()
    async with RunningStage(tmp_path, ERRORS.replace("{port}", str(port)), threads=(4, 1000)) as run:
        client = await connect(port)
        client.send(b"one", b"bad", b"two")
        await wait_for(lambda: len(client.frames()) == 2, WAIT, "the jobs around the failing one")
        assert client.frames() == [b"ok one", b"ok two"]
        await wait_for(lambda: "broker.submit job of socket" in run.text(), WAIT, "the error report")
        line = next(x for x in run.text().splitlines() if "broker.submit job of socket" in x)
        assert "Lua error in broker.submit job of socket" in line
        assert "a.lua:7:" in line and "attempt to index a nil value" in line


# From a sandbox: socket fields, broker.signal by id and by address, commit then close (in order),
# broker.close(id), and what a sandbox refuses; the main runtime logs the same fields for comparison.
SANDBOX = """
broker.ready("tcp://127.0.0.1:{port}?packet", function(socket)
    log4cxx.info("main", socket.id, socket[0], socket[1], socket[-1])
    return function(s, data)
        if data == "fields" then
            broker.submit(s, function(sock)
                local ok, err = pcall(function() local l = broker.ready("tcp://127.0.0.1:0"); return l end)
                log4cxx.info("job", sock.id, sock[0], sock[1], sock[-1], thread.id ~= 0)
                broker.signal({sock.id}, "by id")
                broker.signal(broker.aton(sock[1]), "by address")
                broker.signal(sock.id, "as received")
                sock.commit("refused " .. tostring(not ok) .. " " .. tostring(err))
            end)
        elseif data == "as received" then
            return "re:" .. data
        elseif data == "bye" then
            broker.submit(s.id, function(sock)
                for i = 1, 3 do log4cxx.info("job commit", sock.commit("last " .. i)) end
                sock.close()
                log4cxx.info("after close", tostring(sock.commit("late")))
            end)
        elseif data == "kill" then
            broker.submit(s, function(sock) broker.close(sock.id) end)
        elseif data == "close here" then
            s.commit("closing")
            s.close()
            log4cxx.info("main after close", s.commit("late"))
        end
    end
end)
"""


@pytest_twisted.ensureDeferred
async def test_sockets_from_a_sandbox_read_in_the_thread_and_write_on_the_reactor_in_order(tmp_path: Path) -> None:
    port = free_port()
    async with RunningStage(tmp_path, SANDBOX.replace("{port}", str(port)), threads=(4, 1000)) as run:
        client = await connect(port)
        client.send(b"fields")
        await wait_for(lambda: len(client.frames()) == 4, WAIT, "four frames from the job")
        assert client.frames()[:3] == [b"by id", b"by address", b"re:as received"]
        assert client.frames()[3].startswith(b"refused true ")
        assert b"lua/a.lua:7: broker.ready: only on the stage's own thread" in client.frames()[3]
        await wait_for(lambda: "job\t" in run.text(), WAIT, "the job's log line")
        main = next(x for x in run.text().splitlines() if "main\t" in x).split("main\t")[1].split("\t")
        job = next(x for x in run.text().splitlines() if "job\t" in x).split("job\t")[1].split("\t")
        assert job == main + ["true"]
        assert main[0] == main[1] and main[2] != main[3]  # socket[0] is the id; peer and local differ

        client.send(b"bye")
        await wait_for(lambda: client.closed, WAIT, "the close from the job")
        assert client.frames()[4:] == [b"last 1", b"last 2", b"last 3"]  # sent before the close
        assert run.said("job commit") == [["6"]] * 3  # the bytes handed over, as the original's count
        await wait_for(lambda: "after close" in run.text(), WAIT, "the job's last line")
        assert b"late" not in client.data  # whether the job's commit returned 4 (handed over) or
        # false (the reactor had closed the socket already), nothing is sent after the close

        other = await connect(port)
        other.send(b"kill")
        await wait_for(lambda: other.closed, WAIT, "broker.close from the job")

        here = await connect(port)
        here.send(b"close here")
        await wait_for(lambda: here.closed, WAIT, "the close in the receive function")
        assert here.frames() == [b"closing"]
        assert "main after close\tfalse\tsocket closed" in run.text()


# A message handler gets a socket id (as after a ticket or curl round trip) and hands it to a
# stage.submit job, which finds the socket with broker.f and answers on it.
BY_ID = """
broker.ready("tcp://127.0.0.1:{port}?packet", function(socket)
    return function(s, data) stage.signal("work", s.id, data) end
end)
stage.waitfor("work", function(id, data)
    stage.submit(0, function(id, data)
        local sock = broker.f(id)
        sock.commit(string.upper(data) .. " " .. tostring(broker.f(id) == sock) .. " " .. tostring(broker.f(-1)))
    end, id, data)
end)
"""


@pytest.mark.parametrize("kind", ["lua", "luajit"])
@pytest_twisted.ensureDeferred
async def test_a_stage_submit_job_answers_a_socket_found_by_its_id(tmp_path: Path, kind: str) -> None:
    port = free_port()
    async with RunningStage(tmp_path, BY_ID.replace("{port}", str(port)), kind, threads=(4, 1000)):
        client = await connect(port)
        client.send(b"hello")
        await wait_for(lambda: len(client.frames()) == 1, WAIT, "the answer")
        assert client.frames() == [b"HELLO true nil"]


SERVER_SCRIPT = """
broker.ready("tcp://127.0.0.1:{port}?packet", function(socket)
    return function(s, data)
        broker.submit(s, function(sock, data)
            local t0 = process.tick
            while process.tick < t0 + 0.02 do end
            broker.f(sock.id).commit(data .. " " .. thread.id)
        end, data)
    end
end)
log4cxx.info("listening")
"""


def _read_frames(conn: socket.socket, count: int, timeout: float) -> list[bytes]:
    framing = PacketFraming(1 << 20, 1 << 20)
    data, deadline = b"", time.monotonic() + timeout
    while len(framing.split(data)[0]) < count:
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return framing.split(data)[0]


def test_broker_submit_in_a_real_server(tmp_path: Path) -> None:
    port = free_port()
    config = {"#startup": [["=lua+a"]], "#threads": [3, 100], "=lua": {"%package": ["[0]lua"], "=lua+a": "a"}}
    path = write_app(tmp_path, config, {"a": SERVER_SCRIPT.replace("{port}", str(port))})
    with ServerProcess(path) as server:
        server.wait_for(lambda: server.logged("a", "listening") == [[]], 30, "the listener")
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            for n, conn in enumerate(conns):
                conn.sendall(b"".join(packet(f"s{n}-{i}".encode()) for i in range(4)))
            replies = [_read_frames(conn, 4, 20) for conn in conns]
        finally:
            for conn in conns:
                conn.close()
    for n, frames in enumerate(replies):
        assert [f.split()[0] for f in frames] == [f"s{n}-{i}".encode() for i in range(4)]
        assert all(int(f.split()[1]) > 0 for f in frames)  # a worker thread's id
