"""systemd's process protocols, written out: inherited listening sockets and readiness notification.

Socket activation (sd_listen_fds(3)): whoever starts us (systemd, ``systemd-socket-activate``, libnbd's
``nbdinfo -- [ CMD ]``) passes listening sockets as descriptors 3, 4, ... and sets ``LISTEN_PID`` to our
pid, ``LISTEN_FDS`` to their count and optionally ``LISTEN_FDNAMES`` to their colon-separated names (a
socket unit's ``FileDescriptorName=``). The variables are for this process only: they are removed from
the environment once read, so that nothing we start believes they are meant for it.

Notification (sd_notify(3)): one datagram per state change (``READY=1``, ``RELOADING=1``,
``STOPPING=1``) to the unix socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). Without the variable it does nothing, so the calls cost nothing outside systemd.

Both serve ``nbdsrv serve`` and ``nbdsrv qemu-nbd``; neither needs libsystemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

log = logging.getLogger("nbdsrv")

LISTEN_FDS_START = 3


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """One descriptor passed by socket activation, and its name (``unknown`` when none was given)."""

    fd: int
    name: str


def listen_fds(*, unset_environment: bool = True) -> list[InheritedSocket]:
    """The sockets passed to this process, in descriptor order; [] when none were (or not to us).

    Each descriptor is made close-on-exec, as sd_listen_fds() does, so that a process we start does not
    keep the listeners open.
    """
    env = os.environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []  # meant for the process that started us, not for us
        n = int(count)
    except ValueError:
        return []
    if n <= 0:
        return []
    parts = names.split(":") if names else []
    out = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.append(InheritedSocket(fd, parts[i] if i < len(parts) and parts[i] else "unknown"))
    return out


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to NOTIFY_SOCKET; False when there is none or it failed."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify failed", extra={"error": str(exc)})
        return False
    return True


def notify_reloading() -> bool:
    """RELOADING=1 with the MONOTONIC_USEC that Type=notify-reload wants beside it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def is_socket(fd: int) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def adopt(fd: int) -> socket.socket:
    """A socket object for an inherited descriptor (family and type read from the descriptor itself)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock
