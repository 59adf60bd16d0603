"""What the tests do as clients and how they look at the results, shared by every test
module (the fixtures built on these are in ``conftest.py``).

- ``MatrixClient``: one user's requests and what a client does with them (create, upload
  by POST, by PUT and through the upload URL, complete, download, thumbnail), in process
  through Django's test client or over HTTP to a running server.
- media and bodies: ``png_bytes``, ``animated_gif``, ``media_of``, ``media_row``,
  ``mxc_path``, ``bytes_at_upload_url``, ``put_body``, ``LyingBody``, ``ThenAtTheEnd``,
  ``body_of``, ``files_under``, ``media_files``, ``file_mode``.
- every read path at once: ``every_read``, ``assert_all_not_found``.
- settings and tokens: ``msc3870_settings``, ``typed``, ``environment_variables``,
  ``make_token``, ``bearer``.
- S3 with moto: ``BUCKET``, ``INCOMING_BUCKET``, ``s3_storages``, ``bucket_keys``,
  ``client_put``.
- processes and local services: ``free_port``, ``wait_until``, ``FakeClamd``,
  ``child_pytest``, ``connections_per_worker``.
- answers: ``assert_matrix_error``, ``data_queries``.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

from django.conf import settings
from PIL import Image

if TYPE_CHECKING:
    from django.test.utils import CaptureQueriesContext

    from msc3870.models import Media

T = TypeVar("T")

CREATE = "/_matrix/media/v1/create"
UPLOAD = "/_matrix/media/v3/upload"
COMPLETE = "/_matrix/media/v1/upload/{path}/complete"
UNSTABLE_COMPLETE = "/_matrix/media/unstable/com.beeper.msc3870/upload/{path}/complete"
V1_DOWNLOAD = "/_matrix/client/v1/media/download/"
V1_THUMBNAIL = "/_matrix/client/v1/media/thumbnail/"
LEGACY_DOWNLOAD = "/_matrix/media/v3/download/"
LEGACY_THUMBNAIL = "/_matrix/media/v3/thumbnail/"
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


# ------------------------------------------------------------------------ media, bytes


def png_bytes(width: int = 8, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def animated_gif(size: int = 50, *, unique: bool = False) -> bytes:
    """Three frames; ``unique``: the last one random, so that no other upload has these
    bytes."""
    frames = [Image.new("RGB", (size, size), colour) for colour in ("red", "blue", "green")]
    if unique:
        frames[-1] = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3))
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def mxc_path(content_uri: str) -> str:
    """``mxc://server/id`` -> ``server/id``."""
    assert content_uri.startswith("mxc://"), content_uri
    return content_uri[len("mxc://") :]


def media_of(content_uri: str) -> Media:
    """The row of ``mxc://server/id``, read now."""
    server_name, media_id = mxc_path(content_uri).split("/")
    return media_row(server_name, media_id)


def media_row(server_name: str, media_id: str) -> Media:
    """The row of ``server_name``'s ``media_id`` (other servers' media too), read now."""
    from msc3870.models import Media

    return Media.objects.get(server_name=server_name, media_id=media_id)


def bytes_at_upload_url(client: MatrixClient, data: bytes) -> dict[str, Any]:
    """A new id (``/create``'s answer) whose upload URL received ``data``, written to the
    store as that endpoint writes it; ``/complete`` not called yet."""
    from msc3870.stores import get_store

    created = client.create()
    get_store().write_stream(
        media_of(created["content_uri"]).incoming_key,
        io.BytesIO(data),
        max_size=len(data),
        expected_size=len(data),
    )
    return created


def body_of(response: Any) -> bytes:
    """The whole body of a Django test response (streamed or not) or a ``requests`` one."""
    if getattr(response, "streaming", False):
        return b"".join(response.streaming_content)
    return bytes(response.content)


class LyingBody(io.RawIOBase):
    """A body that keeps going past the Content-Length it announced (and a client that
    says nothing about its size): ``size`` bytes of ``y``."""

    def __init__(self, size: int) -> None:
        self.remaining = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        count = min(len(buffer), self.remaining)
        buffer[:count] = b"y" * count
        self.remaining -= count
        return count


class ThenAtTheEnd(io.BytesIO):
    """A body that runs ``meanwhile`` once, when its last byte has been read: another
    party acting while an upload's body is still open."""

    def __init__(self, data: bytes, meanwhile: Callable[[], None]) -> None:
        super().__init__(data)
        self.meanwhile: Callable[[], None] | None = meanwhile

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if not chunk and self.meanwhile is not None:
            run, self.meanwhile = self.meanwhile, None
            run()
        return chunk


