"""The curl stage against a real twisted.web server on 127.0.0.1, HTTP and HTTPS, real sockets."""

from __future__ import annotations

import datetime
import functools
import gzip
import ipaddress
import json
import os
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from stagetx.message import Message, Sender
from stagetx.stages.curl.stage import Stage

BIG = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB


@functools.cache
def gzip_bomb() -> bytes:
    """64 MiB of zeros gzip-compressed: about 64 KiB on the wire."""
    return gzip.compress(bytes(64 << 20), compresslevel=9)


WAIT = 10.0  # seconds any reply may take before the test fails


class RecordingContext:
    """A StageContext on the real reactor that records replies and lets a test await them."""

    stage_id = "agent"
    name = "=curl+agent"
    instance = 0

    def __init__(self, base_dir: str = "/") -> None:
        self.clock = reactor
        self.log = Logger(namespace="test.curl")
        self.base_dir = base_dir
        self.replies: list[dict[str, Any]] = []
        self.errors = 0
        self._waiting: list[tuple[int, defer.Deferred[list[dict[str, Any]]]]] = []

    def count_error(self) -> None:
        self.errors += 1

    def resolve_path(self, path: str) -> str:
        return str(Path(self.base_dir, path))

    def reply(self, message: Message, *values: Any) -> None:
        (reply,) = values
        self.replies.append(reply)
        for count, d in list(self._waiting):
            if len(self.replies) >= count:
                self._waiting.remove((count, d))
                d.callback(self.replies)

    answer = reply  # the host's choice between reply address and sender's handler: test_stage_compat

    def send(self, target: str, *values: Any) -> tuple[bool, str | None]:
        return False, "not used"

    def replies_count(self, count: int) -> defer.Deferred[list[dict[str, Any]]]:
        d: defer.Deferred[list[dict[str, Any]]] = defer.Deferred()
        if len(self.replies) >= count:
            d.callback(self.replies)
        else:
            self._waiting.append((count, d))
        return d.addTimeout(WAIT, reactor)


def request(**fields: Any) -> Message:
    """A message as a Lua stage's ``stage.signal("agent:cb=reply", {...})`` arrives."""
    table: dict[Any, Any] = {}
    for key, value in fields.items():
        table[1 if key == "url" else key.encode()] = value.encode() if isinstance(value, str) else value
    return Message("agent:cb", b"", Sender("s1", 0, "stage", 0), reply="^r", values=(table,))


class Hold(Resource):
    """Answers after ``delay`` seconds; records how many requests were open at once."""

    isLeaf = True

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.open = 0
        self.most = 0
        self.served = 0

    def render(self, request: server.Request) -> object:
        self.open += 1
        self.most = max(self.most, self.open)

        def finish() -> None:
            self.open -= 1
            self.served += 1
            request.write(b"held")
            request.finish()

        reactor.callLater(self.delay, finish)
        return server.NOT_DONE_YET


class Endless:
    """A chunked body that never ends: 256 KiB every 10 ms until the client hangs up.

    Paced, so that a client without a size bound grows by a few MiB per second, not by GiB.
    """

    def __init__(self, request: server.Request) -> None:
        self.request = request
        self.sent = 0
        self.hung_up: defer.Deferred[None] = defer.Deferred()
        self.writer = task.LoopingCall(self.write)
        request.notifyFinish().addBoth(self.stop)
        self.writer.start(0.01)

    def write(self) -> None:
        self.request.write(b"x" * 256 * 1024)
        self.sent += 256 * 1024

    def stop(self, _: object) -> None:
        if self.writer.running:
            self.writer.stop()
        self.hung_up.callback(None)


