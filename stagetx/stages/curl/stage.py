"""The ``curl`` stage: HTTP(S) requests for Lua, answered with curl-shaped reply tables.

Built on treq with the stage's own ``HTTPClient``: its own connection pool (module-level treq calls
share one global pool) and its own cookie jar, so cookies persist across the stage's requests.
The total timeout (connect, headers and body) is enforced here: treq's ``timeout=`` only covers
the wait for the headers.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from treq.client import HTTPClient
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    TimeoutError,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IAddress
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web import error as web_error
from twisted.web._newclient import ResponseFailed
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from stagetx import reactors
from stagetx.message import Message
from stagetx.stages.base import StageContext
from stagetx.stages.curl import errors
from stagetx.stages.curl.request import BadRequest, CurlRequest, parse_request
from stagetx.stages.curl.response import (
    BoundedHeadProtocol,
    GzipAgent,
    chain,
    content_type,
    read_body,
    set_cookies,
    url_of,
)
from stagetx.stages.curl.settings import CurlSettings, parse_settings, wrong_setting
from stagetx.stages.curl.tls import https_policy
from stagetx.stages.registry import SettingsError

# Redirects Twisted does not follow (a 307 after a POST, a 3xx without Location): like curl, the
# stage then answers with that 3xx response itself.
_UNFOLLOWED = (web_error.PageRedirect, web_error.RedirectWithNoLocation)


def check_settings(settings: Any, path: str, base_dir: str) -> None:
    """The registry's check (``stagetx.stages.registry``): a value that is not an object, a
    known setting of the wrong kind or a ``ca-file`` without a PEM certificate stops start-up;
    unknown settings are logged when it starts."""
    wrong = wrong_setting(settings)
    if wrong is not None:
        raise SettingsError(f"{path}.{wrong}" if ": wrong value" in wrong else f"{path}: {wrong}")
    ca_file = settings.get("ca-file") if isinstance(settings, dict) else None
    if ca_file is not None:
        try:
            https_policy(True, os.path.join(base_dir, ca_file))
        except OSError as error:
            raise SettingsError(f"{path}.ca-file: cannot read {error.filename}: {error.strerror}") from None
        except Exception as error:  # no certificate in it, or OpenSSL's error for a broken one
            raise SettingsError(f"{path}.ca-file: {error}") from None


class _QuietFactory(_HTTP11ClientFactory):
    """Connections whose response heads are bounded, without a log line each."""

    noisy = False  # else every new connection logs "Starting factory" / "Stopping factory"

    def buildProtocol(self, addr: IAddress | None) -> BoundedHeadProtocol:
        return BoundedHeadProtocol(self._quiescentCallback)


class _QuietPool(HTTPConnectionPool):
    """The stage's connection pool, without a log line per connection."""

    _factory = _QuietFactory


class HTTPRequester(Protocol):
    """What the stage needs of treq: an ``HTTPClient`` (or a ``treq.testing.StubTreq``)."""

    def request(
        self,
        method: str,
        url: Any,
        *,
        headers: Any = None,
        data: Any = None,
        browser_like_redirects: bool = False,
        unbuffered: bool = False,
    ) -> Deferred[Any]: ...


def _reply(request_url: str, effective_url: str, extra: Any, code: int, message: str, elapsed: float) -> dict[str, Any]:
    """The reply table of a request that produced no response."""
    return {
        "url": request_url,
        "redirect_url": None,
        "effective_url": effective_url,
        "status": 0,
        "cookie": {},
        "extra": extra,
        "data": {
            "type": None,
            "length": 0,
            "download_speed": 0.0,
            "content": b"",
            "charset": None,
            "result": code,
            "message": message,
            "time": elapsed,
        },
    }


def _timed_out(result: Any, timeout: float) -> Any:
    """``addTimeout``'s translation: whatever failure a cancelled request produced is a timeout.

    Cancelling while connecting fails with ``ConnectingCancelledError``, not ``CancelledError``,
    which Twisted's default translation would let through unrecognised.
    """
    if isinstance(result, Failure):
        return Failure(TimeoutError(timeout, "HTTP request"))
    return result


def host_of(request: CurlRequest) -> tuple[str, str, int | None]:
    """The key of the connections ``request`` starts with: scheme, host and port, as the pool's."""
    target = request.target
    return target.scheme.lower(), target.host.lower(), target.port


