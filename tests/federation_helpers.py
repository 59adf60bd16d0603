"""Helpers of the federation tests: a real local HTTP(S) server and a fake remote server."""

from __future__ import annotations

import datetime
import ipaddress
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
