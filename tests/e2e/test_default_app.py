"""The default application (etc/stage.json + lua/) under a real ``twistd -n stage``, driven by the
shipped client: its command line (one-shot, ``--listen``, ``load``) and its connection class.

Each server runs a temporary copy of etc/ and lua/ with a free port and a temporary data
directory, set through the config values the application reads (``#services``, ``listen``,
``=index+rank``). Bounded: every wait has a deadline, the load run lasts a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import pytest

from stagetx.client.connection import Connection
from stagetx.client.protocol import Command
from tests.redis_servers import RedisServer, needs_redis
from tests.support import ServerProcess, env_path, free_port

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0


class App:
    """A running copy of the default application: its port, data directory and server process."""

    def __init__(self, root: Path, **values: Any) -> None:
        self.root = root
        self.port = free_port()
        self.data = root / "data"
        shutil.copytree(ROOT / "etc", root / "etc", dirs_exist_ok=True)
        shutil.copytree(ROOT / "lua", root / "lua", dirs_exist_ok=True)
        self.config_path = root / "etc" / "stage.json"
        config = json.loads(self.config_path.read_text())
        config["#services"] = {"tcp": [f"127.0.0.1:{self.port}"]}
        config["listen"] = f"tcp://127.0.0.1:{self.port}?bson=16k,256k&inflight=64"
        config["=index+rank"] = str(self.data)
        config.pop("#admin", None)  # the shipped admin ports are fixed; this copy needs none
        config.pop("browser", None)  # likewise the browsers' port (the browser test sets its own)
        config.update(values)
        self.config_path.write_text(json.dumps(config))
        self.fronts = sum(1 for group in config["#startup"] if "=lua+front" in group)
        self.server: ServerProcess | None = None

    def start(self) -> App:
        self.server = server = ServerProcess(self.config_path)
        server.wait_for(
            lambda: (
                len(server.logged("front", "listening")) == self.fronts
                and any("ready: ['=index+rank'" in line for line in server.lines)
            ),
            WAIT,
            "every front process listening",
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()  # SIGTERM, then waits for the whole server to exit
            self.server = None

    def client(self, *args: str, timeout: float = WAIT) -> tuple[int, list[dict[str, Any]]]:
        """``python -m stagetx.client --json ARGS``: its exit status and the JSON lines printed."""
        done = subprocess.run(
            [sys.executable, "-m", "stagetx.client", "--port", str(self.port), "--json", *args],
            env={**os.environ, "PYTHONPATH": env_path()},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.returncode, [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    running = App(tmp_path_factory.mktemp("app")).start()
    yield running
    running.stop()


def test_login_score_top_and_rank(app: App) -> None:
    code, replies = app.client("login alice; score 50; score 30; top 3; rank")
    assert code == 0
    login, first, second, top, rank = replies
    assert login["ok"] and login["user"] == "alice" and "rank" not in login
    assert login["front"] in (2, 3)  # the front processes of etc/stage.json's #startup
    assert (first["score"], first["best"], first["rank"], first["improved"]) == (50, 50, 1, True)
    assert (second["score"], second["best"], second["improved"]) == (30, 50, False)
    assert top["rows"] == [{"rank": 1, "user": "alice", "score": 50}] and top["total"] == 1

    code, replies = app.client("login bob; score 80; top 2; rank; rank alice")
    assert code == 0
    _, score, top, mine, alices = replies
    assert score["rank"] == 1
    assert [(r["user"], r["score"], r["rank"]) for r in top["rows"]] == [
        ("bob", 80, 1),
        ("alice", 50, 2),
    ]
    assert (mine["rank"], mine["score"], mine["total"]) == (1, 80, 2)
    assert (alices["user"], alices["rank"]) == ("alice", 2)
    assert [r["user"] for r in alices["around"]] == ["bob", "alice"]

    code, replies = app.client("login alice")  # a new login reads the best score back
    assert (replies[0]["score"], replies[0]["rank"]) == (50, 2)


def test_mistakes_get_error_replies_and_exit_status_1(app: App) -> None:
    code, replies = app.client("score 10; login admin wrong; login admin change-me; login again; join bad.name")
    assert code == 1
    assert [r.get("error") for r in replies] == [
        "log in first",
        "wrong password",
        None,
        "already logged in as admin",
        "channel: 1 to 32 letters, digits, _ or -",
    ]
    code, replies = app.client("frobnicate")  # refused by the client before anything is sent
    assert code == 1 and "unknown command" in replies[0]["error"]


def test_chat_reaches_players_on_every_front_process(app: App) -> None:
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stagetx.client",
            "--port",
            str(app.port),
            "--json",
            "--listen",
            "20",
            "login carol; join lobby",
        ],
        env={**os.environ, "PYTHONPATH": env_path()},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        login = json.loads(listener.stdout.readline())
        assert json.loads(listener.stdout.readline())["channel"] == "lobby"
        fronts_seen: set[int] = set()
        for n in range(30):  # the kernel picks the front process of each new connection
            code, lines = app.client(f"login dan{n}; join lobby; say lobby hello {n}")
            # its own line may come back as a push before the client exits: keep the replies
            speaker, _, said = [line for line in lines if "push" not in line]
            assert code == 0 and said["ok"]
            fronts_seen.add(speaker["front"])
            if len(fronts_seen) == 2:
                break
        assert fronts_seen == {2, 3}, "every connection went to one front process"
        pushes = [json.loads(listener.stdout.readline()) for _ in range(n + 1)]
        assert [(p["push"], p["channel"], p["from"], p["text"]) for p in pushes] == [
            ("chat", "lobby", f"dan{i}", f"hello {i}") for i in range(n + 1)
        ]
        assert login["front"] in fronts_seen
    finally:
        listener.terminate()
        listener.wait(10)


def test_a_player_that_left_a_channel_gets_no_more_lines(app: App) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        heard: list[dict[str, Any]] = []
        erin = await Connection.open("127.0.0.1", app.port, on_push=heard.append)
        fred = await Connection.open("127.0.0.1", app.port)
        replies = [
            await erin.request(Command("login", {"user": "erin"})),
            await fred.request(Command("login", {"user": "fred"})),
        ]
        for connection in (erin, fred):
            replies.append(await connection.request(Command("join", {"channel": "quiet"})))
        # a join is answered once the route stage has erin's front for the channel: a line said
        # from fred's front after that reaches her
        replies.append(await fred.request(Command("say", {"channel": "quiet", "text": "one"})))
        await _until(lambda: len(heard) == 1)
        replies.append(await erin.request(Command("leave", {})))
        replies.append(await fred.request(Command("say", {"channel": "quiet", "text": "two"})))
        replies.append(await erin.request(Command("say", {"channel": "quiet", "text": "three"})))
        await asyncio.sleep(0.3)
        await erin.close()
        await fred.close()
        return replies, heard

    replies, heard = asyncio.run(scenario())
    assert [r["ok"] for r in replies] == [True] * 7 + [False]
    assert replies[5]["left"] == ["quiet"] and replies[7]["error"] == "join the channel first"
    assert [(p["from"], p["text"]) for p in heard] == [("fred", "one")]


def test_a_join_is_answered_only_once_the_route_stage_has_the_channel(tmp_path: Path) -> None:
    """The route stage in a process of its own, stopped (SIGSTOP): a join cannot be confirmed,
    so it is answered with an error after ``timeout_ms`` and the player is not in the channel
    (never "joined" while a line said right after could miss them); once the stage runs again a
    join succeeds and the player's own line comes back."""
    startup = [["=index+rank", "=ticket+ticket"], ["=route+route"], ["=lua+front"]]
    app = App(tmp_path, **{"#startup": startup, "timeout_ms": 3000}).start()
    assert app.server is not None
    (route_pid,) = app.server.pids(1)

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        heard: list[dict[str, Any]] = []
        gina = await Connection.open("127.0.0.1", app.port, on_push=heard.append)
        replies = [await gina.request(Command("login", {"user": "gina"}))]
        os.kill(route_pid, signal.SIGSTOP)
        try:
            replies.append(await gina.request(Command("join", {"channel": "hall"}), timeout=WAIT))
            replies.append(await gina.request(Command("say", {"channel": "hall", "text": "lost"})))
        finally:
            os.kill(route_pid, signal.SIGCONT)
        replies.append(await gina.request(Command("join", {"channel": "hall"}), timeout=WAIT))
        replies.append(await gina.request(Command("say", {"channel": "hall", "text": "back"})))
        await _until(lambda: len(heard) == 1)
        await gina.close()
        return replies, heard

    try:
        replies, heard = asyncio.run(scenario())
    finally:
        app.stop()
    assert [r["ok"] for r in replies] == [True, False, False, True, True]
    assert replies[1]["error"] == "chat unavailable: the route stage did not confirm the channel"
    assert replies[2]["error"] == "join the channel first"
    assert [(p["from"], p["text"]) for p in heard] == [("gina", "back")]