class HostSlots:
    """A FIFO queue per host, each with ``size`` requests in flight at most.

    The connection pool opens a connection for every request not served by an idle one, so
    without it 2,000 requests to one slow host are 2,000 sockets; and a queue per host, not one
    for all, lets requests to other hosts pass those waiting for a slow one.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._hosts: dict[tuple[str, str, int | None], DeferredSemaphore] = {}

    def acquire(self, host: tuple[str, str, int | None]) -> Deferred[None]:
        """Fires when ``host`` has a slot for the caller, who must `release` it; cancelling it
        while it waits takes it out of the queue."""
        slots = self._hosts.get(host)
        if slots is None:
            slots = self._hosts[host] = DeferredSemaphore(self._size)
        return slots.acquire().addCallbacks(lambda _: None, self._withdrawn, errbackArgs=(host, slots))

    def release(self, host: tuple[str, str, int | None]) -> None:
        """Give back a slot of ``host``: the next request waiting for it starts."""
        slots = self._hosts[host]
        slots.release()
        self._forget(host, slots)

    def _withdrawn(self, failure: Failure, host: tuple[str, str, int | None], slots: DeferredSemaphore) -> Failure:
        self._forget(host, slots)
        return failure

    def _forget(self, host: tuple[str, str, int | None], slots: DeferredSemaphore) -> None:
        """Drop an idle host's queue, so that the hosts ever asked do not pile up."""
        if slots.tokens == self._size and not slots.waiting and self._hosts.get(host) is slots:
            del self._hosts[host]

    def __len__(self) -> int:
        return len(self._hosts)


