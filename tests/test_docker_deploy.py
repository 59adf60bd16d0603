"""The docker deployment ships no credential and publishes only the web port.

There is no Docker engine here, so compose.yaml is checked by reading it, and the script
that makes the secrets at deploy time is run in a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import re
import stat
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml  # PyYAML: installed with moto[server] (requirements-dev.txt)

DOCKER = Path(__file__).resolve().parent.parent / "docker"
WEB_PORT = 8008
# Names of settings whose value is a secret; *_FILE variants name a file, not a value.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|CREDENTIAL", re.IGNORECASE)
# A compose interpolation that makes the operator give the value: ${NAME:?message}.
REQUIRED_FROM_OPERATOR = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*:?\?[^}]*\}$")
# user:password@host in a URL.
URL_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _published_on_all_interfaces(service: dict[str, Any]) -> list[int]:
    """Container ports published on every interface of the host."""
    published = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):  # long syntax
            host_ip = str(port.get("host_ip", ""))
            target = int(port["target"])
        else:
            parts = str(port).split("/")[0].rsplit(":", 2)
            host_ip = parts[0] if len(parts) == 3 else ""
            target = int(parts[-1])
        if host_ip in ("", "0.0.0.0", "::", "[::]"):
            published.append(target)
    return published


def test_compose_is_valid_yaml_with_services() -> None:
    services = _compose()["services"]
    assert {"web", "worker", "beat", "postgres", "redis", "seaweedfs"} <= set(services)


def test_only_the_web_port_is_published_on_all_interfaces() -> None:
    exposed = {
        (name, port)
        for name, service in _compose()["services"].items()
        for port in _published_on_all_interfaces(service)
    }
    assert exposed == {("web", WEB_PORT)}


def test_no_secret_value_in_compose_environment() -> None:
    for name, service in _compose()["services"].items():
        for key, value in _environment(service).items():
            assert not URL_WITH_PASSWORD.search(value), f"{name}.{key} holds a password"
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):
                # A default (${X:-literal}) would ship a secret; only a required value passes.
                assert REQUIRED_FROM_OPERATOR.match(value), f"{name}.{key} = {value!r}"


def _is_literal(value: str) -> bool:
    """Whether a credential's value is written out, not taken from elsewhere."""
    value = value.rstrip(",;}")
    if value[:1] in "\"'":
        value = value[1 : value.find(value[0], 1)]
        if not value:
            return False
    # Variables, files, placeholders, names of variables and computed values are fine.
    return not (
        value.startswith(("$", "/", "<")) or value.isupper() or any(c in value for c in "([")
    )


def test_no_literal_credential_in_docker_files() -> None:
    credential = re.compile(
        r"(secretKey|accessKey|password|secret_key|access_key_id|secret_access_key)"
        r"[\"']?\s*[:=]\s*(\S+)",
        re.IGNORECASE,
    )
    for path in sorted(DOCKER.rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text()
        assert "mediarepo-secret" not in text, path.name
        for match in credential.finditer(text):
            assert not _is_literal(match.group(2)), f"{path.name}: {match.group(0)!r}"
    # The S3 server's identities are made at deploy time, not kept in the repository.
    assert not list(DOCKER.glob("*.json"))


def test_the_literal_check_finds_literal_credentials() -> None:
    """Passwords and keys written into compose.yaml as literals are caught."""
    assert _is_literal('"mediarepo-secret"}]')
    assert _is_literal("mediarepo")  # POSTGRES_PASSWORD: mediarepo
    assert not _is_literal("${AWS_SECRET_ACCESS_KEY:?set it}")
    assert not _is_literal("secrets.token_hex(24),")


def _load_make_secrets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_secrets", DOCKER / "make-secrets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_secrets_are_made_once_and_consistent(tmp_path: Path) -> None:
    make_secrets = _load_make_secrets()
    make_secrets.main(tmp_path)
    env_file = tmp_path / "app" / "credentials.env"
    s3_file = tmp_path / "seaweedfs" / "s3.json"
    pg_file = tmp_path / "postgres" / "password"
    first = {p: p.read_text() for p in (env_file, s3_file, pg_file)}
    for path in first:
        assert stat.S_IMODE(path.stat().st_mode) == 0o400, path
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    identity = json.loads(s3_file.read_text())["identities"][0]
    assert identity["credentials"] == [
        {"accessKey": env["AWS_ACCESS_KEY_ID"], "secretKey": env["AWS_SECRET_ACCESS_KEY"]}
    ]
    assert len(env["AWS_SECRET_ACCESS_KEY"]) >= 32
    password = pg_file.read_text().strip()
    assert len(password) >= 32
    assert env["DATABASE_URL"] == f"postgres://mediarepo:{password}@postgres:5432/mediarepo"

    # A restart keeps them: the database was initialised with that password.
    make_secrets.main(tmp_path)
    assert {p: p.read_text() for p in first} == first
    # Another deployment gets other ones.
    other = tmp_path / "other"
    make_secrets.main(other)
    assert (other / "postgres" / "password").read_text() != pg_file.read_text()


@pytest.mark.parametrize("service", ["web", "worker", "beat"])
def test_the_server_reads_the_made_credentials(service: str) -> None:
    spec = _compose()["services"][service]
    env = _environment(spec)
    assert env.get("MEDIAREPO_ENV_FILE", "").endswith("credentials.env")
    assert "secrets" in (spec.get("depends_on") or {})


# ------------------------------------------------------------------------ operating


def _metric_families() -> dict[str, set[str]]:
    """Each metric family the app defines, and the sample names it exposes."""
    from prometheus_client import REGISTRY

    import msc3870.metrics  # noqa: F401 - defines them

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    return {
        family.name: {family.name + s for s in suffixes.get(family.type, ("",))}
        for family in REGISTRY.collect()
        if family.name.startswith("msc3870_")
    }


def test_prometheus_scrapes_the_metrics_listeners_of_web_and_worker() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"prometheus", "grafana"} <= set(services)
    env = _environment(compose["x-mediarepo"])
    port = env["METRICS_PORT"]
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets == {f"web:{port}", f"worker:{port}"}
    assert services["web"]["healthcheck"]["test"][-1].endswith("/health', timeout=5)")


def test_the_dashboard_reads_only_metrics_the_app_exposes() -> None:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "mediarepo.json").read_text())
    datasources = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    uid = datasources["datasources"][0]["uid"]
    families = _metric_families()
    known = set().union(*families.values())
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\bmsc3870_[a-z_]+", target["expr"]))
    assert used <= known, used - known
    # Every metric the app defines has a panel.
    unseen = {name for name, samples in families.items() if not samples & used}
    assert not unseen, unseen