class App(Resource):
    """The test server: one behaviour per path."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hold = Hold(0.03)
        self.stalled: list[server.Request] = []
        self.endless: list[Endless] = []

    def render(self, request: server.Request) -> object:
        path = request.path.decode()
        if path.startswith("/status/"):
            request.setResponseCode(int(path.rsplit("/", 1)[1]))
            return b"status body"
        if path == "/hop1":
            request.addCookie(b"hop", b"one", path=b"/")
            request.redirect(b"/hop2")
            return b""
        if path == "/loop":
            request.redirect(b"/loop")
            return b""
        if path == "/to-ftp":
            request.redirect(b"ftp://127.0.0.1/file")
            return b""
        if path == "/hop2":
            request.redirect(b"/echo")
            return b""
        if path == "/login":
            request.addCookie(b"sid", b"s3cr3t", path=b"/")
            request.addCookie(b"lang", b"ko", path=b"/")
            return b"welcome"
        if path == "/deep/jar":  # a cookie without attributes, set twice; one with several
            request.responseHeaders.addRawHeader(b"set-cookie", b"plain=1")
            request.responseHeaders.addRawHeader(b"set-cookie", b"kept=2; Path=/; HttpOnly; Max-Age=3600")
            request.responseHeaders.addRawHeader(b"set-cookie", b"plain=3")
            return b"jar"
        if path == "/echo":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {
                    "method": request.method.decode(),
                    "body": request.content.read().decode("latin-1"),
                    "headers": {
                        k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()
                    },
                    "cookies": {k.decode(): v.decode() for k, v in request.received_cookies.items()},
                }
            ).encode()
        if path == "/json":
            request.setHeader(b"content-type", b"application/json; charset=utf-8")
            return json.dumps({"name": "스테이지", "n": 1}).encode()
        if path == "/big":
            request.setHeader(b"content-type", b"application/octet-stream")
            return BIG
        if path == "/trickle":  # headers and a little body, then nothing
            request.setHeader(b"content-length", b"1000")
            request.write(b"first bytes")
            self.stalled.append(request)
            return server.NOT_DONE_YET
        if path == "/drip":  # a body of 1000 bytes, one byte every 20 ms
            request.setHeader(b"content-length", b"1000")
            drip = task.LoopingCall(request.write, b".")
            request.notifyFinish().addBoth(lambda _: drip.stop())
            drip.start(0.02)
            self.stalled.append(request)
            return server.NOT_DONE_YET
        if path == "/silent":  # not even headers
            self.stalled.append(request)
            return server.NOT_DONE_YET
        if path == "/endless":
            self.endless.append(Endless(request))
            return server.NOT_DONE_YET
        if path == "/headers":  # 200 KiB of header lines
            for n in range(2000):
                request.responseHeaders.addRawHeader(b"x-pad-%d" % n, b"a" * 90)
            return b"many"
        if path == "/hold":
            return self.hold.render(request)
        if path in ("/gzip", "/bomb"):  # a small JSON body, or 64 MiB of zeros, gzip-encoded
            request.setHeader(b"content-encoding", b"gzip")
            return gzip_bomb() if path == "/bomb" else gzip.compress(json.dumps({"zipped": True}).encode())
        request.setResponseCode(404)
        return b"no such path"


class Harness:
    """A server on 127.0.0.1:0, and a started curl stage."""

    def __init__(self, port: IListeningPort, app: App, base_dir: str) -> None:
        self.port = port
        self.app = app
        self.base_dir = base_dir
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.stages: list[Stage] = []

    def stage(self, settings: dict[str, Any] | None = None) -> tuple[Stage, RecordingContext]:
        context = RecordingContext(self.base_dir)
        stage = Stage(context, settings)
        stage.start()
        self.stages.append(stage)
        return stage, context

    async def ask(self, settings: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        stage, context = self.stage(settings)
        stage.receive(request(**fields))
        (reply,) = await context.replies_count(1)
        return reply

    async def close(self) -> None:
        for stage in self.stages:
            await defer.maybeDeferred(stage.stop).addTimeout(WAIT, reactor)
        for request in self.app.stalled:
            if request.channel is not None:  # None once the client has hung up
                request.channel.transport.abortConnection()
        for endless in self.app.endless:
            if endless.writer.running:
                endless.request.channel.transport.abortConnection()
        await defer.maybeDeferred(self.port.stopListening).addTimeout(WAIT, reactor)


@pytest_twisted.async_yield_fixture
async def web(tmp_path: Path) -> AsyncIterator[Harness]:
    app = App()
    port = reactor.listenTCP(0, server.Site(app), interface="127.0.0.1")
    harness = Harness(port, app, str(tmp_path))
    yield harness
    await harness.close()


@pytest_twisted.ensureDeferred
async def test_get_returns_status_body_and_timing(web: Harness) -> None:
    reply = await web.ask(url=f"{web.url}/status/201", extra={b"player": 7})
    assert reply["status"] == 201
    assert reply["url"] == reply["effective_url"] == f"{web.url}/status/201"
    assert reply["redirect_url"] is None
    assert reply["extra"] == {b"player": 7}
    data = reply["data"]
    assert (data["result"], data["content"], data["length"]) == (0, b"status body", 11)
    assert data["type"].startswith("text/html") and data["time"] > 0


@pytest.mark.parametrize("code", [404, 500, 503])
@pytest_twisted.ensureDeferred
async def test_error_statuses_are_answers(web: Harness, code: int) -> None:
    reply = await web.ask(url=f"{web.url}/status/{code}")
    assert (reply["status"], reply["data"]["result"]) == (code, 0)


@pytest_twisted.ensureDeferred
async def test_redirects_are_followed_with_their_cookies(web: Harness) -> None:
    reply = await web.ask(url=f"{web.url}/hop1")
    assert reply["status"] == 200
    assert reply["redirect_url"] == reply["effective_url"] == f"{web.url}/echo"
    assert reply["cookie"] == {1: "127.0.0.1\tFALSE\t/\tFALSE\t0\thop\tone", "hop": "one"}
    assert json.loads(reply["data"]["content"])["cookies"] == {"hop": "one"}


@pytest_twisted.ensureDeferred
async def test_the_cookie_array_lists_each_cookie_as_curls_cookie_list_does(web: Harness) -> None:
    """The document's ``cookie`` array (the original's ``CURLINFO_COOKIELIST``): one Netscape
    cookie-file line per cookie, the default path the request's directory, a cookie set again
    replaced in place, ``#HttpOnly_`` and ``Max-Age``'s expiry time; the values by name too."""
    before = int(time.time())
    reply = await web.ask(url=f"{web.url}/deep/jar")
    cookie = reply["cookie"]
    assert set(cookie) == {1, 2, "plain", "kept"}
    assert (cookie["plain"], cookie["kept"]) == ("3", "2")
    assert cookie[1] == "127.0.0.1\tFALSE\t/deep\tFALSE\t0\tplain\t3"
    domain, tailmatch, path, secure, expires, name, value = cookie[2].split("\t")
    assert (domain, tailmatch, path, secure, name, value) == ("#HttpOnly_127.0.0.1", "FALSE", "/", "FALSE", "kept", "2")
    assert before + 3600 <= int(expires) <= int(time.time()) + 3600


