"""The written contract between what runs (or replays) a pair and what watches and drives it.

The dashboard (``pdtui.app``), the control plane (``pdtui.core.control``: its keys and ``pdtui
ctl``), the drill and the tests read and call a run only through :class:`Source`. Four things
satisfy it: the live :class:`pdtui.core.runtime.Runtime`, the :class:`pdtui.core.replay.Replay`
of a recording, the :class:`pdtui.core.remote.RemoteSource` of a service running in another
process (``pdtui attach`` with no URLs), and the functional tests' fake
(``tests/functional/fake_runtime.py``). A run over engines pdtui did not start (``pdtui attach
--prefill URL --decode URL``) is a Runtime too, its instances
``pdtui.core.attached.AttachedInstance``. Nothing on the other side probes for attributes: what is
here is what there is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pdtui.core.events import Event
from pdtui.core.kvmath import KvGeometry


@dataclass(frozen=True)
class RunInfo:
    """What a watcher needs to know of the run as a whole (a live one: from its config; a replay:
    from the recording's RuntimeStarted)."""

    profile: str
    model_name: str
    """The name clients send as ``model`` (the engines' --served-model-name)."""
    proxy_url: str
    block_size: int
    model: str | None = None
    """Where the model lives (a folder or a Hugging Face id) for its tokenizer; None: not here (a replay)."""
    max_model_len: int | None = None
    ready_timeout_s: float = 600.0


class InstanceView(Protocol):
    """One engine instance as a watcher sees it."""

    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str:
        """prefill | decode | single."""
    @property
    def url(self) -> str: ...
    @property
    def state(self) -> str:
        """stopped | starting | ready | stopping | exited | failed; unreachable (an attached
        instance that stopped answering other than by a refused connection); unknown, in a replay."""
    @property
    def pid(self) -> int | None: ...
    @property
    def ready(self) -> bool: ...
    @property
    def log_path(self) -> Path | None: ...
    @property
    def ready_timeout_s(self) -> float: ...
    @property
    def stop_grace_s(self) -> float: ...


class Controls(Protocol):
    """The operations on a run as the dashboard's keys and ``pdtui ctl`` call them: a
    :class:`pdtui.core.control.Control` over the run in this process, or a
    :class:`pdtui.core.remote.RemoteControl` that forwards them to the service's control socket.
    Answers are JSON-able dicts with ``ok``; a refusal raises ``pdtui.core.control.ControlError``."""

    @property
    def read_only(self) -> bool:
        """True: kill, restart and down are refused (``code: forbidden``); the dashboard hides their keys."""
    async def status(self) -> dict[str, Any]: ...
    async def kill(self, which: str, *, source: str | None = None) -> dict[str, Any]: ...
    async def restart(self, which: str, *, source: str | None = None, timeout_s: float | None = None,
                      progress: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]: ...
    async def down(self, *, source: str | None = None, notify: bool = True) -> dict[str, Any]: ...
    def on_down(self, handler: Callable[[], Any]) -> None:
        """Call ``handler`` once the run has stopped (its ``down``, from any client)."""


class Source(Protocol):
    """A run of a pair, live or replayed: its events, its instances, and the operations on it."""

    @property
    def run(self) -> RunInfo: ...
    @property
    def instances(self) -> Mapping[str, InstanceView]: ...
    @property
    def geometry(self) -> KvGeometry | None:
        """The KV geometry behind the freight (bytes per token); None when unknown."""
    @property
    def history(self) -> Sequence[Event]:
        """The events so far (bounded), for whoever arrives late."""
    @property
    def replay(self) -> bool:
        """True for a recording: the operations raise, the dashboard says it is a replay."""
    @property
    def remote(self) -> bool:
        """True for a viewer of a service in another process (``pdtui attach``): ``aclose()`` hangs
        up and leaves the service running, and this machine's GPUs are not the run's."""
    @property
    def closed(self) -> bool:
        """aclose() has begun: no operation is taken any more."""
    @property
    def broken(self) -> str | None:
        """Why the pair is up but not working (the warm-up's outcome), or None."""
    @property
    def log_dir(self) -> Path | None:
        """The run folder (engine logs, proxy log, screenshots); None for a replay."""
    @property
    def t_start(self) -> float | None:
        """time.monotonic() at start(), None before."""
    @property
    def control(self) -> Controls:
        """The operations (kill, restart, down, status) as the keys and ``pdtui ctl`` call them."""

    def subscribe(self) -> AsyncIterator[Event]:
        """Every event from now on; the iteration ends when the run closes."""
    def emit(self, event: Event) -> None:
        """Add an event to the run's stream (the control plane's notices)."""

    async def start(self) -> float:
        """Start (or play); the seconds until ready."""
    async def aclose(self, reason: str = "closed") -> None: ...
    async def kill(self, name: str, reason: str = "killed") -> int | None: ...
    async def restart(self, name: str) -> float: ...
    async def stop_instance(self, name: str) -> int | None: ...
