"""The curl stage over in-memory HTTP (treq's StubTreq) and fake time: requests, replies, errors."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import pytest
from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web._newclient import ParseError, ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource

from stagetx.message import Message, Sender
from stagetx.stages.curl import errors
from stagetx.stages.curl.request import BadRequest, parse_request
from stagetx.stages.curl.response import BodyTooLarge
from stagetx.stages.curl.settings import CurlSettings, parse_settings, wrong_setting
from stagetx.stages.curl.stage import HostSlots, Stage


class FakeContext:
    """A StageContext that records replies."""

    stage_id = "agent"
    name = "=curl+agent"
    instance = 0
    base_dir = "/etc/stagetx"

    def __init__(self) -> None:
        self.clock = Clock()
        self.log = Logger(namespace="test.curl")
        self.replies: list[tuple[Message, tuple[Any, ...]]] = []
        self.errors = 0

    def count_error(self) -> None:
        self.errors += 1

    def resolve_path(self, path: str) -> str:
        return f"{self.base_dir}/{path}"

    def reply(self, message: Message, *values: Any) -> None:
        self.replies.append((message, values))

    def answer(self, message: Message, *values: Any) -> None:
        """The host's rule (reply address, else the sender's handler) is tested in e2e."""
        self.replies.append((message, values))

    def send(self, target: str, *values: Any) -> tuple[bool, str | None]:
        return False, "not used"

    def only_reply(self) -> dict[str, Any]:
        assert len(self.replies) == 1, self.replies
        (reply,) = self.replies[0][1]
        return reply


def msg(*values: Any, msgid: str = "agent:cb") -> Message:
    return Message(msgid, b"", Sender("s1", 0, "stage", 0), reply="^r1", values=values)


class Recorder(Resource):
    """Answers every request with a fixed body and records what it was sent."""

    isLeaf = True

    def __init__(self, body: bytes = b"hello", ctype: bytes = b"text/plain; charset=EUC-KR") -> None:
        super().__init__()
        self.body = body
        self.ctype = ctype
        self.seen: list[dict[str, Any]] = []

    def render(self, request: server.Request) -> bytes:
        self.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "body": request.content.read(),
                "headers": {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
                "cookies": dict(request.received_cookies),
            }
        )
        request.setHeader(b"content-type", self.ctype)
        return self.body


def make_stage(resource: Resource, settings: Any = None) -> tuple[Stage, FakeContext, StubTreq]:
    context = FakeContext()
    stub = StubTreq(resource)
    stage = Stage(context, settings, client=stub)
    stage.start()
    return stage, context, stub


# --- request rules (pure) -------------------------------------------------------------------


def test_url_may_be_the_array_part_a_sequence_or_a_named_field() -> None:
    settings = CurlSettings()
    for values in [
        ({1: b"http://a.example/x", b"extra": 5},),
        ([b"http://a.example/x"],),
        ({b"url": b"http://a.example/x"},),
        (b"http://a.example/x",),
    ]:
        request = parse_request(values, settings)
        assert request.target.to_text() == "http://a.example/x"
        assert request.method == "GET"


def test_url_without_scheme_is_http_as_libcurl_guesses() -> None:
    request = parse_request(({b"url": b"a.example:81/p?q=1"},), CurlSettings())
    assert request.target.to_text() == "http://a.example:81/p?q=1"
    assert request.url == "a.example:81/p?q=1"


def test_ipv6_literal_and_idn_hosts_become_ascii_urls() -> None:
    assert parse_request((b"http://[::1]:8080/x",), CurlSettings()).target.to_text() == "http://[::1]:8080/x"
    idn = parse_request(("http://bücher.example/ä",), CurlSettings()).target.to_text()
    assert idn == "http://xn--bcher-kva.example/%C3%A4"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        (b"", errors.URL_MALFORMAT),
        (b"http://", errors.URL_MALFORMAT),
        (b"http://a b/", errors.URL_MALFORMAT),
        (b"http://a:99999/", errors.URL_MALFORMAT),
        (b"http://a:x/", errors.URL_MALFORMAT),
        (b"\xff\xfe", errors.URL_MALFORMAT),
        (b"ftp://a.example/f", errors.UNSUPPORTED_PROTOCOL),
        (b"gopher://a.example/", errors.UNSUPPORTED_PROTOCOL),
    ],
)
def test_bad_urls_are_refused_with_curls_numbers(url: bytes, code: int) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(({b"url": url, b"extra": [1, 2]},), CurlSettings())
    assert caught.value.code == code
    assert caught.value.extra == [1, 2]


def test_missing_url_is_malformed() -> None:
    for values in [(), ({b"header": {}},), (42,), ({1: 7},)]:
        with pytest.raises(BadRequest) as caught:
            parse_request(values, CurlSettings())
        assert caught.value.code == errors.URL_MALFORMAT


def test_string_data_posts_as_is_with_curls_default_type() -> None:
    request = parse_request(({1: b"http://h/", b"data": b'{"a":1}'},), CurlSettings())
    assert (request.method, request.body) == ("POST", b'{"a":1}')
    assert request.headers[b"Content-Type"] == [b"application/x-www-form-urlencoded"]


def test_table_data_is_a_url_encoded_form() -> None:
    data = {b"name": "홍길동".encode(), b"n": 3, b"ok": True, b"tag": [b"a", b"b&c"]}
    request = parse_request(({1: b"http://h/", b"data": data},), CurlSettings())
    assert parse_qs(request.body.decode()) == {
        "name": ["홍길동"],
        "n": ["3"],
        "ok": ["true"],
        "tag": ["a", "b&c"],
    }


def test_request_headers_override_defaults() -> None:
    header = {b"Content-Type": b"application/json", b"user-agent": b"mine", b"X-N": 7}
    request = parse_request(({1: b"http://h/", b"data": b"{}", b"header": header},), CurlSettings())
    assert request.headers == {
        b"Content-Type": [b"application/json"],
        b"user-agent": [b"mine"],
        b"X-N": [b"7"],
    }


def test_header_lines_as_curl_writes_them() -> None:
    request = parse_request(({1: b"http://h/", b"header": [b"X-A: 1", b"X-A: 2"]},), CurlSettings("ua/1"))
    assert request.headers == {b"X-A": [b"1", b"2"], b"User-Agent": [b"ua/1"]}


@pytest.mark.parametrize(
    "fields",
    [
        {b"data": {b"a": {b"nested": 1}}},
        {b"data": [b"x"]},
        {b"header": b"X-A: 1"},
        {b"header": [b"no colon"]},
        {b"header": {b"X-B\r\nEvil": b"1"}},
        {b"header": {b"Bad Name": b"1"}},
        {b"header": [b": empty name"]},
        {b"timeout": b"soon"},
        {b"method": b"GET /"},
    ],
)
def test_wrong_field_types_are_bad_arguments(fields: dict[bytes, Any]) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(({1: b"http://h/", **fields},), CurlSettings())
    assert caught.value.code == errors.BAD_FUNCTION_ARGUMENT
    assert caught.value.url == "http://h/"


def test_timeout_comes_from_the_request_else_the_settings() -> None:
    settings = CurlSettings(timeout_ms=1500.0)
    assert parse_request(({1: b"http://h/"},), settings).timeout_ms == 1500.0
    assert parse_request(({1: b"http://h/", b"timeout": 20},), settings).timeout_ms == 20.0
    assert parse_request(({1: b"http://h/", b"timeout": 0},), settings).timeout_ms is None


def test_settings_are_checked_and_unknown_ones_reported() -> None:
    raw = {
        "user-agent": "game/2",
        "timeout": 500,
        "concurrency": 3,
        "verify": False,
        "ca-file": "ca.pem",
        "per-host": 5,
        "max-size": 1000,
    }
    expected = CurlSettings(
        user_agent="game/2",
        timeout_ms=500.0,
        concurrency=3,
        per_host=5,
        verify=False,
        ca_file="ca.pem",
        max_size=1000,
    )
    assert parse_settings(raw) == (expected, [])
    assert parse_settings({"max-size": 0, "per-host": 0})[0] == CurlSettings(max_size=None, per_host=None)
    settings, notices = parse_settings({"timeout": "x", "verbose": 1})
    assert settings == CurlSettings()
    assert len(notices) == 2 and "verbose" in notices[1]
    assert parse_settings(None) == (CurlSettings(), [])
    assert parse_settings("agent")[0] == CurlSettings()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("concurrency", float("inf")),
        ("concurrency", float("nan")),
        ("concurrency", 1e300),
        ("timeout", float("nan")),
        ("timeout", float("inf")),
        ("timeout", 1e300),
        ("per-host", float("nan")),
        ("per-host", 2.5),
        ("max-size", float("inf")),
        ("max-size", 1e300),
        ("max-size", 1.5),
    ],
)
def test_non_finite_or_absurd_numbers_are_wrong_values(key: str, value: float) -> None:
    """int(inf) once raised OverflowError out of the check, a traceback instead of one line."""
    assert wrong_setting({key: value}) == f"{key}: wrong value {json.dumps(value)}"
    settings, notices = parse_settings({key: value})
    assert settings == CurlSettings() and "wrong value" in notices[0]


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (error.DNSLookupError("nohost"), errors.COULDNT_RESOLVE_HOST),
        (error.ConnectionRefusedError(), errors.COULDNT_CONNECT),
        (error.TCPTimedOutError(), errors.OPERATION_TIMEDOUT),
        (defer.TimeoutError(), errors.OPERATION_TIMEDOUT),
        (defer.CancelledError(), errors.ABORTED),
        (ResponseNeverReceived([Failure(error.ConnectionDone())]), errors.GOT_NOTHING),
        (ResponseFailed([Failure(error.ConnectionLost())]), errors.RECV_ERROR),
        (ResponseNeverReceived([Failure(defer.CancelledError())]), errors.ABORTED),
        (ResponseFailed([Failure(BodyTooLarge(10))]), errors.FILESIZE_EXCEEDED),
        (ResponseFailed([Failure(ParseError("wrong number of parts", b"x"))]), errors.WEIRD_SERVER_REPLY),
        (ResponseFailed([Failure(ValueError("bad length"))]), errors.WEIRD_SERVER_REPLY),
        (ValueError("not from a reply"), errors.INTERNAL),
        (KeyError("bug"), errors.INTERNAL),
    ],
)
def test_failures_map_to_curl_numbers(failure: Exception, code: int) -> None:
    assert errors.classify(Failure(failure), 100.0)[0] == code


# --- the stage over StubTreq ----------------------------------------------------------------


def test_get_reply_has_every_field() -> None:
    stage, context, _ = make_stage(Recorder(b"\xb0\xa1 body"))
    stage.receive(msg({1: b"http://api.example/v1?x=1", b"extra": {b"k": [1, 2]}}))
    reply = context.only_reply()
    assert reply["url"] == "http://api.example/v1?x=1"
    assert reply["effective_url"] == "http://api.example/v1?x=1"
    assert reply["redirect_url"] is None
    assert reply["status"] == 200
    assert reply["cookie"] == {}
    assert reply["extra"] == {b"k": [1, 2]}
    data = reply["data"]
    assert data["content"] == b"\xb0\xa1 body"
    assert data["length"] == 7
    assert data["type"] == "text/plain; charset=EUC-KR"
    assert data["charset"] == "euc-kr"
    assert (data["result"], data["message"]) == (0, "OK")
    assert data["time"] >= 0.0


def test_post_form_and_headers_reach_the_server() -> None:
    recorder = Recorder()
    stage, context, _ = make_stage(recorder, {"user-agent": "game/1"})
    stage.receive(msg({1: b"http://h/form", b"data": {b"a": b"1 2"}, b"header": {b"X-Token": b"t"}}))
    assert context.only_reply()["status"] == 200
    (seen,) = recorder.seen
    assert seen["method"] == b"POST"
    assert seen["body"] == b"a=1+2"
    assert seen["headers"][b"x-token"] == [b"t"]
    assert seen["headers"][b"user-agent"] == [b"game/1"]
    assert seen["headers"][b"content-type"] == [b"application/x-www-form-urlencoded"]


class CookieAndRedirect(Resource):
    """``/login`` sets a cookie and redirects to ``/home``, which echoes the cookie it got."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        if request.path == b"/login":
            request.addCookie(b"sid", b"abc", path=b"/")
            request.redirect(b"/home")
            return b""
        request.setHeader(b"content-type", b"text/plain")
        return b"sid=" + request.getCookie(b"sid")


