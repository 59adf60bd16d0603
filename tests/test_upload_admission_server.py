"""Upload admission on the real server (gunicorn + uvicorn, as ``make run`` starts it):
credentials before a byte of the body, the per-address cap, and stalled bodies dropped.
One worker, so that every request meets the same caps."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from .helpers import assert_matrix_error, mxc_path
from .server_helpers import Server, read_response, start_server

MiB = 1024 * 1024
IDLE_TIMEOUT = 2.0
KEEP_ALIVE = 3
BOGUS_URL = "/_matrix/media/unstable/com.beeper.msc3870/upload_url/not-a-token"


@pytest.fixture(scope="module")
def admitting_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("admission"),
        "admission",
        migrate=True,
        WEB_CONCURRENCY="1",
        MSC3870_MAX_UPLOAD_SIZE=str(50 * MiB),
        MSC3870_UPLOAD_BODIES_PER_ADDRESS_MAX="2",
        MSC3870_UPLOAD_IDLE_TIMEOUT_SECONDS=str(IDLE_TIMEOUT),
        # 100 bytes/s after 1 s: the 4 KiB of a stalled upload earn 41 s, so the idle
        # timeout is what drops it; a byte now and then is dropped at about 1 s.
        MSC3870_UPLOAD_MIN_BYTES_PER_SECOND="100",
        MSC3870_UPLOAD_RATE_GRACE_SECONDS="1",
        GUNICORN_CMD_ARGS=f"--keep-alive {KEEP_ALIVE}",
    )
    yield running
    running.stop()


def head(method: str, target: str, length: int, **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection (EOF or a reset) within 5 s."""
    sock.settimeout(5)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def stalled_upload(server: Server, target: str, **headers: str) -> socket.socket:
    """An upload announcing 40 MiB that sends 4 KiB and then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head("PUT" if "upload_url" in target else "POST", target, 40 * MiB, **headers))
    sock.sendall(b"x" * 4096)
    return sock


@pytest.mark.parametrize(
    ("target", "status", "errcode"),
    [
        (BOGUS_URL, 403, "M_FORBIDDEN"),
        ("/_matrix/media/v3/upload", 401, "M_MISSING_TOKEN"),
        ("/_matrix/media/v3/upload?access_token=mr_nobody", 401, "M_UNKNOWN_TOKEN"),
    ],
)
def test_uploads_without_a_credential_are_refused_at_once_and_closed(
    admitting_server: Server, target: str, status: int, errcode: str
) -> None:
    started = time.monotonic()
    with stalled_upload(admitting_server, target) as sock:
        answer_status, headers, body = read_response(sock, length_required=True)
        assert time.monotonic() - started < IDLE_TIMEOUT  # not the idle timeout's answer
        assert_matrix_error(answer_status, body, status, errcode)
        assert headers["connection"] == "close"
        if status == 401:
            assert headers["www-authenticate"].startswith('Bearer realm="matrix"')
        assert closed_by_server(sock)


@pytest.mark.parametrize("size", [4, 2 * MiB + 3])  # in memory; streamed from its start
def test_a_client_that_expects_100_continue_is_refused_without_sending_its_body(
    admitting_server: Server, size: int
) -> None:
    """No 100 Continue for a refused upload: the final answer is the first thing sent.
    An admitted one gets it, also when its body is handed to the view before a byte of
    it arrived."""
    with socket.create_connection(("127.0.0.1", admitting_server.port), timeout=10) as sock:
        sock.sendall(head("POST", "/_matrix/media/v3/upload", 40 * MiB, Expect="100-continue"))
        status, _, body = read_response(sock, length_required=True)
        assert_matrix_error(status, body, 401, "M_MISSING_TOKEN")
    auth = f"Bearer {admitting_server.token}"
    with socket.create_connection(("127.0.0.1", admitting_server.port), timeout=10) as sock:
        sock.sendall(
            head(
                "POST", "/_matrix/media/v3/upload", size, Expect="100-continue", Authorization=auth
            )
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")  # admitted: send it
        sock.sendall(b"d" * size)
        assert read_response(sock, length_required=True)[0] == 200


def test_a_stalled_upload_with_a_valid_token_is_dropped_with_408(
    admitting_server: Server,
) -> None:
    started = time.monotonic()
    with stalled_upload(
        admitting_server,
        "/_matrix/media/v3/upload",
        Authorization=f"Bearer {admitting_server.token}",
    ) as sock:
        status, headers, body = read_response(sock, length_required=True)
        elapsed = time.monotonic() - started
        assert_matrix_error(status, body, 408, "M_UNKNOWN")
        assert "No bytes" in json.loads(body)["error"]
        assert IDLE_TIMEOUT * 0.9 <= elapsed < IDLE_TIMEOUT + 5, elapsed
        assert headers["connection"] == "close"
        assert closed_by_server(sock)


def test_the_per_address_cap_refuses_with_429_and_recovers(admitting_server: Server) -> None:
    auth = {"Authorization": f"Bearer {admitting_server.token}"}
    admitting_server.client.create()  # the token resolved: the uploads below are admitted at once
    held = [stalled_upload(admitting_server, "/_matrix/media/v3/upload", **auth) for _ in range(2)]
    try:
        time.sleep(0.5)  # both admitted and reading
        with stalled_upload(admitting_server, "/_matrix/media/v3/upload", **auth) as third:
            status, headers, body = read_response(third, length_required=True)
            assert_matrix_error(status, body, 429, "M_LIMIT_EXCEEDED")
            assert json.loads(body)["retry_after_ms"] > 0
            assert int(headers["retry-after"]) >= 1
        for sock in held:  # the idle timeout drops them, and their places free
            assert read_response(sock, length_required=True)[0] == 408
    finally:
        for sock in held:
            sock.close()
    created = admitting_server.client.create()
    put = requests.put(
        f"{admitting_server.base_url}/_matrix/media/v3/upload/{mxc_path(created['content_uri'])}",
        data=b"fine",
        headers={**auth, "Content-Type": "application/octet-stream"},
        timeout=15,
    )
    assert put.status_code == 200, put.text
    url = requests.put(created["upload_url"], data=b"fine", timeout=15)
    assert url.status_code == 409  # this id is complete: the upload URL reached the view


def responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """The next ``count`` responses on ``sock`` (each with a Content-Length): statuses and
    bodies, however the bytes came."""
    received, found = b"", []
    while len(found) < count:
        head_end = received.find(b"\r\n\r\n")
        if head_end >= 0:
            head = received[:head_end].decode("latin1")
            length = int(head.lower().split("content-length:")[1].split("\r\n")[0])
            end = head_end + 4 + length
            if len(received) >= end:
                found.append((int(head.split(" ", 2)[1]), received[head_end + 4 : end]))
                received = received[end:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(found)} responses"
        received += chunk
    return found


def test_an_upload_and_the_request_after_it_share_a_connection(admitting_server: Server) -> None:
    """Past its first MiB an upload is received straight into the store's buffers: the
    request sent right behind it, in the same bytes, is still parsed and answered."""
    data = os.urandom(6 * MiB + 321)
    target = "/_matrix/media/v3/upload?filename=a.bin"
    auth = {"Authorization": f"Bearer {admitting_server.token}"}
    with socket.create_connection(("127.0.0.1", admitting_server.port), timeout=30) as sock:
        sock.sendall(
            head("POST", target, len(data), **auth)
            + data
            + b"GET /_matrix/client/versions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        (uploaded, answer), (versions, _) = responses(sock, 2)
    assert uploaded == 200, answer
    assert versions == 200
    download = requests.get(
        f"{admitting_server.base_url}/_matrix/client/v1/media/download/"
        + mxc_path(json.loads(answer)["content_uri"]),
        headers=auth,
        timeout=30,
    )
    assert download.status_code == 200
    assert hashlib.sha256(download.content).digest() == hashlib.sha256(data).digest()


def upload_past_its_first_mib(server: Server) -> socket.socket:
    """A POST announcing 20 MiB that sends 3 MiB (received into the store's buffers past
    the first) and then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        head("POST", "/_matrix/media/v3/upload", 20 * MiB, Authorization=f"Bearer {server.token}")
    )
    sock.sendall(os.urandom(3 * MiB))
    return sock