def test_a_player_on_two_connections_keeps_the_best_of_both(app: App) -> None:
    """Each connection knows only the scores it saw: a lower score sent on the other one must not
    overwrite the board's best, and a score sent after the entry was forgotten elsewhere is kept.
    Pipelined scores on one connection keep the best too."""

    async def scenario() -> list[dict[str, Any]]:
        first = await Connection.open("127.0.0.1", app.port)
        second = await Connection.open("127.0.0.1", app.port)
        for connection in (first, second):
            assert (await connection.request(Command("login", {"user": "twin"})))["ok"]
        replies = [
            await first.request(Command("score", {"points": 150})),
            await second.request(Command("score", {"points": 120})),
            await second.request(Command("score", {"points": 200})),
            await first.request(Command("forget", {})),
            await second.request(Command("score", {"points": 50})),
            *await asyncio.gather(
                first.request(Command("score", {"points": 300})), first.request(Command("score", {"points": 250}))
            ),
            await second.request(Command("rank", {})),
        ]
        await first.close()
        await second.close()
        return replies

    high, low, higher, forgot, after, best, pipelined, rank = asyncio.run(scenario())
    assert (high["improved"], high["best"]) == (True, 150)
    assert (low["ok"], low["improved"], low["best"]) == (True, False, 150)
    assert (higher["improved"], higher["best"]) == (True, 200)
    assert forgot["removed"] == 1
    assert (after["ok"], after["improved"], after["best"]) == (True, True, 50)
    assert (best["improved"], pipelined["improved"]) == (True, False)
    assert rank["score"] == 300


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