def test_redirect_is_followed_and_its_cookie_kept_and_reported() -> None:
    stage, context, _ = make_stage(CookieAndRedirect())
    stage.receive(msg({1: b"http://h.example/login"}))
    reply = context.only_reply()
    assert reply["status"] == 200
    assert reply["redirect_url"] == "http://h.example/home"
    assert reply["effective_url"] == "http://h.example/home"
    assert reply["cookie"] == {1: "h.example\tFALSE\t/\tFALSE\t0\tsid\tabc", "sid": "abc"}
    assert reply["data"]["content"] == b"sid=abc"


class Moves(Resource):
    """``/temp``: 307 to ``/echo``; ``/lost``: 302 without Location; ``/echo``: the method."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        if request.path == b"/temp":
            request.setResponseCode(307)
            request.setHeader(b"location", b"/echo")
            return b"moved"
        if request.path == b"/lost":
            request.setResponseCode(302)
            return b"nowhere"
        return request.method


def test_307_is_followed_for_get_and_is_the_answer_for_post() -> None:
    stage, context, _ = make_stage(Moves())
    stage.receive(msg({1: b"http://h/temp", b"method": b"GET"}))
    stage.receive(msg({1: b"http://h/temp", b"data": b"x=1"}))
    followed, kept = (values[0] for _, values in context.replies)
    assert (followed["status"], followed["data"]["content"]) == (200, b"GET")
    assert followed["redirect_url"] == "http://h/echo"
    assert (kept["status"], kept["data"]["content"], kept["data"]["result"]) == (307, b"moved", 0)
    assert kept["redirect_url"] is None


def test_redirect_without_location_is_the_answer() -> None:
    stage, context, _ = make_stage(Moves())
    stage.receive(msg(b"http://h/lost"))
    reply = context.only_reply()
    assert (reply["status"], reply["data"]["content"], reply["data"]["result"]) == (
        302,
        b"nowhere",
        0,
    )


def test_server_errors_are_answers_not_failures() -> None:
    class NotFound(Resource):
        isLeaf = True

        def render(self, request: server.Request) -> bytes:
            request.setResponseCode(404)
            return b"nope"

    stage, context, _ = make_stage(NotFound())
    stage.receive(msg(b"http://h/missing"))
    reply = context.only_reply()
    assert (reply["status"], reply["data"]["result"], reply["data"]["content"]) == (404, 0, b"nope")


class Held(Resource):
    """Keeps every request open until the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.open: list[server.Request] = []

    def render(self, request: server.Request) -> object:
        self.open.append(request)
        return server.NOT_DONE_YET


