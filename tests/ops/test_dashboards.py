"""The Grafana dashboard and the Prometheus alert rules in ``deploy/`` use only metrics a
live node exports, and their PromQL parses (``promtool``, from Debian's prometheus
package; under ``CI=true`` it must be installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from cloister.sources import partition_name
from cloister.testing import (
    NatsServer,
    ProcessGroup,
    eventually,
    free_port,
    in_ci,
    wait_for_event_async,
)
from tests.cli.support import cli_env

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "cloister-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "cloister-alerts.yml"
_METRIC = re.compile(r"\b((?:cloister|process)_[a-z0-9_]+)\b")
# Never go through an HTTP proxy to reach a loopback port.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

APP = """
import os

import nats

from cloister import DynamicManager, Replace
from cloister.metrics import report_source
from cloister.sources.jetstream import JetStreamSource


class Shop(DynamicManager):
    partitions = 4
    sources = []

    def children_specs(self):
        return {f"k{i}": {"payload": 0} for i in range(8)}

    async def handle_cast(self, message, id, payload):
        return Replace(payload + message)

    @classmethod
    async def start(cls, cluster=None, **options):
        manager = await super().start(cluster, **options)
        nc = await nats.connect(os.environ["ORDERS_URL"])
        source = await JetStreamSource.start(
            manager, nc=nc, stream="ORDERS", durable="shop", subject="orders",
            key=lambda body, meta: (body["key"], body["n"]),
        )
        report_source(source)
        cls.sources.append(source)
        return manager
"""


def dashboard_queries() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in document["panels"] for target in panel.get("targets", [])
    ]
    assert queries, "the dashboard has no query"
    return queries


def rule_queries() -> list[str]:
    document = yaml.safe_load(RULES.read_text())
    queries = [rule["expr"] for group in document["groups"] for rule in group["rules"]]
    assert queries, "the alert rules have no rule"
    return queries


def metrics_used() -> set[str]:
    names = {m for query in dashboard_queries() + rule_queries() for m in _METRIC.findall(query)}
    return names


def exported(text: str) -> set[str]:
    """The sample names of a /metrics page (``name{...} value`` or ``name value``)."""
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def scrape(port: int) -> str:
    with _HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


def test_the_dashboard_is_well_formed() -> None:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in document["templating"]["list"]}
    assert {"datasource", "cluster"} <= variables
    for panel in document["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


async def test_every_metric_the_dashboard_and_the_rules_use_is_exported(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="ORDERS", subjects=["orders.>"])
        (tmp_path / "shopapp.py").write_text(APP)
        port = free_port()
        node = node_processes.spawn_python(
            *("-m", "cloister", "run", "shopapp:Shop", "--backend", nats_server.url),
            *("--cluster", "shop", "--name", "a", "--metrics-port", str(port)),
            cwd=tmp_path,
            env=cli_env({"ORDERS_URL": nats_server.url}),
        )
        await wait_for_event_async(node, r"^manager up workers=8 ", timeout=30)
        for n in range(5):  # through the source, so that its counters and the latency move
            subject = partition_name("orders", f"k{n}", 4)  # Shop.partitions
            await js.publish(subject, json.dumps({"key": f"k{n}", "n": 1}).encode())
        wanted = metrics_used()
        missing: set[str] = set()

        def every_one_exported() -> bool:
            missing.clear()
            missing.update(wanted - exported(scrape(port)))
            return not missing

        await eventually(every_one_exported, timeout=20, what=f"metrics exported: {missing}")
        text = scrape(port)
        stored = [
            line for line in text.splitlines() if 'outcome="stored"' in line and "source=" in line
        ]
        assert stored and float(stored[0].rsplit(" ", 1)[1]) == 5.0, stored
    finally:
        await nc.close()


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if in_ci():
            pytest.fail("promtool is missing: apt-get install prometheus (Debian ships it)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def test_promtool_accepts_the_rules_and_the_dashboard_queries(tmp_path: Path) -> None:
    promtool = _promtool()
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The dashboard's queries, with Grafana's variables filled in, as recording rules:
    # promtool then parses each one as Prometheus would.
    rules = [
        {
            "record": f"cloister:dashboard_query_{n}",
            "expr": query.replace("$__rate_interval", "5m").replace("$cluster", ".*"),
        }
        for n, query in enumerate(dashboard_queries())
    ]
    file = tmp_path / "dashboard-rules.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(file)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