def test_an_upload_that_stalls_past_its_first_mib_is_dropped_with_408(
    admitting_server: Server,
) -> None:
    with upload_past_its_first_mib(admitting_server) as sock:
        status, headers, body = read_response(sock, length_required=True)
        assert_matrix_error(status, body, 408, "M_UNKNOWN")
        assert headers["connection"] == "close"
        assert closed_by_server(sock)


def test_a_client_that_leaves_past_the_first_mib_leaves_the_server_serving(
    admitting_server: Server,
) -> None:
    auth = {"Authorization": f"Bearer {admitting_server.token}"}
    with upload_past_its_first_mib(admitting_server):
        time.sleep(0.3)  # the store is writing
    time.sleep(0.3)
    put = requests.post(
        f"{admitting_server.base_url}/_matrix/media/v3/upload",
        data=os.urandom(2 * MiB),
        headers={**auth, "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert put.status_code == 200, put.text


def test_the_server_logged_no_traceback(admitting_server: Server) -> None:
    assert "Traceback" not in admitting_server.log_text()


def test_the_rest_of_a_refused_body_must_keep_the_pace(admitting_server: Server) -> None:
    """A refused body under 1 MiB is drained, the connection kept: a client trickling it
    a byte at a time is closed at the rate bound (uvicorn alone would hold it as long as
    bytes come now and then)."""
    with socket.create_connection(("127.0.0.1", admitting_server.port), timeout=10) as sock:
        sock.sendall(head("PUT", BOGUS_URL, 512 * 1024))
        status, headers, body = read_response(sock, length_required=True)
        assert_matrix_error(status, body, 403, "M_FORBIDDEN")
        assert "connection" not in headers  # kept: the body is drained
        started = time.monotonic()
        sock.settimeout(0.25)
        closed = False
        while not closed and time.monotonic() - started < 10:
            try:
                sock.sendall(b"x")
                closed = sock.recv(1024) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "the trickling connection was held"
        assert time.monotonic() - started < 5


def test_a_drained_body_keeps_the_connection_for_the_next_request(
    admitting_server: Server,
) -> None:
    with socket.create_connection(("127.0.0.1", admitting_server.port), timeout=10) as sock:
        sock.sendall(head("PUT", BOGUS_URL, 64 * 1024))
        assert read_response(sock, length_required=True)[0] == 403
        sock.sendall(b"x" * 64 * 1024)  # the rest of the body, drained
        sock.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock, length_required=True)[0] == 200


def test_a_connection_idle_after_a_drained_body_is_closed_at_the_keep_alive_timeout(
    admitting_server: Server,
) -> None:
    """The body's bytes cancelled uvicorn's keep-alive timeout, armed with the answer."""
    with socket.create_connection(("127.0.0.1", admitting_server.port), timeout=10) as sock:
        sock.sendall(head("PUT", BOGUS_URL, 64 * 1024))
        assert read_response(sock, length_required=True)[0] == 403
        sock.sendall(b"x" * 64 * 1024)
        started = time.monotonic()
        assert closed_by_server(sock)
        assert time.monotonic() - started < KEEP_ALIVE + 1.5