def test_total_timeout_gives_result_28() -> None:
    held = Held()
    stage, context, _ = make_stage(held, {"timeout": 5000})
    stage.receive(msg({1: b"http://h/slow", b"timeout": 250, b"extra": b"e"}))
    assert len(held.open) == 1
    context.clock.advance(0.2)
    assert context.replies == []
    context.clock.advance(0.05)
    reply = context.only_reply()
    assert (reply["status"], reply["data"]["result"], reply["extra"]) == (0, 28, b"e")
    assert "250" in reply["data"]["message"]
    assert reply["data"]["time"] == pytest.approx(0.25)
    assert context.errors == 1  # failures count as stage errors (stat, /metrics)


def test_timeout_also_covers_a_body_that_never_ends() -> None:
    held = Held()
    stage, context, stub = make_stage(held, {"timeout": 1000})
    stage.receive(msg(b"http://h/stream"))
    held.open[0].setHeader(b"content-length", b"100")
    held.open[0].write(b"partial")
    stub.flush()
    assert context.replies == []
    context.clock.advance(1.0)
    assert context.only_reply()["data"]["result"] == errors.OPERATION_TIMEDOUT


def test_concurrency_limit_queues_requests_in_order() -> None:
    held = Held()
    stage, context, stub = make_stage(held, {"concurrency": 2})
    for n in range(5):
        stage.receive(msg({1: f"http://h/{n}".encode(), b"extra": n}))
    assert [r.path for r in held.open] == [b"/0", b"/1"]
    for step in range(5):
        request = held.open[step]
        request.write(b"done")
        request.finish()
        stub.flush()
        assert len([r for r in held.open if not r.finished]) == min(2, 4 - step)
    assert [r.path for r in held.open] == [b"/0", b"/1", b"/2", b"/3", b"/4"]
    assert [values[0]["extra"] for _, values in context.replies] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("settings", [{"per-host": 2}, {"concurrency": 2}, {"concurrency": 3, "per-host": 2}])
