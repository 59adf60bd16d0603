"""X-Matrix request authentication (spec "Request Authentication").

A request from another server carries ``Authorization: X-Matrix origin="...",
destination="...",key="ed25519:...",sig="..."``: an Ed25519 signature by the origin over the
canonical JSON of ``{"method", "uri", "origin", "destination"}`` (and ``"content"``, the
parsed JSON body, when there is one). ``uri`` is the path and query exactly as the request
line carried them: under ASGI ``scope["raw_path"]`` and ``scope["query_string"]``, never
Django's decoded ``request.path``, or a signature over ``/a%2Fb`` would be checked against
``/a/b`` and fail (or worse, two different requests would share one signature).

The header follows RFC 7235/9110 ``credentials``: the scheme (any case), one or more
spaces, then comma-separated ``name=value`` parameters with optional whitespace around the
commas; names are case-insensitive; a value is a token or a quoted string whose backslash
pairs are unescaped; as the spec asks for older servers, a colon is accepted in an unquoted
value. Unknown parameters are ignored, a repeated one makes the header malformed. Several
``Authorization`` headers may arrive, as separate headers or joined by commas into one (as
WSGI servers and Django do): the request is accepted if any X-Matrix credential verifies.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from signedjson.types import SigningKey

from ..conf import app_settings
from ..errors import Unauthorized
from ..server_names import is_valid_server_name
from . import keyring, keys

log = logging.getLogger(__name__)

SCHEME = "x-matrix"

# RFC 9110 token characters; the spec lets ":" into unquoted values for older servers.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_UNQUOTED_VALUE = r"[!#$%&'*+\-.^_`|~0-9A-Za-z:]+"
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e\x80-\xff])*"'
_OWS = r"[ \t]*"
_PARAM_RE = re.compile(rf"({_TOKEN}){_OWS}={_OWS}({_QUOTED}|{_UNQUOTED_VALUE})")
_SCHEME_RE = re.compile(rf"({_TOKEN}) +")
_TOKEN68_RE = re.compile(rf"[A-Za-z0-9\-._~+/]+=*{_OWS}(?:,|$)")
_AFTER_PARAM_RE = re.compile(rf"{_OWS}(?:,|$)")
_QUOTED_PAIR_RE = re.compile(r"\\(.)", re.DOTALL)


class MalformedAuthorization(ValueError):
    pass


@dataclass(frozen=True)
class XMatrixCredentials:
    origin: str
    destination: str | None
    key: str
    sig: str


def _unquote(value: str) -> str:
    if value.startswith('"'):
        return _QUOTED_PAIR_RE.sub(lambda m: m.group(1), value[1:-1])
    return value


def parse_credentials(header: str) -> list[tuple[str, dict[str, str]]]:
    """Every credential in one ``Authorization`` value: ``[(scheme lowercased, {name
    lowercased: unescaped value})]``. Raises MalformedAuthorization."""
    credentials: list[tuple[str, dict[str, str]]] = []
    pos, end = 0, len(header)
    expect_credential = True
    while True:
        # Empty list elements (",,") and whitespace between elements are allowed.
        while pos < end and header[pos] in " \t,":
            pos += 1
        if pos >= end:
            break
        param = _PARAM_RE.match(header, pos)
        if param and not expect_credential and credentials:
            params = credentials[-1][1]
        else:
            scheme = _SCHEME_RE.match(header, pos)
            if not scheme:
                raise MalformedAuthorization(f"Expected an auth scheme at {pos}")
            pos = scheme.end()
            credentials.append((scheme.group(1).lower(), {}))
            params = credentials[-1][1]
            param = _PARAM_RE.match(header, pos)
            if not param:
                # Another scheme's token68 credentials ("Bearer abc"): nothing for us.
                token68 = _TOKEN68_RE.match(header, pos)
                if not token68:
                    raise MalformedAuthorization(f"Expected a parameter at {pos}")
                pos = token68.end()
                expect_credential = True
                continue
        name = param.group(1).lower()
        if name in params:
            raise MalformedAuthorization(f"Parameter {name!r} given twice")
        params[name] = _unquote(param.group(2))
        pos = param.end()
        # After a parameter: the end, or optional whitespace and a comma.
        after = _AFTER_PARAM_RE.match(header, pos)
        if not after:
            raise MalformedAuthorization(f"Expected ',' at {pos}")
        pos = after.end()
        expect_credential = False
    return credentials


def parse_x_matrix(headers: Iterable[str]) -> list[XMatrixCredentials]:
    """The X-Matrix credentials among ``Authorization`` header values (other schemes are
    skipped). Raises MalformedAuthorization for an X-Matrix credential without origin, key
    or sig, or with an origin that is not a server name."""
    found = []
    for header in headers:
        for scheme, params in parse_credentials(header):
            if scheme != SCHEME:
                continue
            try:
                origin, key, sig = params["origin"], params["key"], params["sig"]
            except KeyError as exc:
                raise MalformedAuthorization(f"X-Matrix credential without {exc}") from exc
            if not is_valid_server_name(origin):
                raise MalformedAuthorization(f"Origin {origin!r} is not a server name")
            found.append(XMatrixCredentials(origin, params.get("destination"), key, sig))
    return found


def request_json(
    method: str, uri: str, origin: str, destination: str, content: Any | None = None
) -> dict[str, Any]:
    """The object whose signature an X-Matrix header carries."""
    signed: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        signed["content"] = content
    return signed


def authenticate(
    method: str,
    uri: str,
    authorization: Iterable[str],
    content: Any | None = None,
    *,
    now: int | None = None,
    wait: bool = True,
) -> str:
    """The origin server of a request, if one of its X-Matrix credentials verifies.

    ``uri`` is the raw path and query (``raw_request_uri``), ``authorization`` every
    ``Authorization`` value, ``content`` the parsed JSON body or None when there is none.
    Raises Unauthorized (401 ``M_UNAUTHORIZED``) otherwise; with ``wait=False``,
    ``keyring.KeyFetchPending`` while the origin's keys are being fetched."""
    try:
        credentials = parse_x_matrix(authorization)
    except MalformedAuthorization as exc:
        raise Unauthorized(f"Malformed Authorization header: {exc}") from exc
    if not credentials:
        raise Unauthorized("Missing X-Matrix Authorization header")
    server_name = app_settings.SERVER_NAME
    for credential in credentials:
        # The spec: a destination that is not ours must be refused; none is accepted from
        # older servers (we sign-check against our own name, so it cannot be another's).
        if credential.destination is not None and credential.destination != server_name:
            raise Unauthorized("Destination mismatch in Authorization header")
    if len({c.origin for c in credentials}) > 1:
        raise Unauthorized("Authorization headers from more than one origin")
    origin = credentials[0].origin

    failures = []
    for credential in credentials:
        signed = request_json(method, uri, origin, server_name, content)
        signed["signatures"] = {origin: {credential.key: credential.sig}}
        try:
            verify_key = keyring.get_verify_key(origin, credential.key, now, wait=wait)
        except keyring.KeyLookupError as exc:
            # The details (addresses, remote errors) go to the log, not to the requester.
            log.info("X-Matrix from %s: key %s: %s", origin, credential.key, exc)
            failures.append(f"No usable key {credential.key} of {origin}")
            continue
        try:
            verify_signed_json(signed, origin, verify_key)
        except SignatureVerifyException:
            failures.append(f"Invalid signature by {origin} with {credential.key}")
            continue
        return origin
    raise Unauthorized("; ".join(failures))


