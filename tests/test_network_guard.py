"""The guard that keeps tests on this machine (tests/network_guard.py).

No test here can leave the machine even with a broken guard: each one first replaces
the guard's references to the real socket functions with recorders, so a destination the
guard wrongly let through reaches nothing either way. Destinations are TEST-NET
addresses (RFC 5737, RFC 3849) and the reserved ``.invalid`` domain."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import GUARD_FINDINGS, network_guard
from .helpers import child_pytest

ELSEWHERE_V4 = ("192.0.2.1", 9)
ELSEWHERE_V6 = ("2001:db8::1", 9, 0, 0)
UNRESOLVABLE = "guard-test.invalid"


class RealCalls:
    """Stands in for the real socket functions: records what would have been called."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def stand_in(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args[1:] if name in SOCKET_METHODS else args))
            if name == "getaddrinfo":
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", args[1]))]
            return 0

        return record

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


SOCKET_METHODS = ("connect", "connect_ex", "sendto", "sendmsg")


@pytest.fixture
def real(monkeypatch: pytest.MonkeyPatch) -> RealCalls:
    stand_ins = RealCalls()
    assert network_guard.installed()
    for name in list(network_guard.REAL):
        monkeypatch.setitem(network_guard.REAL, name, stand_ins.stand_in(name))
    return stand_ins


@pytest.fixture
def findings() -> Iterator[list[str]]:
    """The guard's findings during the test, kept from the session's tally (they are
    expected here)."""
    found: list[str] = []
    with network_guard.recording_only_to(found.append):
        yield found


def udp(family: int = socket.AF_INET) -> socket.socket:
    return socket.socket(family, socket.SOCK_DGRAM)


def test_connections_elsewhere_are_refused_before_they_are_made(
    real: RealCalls, findings: list[str]
) -> None:
    with socket.socket() as sock, pytest.raises(network_guard.NetworkGuardError):
        sock.connect(ELSEWHERE_V4)
    with socket.socket() as sock, pytest.raises(network_guard.NetworkGuardError):
        sock.connect_ex(ELSEWHERE_V4)
    with socket.socket(socket.AF_INET6) as sock, pytest.raises(network_guard.NetworkGuardError):
        sock.connect(ELSEWHERE_V6)
    with socket.socket() as sock, pytest.raises(OSError):  # a name the C library would resolve
        sock.connect((UNRESOLVABLE, 80))
    for address in (("", 80), ("<broadcast>", 80), ("0.0.0.0", 80), ("10.0.0.1", 80)):
        with socket.socket() as sock, pytest.raises(OSError):
            sock.connect(address)
    assert real.calls == []
    assert len(findings) == 8
    assert "connect(('192.0.2.1', 9))" in findings[0]
    assert "test_network_guard.py" in findings[0]  # where it came from


def test_datagrams_elsewhere_are_refused(real: RealCalls, findings: list[str]) -> None:
    """A DNS query is a datagram sent without connecting."""
    with udp() as sock, pytest.raises(OSError):
        sock.sendto(b"query", ("192.0.2.53", 53))
    with udp() as sock, pytest.raises(OSError):
        sock.sendto(b"query", 0, ("192.0.2.53", 53))
    with udp() as sock, pytest.raises(OSError):
        sock.sendmsg([b"query"], [], 0, ("192.0.2.53", 53))
    assert real.calls == []
    assert len(findings) == 3


def test_names_that_need_a_dns_query_are_not_resolved(real: RealCalls, findings: list[str]) -> None:
    for resolve in (socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex):
        with pytest.raises(OSError):
            resolve(UNRESOLVABLE, *([80] if resolve is socket.getaddrinfo else []))
    with pytest.raises(OSError):
        socket.gethostbyaddr("example.invalid")
    assert real.calls == []
    assert len(findings) == 4