def test_the_timeout_counts_the_wait_in_a_queue(settings: dict[str, int]) -> None:
    """Once a queued request's timeout started when it left the queue: with a host that never
    answers, each batch waited a whole timeout more, and the last reply came after minutes."""
    held = Held()
    stage, context, _ = make_stage(held, {"timeout": 1000, **settings})
    for n in range(6):
        stage.receive(msg({1: f"http://h/{n}".encode(), b"extra": n}))
    context.clock.advance(0.5)
    stage.receive(msg({1: b"http://h/late", b"extra": 6}))
    assert len(held.open) == 2
    context.clock.advance(0.5)
    assert sorted(values[0]["extra"] for _, values in context.replies) == [0, 1, 2, 3, 4, 5]
    for _, (reply,) in context.replies:
        assert reply["data"]["result"] == errors.OPERATION_TIMEDOUT
        assert reply["data"]["time"] == pytest.approx(1.0)
    assert [r.path for r in held.open] == [b"/0", b"/1", b"/late"]  # it has half its time left
    context.clock.advance(0.5)
    (reply,) = context.replies[-1][1]
    assert (reply["extra"], reply["data"]["result"], reply["data"]["time"]) == (6, 28, pytest.approx(1.0))


def test_bad_request_is_answered_at_once() -> None:
    stage, context, _ = make_stage(Recorder())
    stage.receive(msg({b"url": b"ftp://h/", b"extra": 9}))
    reply = context.only_reply()
    assert (reply["status"], reply["data"]["result"], reply["extra"], reply["url"]) == (
        0,
        1,
        9,
        "ftp://h/",
    )


