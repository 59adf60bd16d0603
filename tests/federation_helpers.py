"""Other servers, for the federation tests: real local HTTP(S) servers on 127.0.0.1
(``local_server``, ``silent_server``, ``remote_media_server``), another homeserver's keys
and signatures (``FakeRemote``, ``KeyServers``, ``fed_get``), and federation answers read
back as Synapse reads them (``parse_multipart``, ``multipart``)."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey

Route = Callable[[BaseHTTPRequestHandler], None]

FED_DOWNLOAD = "/_matrix/federation/v1/media/download/"
FED_THUMBNAIL = "/_matrix/federation/v1/media/thumbnail/"
DAY_MS = 24 * 60 * 60 * 1000
# How far past its deadline a call may end (thread wake-ups on a busy machine).
SLACK_SECONDS = 1.0


@dataclass
class LocalServer:
    """A real HTTP server on 127.0.0.1; ``hits`` lists the paths it was asked for."""

    port: int
    scheme: str
    hits: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def server_name(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def local_server(
    routes: dict[str, Route], tls: ssl.SSLContext | None = None
) -> Iterator[LocalServer]:
    state: dict[str, LocalServer] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _dispatch(self) -> None:
            state["server"].hits.append(self.path)
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                send(self, 404, b'{"errcode":"M_UNRECOGNIZED"}')
            else:
                route(self)

        do_GET = do_POST = _dispatch

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state["server"] = LocalServer(server.server_address[1], "https" if tls else "http")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["server"]
    finally:
        server.shutdown()
        server.server_close()


def send(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> None:
    handler.send_response(status)
    headers = {"Content-Type": "application/json", **(headers or {})}
    if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
        headers["Content-Length"] = str(len(body))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def self_signed_tls(tmp_path: Path) -> ssl.SSLContext:
    """A server TLS context with a self-signed certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


@dataclass
class FakeRemote:
    """Another homeserver: its name and its own Ed25519 key pair."""

    server_name: str
    key: SigningKey = field(default_factory=lambda: generate_signing_key("rem1"))

    @property
    def key_id(self) -> str:
        return f"ed25519:{self.key.version}"

    def key_response(
        self,
        valid_until_ts: int,
        *,
        server_name: str | None = None,
        extra_keys: tuple[SigningKey, ...] = (),
        sign_with: list[SigningKey] | None = None,
    ) -> dict[str, Any]:
        """Its ``/_matrix/key/v2/server`` answer, signed by ``sign_with`` (its key)."""
        body: dict[str, Any] = {
            "server_name": server_name or self.server_name,
            "valid_until_ts": valid_until_ts,
            "verify_keys": {
                f"ed25519:{k.version}": {"key": encode_verify_key_base64(get_verify_key(k))}
                for k in [self.key, *extra_keys]
            },
            "old_verify_keys": {},
        }
        for key in [self.key] if sign_with is None else sign_with:
            body = sign_json(body, self.server_name, key)
        return body


def undelegated(server_name: str) -> Any:
    """``discovery.resolve`` for a made-up name that publishes no delegation (no
    well-known, no SRV): its host on port 8448, as the spec's last step says; no DNS."""
    from msc3870.federation.discovery import Destination

    return Destination(server_name, 8448, server_name, 8448, server_name)


@contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never says a byte (nor
    completes a TLS handshake); yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()


# --- other servers' keys, and their signed requests to us ----------------------------


class KeyServers:
    """Other servers' ``/_matrix/key/v2/server``, answered at the keyring's HTTP layer
    (the ``key_servers`` fixture installs it): URL -> answer (a value, or a function of
    the request body), with a log of the requests."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.requests: list[tuple[str, str, Any]] = []

    def __call__(
        self, method: str, url: str, body: Any | None = None, *, host: str | None = None
    ) -> Any:
        from msc3870.federation import keyring

        self.requests.append((method, url, body))
        answer = self.answers.get(url)
        if answer is None:
            raise keyring.KeyLookupError(f"{url} answered 404")
        return answer(body) if callable(answer) else answer

    def serve(self, remote: FakeRemote, answer: Any) -> None:
        self.answers[f"https://{remote.server_name}:8448/_matrix/key/v2/server"] = answer

    def publish(self, remote: FakeRemote) -> FakeRemote:
        """``remote`` answers with its own key, valid for a day from each request."""
        from msc3870.federation import keyring

        self.serve(remote, lambda _body: remote.key_response(keyring.now_ms() + DAY_MS))
        return remote


def signed(
    remote: FakeRemote, uri: str, *, destination: str | None = None, method: str = "GET"
) -> dict[str, str]:
    """Headers of a request from ``remote`` to us for ``uri`` (path and query as sent)."""
    from msc3870.conf import app_settings
    from msc3870.federation.xmatrix import sign_request

    header = sign_request(
        method,
        uri,
        destination or app_settings.SERVER_NAME,
        origin=remote.server_name,
        signing_key=remote.key,
    )
    return {"Authorization": header}


def fed_get(remote: FakeRemote, uri: str, **kwargs: Any) -> Any:
    """A GET of ``uri`` signed by ``remote``, through Django's test client."""
    from django.test import Client

    return Client().get(uri, headers=signed(remote, uri, **kwargs))