def test_loopback_unix_and_local_names_pass(
    real: RealCalls, findings: list[str], tmp_path: Path
) -> None:
    for address in (("127.0.0.1", 80), ("127.8.9.10", 80), ("localhost", 80)):
        with socket.socket() as sock:
            sock.connect(address)
    for address6 in (("::1", 80, 0, 0), ("::ffff:127.0.0.1", 80, 0, 0)):
        with socket.socket(socket.AF_INET6) as sock:
            sock.connect_ex(address6)
    with udp() as sock:
        sock.sendto(b"x", ("127.0.0.1", 53))
        sock.sendmsg([b"x"])  # no address: the connected peer
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(tmp_path / "socket"))
    for host in ("localhost", "127.0.0.1", "::1", "192.0.2.1", None):  # literals: no query
        socket.getaddrinfo(host, 80)
    assert findings == []
    assert (
        real.names()
        == ["connect"] * 3
        + ["connect_ex"] * 2
        + ["sendto", "sendmsg"]
        + ["connect"]
        + ["getaddrinfo"] * 5
    )


def test_names_mapped_to_loopback_by_the_hosts_file_only(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost vm  # comment\n"
        "::1 ip6-localhost\n"
        "127.0.1.1 box.local box\n"
        "10.1.2.3 db\n"
        "127.0.0.1 split\n10.0.0.9 split\n"
        "# 127.0.0.1 commented\n"
    )
    assert network_guard.loopback_names(str(hosts)) == {
        "localhost",
        "vm",
        "ip6-localhost",
        "box.local",
        "box",
    }


def test_a_swallowed_refusal_still_fails_the_test(real: RealCalls, tmp_path: Path) -> None:
    """What the session's autouse fixture reads: findings of this process, and of the
    processes it started (their log file), each reported once."""
    tally = network_guard.Findings(tmp_path / "findings.log")
    with network_guard.recording_only_to(tally.record):
        try:
            with socket.socket() as sock:
                sock.connect(ELSEWHERE_V4)
        except OSError:
            pass  # as code under test might
    network_guard.file_recorder(str(tally.log_path))("connect(...) in pid 1")
    found = tally.new()
    assert len(found) == 2
    assert "connect(('192.0.2.1', 9))" in found[0]
    assert "In a process the tests started" in found[1]
    assert tally.new() == []
    assert real.calls == []


CHILD = textwrap.dedent(
    """
    import socket, sys

    guard = sys.modules.get("_msc3870_network_guard")
    if guard is None or not guard.installed():
        sys.exit(3)  # not guarded: stop before any connection
    calls = []
    for name in list(guard.REAL):
        guard.REAL[name] = lambda *args, name=name: calls.append(name)
    for attempt in (
        lambda: socket.socket().connect(("192.0.2.1", 9)),
        lambda: socket.getaddrinfo("guard-test.invalid", 80),
    ):
        try:
            attempt()
        except OSError as exc:
            print("refused:", exc)
    print("real calls:", calls)
    """
)


def test_processes_the_tests_start_are_guarded_and_report_here(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    env = {**os.environ, network_guard.LOG_ENV: str(log)}
    assert str(network_guard.SITE_DIR) in env["PYTHONPATH"].split(":")
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("refused:") == 2
    assert "real calls: []" in done.stdout
    recorded = log.read_text()
    assert "connect(('192.0.2.1', 9))" in recorded
    assert "getaddrinfo('guard-test.invalid')" in recorded
    assert GUARD_FINDINGS.log_path != log  # the session's own file is untouched


def test_a_forked_child_reports_to_the_log_file(real: RealCalls) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a refusal, then out without pytest's cleanup
        with contextlib.suppress(OSError):
            socket.socket().connect(ELSEWHERE_V4)
        os.write(write_end, b"done")
        os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 4) == b"done"
    os.waitpid(pid, 0)
    found = GUARD_FINDINGS.new()  # taken here: expected, not a failure of this test
    assert len(found) == 1 and "connect(('192.0.2.1', 9))" in found[0]
    assert real.calls == []


def test_a_swallowed_refusal_fails_the_test_at_teardown(tmp_path: Path) -> None:
    env = {
        **os.environ,
        network_guard.LOG_ENV: str(tmp_path / "child-session.log"),  # not this session's
        "MEDIAREPO_DATA_DIR": str(tmp_path),
    }
    done = child_pytest(
        # Not a test_*.py file: collected only when named, as here.
        "guard_child_session.py::test_swallows_a_refused_connection",
        env=env,
        cwd=Path(__file__).parent,
        timeout=240,
    )
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    assert "1 passed, 1 error" in done.stdout, done.stdout
    assert "ERROR at teardown of test_swallows_a_refused_connection" in done.stdout
    assert "A test reached for another machine" in done.stdout
    assert "connect(('192.0.2.1', 9))" in done.stdout
