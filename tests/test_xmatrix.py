"""X-Matrix authentication with real Ed25519 signatures from a fake remote server's own key
pair: the header grammar, the signed request object, the origin's keys (checked, cached,
through notaries) and every refusal as 401 M_UNAUTHORIZED."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.cache import cache
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json

from msc3870.errors import Unauthorized
from msc3870.federation import discovery, keyring, keys, outbound, xmatrix
from msc3870.federation.xmatrix import MalformedAuthorization, authenticate, sign_request

from .federation_helpers import (
    DAY_MS,
    FakeRemote,
    KeyServers,
    local_server,
    self_signed_tls,
    send,
    undelegated,
)
from .helpers import msc3870_settings

OURS = "media.example.org"
URI = "/_matrix/federation/v1/media/download/abcDEF?timeout_ms=2000"


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture(autouse=True)
def _our_name(tmp_path: Path) -> Iterator[None]:
    with msc3870_settings(SERVER_NAME=OURS, SIGNING_KEY_PATH=str(tmp_path / "signing.key")):
        yield


@pytest.fixture
def origin() -> FakeRemote:
    """The server that signs the requests, its key not published yet."""
    return FakeRemote("remote.example.com")


@pytest.fixture
def published(origin: FakeRemote, key_servers: KeyServers) -> FakeRemote:
    """The origin publishes a valid, self-signed key response."""
    key_servers.serve(origin, origin.key_response(now_ms() + DAY_MS))
    return origin


def signed_header(
    origin: FakeRemote,
    method: str = "GET",
    uri: str = URI,
    destination: str = OURS,
    content: Any | None = None,
) -> str:
    return sign_request(
        method, uri, destination, content, origin=origin.server_name, signing_key=origin.key
    )


def refused(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(Unauthorized) as caught:
        authenticate(*args, **kwargs)
    assert caught.value.status == 401
    assert caught.value.as_dict()["errcode"] == "M_UNAUTHORIZED"
    return caught.value.message


# --- the header grammar ---------------------------------------------------------------


def test_parses_the_spec_example() -> None:
    [credential] = xmatrix.parse_x_matrix(
        [
            'X-Matrix origin="origin.hs.example.com",destination="destination.hs.example.com",'
            'key="ed25519:key1",sig="ABCDEF..."'
        ]
    )
    assert credential == xmatrix.XMatrixCredentials(
        "origin.hs.example.com", "destination.hs.example.com", "ed25519:key1", "ABCDEF..."
    )


def test_parses_unquoted_values_with_colons_spaces_and_any_case() -> None:
    [credential] = xmatrix.parse_x_matrix(
        ["x-matrix   Origin=remote.example.com:8448 ,\tKEY=ed25519:a_1 , sig=abc+def, x=y"]
    )
    assert credential.origin == "remote.example.com:8448"
    assert (credential.key, credential.sig, credential.destination) == (
        "ed25519:a_1",
        "abc+def",
        None,
    )


def test_unescapes_quoted_pairs() -> None:
    [credential] = xmatrix.parse_x_matrix(
        ['X-Matrix origin="a.example",key="ed\\25519:\\"q\\"",sig="s\\\\"']
    )
    assert (credential.key, credential.sig) == ('ed25519:"q"', "s\\")


def test_several_credentials_in_one_joined_header_and_other_schemes() -> None:
    joined = (
        "Bearer abc.def==, X-Matrix origin=a.example,key=ed25519:1,sig=s1,"
        'X-Matrix origin="a.example",key="ed25519:2",sig="s2"'
    )
    credentials = xmatrix.parse_x_matrix([joined, "Basic dXNlcjpwYXNz"])
    assert [(c.key, c.sig) for c in credentials] == [("ed25519:1", "s1"), ("ed25519:2", "s2")]


@pytest.mark.parametrize(
    "header",
    [
        "X-Matrix",
        'X-Matrix origin="a.example",key="ed25519:1"',  # no sig
        'X-Matrix origin="a.example",origin="b.example",key="k",sig="s"',  # repeated
        'X-Matrix origin="unterminated,key="k",sig="s"',
        "X-Matrix origin=a.example,key=ed25519:1,sig=abc/def",  # "/" needs quotes
        'X-Matrix origin="not a server",key="k",sig="s"',
        'X-Matrix origin="a.example";key="k",sig="s"',
    ],
)
def test_malformed_headers_are_refused(header: str) -> None:
    with pytest.raises(MalformedAuthorization):
        xmatrix.parse_x_matrix([header])
    assert "Malformed" in refused("GET", URI, [header])


def test_missing_or_foreign_authorization_is_refused() -> None:
    assert "Missing" in refused("GET", URI, [])
    assert "Missing" in refused("GET", URI, ["Bearer syt_abc"])


# --- verification ---------------------------------------------------------------------


def test_a_real_signature_verifies_and_names_the_origin(published: FakeRemote) -> None:
    assert authenticate("GET", URI, [signed_header(published)]) == published.server_name


def test_the_origin_keys_are_fetched_once_then_cached(
    published: FakeRemote, key_servers: KeyServers
) -> None:
    for _ in range(3):
        assert authenticate("GET", URI, [signed_header(published)]) == published.server_name
    assert key_servers.requests == [
        ("GET", "https://remote.example.com:8448/_matrix/key/v2/server", None)
    ]


def test_keys_are_fetched_where_the_origin_delegates(
    origin: FakeRemote, key_servers: KeyServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that delegates (well-known or SRV) publishes its keys there, as every
    other federation request finds it: the key fetch goes through discovery too."""
    from msc3870.federation.discovery import Destination

    monkeypatch.setattr(
        discovery,
        "resolve",
        lambda name: Destination("keys.example.org", 443, "keys.example.org", 443, name),
    )
    key_servers.answers["https://keys.example.org:443/_matrix/key/v2/server"] = origin.key_response(
        now_ms() + DAY_MS
    )
    assert authenticate("GET", URI, [signed_header(origin)]) == origin.server_name
    assert [url for _, url, _ in key_servers.requests] == [
        "https://keys.example.org:443/_matrix/key/v2/server"
    ]


def test_keys_are_cached_for_at_most_half_their_remaining_validity(
    published: FakeRemote, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeouts: list[float] = []
    # The class, not the cache object: the fetch runs on a thread of its own, whose cache
    # connection is another object.
    cache_class = type(cache._connections[cache._alias])  # type: ignore[attr-defined]
    real_set = cache_class.set

    def recording_set(self: Any, key: str, value: Any, timeout: Any = None, **kwargs: Any) -> None:
        if ":key:" in key:
            timeouts.append(timeout)
        real_set(self, key, value, timeout, **kwargs)

    monkeypatch.setattr(cache_class, "set", recording_set)
    authenticate("GET", URI, [signed_header(published)])
    assert len(timeouts) == 1
    assert DAY_MS / 2 / 1000 - 5 <= timeouts[0] <= DAY_MS / 2 / 1000


def test_a_tampered_signature_is_refused(published: FakeRemote) -> None:
    header = signed_header(published)
    sig = header.rsplit('sig="', 1)[1].rstrip('"')
    tampered = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    assert "Invalid signature" in refused("GET", URI, [header.replace(sig, tampered)])


def test_a_signature_over_another_request_is_refused(published: FakeRemote) -> None:
    header = signed_header(published)
    assert "Invalid signature" in refused("POST", URI, [header])
    assert "Invalid signature" in refused("GET", URI + "&x=1", [header])


def test_the_uri_is_compared_exactly_as_sent(published: FakeRemote) -> None:
    raw = "/_matrix/federation/v1/media/download/a%2Fb?name=%C3%A9t%C3%A9"
    header = signed_header(published, uri=raw)
    assert authenticate("GET", raw, [header]) == published.server_name
    decoded = "/_matrix/federation/v1/media/download/a/b?name=été"
    assert "Invalid signature" in refused("GET", decoded, [header])


def test_a_wrong_destination_is_refused(published: FakeRemote) -> None:
    header = signed_header(published, destination="other.example")
    assert "Destination mismatch" in refused("GET", URI, [header])


def test_a_signature_for_another_destination_without_the_parameter_is_refused(
    published: FakeRemote,
) -> None:
    header = signed_header(published, destination="other.example")
    stripped = header.replace(',destination="other.example"', "")
    assert "Invalid signature" in refused("GET", URI, [stripped])


def test_older_servers_may_omit_the_destination(published: FakeRemote) -> None:
    header = signed_header(published).replace(f',destination="{OURS}"', "")
    assert authenticate("GET", URI, [header]) == published.server_name


def test_a_json_body_is_part_of_what_is_signed(published: FakeRemote) -> None:
    content = {"server_keys": {"x": {}}}
    header = signed_header(published, method="POST", content=content)
    assert authenticate("POST", URI, [header], content) == published.server_name
    assert "Invalid signature" in refused("POST", URI, [header], {"server_keys": {}})
    assert "Invalid signature" in refused("POST", URI, [header])


def test_any_verifying_header_among_several_is_enough(published: FakeRemote) -> None:
    bogus = signed_header(published).replace(published.key_id, "ed25519:gone")
    good = signed_header(published)
    assert authenticate("GET", URI, [bogus, good]) == published.server_name
    assert authenticate("GET", URI, [f"{bogus},{good}"]) == published.server_name


def test_headers_from_two_origins_are_refused(
    published: FakeRemote, key_servers: KeyServers
) -> None:
    other = FakeRemote("other.example")
    key_servers.serve(other, other.key_response(now_ms() + DAY_MS))
    headers = [signed_header(published), signed_header(other)]
    assert "more than one origin" in refused("GET", URI, headers)


def test_an_unknown_key_is_refused_and_not_refetched_at_once(
    published: FakeRemote, key_servers: KeyServers
) -> None:
    stranger = generate_signing_key("rem2")  # not in the remote's key response
    header = sign_request("GET", URI, OURS, origin=published.server_name, signing_key=stranger)
    assert "No usable key ed25519:rem2" in refused("GET", URI, [header])
    assert "No usable key" in refused("GET", URI, [header])
    assert len(key_servers.requests) == 1  # made-up key ids do not make us fetch again
    # The keys that were fetched are cached: the real key works without a fetch.
    assert authenticate("GET", URI, [signed_header(published)]) == published.server_name
    assert len(key_servers.requests) == 1


def test_expired_keys_are_refused(origin: FakeRemote, key_servers: KeyServers) -> None:
    key_servers.serve(origin, origin.key_response(now_ms() - 1000))
    assert "No usable key" in refused("GET", URI, [signed_header(origin)])


def test_keys_of_another_server_name_are_refused(
    origin: FakeRemote, key_servers: KeyServers
) -> None:
    key_servers.serve(origin, origin.key_response(now_ms() + DAY_MS, server_name="evil.example"))
    assert "No usable key" in refused("GET", URI, [signed_header(origin)])


def test_an_unsigned_key_response_is_refused(origin: FakeRemote, key_servers: KeyServers) -> None:
    key_servers.serve(origin, origin.key_response(now_ms() + DAY_MS, sign_with=[]))
    assert "No usable key" in refused("GET", URI, [signed_header(origin)])


def test_every_self_signature_must_verify(origin: FakeRemote, key_servers: KeyServers) -> None:
    second = generate_signing_key("rem2")
    body = origin.key_response(now_ms() + DAY_MS, extra_keys=(second,), sign_with=[origin.key])
    # A signature claimed for the second listed key that is not its own.
    body["signatures"][origin.server_name]["ed25519:rem2"] = body["signatures"][origin.server_name][
        origin.key_id
    ]
    key_servers.serve(origin, body)
    assert "No usable key" in refused("GET", URI, [signed_header(origin)])


def test_a_key_response_signed_by_another_key_is_refused(
    origin: FakeRemote, key_servers: KeyServers
) -> None:
    impostor = generate_signing_key(origin.key.version)
    key_servers.serve(origin, origin.key_response(now_ms() + DAY_MS, sign_with=[impostor]))
    assert "No usable key" in refused("GET", URI, [signed_header(origin)])


def test_validity_counts_as_at_most_seven_days(origin: FakeRemote) -> None:
    now = now_ms()
    body = origin.key_response(now + 365 * DAY_MS)
    [key] = keyring.check_server_keys(body, origin.server_name, now).values()
    assert key.valid_until_ts == now + 7 * DAY_MS


def test_our_own_requests_verify_with_our_keys_without_a_fetch(key_servers: KeyServers) -> None:
    header = sign_request("GET", URI, OURS)
    assert authenticate("GET", URI, [header]) == OURS
    assert key_servers.requests == []


# --- notaries -------------------------------------------------------------------------


@pytest.fixture
def notary(key_servers: KeyServers, published: FakeRemote) -> Iterator[FakeRemote]:
    notary = FakeRemote("notary.example", generate_signing_key("not1"))
    config = {
        "server_name": notary.server_name,
        "verify_keys": {notary.key_id: encode_verify_key_base64(get_verify_key(notary.key))},
    }
    with msc3870_settings(SERVER_NAME=OURS, TRUSTED_KEY_SERVERS=[config]):
        yield notary


def _notary_answer(notary: FakeRemote, origin: FakeRemote, signer: Any) -> Any:
    def answer(body: Any) -> Any:
        assert list(body["server_keys"]) == [origin.server_name]
        entry = origin.key_response(now_ms() + DAY_MS)
        return {"server_keys": [sign_json(entry, notary.server_name, signer)]}

    return answer


def test_keys_come_from_a_trusted_notary_first(
    notary: FakeRemote, published: FakeRemote, key_servers: KeyServers
) -> None:
    query = "https://notary.example:8448/_matrix/key/v2/query"
    key_servers.answers[query] = _notary_answer(notary, published, notary.key)
    assert authenticate("GET", URI, [signed_header(published)]) == published.server_name
    assert [(m, u) for m, u, _ in key_servers.requests] == [("POST", query)]
    [(_, _, body)] = key_servers.requests
    assert (
        body["server_keys"][published.server_name][published.key_id]["minimum_valid_until_ts"] > 0
    )


def test_a_notary_answer_not_signed_by_the_notary_falls_back_to_the_origin(
    notary: FakeRemote, published: FakeRemote, key_servers: KeyServers
) -> None:
    query = "https://notary.example:8448/_matrix/key/v2/query"
    key_servers.answers[query] = _notary_answer(notary, published, generate_signing_key("not1"))
    assert authenticate("GET", URI, [signed_header(published)]) == published.server_name
    assert [u for _, u, _ in key_servers.requests] == [
        query,
        "https://remote.example.com:8448/_matrix/key/v2/server",
    ]


# --- Django requests ------------------------------------------------------------------


def test_raw_uri_comes_from_the_asgi_scope() -> None:
    scope = {"raw_path": b"/_matrix/x/a%2Fb", "path": "/_matrix/x/a/b", "query_string": b"q=%20"}
    assert xmatrix.raw_uri_from_scope(scope) == "/_matrix/x/a%2Fb?q=%20"
    assert xmatrix.raw_uri_from_scope({**scope, "query_string": b""}) == "/_matrix/x/a%2Fb"
    without_raw = {"path": "/_matrix/x/é b", "query_string": b""}
    assert xmatrix.raw_uri_from_scope(without_raw) == "/_matrix/x/%C3%A9%20b"


def test_authenticate_request_reads_an_asgi_request(published: FakeRemote) -> None:
    raw = "/_matrix/federation/v1/media/download/a%2Fb?timeout_ms=5"
    good, bogus = signed_header(published, uri=raw), 'X-Matrix origin="x.example",key="k",sig="s"'
    request = SimpleNamespace(
        method="GET",
        scope={
            "raw_path": raw.split("?")[0].encode(),
            "path": "/_matrix/federation/v1/media/download/a/b",
            "query_string": b"timeout_ms=5",
            "headers": [(b"authorization", good.encode()), (b"host", b"x")],
        },
        META={"HTTP_AUTHORIZATION": f"{bogus},{good}"},
    )
    assert xmatrix.authenticate_request(request) == published.server_name


def test_authenticate_request_reads_a_wsgi_raw_uri(published: FakeRemote) -> None:
    raw = "/_matrix/federation/v1/media/download/a%2Fb"
    request = SimpleNamespace(
        method="GET",
        META={"RAW_URI": raw, "HTTP_AUTHORIZATION": signed_header(published, uri=raw)},
        get_full_path=lambda: "/_matrix/federation/v1/media/download/a/b",
    )
    assert xmatrix.authenticate_request(request) == published.server_name


# --- end to end: the origin's key server over real HTTPS, through the SSRF guard ------


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_keys_fetched_over_https_from_a_local_server(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    routes: dict[str, Any] = {}
    with local_server(routes, tls=self_signed_tls(tmp_path)) as server:
        origin = FakeRemote(server.server_name)  # "127.0.0.1:<port>": an IP literal and port
        body = json.dumps(origin.key_response(now_ms() + DAY_MS)).encode()

        def key_route(handler: BaseHTTPRequestHandler) -> None:
            send(handler, 200, body)

        routes["/_matrix/key/v2/server"] = key_route
        header = signed_header(origin)
        # The guard closed (default): the key server is never reached.
        assert "No usable key" in refused("GET", URI, [header])
        assert server.hits == []
        cache.clear()
        with msc3870_settings(
            SERVER_NAME=OURS,
            FEDERATION_IP_RANGE_ALLOWLIST=["127.0.0.1/32"],
            FEDERATION_VERIFY_TLS=False,
        ):
            assert authenticate("GET", URI, [header]) == origin.server_name
        assert server.hits == ["/_matrix/key/v2/server"]


def test_outbound_errors_reach_the_log_not_the_requester(
    origin: FakeRemote, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise outbound.AddressNotAllowed("remote.example.com resolves to 10.1.2.3")

    monkeypatch.setattr(outbound, "request", refuse)
    # The made-up name is not looked up in DNS (SRV) either: tests never leave the machine.
    monkeypatch.setattr(discovery, "resolve", undelegated)
    message = refused("GET", URI, [signed_header(origin)])
    assert "10.1.2.3" not in message and "No usable key" in message


def test_signing_uses_our_key_file(tmp_path: Path) -> None:
    header = sign_request("GET", URI, "remote.example.com")
    [credential] = xmatrix.parse_x_matrix([header])
    assert credential.origin == OURS and credential.destination == "remote.example.com"
    assert credential.key == keys.key_id(keys.signing_key())
