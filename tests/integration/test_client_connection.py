"""The client's connection and load mode against a small asyncio server on loopback.

The stand-in server speaks the default application's protocol (docs/default-app.md) with
scripted behaviour, so these tests pin the client's side: id matching, pushes, closing, and the
load loop's counting, without starting twistd (tests/e2e/test_default_app.py does that).
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import Callable
from typing import Any

import bson
import pytest

from stagetx.client.connection import Connection, ConnectionClosed
from stagetx.client.load import LoadOptions, run_load
from stagetx.client.protocol import Command, Decoder

Handler = Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], None]


async def serve(handler: Handler) -> tuple[asyncio.AbstractServer, int]:
    """A loopback server calling ``handler(request, send)`` for each document received."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = Decoder()
        send = lambda doc: writer.write(bson.encode(doc))  # noqa: E731
        try:
            while data := await reader.read(1 << 16):
                for request in decoder.feed(data):
                    handler(request, send)
        except ConnectionResetError:
            pass  # a handler's way to hang up
        finally:
            writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0, family=socket.AF_INET)
    return server, server.sockets[0].getsockname()[1]


def test_replies_are_matched_by_id_whatever_their_order() -> None:
    async def scenario() -> list[dict[str, Any]]:
        held: list[dict[str, Any]] = []

        def handler(request: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
            held.append(request)
            if len(held) == 2:  # answer the second request first
                for r in reversed(held):
                    send({"re": r["id"], "ok": True, "op": r["op"]})

        server, port = await serve(handler)
        async with server:
            connection = await Connection.open("127.0.0.1", port)
            replies = await asyncio.gather(
                connection.request(Command("top", {})), connection.request(Command("rank", {}))
            )
            await connection.close()
        return list(replies)

    assert [r["op"] for r in asyncio.run(scenario())] == ["top", "rank"]


def test_pushes_go_to_on_push_and_not_to_a_waiting_request() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        def handler(request: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
            send({"push": "chat", "channel": "c", "from": "x", "text": "hi"})
            send({"re": request["id"], "ok": True})

        pushes: list[dict[str, Any]] = []
        server, port = await serve(handler)
        async with server:
            connection = await Connection.open("127.0.0.1", port, on_push=pushes.append)
            reply = await connection.request(Command("say", {"channel": "c", "text": "hi"}))
            await connection.close()
        return pushes, reply

    pushes, reply = asyncio.run(scenario())
    assert pushes == [{"push": "chat", "channel": "c", "from": "x", "text": "hi"}]
    assert reply == {"re": 1, "ok": True}


def test_a_closed_connection_fails_the_waiting_request_at_once() -> None:
    async def scenario() -> None:
        def handler(request: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
            raise ConnectionResetError

        server, port = await serve(handler)
        async with server:
            connection = await Connection.open("127.0.0.1", port)
            with pytest.raises(ConnectionClosed):
                await connection.request(Command("top", {}), timeout=5)
            with pytest.raises(ConnectionClosed, match="closed"):
                await connection.request(Command("top", {}), timeout=5)
            await connection.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("re", [{"x": 1}, [1], "1", True, 1.5])
def test_a_reply_whose_re_is_no_request_id_ends_the_connection_with_a_clear_error(re: Any) -> None:
    async def scenario() -> None:
        def handler(request: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
            send({"re": re, "ok": True})
            send({"re": request["id"], "ok": True})

        server, port = await serve(handler)
        async with server:
            connection = await Connection.open("127.0.0.1", port)
            with pytest.raises(ConnectionClosed, match="not a request id"):
                await connection.request(Command("top", {}), timeout=5)
            await connection.close()  # the reader ended without an exception of its own

    asyncio.run(scenario())


def test_a_request_without_reply_times_out() -> None:
    async def scenario() -> None:
        server, port = await serve(lambda request, send: None)
        async with server:
            connection = await Connection.open("127.0.0.1", port)
            with pytest.raises(TimeoutError, match="reply to top"):
                await connection.request(Command("top", {}), timeout=0.1)
            await connection.close()

    asyncio.run(scenario())


def test_load_players_loop_until_the_time_is_up_and_measure_the_chat_echo() -> None:
    async def scenario() -> tuple[dict[str, Any], list[str]]:
        seen: list[str] = []

        def handler(request: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
            seen.append(request["op"])
            ok = not (request["op"] == "login" and seen.count("login") == 1)  # the first login: busy
            send({"re": request["id"], "ok": ok})
            if request["op"] == "say":
                send(
                    {
                        "push": "chat",
                        "channel": request["channel"],
                        "from": request["text"].split()[0],
                        "text": request["text"],
                    }
                )

        server, port = await serve(handler)
        async with server:
            summary = await run_load(
                LoadOptions(port=port, players=3, seconds=0.5, max_requests=40),
                out=io.StringIO(),
                tick=0.05,
            )
        return summary, seen

    summary, seen = asyncio.run(scenario())
    ops = summary["ops"]
    assert (summary["connected"], summary["failed_players"]) == (3, 0)
    assert (ops["login"]["count"], ops["login"]["errors"]) == (3, 1)  # the busy one retried
    assert seen.count("join") == 3
    played = sum(ops[op]["count"] for op in ("score", "top", "rank", "say"))
    assert played <= 3 * 40  # --max-requests bounds each player
    assert ops["chat"]["count"] == ops["say"]["count"] > 0
    assert summary["requests"] == played + 4


def test_load_counts_a_request_that_timed_out_as_an_error_of_its_message() -> None:
    """A server that answers logins but never a score: each player's score times out, which is
    an error of ``score`` (it was counted nowhere but as a failed player, 'could not connect or
    lost their connection', and the summary said 0 errors)."""

    async def scenario() -> dict[str, Any]:
        def handler(request: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
            if request["op"] != "score":
                send({"re": request["id"], "ok": True})

        server, port = await serve(handler)
        async with server:
            return await run_load(
                LoadOptions(port=port, players=2, seconds=0.5, max_requests=10, timeout=0.3),
                out=io.StringIO(),
                tick=0.05,
            )

    summary = asyncio.run(scenario())
    assert (summary["ops"]["score"]["errors"], summary["errors"], summary["failed_players"]) == (2, 2, 2)
    assert summary["requests"] == 4  # per player: its login and its score