LOGIN_MS = 200


def test_rank_shows_two_above_and_two_below_also_near_the_top(app: App) -> None:
    for n in range(4):  # four players above everyone else so far: ranks 1 to 4
        code, _ = app.client(f"login top{n}; score {1000 + n}")
        assert code == 0
    code, replies = app.client("login top3; rank; rank top2")
    assert code == 0
    _, first, second = replies
    assert (first["rank"], [r["rank"] for r in first["around"]]) == (1, [1, 2, 3])
    assert (second["rank"], [r["rank"] for r in second["around"]]) == (2, [1, 2, 3, 4])


def _ask_raw(port: int, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """Requests as raw BSON documents on one connection, each sent once the one before it is
    answered (a login is answered when its ticket comes): the replies, in order."""
    replies: list[dict[str, Any]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
        buffer = b""
        for request in requests:
            conn.sendall(bson.encode(request))
            while len(buffer) < 4 or len(buffer) < int.from_bytes(buffer[:4], "little"):
                chunk = conn.recv(65536)
                assert chunk, "connection closed before every reply"
                buffer += chunk
            size = int.from_bytes(buffer[:4], "little")
            replies.append(bson.decode(buffer[:size]))
            buffer = buffer[size:]
    return replies


def test_an_unknown_op_is_named_in_its_error_whatever_its_letters(app: App) -> None:
    before, login, upper, digits, plain, long = _ask_raw(
        app.port,
        {"op": "Top", "id": 1},
        {"op": "login", "id": 2, "user": "raw"},
        {"op": "Top", "id": 3},
        {"op": "top2", "id": 4},
        {"op": "nope", "id": 5},
        {"op": "X" * 10000, "id": 6},
    )
    assert before["error"] == "log in first" and login["ok"] is True
    assert [r["error"] for r in (upper, digits, plain, long)] == [
        "unknown message Top",
        "unknown message top2",
        "unknown message nope",
        "unknown message " + "X" * 64 + "...",
    ]


def test_a_channel_that_is_no_name_is_refused_by_leave_without_echoing_it(app: App) -> None:
    """It was echoed with tostring: a table came back as 'not in channel table: 0x55…', a heap
    address of the server's Lua state."""
    _, table, number, unknown = _ask_raw(
        app.port,
        {"op": "login", "id": 1, "user": "lea"},
        {"op": "leave", "id": 2, "channel": {"a": 1}},
        {"op": "leave", "id": 3, "channel": 5},
        {"op": "leave", "id": 4, "channel": "nowhere"},
    )
    assert table["error"] == number["error"] == "channel: 1 to 32 letters, digits, _ or -"
    assert unknown["error"] == "not in channel nowhere"


@pytest.fixture(scope="module")
def throttled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """At most 2 logins checked at once, 6 waiting or held, each check 200 ms."""
    running = App(
        tmp_path_factory.mktemp("throttled"),
        **{
            "=ticket+ticket": [6, {"login": 2}, 5000],
            "login_ms": LOGIN_MS,
        },
    ).start()
    yield running
    running.stop()


def test_logins_are_throttled_by_the_ticket_stage(throttled: App) -> None:
    async def logins(n: int) -> tuple[list[tuple[float, dict[str, Any]]], dict[str, Any]]:
        connections = [await Connection.open("127.0.0.1", throttled.port) for _ in range(n)]

        async def login(i: int, connection: Connection) -> tuple[float, dict[str, Any]]:
            reply = await connection.request(Command("login", {"user": f"p{i}"}))
            return time.monotonic(), reply

        results = await asyncio.gather(*(login(i, c) for i, c in enumerate(connections)))
        refused = [c for c, (_, r) in zip(connections, results, strict=True) if not r["ok"]]
        retry = await refused[0].request(Command("login", {"user": "late"})) if refused else {}
        for connection in connections:
            await connection.close()
        return list(results), retry

    results, retry = asyncio.run(logins(16))
    done = sorted(t for t, r in results if r["ok"])
    refused = [r for _, r in results if not r["ok"]]
    # 2 checked at once + 4 waiting at most: of 16 logins sent together, some are refused
    assert len(done) >= 6 and refused, results
    assert {r["error"] for r in refused} == {"busy: too many logins waiting, try again"}
    # two slots, each busy LOGIN_MS per login: never three logins done within LOGIN_MS
    gaps = [later - first for first, later in zip(done, done[2:], strict=False)]
    assert min(gaps) >= LOGIN_MS / 1000 - 0.03, gaps
    waits = sorted(r["queued_ms"] for _, r in results if r["ok"])
    assert waits[-1] >= LOGIN_MS - 30, waits  # the last ones waited behind both slots
    assert retry["ok"], retry  # once the queue drained, a refused player gets in


def test_load_mode_reports_throughput_and_percentiles(throttled: App) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stagetx.client",
            "--port",
            str(throttled.port),
            "load",
            "--players",
            "4",
            "--seconds",
            "3",
            "--json",
        ],
        env={**os.environ, "PYTHONPATH": env_path()},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (
        summary["players"],
        summary["connected"],
        summary["errors"],
        summary["failed_players"],
    ) == (4, 4, 0, 0)
    assert 3.0 <= summary["seconds"] < 3.0 + 10.0
    ops = summary["ops"]
    assert ops["login"]["count"] == 4
    for op in ("score", "top", "rank", "say", "chat"):
        row = ops[op]
        assert row["count"] > 0, op
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"], (op, row)
    assert summary["requests"] == sum(ops[op]["count"] for op in ("login", "score", "top", "rank", "say"))
    assert summary["throughput"] == pytest.approx(summary["requests"] / summary["seconds"])
    progress = [line for line in done.stderr.splitlines() if "requests" in line]
    assert len(progress) >= 2  # plain progress lines, one a second, when stderr is not a terminal


def test_scores_survive_a_restart(tmp_path: Path) -> None:
    app = App(tmp_path).start()
    try:
        assert app.client("login gina; score 77")[0] == 0
    finally:
        app.stop()
    app.start()
    try:
        code, (_, rank) = app.client("login hal; rank gina")
        assert code == 0 and (rank["rank"], rank["score"]) == (1, 77)
    finally:
        app.stop()
    assert any(name.endswith(".log") for name in os.listdir(app.data))


@needs_redis
def test_one_config_key_puts_the_scoreboard_on_redis(tmp_path: Path) -> None:
    """``"=index+rank": {"redis": URL}`` instead of the data directory: the same replies, and the
    scores live in Redis, so they outlast the server (docs/default-app.md)."""
    redis = RedisServer(tmp_path)
    try:
        app = App(tmp_path / "app", **{"=index+rank": {"redis": redis.url, "prefix": "game:"}}).start()
        try:
            assert app.client("login alice; score 50")[0] == 0
            code, replies = app.client("login bob; score 80; top 2; rank alice")
            assert code == 0
            top, alice = replies[-2:]
            assert [(r["user"], r["score"], r["rank"]) for r in top["rows"]] == [("bob", 80, 1), ("alice", 50, 2)]
            assert (alice["rank"], alice["score"], alice["total"]) == (2, 50, 2)
        finally:
            app.stop()
        app.start()
        try:
            code, (_, rank) = app.client("login hal; rank bob")
            assert code == 0 and (rank["rank"], rank["score"]) == (1, 80)
        finally:
            app.stop()
        assert not app.data.exists()  # nothing on disk: the boards are in Redis
    finally:
        redis.stop()
