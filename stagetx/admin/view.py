"""What the admin side reads: ``AdminView`` (provided by ``stagetx.admin.service.AdminService``) for
the commands, the dashboard and ``/metrics``; ``Processes`` (the ``Supervisor``) for the service."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred

from stagetx.config import ServerConfig

if TYPE_CHECKING:
    from stagetx.admin.control import ControlServer


class ProcessStatus(Protocol):
    """One ``#startup`` group's process as the supervisor reports it."""

    @property
    def group(self) -> int: ...

    @property
    def pid(self) -> int | None: ...  # None while down

    @property
    def started(self) -> float | None: ...  # reactor time of its start

    @property
    def restarts(self) -> int: ...


class AdminView(Protocol):
    """What ``Commands``, the dashboard and ``/metrics`` read: the processes, their control links
    and the server's health."""

    config: ServerConfig

    def clock(self) -> Any:
        """The reactor (an ``IReactorTime``; ``task.Clock`` in tests)."""

    def status(self) -> Sequence[ProcessStatus]:
        """One entry per group, in group order."""

    def restart(self, group: int) -> Deferred[int]:
        """Restart group ``group`` now; fires with the new pid."""

    @property
    def control(self) -> ControlServer | None: ...

    def health(self) -> list[str]:
        """What is wrong with the server (empty: healthy)."""

    def unresponsive(self, group: int) -> float | None:
        """Seconds a ready process has not reported, once that is too long; else None."""


class Processes(Protocol):
    """The supervisor as ``AdminService`` drives it."""

    config: ServerConfig
    secret: str  # hex: the key of the control links
    on_spawn: list[Callable[[int], None]]
    on_stopped: list[Callable[[], Deferred[None] | None]]

    @property
    def rundir(self) -> str | None: ...  # where the control socket goes, while running

    def clock(self) -> Any: ...

    def status(self) -> Sequence[ProcessStatus]: ...

    def restart(self, group: int) -> Deferred[int]: ...

    def kill(self, group: int) -> bool: ...