def sign_request(
    method: str,
    uri: str,
    destination: str,
    content: Any | None = None,
    *,
    origin: str | None = None,
    signing_key: SigningKey | None = None,
) -> str:
    """The ``Authorization`` value for a request of ours to ``destination``.

    ``uri`` must be exactly the path and query that will be sent; a JSON body must be sent
    as the canonical JSON of ``content`` (or any encoding of the same value)."""
    origin = origin or app_settings.SERVER_NAME
    signing_key = signing_key or keys.signing_key()
    signed = sign_json(request_json(method, uri, origin, destination, content), origin, signing_key)
    key_id = keys.key_id(signing_key)
    sig = signed["signatures"][origin][key_id]
    return (
        f'X-Matrix origin="{_escape(origin)}",destination="{_escape(destination)}",'
        f'key="{_escape(key_id)}",sig="{sig}"'
    )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def raw_uri_from_scope(scope: Mapping[str, Any]) -> str:
    """Path and query exactly as sent, from an ASGI HTTP scope. ``raw_path`` is optional
    in the ASGI spec; without it the path is re-encoded from the decoded one (exact for the
    usual percent-encoding, which is what servers that omit raw_path receive anyway)."""
    raw_path = scope.get("raw_path")
    if raw_path:
        path = raw_path.decode("latin-1")
    else:
        path = quote(scope["path"], safe="/:@!$&'()*+,;=-._~")
    query = scope.get("query_string") or b""
    return f"{path}?{query.decode('latin-1')}" if query else path


def raw_request_uri(request: Any) -> str:
    """Path and query of a Django request exactly as sent: from the ASGI scope, or the
    WSGI server's raw request target (gunicorn's ``RAW_URI``, uWSGI's ``REQUEST_URI``).
    Django's test client sends neither; there the re-quoted ``get_full_path()`` is used,
    which equals what was sent whenever the sender percent-encoded normally."""
    scope = getattr(request, "scope", None)
    if isinstance(scope, Mapping):
        return raw_uri_from_scope(scope)
    meta = getattr(request, "META", {})
    for name in ("RAW_URI", "REQUEST_URI"):
        raw = meta.get(name)
        if raw:
            # An absolute-form request target (a proxy's) still signs only path and query.
            if "://" in raw.split("?", 1)[0]:
                after_scheme = raw.split("://", 1)[1]
                raw = after_scheme[after_scheme.find("/") :] if "/" in after_scheme else "/"
            return str(raw)
    return str(request.get_full_path())


def authorization_headers(request: Any) -> list[str]:
    """Every ``Authorization`` value of a Django request, separately when the ASGI scope
    still has them apart (Django joins repeated headers with commas; the parser copes with
    both)."""
    scope = getattr(request, "scope", None)
    if isinstance(scope, Mapping) and "headers" in scope:
        return [
            value.decode("latin-1")
            for name, value in scope["headers"]
            if name.lower() == b"authorization"
        ]
    value = getattr(request, "META", {}).get("HTTP_AUTHORIZATION")
    return [value] if value else []


def authenticate_request(request: Any, content: Any | None = None, *, wait: bool = True) -> str:
    """``authenticate`` for a Django request (ASGI or WSGI): the origin, or Unauthorized."""
    return authenticate(
        request.method,
        raw_request_uri(request),
        authorization_headers(request),
        content,
        wait=wait,
    )