def put_body(client: MatrixClient, media: Media, body: Any, size: int) -> Media:
    """A PUT of ``body`` (announced as ``size`` bytes of text) to ``media`` as
    ``client``'s user, through the service the view calls (``uploads.upload_to_media``)."""
    from msc3870 import uploads
    from msc3870.auth import MatrixUser

    return uploads.upload_to_media(
        MatrixUser(client.user_id),
        "localhost",
        media.media_id,
        body,
        content_length=size,
        content_type="text/plain",
        filename=None,
    )


def url_path(url: str) -> str:
    """The path and query of an absolute URL, for Django's test client."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def files_under(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def media_files() -> list[str]:
    """Every file of the local store (the embedded default's media directory)."""
    return files_under(Path(settings.MEDIA_DIR))


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------- settings, tokens


def msc3870_settings(**overrides: Any) -> Any:
    """``override_settings`` for a few keys of the MSC3870 dict, keeping the others."""
    from django.test import override_settings

    return override_settings(MSC3870={**settings.MSC3870, **overrides})


def environment_variables() -> set[str]:
    """Every environment variable a setting of the app is declared with."""
    from msc3870.conf import SETTINGS

    return {s.env.var for s in SETTINGS.values() if s.env is not None}


def typed(value: Any) -> Any:
    """``value`` with the type of every scalar in it: 20 and 20.0 differ, so do 1 and True,
    and a list and a tuple."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(item) for item in value])
    return (type(value).__name__, value)


def make_token(user_id: str, **fields: Any) -> str:
    """A new local access token of ``user_id`` (in the test's database)."""
    from msc3870.models import AccessToken, digest_token

    token = "mr_" + secrets.token_urlsafe(16)
    AccessToken.objects.create(user_id=user_id, token_digest=digest_token(token), **fields)
    return token


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


# ------------------------------------------------------------------------ the client


class Transport(Protocol):
    def request(
        self,
        method: str,
        target: str,
        data: Any,
        content_type: str | None,
        headers: dict[str, str],
        **options: Any,
    ) -> Any: ...


@dataclass
class DjangoTransport:
    """In process, through Django's test client; absolute URLs (upload URLs) are sent to
    their path."""

    client: Any = None

    def __post_init__(self) -> None:
        if self.client is None:
            from django.test import Client

            self.client = Client()

    def request(
        self,
        method: str,
        target: str,
        data: Any,
        content_type: str | None,
        headers: dict[str, str],
        **options: Any,
    ) -> Any:
        path = url_path(target) if "://" in target else target
        if method == "GET":
            return self.client.get(path, headers=headers, **options)
        return self.client.generic(
            method,
            path,
            data,
            content_type=content_type or "application/octet-stream",
            headers=headers,
            **options,
        )


@dataclass
class HTTPTransport:
    """Over HTTP with ``requests``, to ``base_url`` (or to an absolute URL: an upload URL
    in the bucket). Every request is bounded by ``timeout``."""

    base_url: str
    verify: bool | str = True
    timeout: float = 120

    def request(
        self,
        method: str,
        target: str,
        data: Any,
        content_type: str | None,
        headers: dict[str, str],
        **options: Any,
    ) -> Any:
        import requests

        url = target if "://" in target else self.base_url + target
        if content_type is not None:
            headers = {"Content-Type": content_type, **headers}
        options.setdefault("timeout", self.timeout)
        options.setdefault("verify", self.verify)
        return requests.request(method, url, data=data, headers=headers, **options)


@dataclass
class MatrixClient:
    """A Matrix client of this server, as one user (``token``; none: anonymous).

    ``get``/``post``/``put`` send a request with the user's token; the rest is what
    clients do: ``create`` an id, upload by POST (``upload``, ``uploaded``), by PUT
    (``put_upload``) or to the upload URL (``put_to_url``, then ``complete``; all three:
    ``upload_through_url``), ``download`` and ``thumbnail``. Responses are the
    transport's own (Django's test responses, or ``requests``'): read bodies with
    ``body_of``."""

    transport: Transport
    token: str = ""
    user_id: str = ""

    @classmethod
    def in_process(cls, token: str = "", user_id: str = "") -> MatrixClient:
        return cls(DjangoTransport(), token, user_id)

    @classmethod
    def over_http(
        cls, base_url: str, token: str = "", user_id: str = "", *, verify: bool | str = True
    ) -> MatrixClient:
        return cls(HTTPTransport(base_url, verify=verify), token, user_id)

    @property
    def client(self) -> Any:
        """Django's test client beneath (in process only)."""
        assert isinstance(self.transport, DjangoTransport)
        return self.transport.client

    def _headers(self, headers: dict[str, str] | None, *, token: bool = True) -> dict[str, str]:
        auth = bearer(self.token) if token and self.token else {}
        return {**auth, **(headers or {})}

    # -- requests ------------------------------------------------------------------------

    def get(self, path: str, headers: dict[str, str] | None = None, **options: Any) -> Any:
        return self.transport.request("GET", path, b"", None, self._headers(headers), **options)

    def post(
        self,
        path: str,
        data: Any = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> Any:
        return self.transport.request(
            "POST", path, data, content_type, self._headers(headers), **options
        )

    def put(
        self,
        path: str,
        data: Any = b"",
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> Any:
        return self.transport.request(
            "PUT", path, data, content_type, self._headers(headers), **options
        )

    # -- what clients do -----------------------------------------------------------------

    def create(self, query: str = "") -> dict[str, Any]:
        """A new media id: ``/create``'s answer (asserted 200)."""
        response = self.post(CREATE + query)
        assert response.status_code == 200, body_of(response)
        return response.json()

    def upload(
        self,
        data: Any = b"content",
        content_type: str = "text/plain",
        *,
        filename: str = "",
        query: str = "",
    ) -> Any:
        """The one-shot ``POST /upload``; the response."""
        if filename:
            query = f"?filename={filename}" + (f"&{query.lstrip('?')}" if query else "")
        return self.post(UPLOAD + query, data, content_type)

    def uploaded(
        self, data: Any = b"content", content_type: str = "text/plain", *, filename: str = ""
    ) -> str:
        """``upload``, asserted 200: the content URI."""
        response = self.upload(data, content_type, filename=filename)
        assert response.status_code == 200, body_of(response)
        return str(response.json()["content_uri"])

    def put_upload(
        self,
        content_uri: str,
        data: Any,
        content_type: str = "application/octet-stream",
        query: str = "",
    ) -> Any:
        """The MSC2246 ``PUT /upload/{server}/{id}``, with the user's token."""
        return self.put(f"{UPLOAD}/{mxc_path(content_uri)}{query}", data, content_type)

    def put_to_url(
        self, upload_url: str, data: Any, content_type: str = "application/octet-stream"
    ) -> Any:
        """A PUT to an upload URL: no Matrix token, the URL is the credential."""
        return self.transport.request("PUT", upload_url, data, content_type, {})

    def complete(self, content_uri: str, query: str = "", *, unstable: bool = False) -> Any:
        path = (UNSTABLE_COMPLETE if unstable else COMPLETE).format(path=mxc_path(content_uri))
        return self.post(path + query, b"{}")

    def upload_through_url(
        self, data: Any, content_type: str = "application/octet-stream", *, query: str = ""
    ) -> str:
        """``create``, a PUT to the upload URL, ``complete`` (``query`` on both requests
        to this server), each asserted 200: the content URI."""
        created = self.create(query)
        put = self.put_to_url(created["upload_url"], data, content_type)
        assert put.status_code == 200, body_of(put)
        done = self.complete(created["content_uri"], query)
        assert done.status_code == 200, body_of(done)
        return str(created["content_uri"])

    def download(
        self,
        content_uri: str,
        query: str = "",
        *,
        filename: str = "",
        legacy: bool = False,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> Any:
        """A download (client v1; ``legacy``: the unauthenticated v3 endpoint)."""
        path = (LEGACY_DOWNLOAD if legacy else V1_DOWNLOAD) + mxc_path(content_uri)
        path += f"/{filename}" if filename else ""
        return self.get(path + query, headers, **options)

    def thumbnail(
        self,
        content_uri: str,
        query: str = "?width=32&height=32",
        *,
        legacy: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Any:
        path = (LEGACY_THUMBNAIL if legacy else V1_THUMBNAIL) + mxc_path(content_uri)
        return self.get(path + query, headers)


def every_read(client: MatrixClient, media_id: str, peer: Any) -> dict[str, Any]:
    """Each way to read local media ``media_id``, none waiting for it: client v1 and legacy
    downloads and thumbnails (as ``client``), federation ones (signed by ``peer``)."""
    from .federation_helpers import FED_DOWNLOAD, FED_THUMBNAIL, fed_get

    content_uri = f"mxc://localhost/{media_id}"
    size = "?width=32&height=32&timeout_ms=0"
    return {
        "v1 download": client.download(content_uri, "?timeout_ms=0"),
        "v1 thumbnail": client.thumbnail(content_uri, size),
        "legacy download": client.download(content_uri, "?timeout_ms=0", legacy=True),
        "legacy thumbnail": client.thumbnail(content_uri, size, legacy=True),
        "federation download": fed_get(peer, FED_DOWNLOAD + media_id + "?timeout_ms=0"),
        "federation thumbnail": fed_get(peer, FED_THUMBNAIL + media_id + size),
    }


def assert_all_not_found(answers: dict[str, Any]) -> None:
    """Every answer is 404 ``M_NOT_FOUND``, saying nothing of why."""
    for name, response in answers.items():
        assert response.status_code == 404, (name, response.content)
        assert response.json()["errcode"] == "M_NOT_FOUND", name
        assert "large" not in response.json()["error"].lower(), name


# --------------------------------------------------------------------------- S3 (moto)

BUCKET = "media-test"
#: Where upload URLs write with ``S3_INCOMING_BUCKET`` (versioning on).
INCOMING_BUCKET = "media-incoming-test"


def s3_storages(**options: Any) -> dict[str, Any]:
    """``STORAGES`` with the media storage on S3 (bucket ``BUCKET``), ``options`` on top."""
    return {
        **settings.STORAGES,
        "msc3870": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": BUCKET,
                "region_name": "us-east-1",
                "access_key": "testing",
                "secret_key": "testing",
                "signature_version": "s3v4",
                **options,
            },
        },
    }


def bucket_keys(s3: Any, prefix: str = "", bucket: str = "") -> list[str]:
    """Every key in the media bucket (``bucket``: another one) under ``prefix``."""
    bucket = bucket or settings.STORAGES["msc3870"]["OPTIONS"]["bucket_name"]
    paginator = s3.get_paginator("list_objects_v2")
    return [
        item["Key"]
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
    ]


def client_put(s3: Any, created: dict[str, Any], data: bytes, content_type: str) -> None:
    """What a client's PUT to its presigned upload URL leaves in the bucket."""
    key = urlsplit(created["upload_url"]).path.lstrip("/")
    assert key == media_of(created["content_uri"]).incoming_key
    s3.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType=content_type)


# ---------------------------------------------------------------------- local services


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T], timeout: float = 30, what: str = "it", interval: float = 0.05
) -> T:
    """The first true value of ``predicate``, asked every ``interval`` seconds; past
    ``timeout``, an AssertionError (a hang fails, it does not hang the suite)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class FakeClamd:
    """Speaks clamd's INSTREAM protocol on a real socket of 127.0.0.1; flags the EICAR
    test string. ``scanned``: every stream it was sent."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.scanned: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                stream = conn.makefile("rb")
                assert stream.read(10) == b"zINSTREAM\0"
                data = b""
                while True:
                    (length,) = struct.unpack("!L", stream.read(4))
                    if length == 0:
                        break
                    data += stream.read(length)
                self.scanned.append(data)
                found = EICAR in data
                conn.sendall(b"stream: Eicar-Signature FOUND\0" if found else b"stream: OK\0")

    def close(self) -> None:
        self.server.close()


def child_pytest(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """A pytest of its own run with ``args`` (and ``env``): what it printed and its exit
    status."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def connections_per_worker(master_pid: int, port: int) -> dict[int, int]:
    """Established client connections on ``port`` each child of a gunicorn master holds
    (worker pid -> count)."""
    import psutil

    return {
        worker.pid: sum(
            1
            for conn in worker.net_connections(kind="tcp")
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port
        )
        for worker in psutil.Process(master_pid).children()
    }


# ---------------------------------------------------------------------------- answers


def assert_matrix_error(
    status: int, body: bytes, expected: int, errcode: str | None = None
) -> None:
    """``body`` is a Matrix error (``errcode`` and ``error``) and ``status`` the one
    expected."""
    assert status == expected, body[:300]
    error = json.loads(body)
    assert set(error) >= {"errcode", "error"}, error
    assert isinstance(error["errcode"], str) and error["errcode"].startswith("M_")
    assert isinstance(error["error"], str)
    if errcode is not None:
        assert error["errcode"] == errcode


TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


def data_queries(captured: CaptureQueriesContext) -> list[str]:
    """Statements that read or write data (a BEGIN or COMMIT is not a query)."""
    return [
        q["sql"] for q in captured.captured_queries if not q["sql"].startswith(TRANSACTION_CONTROL)
    ]


class JSONHandler(BaseHTTPRequestHandler):
    """A fake server's handler that answers JSON and logs nothing."""

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass
