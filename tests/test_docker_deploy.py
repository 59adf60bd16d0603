"""The docker deployment ships no credential, publishes only the balancer's port, and its
web nodes share what must be shared (secrets, the signing key, the services).

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
    assert {"web2", "balancer"} <= set(services)


def test_only_the_balancers_port_is_published_on_all_interfaces() -> None:
    exposed = {
        (name, port)
        for name, service in _compose()["services"].items()
        for port in _published_on_all_interfaces(service)
    }
    assert exposed == {("balancer", WEB_PORT)}


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
    key_file = tmp_path / "app" / "signing.key"
    first = {p: p.read_text() for p in (env_file, s3_file, pg_file, key_file)}
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
    assert (other / "app" / "signing.key").read_text() != key_file.read_text()


def test_the_made_signing_key_is_one_the_server_reads(tmp_path: Path) -> None:
    """Synapse's key file format, read as the server reads it (msc3870.federation.keys)."""
    from signedjson.key import get_verify_key

    from msc3870.federation.keys import read_keys

    _load_make_secrets().main(tmp_path)
    [key] = read_keys(tmp_path / "app" / "signing.key")
    assert re.fullmatch(r"a_[A-Za-z0-9]{4}", key.version)
    assert len(key.encode()) == 32 and get_verify_key(key) is not None


def test_a_deployment_made_before_the_signing_key_gets_one_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    make_secrets = _load_make_secrets()
    make_secrets.main(tmp_path)
    source = tmp_path / "source" / "secrets.json"
    older = json.loads(source.read_text())
    for name in ("signing_key_seed", "signing_key_version"):
        del older[name]
    source.chmod(0o600)
    source.write_text(json.dumps(older))
    (tmp_path / "app" / "signing.key").unlink()
    password = (tmp_path / "postgres" / "password").read_text()

    make_secrets.main(tmp_path)
    assert (tmp_path / "postgres" / "password").read_text() == password
    key = (tmp_path / "app" / "signing.key").read_text()
    make_secrets.main(tmp_path)
    assert (tmp_path / "app" / "signing.key").read_text() == key


APP_SERVICES = ("web", "web2", "worker", "beat")


def test_every_process_of_the_server_shares_the_secrets_the_key_and_the_services() -> None:
    """A node or worker with a key or a service of its own breaks the others' requests:
    upload URLs signed by one, federation requests signed with a key the other does not
    publish, limits counted apart."""
    services = _compose()["services"]
    shared = ("DJANGO_SECRET_KEY", "MSC3870_SIGNING_KEY_PATH", "MEDIAREPO_ENV_FILE")
    shared += ("CELERY_BROKER_URL", "REDIS_URL", "AWS_STORAGE_BUCKET_NAME", "MATRIX_SERVER_NAME")
    environments = {name: _environment(services[name]) for name in APP_SERVICES}
    for variable in shared:
        values = {name: env.get(variable) for name, env in environments.items()}
        assert len(set(values.values())) == 1 and None not in values.values(), values
    key_path = environments["web"]["MSC3870_SIGNING_KEY_PATH"]
    for name in APP_SERVICES:
        mounts = [str(v) for v in services[name]["volumes"]]
        assert any(key_path.startswith(m.split(":")[1] + "/") for m in mounts), name
    # web migrates and makes the bucket; web2 waits for it and only serves.
    assert "migrate" in " ".join(_image_command())
    assert "migrate" not in " ".join(services["web2"]["command"])
    assert services["web2"]["depends_on"]["web"] == {"condition": "service_healthy"}


def _image_command() -> list[str]:
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD "):
            return list(json.loads(line[4:]))
    raise AssertionError("no CMD in the Dockerfile")


def test_the_balancer_sends_requests_to_both_web_nodes() -> None:
    """docker/haproxy.cfg's servers are the variables compose sets to the web services
    (the services suite runs the same file in front of its two nodes)."""
    services = _compose()["services"]
    balancer = services["balancer"]
    config = (DOCKER / "haproxy.cfg").read_text()
    servers = re.findall(r'^\s*server \S+ "\$\{(\w+)\}"', config, re.MULTILINE)
    env = _environment(balancer)
    assert sorted(env[name] for name in servers) == ["web2:8008", "web:8008"]
    assert f"{WEB_PORT}:{WEB_PORT}" in balancer["ports"]
    assert env["MEDIAREPO_BALANCER_BIND"] == f":{WEB_PORT}"
    assert any("haproxy.cfg:" in str(v) for v in balancer["volumes"])
    # Nodes count clients by the address the balancer forwards, not the balancer's own.
    assert "option forwardfor" in config
    for web in ("web", "web2"):
        assert _environment(services[web])["FORWARDED_ALLOW_IPS"]


@pytest.mark.parametrize("service", ["web", "web2", "worker", "beat"])
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
    assert targets == {f"web:{port}", f"web2:{port}", f"worker:{port}"}
    for web in ("web", "web2"):
        assert services[web]["healthcheck"]["test"][-1].endswith("/health', timeout=5)")


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
