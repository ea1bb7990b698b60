"""What a stage type implements, and what the hosting process offers it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from stagetx.message import Message


class StageContext(Protocol):
    """The hosting process as one stage sees it (implemented by ``stagetx.child.host``)."""

    stage_id: str  # the id used in addresses, e.g. "rank" for "=index+rank"
    name: str  # the full name, e.g. "=index+rank"
    instance: int  # this replica's number in the server's #startup (0-based)
    clock: IReactorTime
    log: Logger
    base_dir: str  # directory of the config file; relative paths resolve against it

    def resolve_path(self, path: str) -> str:
        """An absolute path for ``path`` relative to the config file's directory."""

    def count_error(self, error: str | None = None) -> None:
        """Count a failure of this stage (shown by ``stat``, ``/metrics`` and the dashboard);
        ``error`` (``file:line: problem``) is kept among the stage's last errors."""

    def reply(self, message: Message, *values: Any) -> None:
        """Send ``values`` (Python natives) to ``message``'s reply address; no-op without one."""

    def reply_all(self, replies: Sequence[tuple[Message, Any]]) -> None:
        """``reply(message, value)`` for each pair, in order (replies in a row to one address of
        another process or server leave packed together, cheaper than one by one)."""

    def answer(self, message: Message, *values: Any) -> None:
        """Answer a request: to its reply address, else to the sender's handler named by the
        message id (the index and curl stages' rule)."""

    def answer_sender(self, message: Message, msgid: str, *values: Any) -> None:
        """Send ``values`` to the handler ``msgid`` of the stage that sent ``message``."""

    def send(self, target: str, *values: Any, reply_to: str | None = None) -> tuple[bool, str | None]:
        """Send Python-native ``values`` to an address string (docs/messaging.md) or a reply address.

        ``reply_to`` asks the receiver to reply: a message id on this stage, or a full reply
        address ``^…`` used as is (to hand a third party's reply address on).
        Returns ``(True, None)`` when queued, ``(False, reason)`` when delivery is impossible.
        """


class Stage(Protocol):
    """A stage type: ``stagetx.stages.<type>.Stage(context, config)``."""

    def __init__(self, context: StageContext, config: Any) -> None:
        """``config`` is the ``stagetx.config.StageConfig``; ``config.settings`` its settings."""

    def start(self) -> Deferred[None] | None:
        """Open files, load state; the stage receives no message before this returns/fires."""

    def stop(self) -> Deferred[None] | None:
        """Flush and close; shutdown waits for the returned Deferred."""

    def receive(self, message: Message) -> None:
        """Handle one message, on the reactor thread; never raises (errors are replies or logs)."""

    # Optional: ``turn_ended(self) -> None``. When a stage defines it, the host calls it after each
    # chunk (``router.DRAIN_CHUNK`` messages) of a turn of the process's run queue in which the
    # stage received messages, before anything else runs and before the process's links are
    # flushed: the place to batch work (one log write and all replies of the chunk).
    # Optional: ``replicas_lost(self, lost: frozenset[tuple[str, int]]) -> None``. Called when a
    # process of this server went away with replicas ``(server, instance)``: a restarted process
    # has the same addresses, so state kept per replica (subscriptions, tickets) is dropped here.
