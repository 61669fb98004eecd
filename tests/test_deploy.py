"""The deploy recipes (deploy/) parse, and their ports and variables match the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cloister.backends import check_url
from cloister.cli import build_parser
from cloister.cli.options import SETTINGS, load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
_BY_ENV = {setting.env: setting for setting in SETTINGS}
_RUN = set(build_parser()._subparsers._group_actions[0].choices["run"].get_default("_settings"))


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(text))
    assert match, f"not a duration: {text!r}"
    value, unit = float(match.group(1)), match.group(2)
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


def _check_environment(env: dict[str, str], where: str) -> dict[str, Any]:
    """Every CLOISTER_* variable is a setting of `cloister run` and its value parses."""
    values: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith("CLOISTER_"):
            continue
        setting = _BY_ENV.get(name)
        assert setting is not None, f"{where}: {name} is no setting of cloister"
        assert setting.name in _RUN, f"{where}: {name} is not an option of cloister run"
        values[name] = None if raw is None else setting.parse(str(raw))
    return values


def _check_command(argv: list[str], where: str) -> None:
    assert argv[:2] == ["cloister", "run"], where
    build_parser().parse_args(argv[1:])  # exits (SystemExit) if the CLI refused it


# -- docker-compose ---------------------------------------------------------------------------


def test_compose_recipe() -> None:
    (compose,) = _documents(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    nats, worker = services["nats"], services["worker"]

    # NATS keeps its store on a named volume.
    store = nats["command"][nats["command"].index("-sd") + 1]
    volume, _, mounted = next(v for v in nats["volumes"] if v.endswith(f":{store}")).partition(":")
    assert mounted == store and volume in compose["volumes"]
    assert "-js" in nats["command"]
    assert "/healthz" in " ".join(nats["healthcheck"]["test"])
    monitor = nats["command"][nats["command"].index("-m") + 1]
    assert f":{monitor}/healthz" in " ".join(nats["healthcheck"]["test"])

    _check_command(worker["command"], "worker")
    env = _check_environment(worker["environment"], "compose worker")
    backend = env["CLOISTER_BACKEND"]
    check_url(backend)
    assert urlsplit(backend).hostname == "nats" and urlsplit(backend).port == 4222
    port = env["CLOISTER_METRICS_PORT"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(worker["healthcheck"]["test"])
    assert env["CLOISTER_METRICS_HOST"] == "0.0.0.0"  # probed from the healthcheck's shell
    assert _seconds(worker["stop_grace_period"]) > env["CLOISTER_SHUTDOWN_TIMEOUT"]
    assert worker["depends_on"]["nats"]["condition"] == "service_healthy"
    assert services["web"]["depends_on"]["worker"]["condition"] == "service_healthy"
    for name, service in services.items():
        assert service["restart"] in ("always", "unless-stopped", "on-failure"), name


# -- Kubernetes -------------------------------------------------------------------------------


def _kinds(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in _documents(path)}


def test_nats_statefulset_is_r3_with_volumes() -> None:
    docs = _kinds(DEPLOY / "kubernetes" / "nats.yaml")
    sts = docs[("StatefulSet", "nats")]
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    service = docs[("Service", "nats")]
    assert service["spec"]["clusterIP"] == "None"
    conf = docs[("ConfigMap", "nats-config")]["data"]["nats.conf"]
    routes = re.findall(r"nats://(nats-\d)\.nats:6222", conf)
    assert routes == [f"nats-{i}" for i in range(3)]
    assert "store_dir: /data" in conf
    container = sts["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == "/data"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": 4222, "cluster": 6222, "monitor": 8222}
    assert f"http_port: {ports['monitor']}" in conf and f"port: {ports['client']}" in conf


def test_worker_deployment_probes_and_grace_match_the_cli() -> None:
    docs = _kinds(DEPLOY / "kubernetes" / "workers.yaml")
    nats = _kinds(DEPLOY / "kubernetes" / "nats.yaml")[("StatefulSet", "nats")]
    deployment = docs[("Deployment", "cloister-worker")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    _check_command(container["args"], "worker")
    raw = {e["name"]: e.get("value") for e in container["env"]}
    env = _check_environment(raw, "kubernetes worker")
    node = next(e for e in container["env"] if e["name"] == "CLOISTER_NODE")
    assert node["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    # Three NATS servers, three copies of every stream, and the URL names them all.
    assert env["CLOISTER_REPLICAS"] == nats["spec"]["replicas"] == 3
    backend = env["CLOISTER_BACKEND"]
    check_url(backend)
    hosts = [part.rsplit(":", 1)[0].removeprefix("nats://") for part in backend.split(",")]
    assert hosts == [f"nats-{i}.nats" for i in range(3)]

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == env["CLOISTER_METRICS_PORT"]
    assert env["CLOISTER_METRICS_HOST"] == "0.0.0.0"
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in (*probes.values(), container["startupProbe"]["httpGet"]):
        assert probe["port"] in (ports["metrics"], "metrics")
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= env["CLOISTER_CONNECT_TIMEOUT"]
    assert pod["terminationGracePeriodSeconds"] > env["CLOISTER_SHUTDOWN_TIMEOUT"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    service = docs[("Service", "cloister-worker-metrics")]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (scraped,) = service["spec"]["ports"]
    assert scraped["port"] == ports["metrics"] and scraped["targetPort"] == "metrics"
    annotations = service["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: p.name)
def test_every_recipe_is_valid_yaml(path: Path) -> None:
    assert _documents(path)


def test_the_example_config_file_loads() -> None:
    config = load_config(str(DEPLOY / "cloister.toml"))
    assert config.values["app"] == "myapp.workers:Processor"
    assert config.values["replicas"] == 3 and config.values["metrics_port"] == 9464
    workers = _kinds(DEPLOY / "kubernetes" / "workers.yaml")[("Deployment", "cloister-worker")]
    (container,) = workers["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The file says what the Kubernetes recipe says.
    for name, value in _check_environment(env, "kubernetes worker").items():
        key = _BY_ENV[name].name
        if value is not None and key in config.values:
            assert config.values[key] == value, name