@pytest_twisted.ensureDeferred
async def test_cookies_set_by_the_server_are_sent_back_by_the_same_stage(web: Harness) -> None:
    stage, context = web.stage()
    stage.receive(request(url=f"{web.url}/login"))
    (login,) = await context.replies_count(1)
    assert login["cookie"] == {
        1: "127.0.0.1\tFALSE\t/\tFALSE\t0\tsid\ts3cr3t",
        2: "127.0.0.1\tFALSE\t/\tFALSE\t0\tlang\tko",
        "sid": "s3cr3t",
        "lang": "ko",
    }
    stage.receive(request(url=f"{web.url}/echo"))
    _, echo = await context.replies_count(2)
    assert json.loads(echo["data"]["content"])["cookies"] == {"sid": "s3cr3t", "lang": "ko"}
    assert echo["cookie"] == {}  # the echo response set none
    other = await web.ask(url=f"{web.url}/echo")  # another stage has its own jar
    assert json.loads(other["data"]["content"])["cookies"] == {}


@pytest_twisted.ensureDeferred
async def test_post_form_table(web: Harness) -> None:
    reply = await web.ask(url=f"{web.url}/echo", data={b"user": "홍길동".encode(), b"score": 10})
    seen = json.loads(reply["data"]["content"])
    assert seen["method"] == "POST"
    assert seen["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert parse_qs(seen["body"].encode("latin-1").decode()) == {
        "user": ["홍길동"],
        "score": ["10"],
    }


@pytest_twisted.ensureDeferred
async def test_post_raw_body_with_own_headers(web: Harness) -> None:
    body = '{"item": 3}'
    reply = await web.ask(
        {"user-agent": "game-server/1.0"},
        url=f"{web.url}/echo",
        data=body,
        header={b"Content-Type": b"application/json", b"X-Request-Id": 42},
    )
    seen = json.loads(reply["data"]["content"])
    assert (seen["method"], seen["body"]) == ("POST", body)
    assert seen["headers"]["content-type"] == "application/json"
    assert seen["headers"]["x-request-id"] == "42"
    assert seen["headers"]["user-agent"] == "game-server/1.0"


@pytest_twisted.ensureDeferred
async def test_json_reply_type_and_charset(web: Harness) -> None:
    reply = await web.ask(url=f"{web.url}/json")
    data = reply["data"]
    assert (data["type"], data["charset"]) == ("application/json; charset=utf-8", "utf-8")
    assert json.loads(data["content"]) == {"name": "스테이지", "n": 1}


@pytest_twisted.ensureDeferred
async def test_large_body_arrives_whole(web: Harness) -> None:
    reply = await web.ask(url=f"{web.url}/big")
    data = reply["data"]
    assert data["length"] == len(BIG) == 5 * 1024 * 1024
    assert data["content"] == BIG
    assert data["download_speed"] > 0


@pytest_twisted.ensureDeferred
async def test_an_endless_body_stops_at_the_default_max_size_with_63(web: Harness) -> None:
    """Without a bound the body grew in memory until the timeout; now the download stops."""
    reply = await web.ask({"timeout": 3000}, url=f"{web.url}/endless", extra=b"x")
    data = reply["data"]
    assert (reply["status"], data["result"], data["content"], reply["extra"]) == (0, 63, b"", b"x")
    assert str(8 * 1024 * 1024) in data["message"]
    (endless,) = web.app.endless
    await endless.hung_up.addTimeout(WAIT, reactor)  # the stage dropped the connection
    assert endless.sent < 64 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_a_body_announced_longer_than_max_size_is_not_read(web: Harness) -> None:
    stage, context = web.stage({"max-size": 1024 * 1024})
    stage.receive(request(url=f"{web.url}/big"))
    stage.receive(request(url=f"{web.url}/json"))  # a body under the limit still arrives
    replies = await context.replies_count(2)
    big, small = sorted(replies, key=lambda r: r["effective_url"])
    assert (big["status"], big["data"]["result"], big["data"]["length"]) == (0, 63, 0)
    assert "1048576" in big["data"]["message"]
    assert (small["status"], small["data"]["result"]) == (200, 0)


