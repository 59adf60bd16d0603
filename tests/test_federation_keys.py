"""This server's signing key: the management command, creation on first use, and the
``/_matrix/key/v2/server`` answer, checked with signedjson as another server would."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.test import Client
from signedjson.key import (
    decode_verify_key_base64,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    read_signing_keys,
    write_signing_keys,
)
from signedjson.sign import SignatureVerifyException, verify_signed_json

from msc3870.federation import keyring, keys

from .helpers import file_mode, msc3870_settings


@pytest.fixture
def key_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data" / "signing.key"
    with msc3870_settings(SIGNING_KEY_PATH=str(path), SERVER_NAME="media.example.org"):
        yield path


def verify_key_response(body: dict, server_name: str) -> dict[str, object]:
    """What another server does with our answer: every listed key verifies the body."""
    assert body["server_name"] == server_name
    verified = {}
    for key_id, data in body["verify_keys"].items():
        algorithm, version = key_id.split(":")
        verify_key = decode_verify_key_base64(algorithm, version, data["key"])
        verify_signed_json(body, server_name, verify_key)
        verified[key_id] = verify_key
    return verified


def test_command_writes_a_private_synapse_format_key_file(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    call_command("generate_signing_key", path=str(path), key_version="a_test")
    assert file_mode(path) == 0o600
    text = path.read_text()
    algorithm, version, seed = text.split()
    assert (algorithm, version) == ("ed25519", "a_test")
    assert text.endswith("\n") and len(seed) == 43  # 32 bytes, unpadded base64
    [key] = read_signing_keys(text.splitlines())
    assert key.version == "a_test"


def test_command_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    call_command("generate_signing_key", path=str(path))
    before = path.read_bytes()
    with pytest.raises(CommandError, match="already exists"):
        call_command("generate_signing_key", path=str(path))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["signing.key"]  # no temporary left


def test_command_writes_to_the_configured_path_and_prints_the_public_key(
    key_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    call_command("generate_signing_key")
    assert file_mode(key_path) == 0o600
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    key = keys.signing_key()
    assert printed == f"{keys.key_id(key)} {encode_verify_key_base64(get_verify_key(key))}"


def test_command_refuses_a_bad_key_version(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="not"):
        call_command("generate_signing_key", path=str(tmp_path / "k"), key_version="a b")
    assert not (tmp_path / "k").exists()


def test_key_is_made_on_first_use_then_kept(key_path: Path) -> None:
    assert not key_path.exists()
    first = keys.signing_key()
    assert key_path.exists() and file_mode(key_path) == 0o600
    assert keys.key_id(first).startswith("ed25519:a_")
    again = keys.signing_key()
    assert again.encode() == first.encode()
    [on_disk] = read_signing_keys(key_path.read_text().splitlines())
    assert on_disk.encode() == first.encode()


def test_losing_the_creation_race_uses_the_winners_key(key_path: Path) -> None:
    winner = keys.write_new_signing_key(key_path, "a_win")
    with pytest.raises(keys.SigningKeyExists):
        keys.write_new_signing_key(key_path, "a_lose")
    assert keys.key_id(keys.signing_key()) == "ed25519:a_win"
    assert keys.signing_key().encode() == winner.encode()


def test_no_key_path_is_a_configuration_error() -> None:
    with msc3870_settings(SIGNING_KEY_PATH=None), pytest.raises(ImproperlyConfigured):
        keys.signing_key()


def test_a_file_that_is_not_a_key_file_is_a_configuration_error(key_path: Path) -> None:
    key_path.parent.mkdir(parents=True)
    key_path.write_text("this is not a key\n")
    with pytest.raises(ImproperlyConfigured, match="not a signing key file"):
        keys.signing_key()


def test_key_server_response_is_self_signed_and_verifies(key_path: Path) -> None:
    now = int(time.time() * 1000)
    body = keys.key_server_response(now_ms=now)
    assert body["valid_until_ts"] == now + 24 * 60 * 60 * 1000
    assert body["old_verify_keys"] == {}
    verified = verify_key_response(body, "media.example.org")
    assert list(verified) == [keys.key_id(keys.signing_key())]
    # What our keyring applies to other servers accepts our own answer too.
    checked = keyring.check_server_keys(body, "media.example.org", now)
    assert set(checked) == set(verified)


def test_key_server_response_signature_breaks_when_tampered(key_path: Path) -> None:
    body = keys.key_server_response()
    body["valid_until_ts"] += 1
    with pytest.raises(SignatureVerifyException):
        verify_key_response(body, "media.example.org")


def test_every_key_in_the_file_is_published_and_signs(key_path: Path) -> None:
    first, second = generate_signing_key("a_new"), generate_signing_key("a_old")
    key_path.parent.mkdir(parents=True)
    with key_path.open("w") as stream:
        write_signing_keys(stream, [first, second])
    assert keys.signing_key().encode() == first.encode()  # the first one signs requests
    body = keys.key_server_response()
    assert set(verify_key_response(body, "media.example.org")) == {
        "ed25519:a_new",
        "ed25519:a_old",
    }
    assert set(body["signatures"]["media.example.org"]) == {"ed25519:a_new", "ed25519:a_old"}


@pytest.mark.parametrize("path", ["/_matrix/key/v2/server", "/_matrix/key/v2/server/ed25519:x"])
def test_key_endpoint_answers_signed_json_without_authentication(key_path: Path, path: str) -> None:
    response = Client().get(path, headers={"Accept": "text/html"})
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert verify_key_response(body, "media.example.org")
    assert body["valid_until_ts"] > time.time() * 1000


def test_key_endpoint_refuses_other_methods_as_matrix_errors(key_path: Path) -> None:
    response = Client().post("/_matrix/key/v2/server")
    assert response.status_code == 405
    assert response.json()["errcode"] == "M_UNRECOGNIZED"