# --- federation answers, read back as Synapse reads them ------------------------------


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    """The parts of a ``multipart/mixed`` body, with python-multipart's callback parser.
    The boundary is taken as Synapse takes it: whatever follows ``boundary=``."""
    from python_multipart import MultipartParser

    assert content_type.startswith("multipart/mixed; boundary=")
    boundary = content_type.split("boundary=")[1]
    parts: list[Part] = []
    field_name: list[bytes] = []

    def on_part_begin() -> None:
        parts.append(Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field_name.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        name = b"".join(field_name).decode().lower()
        field_name.clear()
        parts[-1].headers[name] = parts[-1].headers.get(name, "") + data[start:end].decode()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_part_data": on_part_data,
        },
    )
    # Fed in small pieces, as a network delivers it.
    for start in range(0, len(body), 1000):
        parser.write(body[start : start + 1000])
    parser.finalize()
    return parts


def multipart(response: Any) -> list[Part]:
    """The two parts of a 200 federation media answer (asserted: metadata ``{}`` first)."""
    from .helpers import body_of

    assert response.status_code == 200, body_of(response)[:500]
    body = body_of(response)
    if response.has_header("Content-Length"):
        assert int(response["Content-Length"]) == len(body)
    parts = parse_multipart(response["Content-Type"], body)
    assert len(parts) == 2
    metadata, _ = parts
    assert metadata.headers == {"content-type": "application/json"}
    assert metadata.data == b"{}"
    return parts


# --- another server whose media we fetch ----------------------------------------------


class Remote:
    """A real HTTPS server on 127.0.0.1 serving the federation media endpoint as the spec
    and Synapse do (server name ``127.0.0.1:<port>``: an IP literal, no discovery).
    ``files``: media id -> (bytes, content type); ``routes`` may be changed by a test."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.authorizations: list[tuple[str, str]] = []  # (path, Authorization)
        self.gate: threading.Event | None = None
        self.server: LocalServer | None = None
        self.routes: dict[str, Route] = {}

    @property
    def name(self) -> str:
        assert self.server is not None
        return self.server.server_name

    def fed_hits(self) -> int:
        assert self.server is not None
        return sum(1 for hit in self.server.hits if hit.startswith(FED_DOWNLOAD))


def multipart_file(body: bytes, content_type: str, filename: str = "f") -> tuple[bytes, str]:
    """A federation media answer of ``body``: (the multipart body, its content type)."""
    from msc3870.federation.multipart import MultipartMedia

    framing = MultipartMedia()
    chunks, _ = framing.file(content_type, f"inline; filename={filename}", [body], len(body))
    return b"".join(chunks), framing.content_type


@contextmanager
def remote_media_server(tmp_path: Path) -> Iterator[Remote]:
    state = Remote()

    def federation(handler: Any) -> None:
        state.authorizations.append((handler.path, handler.headers.get("Authorization", "")))
        if state.gate is not None:
            state.gate.wait(20)
        media_id = handler.path.split("?")[0].rsplit("/", 1)[1]
        if media_id not in state.files:
            send(handler, 404, b'{"errcode":"M_NOT_FOUND","error":"no"}')
            return
        body, content_type = multipart_file(*state.files[media_id])
        send(handler, 200, body, {"Content-Type": content_type})

    class Routes(dict[str, Route]):
        def get(self, path: str, default: Any = None) -> Any:  # type: ignore[override]
            if path.startswith(FED_DOWNLOAD) and "federation" in self:
                return self["federation"]
            return super().get(path, default)

    routes = Routes(federation=federation)
    state.routes = routes
    with local_server(routes, tls=self_signed_tls(tmp_path)) as server:
        state.server = server
        yield state
