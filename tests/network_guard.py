"""Tests never leave the machine: a guard on Python's sockets, for the test process and for
every Python process the tests start.

``install()`` wraps ``socket.socket.connect``, ``connect_ex``, ``sendto`` and ``sendmsg``
(a UDP DNS query is sent without connecting) so that only loopback destinations
(127.0.0.0/8, ::1, IPv4-mapped loopback) and AF_UNIX sockets are reached, and
``socket.getaddrinfo``, ``gethostbyname``, ``gethostbyname_ex`` and ``gethostbyaddr`` so
that only names that need no DNS query are resolved: ``localhost``, IP literals and names
``/etc/hosts`` maps to loopback addresses only (a query would leave the machine too).

Anything else raises ``NetworkGuardError`` (an ``OSError``, as a refused network would)
before the real call is made, and is recorded: code under test may swallow the error, the
record stays, and the test session fails the test (``tests/conftest.py``). Processes the
tests start load this module through ``tests/network_guard_site/sitecustomize.py`` (on
their ``PYTHONPATH``) and append their records to the file ``LOG_ENV`` names.

What it cannot see: connections made below Python's socket module (libpq for
PostgreSQL, uvloop's own transports, C extensions), and processes that are not Python
or that do not take ``PYTHONPATH`` (redis-server, clamd, SeaweedFS; a homeserver in a
virtualenv started with ``-I`` or ``-E``). Only the standard library is used: a
subprocess's interpreter loads this before anything else.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Environment variable naming the file where processes the tests start record findings.
LOG_ENV = "MSC3870_NETWORK_GUARD_LOG"
#: The directory whose ``sitecustomize`` installs the guard in those processes.
SITE_DIR = Path(__file__).resolve().parent / "network_guard_site"
HOSTS_FILE = "/etc/hosts"

#: The real functions, called once a destination is allowed. Tests of the guard replace
#: them with recorders, so that a guard that let something through still reaches nothing.
REAL: dict[str, Any] = {}

_sink: list[Callable[[str], None]] = []
_installed = threading.Event()


class NetworkGuardError(OSError):
    """A test tried to reach another machine."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address literal (IPv4-mapped ones included)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def loopback_names(hosts_file: str = HOSTS_FILE) -> frozenset[str]:
    """Names the hosts file maps to loopback addresses and nothing else."""
    addresses: dict[str, set[bool]] = {}
    try:
        text = Path(hosts_file).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        loopback = is_loopback(fields[0])
        for name in fields[1:]:
            addresses.setdefault(name.lower(), set()).add(loopback)
    return frozenset(name for name, kinds in addresses.items() if kinds == {True})


_local_names: frozenset[str] = frozenset()


def resolves_locally(host: object) -> bool:
    """Whether resolving ``host`` needs no DNS query and gives loopback addresses (or,
    for an IP literal, is no query at all)."""
    if host is None:  # the wildcard or loopback address of a passive or local socket
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    name = host.lower()
    return name == "localhost" or is_ip_literal(name) or name in _local_names


def destination_allowed(family: int, address: Any) -> bool:
    if family == getattr(socket, "AF_UNIX", None):
        return True
    if family not in (socket.AF_INET, socket.AF_INET6):
        return False
    if not isinstance(address, tuple) or not address:
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if is_ip_literal(host):
        return is_loopback(host)
    # A name is resolved by the C library: only names that resolve to loopback from the
    # hosts file pass ("" and "<broadcast>" are not loopback).
    return host.lower() == "localhost" or host.lower() in _local_names


def _refuse(call: str, target: object) -> NetworkGuardError:
    stack = "".join(traceback.format_stack(limit=12)[:-2])
    finding = (
        f"{call}({target!r}) in pid {os.getpid()}, thread {threading.current_thread().name}: "
        f"tests never leave the machine (tests/network_guard.py)\n{stack}"
    )
    for record in list(_sink):
        record(finding)
    return NetworkGuardError(errno.ENETUNREACH, f"network guard: {call}({target!r}) refused")


def _connect(self: socket.socket, address: Any) -> Any:
    if not destination_allowed(self.family, address):
        raise _refuse("connect", address)
    return REAL["connect"](self, address)


def _connect_ex(self: socket.socket, address: Any) -> Any:
    if not destination_allowed(self.family, address):
        raise _refuse("connect_ex", address)
    return REAL["connect_ex"](self, address)


def _sendto(self: socket.socket, data: Any, *rest: Any) -> Any:
    address = rest[-1] if rest else None  # sendto(data, address) or (data, flags, address)
    if not destination_allowed(self.family, address):
        raise _refuse("sendto", address)
    return REAL["sendto"](self, data, *rest)


def _sendmsg(self: socket.socket, buffers: Any, *rest: Any) -> Any:
    # sendmsg(buffers[, ancdata[, flags[, address]]]): without an address, the socket's
    # connected peer, which connect() allowed.
    if len(rest) >= 3 and rest[2] is not None and not destination_allowed(self.family, rest[2]):
        raise _refuse("sendmsg", rest[2])
    return REAL["sendmsg"](self, buffers, *rest)


def _numeric_only(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A ``getaddrinfo`` told never to look a name up (``AI_NUMERICHOST``): it answers
    from the string alone, or fails, without a query."""
    if name != "getaddrinfo":
        return False
    flags = kwargs.get("flags", args[4] if len(args) > 4 else 0)
    return bool(flags & socket.AI_NUMERICHOST)


def _resolver(name: str) -> Callable[..., Any]:
    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not resolves_locally(host) and not _numeric_only(name, args, kwargs):
            raise _refuse(name, host)
        return REAL[name](host, *args, **kwargs)

    resolve.__name__ = name
    return resolve


_SOCKET_METHODS = {
    "connect": _connect,
    "connect_ex": _connect_ex,
    "sendto": _sendto,
    "sendmsg": _sendmsg,
}
_RESOLVERS = ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr")


def _after_fork_in_child() -> None:
    # A forked child's findings would stay in its own memory: they go to the log file.
    log = os.environ.get(LOG_ENV)
    if log:
        _sink[:] = [file_recorder(log)]


def install(record: Callable[[str], None]) -> None:
    """Guard this process's sockets; ``record`` receives each finding. Installing again
    only adds a recorder."""
    global _local_names
    _sink.append(record)
    if _installed.is_set():
        return
    _local_names = loopback_names()
    os.register_at_fork(after_in_child=_after_fork_in_child)
    for name, guard in _SOCKET_METHODS.items():
        REAL[name] = getattr(socket.socket, name)
        setattr(socket.socket, name, guard)
    for name in _RESOLVERS:
        REAL[name] = getattr(socket, name)
        setattr(socket, name, _resolver(name))
    _installed.set()


def installed() -> bool:
    """Whether the guard is on in this process and still in place."""
    return _installed.is_set() and all(
        getattr(socket.socket, name) is guard for name, guard in _SOCKET_METHODS.items()
    )


@contextmanager
def recording_only_to(record: Callable[[str], None]) -> Iterator[None]:
    """Findings go to ``record`` alone for a while (a test of the guard, whose findings
    are expected)."""
    saved = list(_sink)
    _sink[:] = [record]
    try:
        yield
    finally:
        _sink[:] = saved


class Findings:
    """What the guard recorded, in this process and in the log file of the processes it
    started, not reported yet."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.here: list[str] = []
        # A session started by a test shares its parent's file: only what comes next.
        self._offset = log_path.stat().st_size if log_path.exists() else 0
        self._lock = threading.Lock()

    def record(self, finding: str) -> None:
        self.here.append(finding)

    def new(self) -> list[str]:
        with self._lock:
            # Taken one by one: a thread may record while this runs.
            found = [self.here.pop(0) for _ in range(len(self.here))]
            try:
                with open(self.log_path, "rb") as log:
                    log.seek(self._offset)
                    text = log.read()
            except FileNotFoundError:
                text = b""
            self._offset += len(text)
        if text:
            found.append("In a process the tests started:\n" + text.decode(errors="replace"))
        return found


def file_recorder(log_path: str) -> Callable[[str], None]:
    """A recorder for a process the tests started: one append per finding (whole, even
    with other processes writing)."""

    def record(finding: str) -> None:
        line = finding.rstrip("\n") + "\n\n"
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode(errors="replace"))
        finally:
            os.close(fd)

    return record


def subprocess_environment(log_path: Path) -> dict[str, str]:
    """What processes the tests start need in their environment to be guarded too."""
    path = os.environ.get("PYTHONPATH", "")
    parts = [str(SITE_DIR), *(p for p in path.split(os.pathsep) if p and p != str(SITE_DIR))]
    return {"PYTHONPATH": os.pathsep.join(parts), LOG_ENV: str(log_path)}