@pytest_twisted.ensureDeferred
async def test_a_gzip_body_is_decoded_and_one_inflating_past_max_size_never_sits_in_memory(web: Harness) -> None:
    """Twisted's decoder inflated each received chunk whole: 64 KiB of a gzip bomb became 64 MiB
    at once before ``max-size`` could stop it. Now it inflates 64 KiB at a time and stops."""
    gzip_bomb()  # made before memory is traced
    stage, context = web.stage({"max-size": 1024 * 1024})
    tracemalloc.start()
    try:
        stage.receive(request(url=f"{web.url}/bomb"))
        (bomb,) = await context.replies_count(1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (bomb["status"], bomb["data"]["result"]) == (0, 63) and "1048576" in bomb["data"]["message"]
    assert peak < 16 << 20, peak
    stage.receive(request(url=f"{web.url}/gzip"))
    (_, zipped) = await context.replies_count(2)
    assert (zipped["status"], zipped["data"]["result"]) == (200, 0)
    assert json.loads(zipped["data"]["content"]) == {"zipped": True}


@pytest.mark.parametrize("path", ["/trickle", "/silent", "/drip"])
@pytest_twisted.ensureDeferred
async def test_slow_response_times_out_with_28_and_its_connection_is_dropped(web: Harness, path: str) -> None:
    reply = await web.ask({"timeout": 10000}, url=f"{web.url}{path}", timeout=300, extra=b"x")
    data = reply["data"]
    assert (reply["status"], data["result"], reply["extra"]) == (0, 28, b"x")
    assert 0.25 < data["time"] < 5.0
    assert "300" in data["message"]
    (held,) = web.app.stalled
    await held.notifyFinish().addErrback(lambda _: None).addTimeout(WAIT, reactor)  # hung up


@pytest_twisted.ensureDeferred
async def test_refused_port_gives_7(web: Harness) -> None:
    closed = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    port = closed.getHost().port
    await closed.stopListening()
    stage, context = web.stage()
    stage.receive(request(url=f"http://127.0.0.1:{port}/"))
    (reply,) = await context.replies_count(1)
    assert (reply["status"], reply["data"]["result"]) == (0, 7)
    assert context.errors == 1
    assert reply["data"]["message"]


class Answers(Protocol):
    """A server that is not HTTP: the same bytes for any request, then it hangs up."""

    answer = b""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(self.answer)
            self.transport.loseConnection()


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"garbage\r\n\r\n", "wrong number of parts: garbage"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "non-integer status code: HTTP/1.1 abc OK"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 2\r\n\r\nok", ""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: xx\r\n\r\nok", "xx"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_reply_that_is_not_http_gives_8_and_the_stage_goes_on(web: Harness, answer: bytes, said: str) -> None:
    """Once 56, the number of a connection broken mid-body, with no word of what was wrong."""
    fixed = type("Fixed", (Answers,), {"answer": answer})
    weird = reactor.listenTCP(0, Factory.forProtocol(fixed), interface="127.0.0.1")
    try:
        stage, context = web.stage()
        stage.receive(request(url=f"http://127.0.0.1:{weird.getHost().port}/"))
        (reply,) = await context.replies_count(1)
    finally:
        await weird.stopListening()
    assert (reply["status"], reply["data"]["result"]) == (0, 8)
    assert reply["data"]["message"].startswith("Weird server reply: ") and said in reply["data"]["message"]
    stage.receive(request(url=f"{web.url}/json"))
    _, good = await context.replies_count(2)
    assert (good["status"], good["data"]["result"]) == (200, 0)


class EndlessHead(Protocol):
    """A status line, then header lines without end: 100 KiB every 10 ms until the client hangs up."""

    def connectionMade(self) -> None:
        self.hung_up: defer.Deferred[None] = defer.Deferred()
        self.writer = task.LoopingCall(self.transport.write, (b"X-Pad: " + b"a" * 95 + b"\r\n") * 1000)
        self.factory.heads.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and not self.writer.running:
            self.transport.write(b"HTTP/1.1 200 OK\r\n")
            self.writer.start(0.01)

    def connectionLost(self, reason: object = None) -> None:
        if self.writer.running:
            self.writer.stop()
        self.hung_up.callback(None)


@pytest_twisted.ensureDeferred
async def test_endless_header_lines_stop_at_300_kib_with_56(web: Harness) -> None:
    """Twisted bounds each header line, not their number: the head grew in memory until the
    timeout; now the stage drops the connection past curl's 300 KiB."""
    factory = Factory.forProtocol(EndlessHead)
    factory.heads = []  # type: ignore[attr-defined]
    endless = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        reply = await web.ask({"timeout": 3000}, url=f"http://127.0.0.1:{endless.getHost().port}/")
        (head,) = factory.heads  # type: ignore[attr-defined]
        await head.hung_up.addTimeout(WAIT, reactor)
    finally:
        await endless.stopListening()
    data = reply["data"]
    assert (reply["status"], data["result"]) == (0, 56)
    assert data["message"].startswith("Too large response headers") and data["time"] < 2.5
    big = await web.ask(url=f"{web.url}/headers")  # 200 KiB of headers are still read
    assert (big["status"], big["data"]["result"], big["data"]["content"]) == (200, 0, b"many")


@pytest.mark.parametrize(("target", "code"), [("/loop", 47), ("/to-ftp", 1), ("http://no-such-host.invalid/", 6)])
@pytest_twisted.ensureDeferred
async def test_redirect_loops_other_schemes_and_unknown_hosts_are_errors(web: Harness, target: str, code: int) -> None:
    stage, context = web.stage()
    stage.receive(request(url=target if "://" in target else f"{web.url}{target}"))
    stage.receive(request(url=f"{web.url}/json"))  # the stage goes on serving
    replies = await context.replies_count(2)
    (failed,) = [r for r in replies if r["data"]["result"] != 0]
    assert (failed["status"], failed["data"]["result"]) == (0, code) and failed["data"]["message"]
    assert [r["status"] for r in replies if r is not failed] == [200]


@pytest.mark.parametrize(
    ("url", "code"), [("http://127.0.0.1:99999/", 3), ("http:// bad/", 3), ("ftp://127.0.0.1/", 1)]
)
@pytest_twisted.ensureDeferred
async def test_bad_urls(web: Harness, url: str, code: int) -> None:
    reply = await web.ask(url=url, extra=[1, 2])
    assert (reply["status"], reply["data"]["result"], reply["extra"]) == (0, code, [1, 2])


@pytest_twisted.ensureDeferred
async def test_concurrency_limit_is_respected(web: Harness) -> None:
    stage, context = web.stage({"concurrency": 3})
    for n in range(12):
        stage.receive(request(url=f"{web.url}/hold", extra=n))
    replies = await context.replies_count(12)
    assert sorted(r["extra"] for r in replies) == list(range(12))
    assert all(r["status"] == 200 for r in replies)
    assert web.app.hold.most == 3
    assert web.app.hold.served == 12


@pytest_twisted.ensureDeferred
async def test_without_a_limit_requests_run_together(web: Harness) -> None:
    stage, context = web.stage()
    for n in range(6):
        stage.receive(request(url=f"{web.url}/hold", extra=n))
    await context.replies_count(6)
    assert web.app.hold.most == 6


@pytest_twisted.ensureDeferred
async def test_requests_to_one_host_are_bounded_by_per_host(web: Harness) -> None:
    """Without a bound, every request to a slow host opened a connection of its own."""
    stage, context = web.stage()
    for n in range(200):
        stage.receive(request(url=f"{web.url}/hold", extra=n))
    replies = await context.replies_count(200)
    assert sorted(r["extra"] for r in replies) == list(range(200))
    assert {r["status"] for r in replies} == {200}
    assert web.app.hold.most == 32  # the default per-host
    assert web.app.hold.served == 200


@pytest_twisted.ensureDeferred
async def test_a_slow_host_does_not_hold_up_requests_to_another(web: Harness) -> None:
    """With one queue for all, the stage's slots all went to the slow host's requests and the
    fast host's request waited behind every one of them."""
    web.app.hold.delay = 0.1
    fast = reactor.listenTCP(0, server.Site(App()), interface="127.0.0.1")
    try:
        stage, context = web.stage({"concurrency": 4, "per-host": 2})
        for n in range(20):
            stage.receive(request(url=f"{web.url}/hold", extra=n))
        stage.receive(request(url=f"http://127.0.0.1:{fast.getHost().port}/json", extra="fast"))
        replies = await context.replies_count(21)
    finally:
        await fast.stopListening()
    assert [r["extra"] for r in replies].index(b"fast") < 4
    assert web.app.hold.most == 2
    assert {r["status"] for r in replies} == {200}


@pytest_twisted.ensureDeferred
async def test_ipv6_loopback_url(web: Harness) -> None:
    try:
        port = reactor.listenTCP(0, server.Site(web.app), interface="::1")
    except Exception as e:  # CannotListenError and friends: no IPv6 on this host
        pytest.skip(f"no IPv6 loopback: {e}")
    url = f"http://[::1]:{port.getHost().port}/json"
    try:
        reply = await web.ask(url=url)
    finally:
        await port.stopListening()
    assert (reply["status"], reply["data"]["result"], reply["effective_url"]) == (200, 0, url)


# --- HTTPS ------------------------------------------------------------------------------------


def self_signed(names: list[str], ips: list[str]) -> tuple[bytes, bytes]:
    """A certificate (PEM) for ``names``/``ips`` and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def https_ask(web: Harness, names: list[str], ips: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    cert, key = self_signed(names, ips)
    Path(web.base_dir, "ca.pem").write_bytes(cert)
    options = ssl.PrivateCertificate.loadPEM(cert + key).options()
    port = reactor.listenSSL(0, server.Site(web.app), options, interface="127.0.0.1")
    try:
        return await web.ask(settings, url=f"https://127.0.0.1:{port.getHost().port}/json")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_https_with_a_trusted_ca_file(web: Harness) -> None:
    reply = await https_ask(web, ["localhost"], ["127.0.0.1"], {"ca-file": "ca.pem"})
    assert (reply["status"], reply["data"]["result"]) == (200, 0)
    assert json.loads(reply["data"]["content"])["n"] == 1


@pytest_twisted.ensureDeferred
async def test_https_refuses_an_untrusted_certificate_by_default(web: Harness) -> None:
    reply = await https_ask(web, ["localhost"], ["127.0.0.1"], {})
    assert (reply["status"], reply["data"]["result"]) == (0, 60)


@pytest_twisted.ensureDeferred
async def test_https_refuses_a_certificate_for_another_host(web: Harness) -> None:
    reply = await https_ask(web, ["other.example"], [], {"ca-file": "ca.pem"})
    assert (reply["status"], reply["data"]["result"]) == (0, 60)


@pytest_twisted.ensureDeferred
async def test_https_without_verification_when_configured(web: Harness) -> None:
    reply = await https_ask(web, ["other.example"], [], {"verify": False})
    assert (reply["status"], reply["data"]["result"]) == (200, 0)


# --- from a Lua stage in another process ------------------------------------------------------

LUA_CLIENT = """
stage.waitfor("web.reply", function (r)
    log4cxx.info("CURLREPLY", r.extra.tag, r.status, r.data.result, r.cookie.sid or "-",
                 r.data.content)
    if r.extra.tag == "login" then  -- the session cookie is in the curl stage's jar now
        stage.signal("agent:go=web.reply", {process["$base"] .. "/echo", data = {user = "kim"},
                                            extra = {tag = "echo"}})
    end
end)
local requests = {
    {process["$base"] .. "/login", extra = {tag = "login"}},
    {url = process["$refused"], extra = {tag = "refused"}},
}
stage.addtask(100, function ()
    while #requests > 0 do
        if not stage.signal("agent:go=web.reply", requests[1]) then
            return 100  -- the curl process is not linked yet: try again
        end
        table.remove(requests, 1)
    end
end)
"""


class TwistdOutput(ProcessProtocol):
    """Collects ``CURLREPLY`` log lines of a ``twistd stage`` run; fires ``ended`` at exit."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.text = b""
        self.replies: dict[str, list[str]] = {}
        self.got: defer.Deferred[dict[str, list[str]]] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.text += data
        for line in self.text.decode("utf-8", "replace").splitlines():
            if "CURLREPLY\t" in line:
                fields = line.split("CURLREPLY\t", 1)[1].split("\t")
                self.replies[fields[0]] = fields[1:]
        if len(self.replies) >= self.wanted and not self.got.called:
            self.got.callback(self.replies)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


async def run_twistd(tmp_path: Path, config: dict[str, Any], script: str, wanted: int, timeout: float) -> TwistdOutput:
    """``twistd -n stage`` with ``config`` and ``lua/client.lua``, until its Lua client logged
    ``wanted`` ``CURLREPLY`` lines; then stopped (SIGTERM, SIGKILL if it hangs)."""
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "client.lua").write_text(script)
    (tmp_path / "stage.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    twistd = "from twisted.scripts.twistd import run; run()"
    argv = [sys.executable, "-c", twistd, "-n", "--pidfile=", "stage", "-c", "stage.json"]
    output = TwistdOutput(wanted)
    process = reactor.spawnProcess(output, sys.executable, argv, env=env, path=str(tmp_path))
    try:
        await output.got.addTimeout(timeout, reactor)
    finally:
        if not output.ended.called:
            process.signalProcess("TERM")
        try:
            await output.ended.addTimeout(20, reactor)
        except defer.TimeoutError:
            process.signalProcess("KILL")
    return output


@pytest_twisted.ensureDeferred
async def test_lua_stage_in_another_process_uses_the_curl_stage(web: Harness, tmp_path: Path) -> None:
    closed = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    refused = f"http://127.0.0.1:{closed.getHost().port}/"
    await closed.stopListening()
    config = {
        "#startup": [["=curl+agent"], ["=lua+client"]],
        "=curl+agent": {"user-agent": "e2e", "timeout": 5000},
        "=lua+client": {"%package": ["[0]lua"], "=lua+client": "client"},
        "base": web.url,
        "refused": refused,
    }
    replies = (await run_twistd(tmp_path, config, LUA_CLIENT, wanted=3, timeout=60)).replies
    assert replies["login"][:3] == ["200", "0", "s3cr3t"]
    assert replies["refused"][:3] == ["0", "7", "-"]
    status, result, _, content = replies["echo"]
    assert (status, result) == ("200", "0")
    seen = json.loads(content)
    assert (seen["method"], seen["body"]) == ("POST", "user=kim")
    assert seen["cookies"] == {"sid": "s3cr3t", "lang": "ko"}  # kept by the curl stage
    assert seen["headers"]["user-agent"] == "e2e"


LUA_BURST = """
local got, failed = 0, 0
stage.waitfor("web.reply", function (r)
    got = got + 1
    if r.status ~= 200 or r.data.result ~= 0 then failed = failed + 1 end
    if got == 1 then error("first reply refused") end  -- logged; the stage goes on
    if got == 2000 then log4cxx.info("CURLREPLY", "burst", got, failed) end
end)
stage.addtask(100, function ()
    if not stage.signal("agent:go=web.reply", {process["$base"] .. "/hold", extra = 0}) then
        return 100  -- the curl process is not linked yet: try again
    end
    for i = 1, 1999 do
        stage.signal("agent:go=web.reply", {process["$base"] .. "/hold", extra = i})
    end
end)
"""


@pytest_twisted.ensureDeferred
async def test_a_lua_burst_of_2000_requests_to_a_slow_host_is_bounded_and_all_answered(
    web: Harness, tmp_path: Path
) -> None:
    """2,000 requests from one Lua callback: never more than the default per-host 32 open at the
    server, every reply delivered, and a handler that raises is logged with its file and line."""
    config = {
        "#startup": [["=curl+agent"], ["=lua+client"]],
        "=lua+client": {"%package": ["[0]lua"], "=lua+client": "client"},
        "base": web.url,
    }
    output = await run_twistd(tmp_path, config, LUA_BURST, wanted=1, timeout=90)
    assert output.replies["burst"][:2] == ["2000", "0"]
    assert web.app.hold.most == 32 and web.app.hold.served == 2000
    assert b"lua/client.lua:6: first reply refused" in output.text
