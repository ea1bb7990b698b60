"""The =index stage on a real redis-server: settings, replies, Redis down at start or later (error
entries, reconnection with back-off), a wrong password, and the log lines naming stage and URL."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import Logger

from stagetx.codec import pack_py
from stagetx.message import Message, Sender
from stagetx.stages.index.redis_link import parse_url
from stagetx.stages.index.redis_stage import RedisStage
from stagetx.stages.index.stage import Stage
from tests.redis_servers import RedisServer, command, needs_redis
from tests.support import LogCapture, free_port, wait_for

WAIT = 30.0  # reconnection back-off reaches 10 s between attempts


@attrs.define
class Context:
    """The StageContext a host gives, on the real reactor, recording replies and error counts."""

    base_dir: str
    clock: Any = reactor
    stage_id: str = "rank"
    name: str = "=index+rank"
    instance: int = 0
    log: Logger = attrs.Factory(lambda: Logger(namespace="test.index.redis"))
    replies: list[Any] = attrs.Factory(list)
    answered: list[tuple[str, Any]] = attrs.Factory(list)  # (sender's handler, answer)
    errors: int = 0

    def resolve_path(self, path: str) -> str:
        return os.path.join(self.base_dir, path)

    def reply(self, message: Message, *values: Any) -> None:
        if message.reply is not None:  # as the host: no reply address, no reply
            self.replies.append(values[0])

    def reply_all(self, replies: list[tuple[Message, Any]]) -> None:
        for message, value in replies:
            self.reply(message, value)

    def answer_sender(self, message: Message, msgid: str, *values: Any) -> None:
        self.answered.append((msgid, values[0]))

    def count_error(self) -> None:
        self.errors += 1


@attrs.frozen
class Config:
    settings: Any


@pytest.fixture
def context(tmp_path: Path) -> Context:
    return Context(str(tmp_path))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    started = RedisServer(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def _message(request: Any) -> Message:
    return Message("m1", pack_py((request,)), Sender("local", 0, "game", 0), reply="^game")


async def _ask(stage: Any, context: Context, request: Any) -> Any:
    """Send one request; its reply, awaited (the Redis stage answers when the script returns)."""
    before = len(context.replies)
    stage.receive(_message(request))
    stage.turn_ended()  # what the router does after each chunk of messages
    await wait_for(lambda: len(context.replies) > before, WAIT, "the index reply")
    return context.replies[before]


def _settings(url: str, **more: Any) -> dict[str, Any]:
    return {"redis": url, "prefix": f"t{uuid.uuid4().hex[:8]}:", **more}


@asynccontextmanager
async def _running(context: Context, settings: dict[str, Any]) -> AsyncIterator[Any]:
    """An index stage of ``settings``, started; stopped on the way out, whatever the test did."""
    stage = Stage(context, Config(settings))
    await stage.start()
    try:
        yield stage
    finally:
        await stage.stop()


def test_urls_give_hosts_database_service_and_credentials() -> None:
    assert parse_url("redis://127.0.0.1:6380/3")["hosts"] == (("127.0.0.1", 6380),)
    assert parse_url("redis://127.0.0.1:6380/3")["db"] == 3
    fields = parse_url("redis+sentinel://u:p%40ss@10.0.0.1,10.0.0.2:26380/games/1")
    assert fields["hosts"] == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (fields["service"], fields["db"], fields["username"], fields["password"]) == ("games", 1, "u", "p@ss")
    assert parse_url("rediss://[::1]:7000")["hosts"] == (("::1", 7000),)


def test_the_url_in_logs_has_no_password(context) -> None:
    stage = Stage(context, Config({"redis": "redis://:secret@127.0.0.1:1/0"}))
    assert isinstance(stage, RedisStage)
    assert stage.settings.shown_url == "redis://127.0.0.1:1/0"


async def _start_error(log: LogCapture) -> str:
    """The stage's one "cannot use redis" start-up line, once it is logged."""
    await wait_for(lambda: "cannot use redis" in log.text(), WAIT, "the start-up error line")
    return next(line for line in log.text().splitlines() if "cannot use redis" in line)


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_request_table_is_answered_from_redis(context, server) -> None:
    async with _running(context, _settings(server.url)) as stage:
        reply = await _ask(stage, context, {"set:board/2": {"alice": {"v": "A", "i": 10}}, "get:board": ["alice"]})
        assert reply == {
            b"set:board/2": {b"alice": 1},
            b"get:board": {b"alice": {"v": b"A", "I": {2: {"i": 10, "d": 1}}}},
        }
        assert set(await _ask(stage, context, "not a table")) == {"error"}
        reply = await _ask(stage, context, {"set:b/9": {"a": {"i": 1}}, "total:b": True})
        assert set(reply[b"set:b/9"]) == {"error"} and reply[b"total:b"] == 0