def test_stop_aborts_requests_in_flight_and_queued() -> None:
    held = Held()
    stage, context, _ = make_stage(held, {"concurrency": 1})
    stage.receive(msg(b"http://h/a"))
    stage.receive(msg(b"http://h/b"))
    stage.stop()
    assert [values[0]["data"]["result"] for _, values in context.replies] == [42, 42]
    assert len(held.open) == 1


def test_stop_aborts_requests_queued_for_their_host() -> None:
    held = Held()
    stage, context, _ = make_stage(held, {"per-host": 1})
    stage.receive(msg(b"http://h/a"))
    stage.receive(msg(b"http://h/b"))
    stage.receive(msg(b"http://other/c"))  # another host: not queued behind h
    assert len(held.open) == 2
    stage.stop()
    assert [values[0]["data"]["result"] for _, values in context.replies] == [42, 42, 42]


def test_host_slots_queue_per_host_and_forget_idle_hosts() -> None:
    slots = HostSlots(1)
    a, b = ("http", "a", 80), ("http", "b", 80)
    first, second, other = slots.acquire(a), slots.acquire(a), slots.acquire(b)
    assert (first.called, second.called, other.called) == (True, False, True)
    slots.release(b)
    assert len(slots) == 1  # b's queue is gone, a's waits
    slots.release(a)
    assert second.called
    slots.release(a)
    assert len(slots) == 0
    holder, waiter = slots.acquire(a), slots.acquire(a)
    waiter.cancel()
    waiter.addErrback(lambda f: f.trap(defer.CancelledError))
    slots.release(a)
    assert holder.called and len(slots) == 0


@pytest.mark.parametrize("settings", [{"per-host": 1}, {"concurrency": 1, "per-host": 0}])
def test_stop_answers_thousands_of_queued_requests(settings: dict[str, int]) -> None:
    """A freed slot once went from one queued request to the next inside one call: past a few
    hundred, RecursionError, requests never answered and left pending."""
    stage, context, _ = make_stage(Held(), settings)
    for _ in range(1500):
        stage.receive(msg(b"http://h/a"))
    stage.stop()
    assert [values[0]["data"]["result"] for _, values in context.replies] == [42] * 1500


@pytest.mark.parametrize("settings", [{"per-host": 1}, {"concurrency": 1, "per-host": 0}])
def test_thousands_of_queued_requests_out_of_time_together_are_all_answered(settings: dict[str, int]) -> None:
    """All received at once, all out of time at once: as the running one times out, each queued
    one is due too; answering each inside the previous one's call nested them as deep as the
    queue."""
    held = Held()
    stage, context, _ = make_stage(held, {"timeout": 1000, **settings})
    for _ in range(1500):
        stage.receive(msg(b"http://h/a"))
    context.clock.advance(1.0)
    assert [values[0]["data"]["result"] for _, values in context.replies] == [28] * 1500
    assert len(held.open) == 1  # none was sent without time left
