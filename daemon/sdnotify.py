"""sd_notify spoken by the daemon itself: READY=1, STOPPING=1, STATUS= and WATCHDOG=1 to systemd.

systemd (``Type=notify``) hands the service a unix datagram socket in ``$NOTIFY_SOCKET`` (a path, or ``@name``
for the abstract namespace) and, with ``WatchdogSec=``, the watchdog period in ``$WATCHDOG_USEC`` (and the pid
it is meant for in ``$WATCHDOG_PID``). Each message is one datagram of ``KEY=VALUE`` lines. No library needed.

Without ``$NOTIFY_SOCKET`` (a terminal, a container, the tests) a `Notifier` does nothing. Errors:

- setting up (``$NOTIFY_SOCKET`` is not an address, the socket cannot be created): `NotifyError` at start, since
  with ``Type=notify`` systemd would otherwise wait for a READY=1 that never comes, and kill us after
  ``TimeoutStartSec`` without a word of why;
- sending (systemd's socket gone or full, during a ``daemon-reexec`` for example): a warning, logged once per
  outage, and the daemon carries on. Losing a notification must never stop the delivery of orders.

`watchdog_loop` pings from the event loop itself, so a loop stuck in a blocking call stops pinging and systemd
restarts the service (``Restart=on-failure`` covers ``WatchdogSec=`` timeouts).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Mapping
from types import TracebackType

from consumers.clock import Clock, SystemClock
from topics.errors import OrderbusError

__all__ = ["Notifier", "NotifyError", "watchdog_loop"]

log = logging.getLogger(__name__)

# sockaddr_un.sun_path is 108 bytes on Linux, the terminating NUL of a path included.
_MAX_PATH = 107


class NotifyError(OrderbusError):
    """``$NOTIFY_SOCKET`` is set but unusable: not a socket address, or no socket could be created for it."""


class Notifier:
    """Notifications to the service manager over ``$NOTIFY_SOCKET``; a no-op when it is unset.

    Every send is non-blocking and returns whether systemd got the datagram (False when disabled or failed).
    Read `env` (default `os.environ`) once, at construction; `close` releases the socket.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog = _watchdog_interval(env) if self._address is not None else None
        self._socket: socket.socket | None = None
        self._failing = False
        if self._address is not None:
            try:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                raise NotifyError(f"NOTIFY_SOCKET: cannot create a unix datagram socket: {exc.strerror}") from None
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (``$NOTIFY_SOCKET`` was set)."""
        return self._socket is not None

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is complete; systemd now counts the service as started (``Type=notify``)."""
        return self._send("READY=1", status)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: the service is shutting down (drain, commit, close) and will exit by itself."""
        return self._send("STOPPING=1", status)

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by ``systemctl status``."""
        return self._send(None, text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the service is alive; systemd restarts it when these stop for ``WatchdogSec``."""
        return self._send("WATCHDOG=1", None)

    def watchdog_interval(self) -> float | None:
        """How often to ping, in seconds: half of ``$WATCHDOG_USEC``; None when no watchdog is meant for us."""
        return self._watchdog

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, state: str | None, status: str | None) -> bool:
        if self._socket is None or self._address is None:
            return False
        lines = [state] if state is not None else []
        if status is not None:
            # A line break would start a new assignment; STATUS= is one line.
            lines.append("STATUS=" + " ".join(status.split()))
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            if not self._failing:
                reason = errno.errorcode.get(exc.errno or 0, "") or str(exc)
                log.warning("cannot notify systemd at %s (%s); carrying on without it", self._shown, reason)
            self._failing = True
            return False
        if self._failing:
            log.info("systemd's notify socket %s answers again", self._shown)
            self._failing = False
        return True

    @property
    def _shown(self) -> str:
        address = self._address or ""
        return "@" + address[1:] if address.startswith("\0") else address


async def watchdog_loop(notifier: Notifier, *, interval: float | None = None, clock: Clock | None = None) -> None:
    """Send WATCHDOG=1 every `interval` seconds (default: `Notifier.watchdog_interval`) until cancelled.

    Returns at once when there is no watchdog. Run it as a task on the daemon's event loop: the pings prove
    that the loop turns, which is what a stuck loop stops doing.
    """
    period = notifier.watchdog_interval() if interval is None else interval
    if period is None or not notifier.enabled:
        return
    clock = SystemClock() if clock is None else clock
    while True:
        notifier.watchdog()
        await clock.sleep(period)


def _address(value: str) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or ``@name`` (abstract) as ``\\0name``; None if unset."""
    if not value:
        return None
    if value.startswith("@") and len(value) > 1:
        address = "\0" + value[1:]
    elif value.startswith("/"):
        address = value
    else:
        # systemd >= 253 also knows vsock: addresses (a VM's manager on its host); a service never gets one.
        raise NotifyError(f"NOTIFY_SOCKET: expected an absolute path or @name, got {value!r}")
    if len(os.fsencode(address)) > _MAX_PATH:
        raise NotifyError(f"NOTIFY_SOCKET: the address is longer than {_MAX_PATH} bytes: {value!r}")
    return address


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if it is set, valid, and (per ``$WATCHDOG_PID``) meant for us."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None  # inherited from the process that systemd started; that one pings, not us
    if not usec.isdigit() or int(usec) == 0:
        log.warning("WATCHDOG_USEC=%r is not a positive number of microseconds; no watchdog pings", usec)
        return None
    return int(usec) / 2 / 1_000_000