@needs_redis
@pytest_twisted.ensureDeferred
async def test_redis_down_at_start_then_up_errors_per_entry_then_answers(context, tmp_path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with LogCapture() as log:
        async with _running(context, _settings(url, timeout=500)) as stage:
            line = await _start_error(log)
            assert "=index+rank" in line and url in line
            reply = await _ask(stage, context, {"set:b": {"a": {"i": 1}}, "total:b": 0, "get:b/7": ["a"]})
            assert reply[b"set:b"] == reply[b"total:b"] == {"error": f"redis: no connection to {url} within 0.5 s"}
            assert reply[b"get:b/7"] == {"error": "the tier must be 1 to 4"}  # checked before Redis
            assert context.errors == 1
            server = RedisServer(tmp_path, sentinel=False, port=port)
            try:
                await wait_for(lambda: stage.link.connected, WAIT, "the reconnection")
                assert (await _ask(stage, context, {"set:b": {"a": {"i": 1}}})) == {b"set:b": {b"a": 1}}
                assert f"boards on redis {url}" in log.text()
            finally:
                server.stop()


@needs_redis
@pytest_twisted.ensureDeferred
async def test_redis_lost_later_errors_then_the_restarted_server_answers(context, tmp_path) -> None:
    server = RedisServer(tmp_path)
    try:
        async with _running(context, _settings(server.url, timeout=500)) as stage:
            await wait_for(lambda: stage.link.connected, WAIT, "the connection")
            assert (await _ask(stage, context, {"set:b": {"a": {"i": 1}}})) == {b"set:b": {b"a": 1}}
            server.kill()
            reply = await _ask(stage, context, {"set:b": {"b": {"i": 2}}, "forEach:b": [1, 5]})
            assert set(reply[b"set:b"]) == {"error"} and set(reply[b"forEach:b"]) == {"error"}
            server = RedisServer(tmp_path, port=server.port)  # an empty server: nothing was saved
            await wait_for(lambda: stage.link.connected, WAIT, "the reconnection")
            assert (await _ask(stage, context, {"set:b": {"b": {"i": 2}}})) == {b"set:b": {b"b": 1}}
    finally:
        server.stop()


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_one_clear_log_line_and_error_replies(context, tmp_path) -> None:
    server = RedisServer(tmp_path, "requirepass right")
    url = f"redis://:wrong@127.0.0.1:{server.port}/0"
    try:
        with LogCapture() as log:
            async with _running(context, _settings(url)) as stage:
                line = await _start_error(log)
                assert "=index+rank" in line and f"redis://127.0.0.1:{server.port}/0" in line and "wrong" not in line
                assert "WRONGPASS" in line or "invalid password" in line
                reply = await _ask(stage, context, {"total:b": 0})
                assert set(reply[b"total:b"]) == {"error"}
    finally:
        server.stop()


@needs_redis
@pytest_twisted.ensureDeferred
async def test_the_tables_of_one_turn_run_as_one_script_and_each_gets_its_own_reply(context, server) -> None:
    async with _running(context, _settings(server.url)) as stage:
        requests = [
            {"set:b": {"a": {"i": 5}, "b": {"i": 5}}},
            {"set:b/0": {"x": {"i": 1}}, "get:b": ["a", "b"]},
            {"#1.del:b": ["a"], "#2.forEach:b": [1, 10], "total:b": 0},
            {"total:nothing": 0},
        ]
        times = stage.receive_batch([_message(request) for request in requests])  # a run, as the router hands it
        assert len(times) == len(requests) and all(time >= 0 for time in times)
        assert context.replies == []  # nothing leaves before the turn's script ran
        stage.turn_ended()
        await wait_for(lambda: len(context.replies) == len(requests), WAIT, "four replies")
        # replies leave in arrival order; each is found by its keys
        first, second, third, fourth = [
            next(reply for reply in context.replies if set(reply) == {key.encode() for key in request})
            for request in requests
        ]
        assert first == {b"set:b": {b"a": 1, b"b": 2}}
        assert second[b"set:b/0"] == {"error": "the tier must be 1 to 4"}
        assert second[b"get:b"] == {b"a": {"I": {1: {"i": 5, "d": 1}}}, b"b": {"I": {1: {"i": 5, "d": 2}}}}
        assert third == {b"#1.del:b": 1, b"#2.forEach:b": [{"k": b"b", "i": 5, "d": 1}], b"total:b": 1}
        assert fourth == {b"total:nothing": 0}


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_turns_script_is_handed_to_the_socket_as_the_turn_ends(context, server, monkeypatch) -> None:
    async with _running(context, _settings(server.url)) as stage:
        await _ask(stage, context, {"set:b": {"x": {"i": 0}}})
        registered: list[Any] = []  # writers the reactor was asked to watch: none for a script the socket took
        add_writer = reactor.addWriter
        monkeypatch.setattr(reactor, "addWriter", lambda writer: (registered.append(writer), add_writer(writer)))
        stage.receive(_message({"set:b": {"y": {"i": 1}}}))
        stage.turn_ended()
        transport = next(conn.transport for conn in stage.link.factory.pool if conn.connected)
        # written now: Redis runs it while the process goes on, not after the reactor's write turn
        assert not transport.dataBuffer and not transport._tempDataBuffer
        assert transport._transport not in registered
        await wait_for(lambda: len(context.replies) == 2, WAIT, "the second reply")
        assert context.replies[1] == {b"set:b": {b"y": 1}}


@needs_redis
@pytest_twisted.ensureDeferred
async def test_turns_sent_back_to_back_run_in_order_also_after_redis_lost_the_script(context, server) -> None:
    async with _running(context, _settings(server.url)) as stage:
        await _ask(stage, context, {"set:b": {"x": {"i": 0}}})  # the connection now runs it by hash
        assert command(server.port, "SCRIPT", "FLUSH").startswith(b"+OK")
        before = len(context.replies)
        for score in (1, 2, 3):  # three turns in flight at once, each a script run of its own
            stage.receive(_message({"set:b": {"x": {"i": score}}, "get:b": ["x"]}))
            stage.turn_ended()
        await wait_for(lambda: len(context.replies) == before + 3, WAIT, "three replies")
        assert [reply[b"get:b"][b"x"]["I"][1]["i"] for reply in context.replies[before:]] == [1, 2, 3]


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A certificate authority and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    days = datetime.timedelta(days=1)

    def issue(subject: str, key: Any, issuer: Any, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - days)
            .not_valid_after(now + days)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stagetx test CA")])
    ca_cert = issue("stagetx test CA", ca_key, ca_name, ca_key, True)
    server_cert = issue("127.0.0.1", server_key, ca_name, ca_key, False)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@needs_redis
@pytest_twisted.ensureDeferred
async def test_rediss_talks_tls_to_a_server_signed_by_the_configured_ca(context, tmp_path) -> None:
    ca, cert, key = _certificates(tmp_path)
    server = RedisServer(tmp_path, tls=(cert, key, ca))
    url = f"rediss://127.0.0.1:{server.port}/0"
    try:
        async with _running(context, _settings(url, ca="ca.pem")) as stage:  # relative to the config's directory
            assert (await _ask(stage, context, {"set:b": {"a": {"i": 3}}})) == {b"set:b": {b"a": 1}}
        with LogCapture() as log:  # without the CA, the system's authorities do not know this server
            async with _running(context, _settings(url)) as stage:
                await _start_error(log)
                assert set((await _ask(stage, context, {"total:b": 0}))[b"total:b"]) == {"error"}
    finally:
        server.stop()


@needs_redis
@pytest_twisted.ensureDeferred
async def test_the_callback_and_direct_forms_are_answered_as_by_the_embedded_board(context, server) -> None:
    """``"rank:callback"`` → the sender's ``waitfor("callback")``; ``"rank:s?board"`` runs one
    command and answers nothing; ``"rank:t?board=total_cb"`` answers the command's own result to the
    reply address, ``"rank:get_cb=g?board"`` to the sender's handler (docs/lua-api.md)."""
    async with _running(context, _settings(server.url, pool=1)) as stage:  # one connection: scripts run in order

        async def sent(msgid: str, reply: str | None, value: Any) -> None:
            before = len(context.replies) + len(context.answered)
            address = None if reply is None else f"^local/0/{reply}"
            stage.receive(Message(msgid, pack_py((value,)), Sender("local", 0, "game", 0), reply=address))
            stage.turn_ended()
            if msgid != "s?board":
                await wait_for(lambda: len(context.replies) + len(context.answered) > before, WAIT, "the answer")

        await sent("callback", None, {"set:board": {"a": {"i": 5}}, "total:board": 0})
        assert context.answered == [("callback", {b"set:board": {b"a": 1}, b"total:board": 1})]
        await sent("s?board", None, {"KR1": {"i": 10, "v": "x"}, "KR2": {"i": 20}})
        await sent("t?board", "total_cb", 0)  # after the s?board script, on the same connection
        assert context.replies[-1] == 3
        await sent("get_cb", "g?board", "KR1")
        assert context.answered[-1] == ("get_cb", {b"KR1": {"v": b"x", "I": {1: {"i": 10, "d": 2}}}})
        await sent("d?board", "deleted", "KR2")
        assert context.replies[-1] == 1