class Stage:
    """``=curl+ID``: one message = one HTTP request; the reply table goes to the reply address."""

    def __init__(self, context: StageContext, config: Any, *, client: HTTPRequester | None = None) -> None:
        """``client`` replaces the stage's own treq client (tests pass a ``StubTreq``)."""
        self._context = context
        self._log = context.log
        settings, notices = parse_settings(getattr(config, "settings", config))
        for notice in notices:
            self._log.warn("{stage}: {notice}", stage=context.name, notice=notice)
        self._settings: CurlSettings = settings
        self._client = client
        self._pool: HTTPConnectionPool | None = None
        self._slots = DeferredSemaphore(settings.concurrency) if settings.concurrency else None
        self._hosts = HostSlots(settings.per_host) if settings.per_host else None
        self._pending: dict[Deferred[Any], None] = {}  # in the order received: see stop()
        self._stopping = False

    def start(self) -> None:
        """Build the stage's own connection pool, HTTPS policy and cookie jar."""
        if self._client is not None:
            return
        reactor = reactors.resolve()
        ca_file = self._settings.ca_file
        policy = https_policy(self._settings.verify, self._context.resolve_path(ca_file) if ca_file else None)
        self._pool = _QuietPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max(2, self._settings.concurrency or 8)
        agent = Agent(reactor, contextFactory=policy, pool=self._pool)
        self._client = HTTPClient(GzipAgent(agent, self._settings.max_size))

    def stop(self) -> Deferred[None] | None:
        """Abort requests in flight or queued (each answered with result 42); close the pool."""
        self._stopping = True
        # newest first: the queued requests leave their queues before a running one frees its
        # slot, which would otherwise pass from one queued request to the next, nested
        for pending in reversed(list(self._pending)):
            pending.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None

    def receive(self, message: Message) -> None:
        """Start (or queue) the request of ``message``; its reply is sent when it completes."""
        try:
            request = parse_request(message.values, self._settings)
        except BadRequest as e:
            self._answer(message, _reply(e.url, e.url, e.extra, e.code, e.message, 0.0))
            return
        except Exception as e:  # an undecodable payload must not escape into the router
            self._log.failure("{stage}: bad curl message {msgid}", stage=self._context.name, msgid=message.msgid)
            self._answer(message, _reply("", "", None, errors.INTERNAL, f"bad message: {e}", 0.0))
            return
        received = self._context.clock.seconds()
        if self._hosts is None and self._slots is None:
            done = self._perform(request, received)
        else:
            done = self._enqueue(request, received)
            done.addErrback(self._failed, request, received)  # its timeout or stop() took it out of a queue
        self._pending[done] = None
        done.addCallback(self._finish, message, done)
        done.addErrback(lambda f: self._log.failure("{stage}: curl reply failed", f, stage=self._context.name))

    def _enqueue(self, request: CurlRequest, received: float) -> Deferred[dict[str, Any]]:
        """Run ``request`` once its host has a free slot, then the stage; its timeout counts the
        wait, as libcurl's total timeout counts the wait for a connection."""
        host = host_of(request)
        turn: Deferred[Any] = succeed(None) if self._hosts is None else self._hosts.acquire(host)
        if self._slots is not None:
            turn.addCallback(self._stage_slot, host)
        if request.timeout_ms is not None:
            turn.addTimeout(request.timeout_ms / 1000.0, self._context.clock, onTimeoutCancel=_timed_out)
        return turn.addCallback(self._run, request, received, host)

    def _stage_slot(self, _: None, host: tuple[str, str, int | None]) -> Deferred[Any]:
        """A slot of the stage, for a request that holds one of its host already."""
        assert self._slots is not None
        slot = self._slots.acquire()
        if self._hosts is not None:
            slot.addErrback(self._give_back, host)
        return slot

    def _give_back(self, failure: Failure, host: tuple[str, str, int | None]) -> Failure:
        """The host's slot of a request that left the stage's queue without running."""
        assert self._hosts is not None
        self._hosts.release(host)
        return failure

    def _run(
        self, _: Any, request: CurlRequest, received: float, host: tuple[str, str, int | None]
    ) -> Deferred[dict[str, Any]]:
        return self._perform(request, received).addBoth(self._release, host)

    def _release(self, reply: dict[str, Any], host: tuple[str, str, int | None]) -> dict[str, Any]:
        if self._slots is not None:
            self._slots.release()
        if self._hosts is not None:
            self._hosts.release(host)
        return reply

    def _finish(self, reply: dict[str, Any], message: Message, done: Deferred[Any]) -> None:
        self._pending.pop(done, None)
        self._answer(message, reply)

    def _answer(self, message: Message, reply: dict[str, Any]) -> None:
        data = reply["data"]
        if data["result"] != errors.OK:
            self._log.info(
                "{stage}: {url} failed: {message} (curl error {result})",
                stage=self._context.name,
                url=reply["url"],
                message=data["message"],
                result=data["result"],
            )
            self._context.count_error()
        self._context.answer(message, reply)

    def _perform(self, request: CurlRequest, received: float) -> Deferred[dict[str, Any]]:
        """Run one transfer within what is left of its timeout since ``received``; the Deferred
        always succeeds with the reply table."""
        if self._stopping:  # a queued request whose slot was freed by stop() itself
            return succeed(self._failed(Failure(CancelledError()), request, received))
        left = None
        if request.timeout_ms is not None:
            left = request.timeout_ms / 1000.0 - (self._context.clock.seconds() - received)
        if left is not None and left <= 0:  # its time ran out in the queue, as the slot came free
            # on the next turn: answered now, it would free the slot for the next one in the
            # queue inside this call, that one for the next, nested as deep as the queue is long
            expired = Failure(TimeoutError(request.timeout_ms, "HTTP request"))
            return deferLater(self._context.clock, 0, self._failed, expired, request, received)
        assert self._client is not None, "start() was not called"
        sent: Deferred[IResponse] = maybeDeferred(
            self._client.request,
            request.method,
            request.target,
            headers=Headers(request.headers),
            data=request.body,
            browser_like_redirects=True,
            unbuffered=True,
        )
        read: Deferred[tuple[IResponse, bytes]] = sent.addCallbacks(self._read, self._read_unfollowed)
        if left is not None:
            read.addTimeout(left, self._context.clock, onTimeoutCancel=_timed_out)
        return read.addCallback(self._succeeded, request, received).addErrback(self._failed, request, received)

    def _read(self, response: IResponse) -> Deferred[tuple[IResponse, bytes]]:
        return read_body(response, self._settings.max_size).addCallback(lambda body: (response, body))

    def _read_unfollowed(self, failure: Failure) -> Deferred[tuple[IResponse, bytes]] | Failure:
        """A redirect Twisted did not follow is a normal 3xx answer, as curl gives it."""
        value = failure.value
        if isinstance(value, ResponseFailed) and value.response is not None:
            if any(reason.check(*_UNFOLLOWED) for reason in value.reasons):
                return self._read(value.response)
        return failure

    def _succeeded(self, got: tuple[IResponse, bytes], request: CurlRequest, started: float) -> dict[str, Any]:
        response, body = got
        elapsed = self._context.clock.seconds() - started
        responses = chain(response)
        mime, charset = content_type(response)
        last_location = url_of(response) if len(responses) > 1 else None
        return {
            "url": request.url,
            "redirect_url": last_location,
            "effective_url": url_of(response),
            "status": response.code,
            "cookie": set_cookies(responses),
            "extra": request.extra,
            "data": {
                "type": mime,
                "length": len(body),
                "download_speed": len(body) / elapsed if elapsed > 0 else 0.0,
                "content": body,
                "charset": charset,
                "result": errors.OK,
                "message": "OK",
                "time": elapsed,
            },
        }

    def _failed(self, failure: Failure, request: CurlRequest, started: float) -> dict[str, Any]:
        code, text = errors.classify(failure, request.timeout_ms)
        if code == errors.INTERNAL:
            self._log.failure("{stage}: unexpected curl failure", failure, stage=self._context.name)
        elapsed = self._context.clock.seconds() - started
        return _reply(request.url, request.target.to_text(), request.extra, code, text, elapsed)
