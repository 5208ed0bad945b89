"""The deployment files: compose, Prometheus, Grafana and Kubernetes parse, name only what exists,
and agree with the binaries; the shipped Prometheus config, run for real against a local fleet,
finds the balancer and every worker."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from fleet_harness import BIN_DIR, LOG_DIR, Balancer, Client, Proc, free_port, wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def load(name):
    return yaml.safe_load((DEPLOY / name).read_text())


def load_all(name):
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


@pytest.mark.parametrize("name", ["compose.yaml", "compose.scale.yaml"])
def test_compose_files_are_consistent(name):
    c = load(name)
    services = c["services"]
    assert {"redis", "fleet", "prometheus", "grafana", "loadtest"} <= set(services)
    for s in services.values():
        # Official images or the one this repo builds; nothing else to pull.
        assert s["image"].split("/")[0] in ("redis:7-bookworm", "prom", "grafana", "localhost"), s["image"]
        assert "depends_on" not in s or all(isinstance(d, str) for d in s["depends_on"]), \
            "no condition: service_healthy (health checks do not run everywhere)"
        for v in s.get("volumes", []):
            assert (DEPLOY / v.split(":")[0]).exists(), v
    fleet = services["fleet"]
    # The fleet file the balancer is given, found on the host through its mount (a file, or
    # the directory holding it, so that edits made by renaming a new file are seen).
    src, dst = fleet["volumes"][0].split(":")[:2]
    inside = fleet["command"][fleet["command"].index("--config") + 1]
    mounted = DEPLOY / src / os.path.relpath(inside, dst) if inside != dst else DEPLOY / src
    cfg = yaml.safe_load(mounted.read_text())
    env = fleet.get("environment", {})
    listen = env.get("FLEET_LISTEN", cfg.get("listen", "0.0.0.0:8080"))
    metrics = env.get("FLEET_METRICS_LISTEN", cfg.get("metrics_listen", "0.0.0.0:9100"))
    published = {int(p.split(":")[1]) for p in fleet["ports"]}
    assert published == {port_of(listen), port_of(metrics)}
    assert services["loadtest"]["profiles"] == ["loadtest"]
    assert f"http://fleet:{port_of(listen)}" in services["loadtest"]["entrypoint"]
    prom_file = next(v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v.split(":")[1])
    prom = yaml.safe_load((DEPLOY / prom_file.split(":")[0]).read_text())
    scrape = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert scrape["fleet-balancer"]["static_configs"][0]["targets"] == [f"fleet:{port_of(metrics)}"]
    assert scrape["fleet-workers"]["http_sd_configs"][0]["url"].startswith(f"http://fleet:{port_of(metrics)}/sd")


def test_dockerfile_builds_every_binary_as_non_root_with_a_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM rust:\S+ AS build", text, re.M)
    assert re.search(r"^FROM debian:bookworm-slim", text, re.M)
    for b in ("balancer", "worker", "loadtest"):
        assert f"target/release/{b}" in text
    assert re.search(r"^USER fleet", text, re.M) and "HEALTHCHECK" in text
    assert "target/" in (DEPLOY.parent / ".dockerignore").read_text()


def test_kubernetes_manifests_agree_with_the_binaries():
    kinds = {}
    for f in load("k8s/kustomization.yaml")["resources"]:
        for doc in load_all(f"k8s/{f}"):
            kinds.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    worker = kinds["Deployment"]["fleet-worker"]["spec"]["template"]
    w = worker["spec"]["containers"][0]
    args = dict(zip(w["args"][::2], w["args"][1::2]))
    help_text = subprocess.run([BIN_DIR / "worker", "--help"], capture_output=True, text=True).stdout
    for flag in args:
        assert flag in help_text, flag
    port = port_of(args["--listen"])
    named = {p["name"]: p["containerPort"] for p in w["ports"]}
    assert named[w["readinessProbe"]["httpGet"]["port"]] == port
    assert w["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    # The grace period covers the drain window.
    assert worker["spec"]["terminationGracePeriodSeconds"] > int(args["--drain-window-secs"])
    headless = kinds["Service"]["fleet-workers"]["spec"]
    assert headless["clusterIP"] == "None" and headless["ports"][0]["port"] == port

    bal = kinds["Deployment"]["fleet-balancer"]
    assert bal["spec"]["replicas"] >= 2
    b = bal["spec"]["template"]["spec"]["containers"][0]
    cfg = yaml.safe_load(kinds["ConfigMap"]["fleet-balancer"]["data"]["fleet.yaml"])
    assert cfg["workers"]["discover"] == f"fleet-workers:{port}"
    named = {p["name"]: p["containerPort"] for p in b["ports"]}
    assert named["public"] == port_of(cfg["listen"]) and named["admin"] == port_of(cfg["metrics_listen"])
    assert named[b["readinessProbe"]["httpGet"]["port"]] == port_of(cfg["metrics_listen"])
    assert kinds["Service"]["fleet"]["spec"]["ports"][0]["targetPort"] == "public"


def _live_metric_names(closer, tmp_path, redis):
    b = closer.add(Balancer(tmp_path, redis.url, count=1))
    b.wait_ready()
    c = closer.add(Client(b.url, ["polling", "websocket"])).connect()
    c.call("join", "r")
    c.call("publish", {"room": "r", "data": 1})
    wait_until(lambda: "fleet_worker_pubsub_lag_seconds_bucket" in requests.get(b.worker_url(0) + "/metrics").text,
               10, what="worker probes")
    text = requests.get(b.admin + "/metrics").text + requests.get(b.worker_url(0) + "/metrics").text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _query_metrics(expr):
    return {m for m in re.findall(r"\b(fleet_[a-z_]+)", expr)}


def test_dashboard_and_alerts_query_only_metrics_the_fleet_exports(closer, tmp_path, redis):
    names = _live_metric_names(closer, tmp_path, redis)
    dash = json.loads((DEPLOY / "grafana/dashboards/fleet.json").read_text())
    used = set()
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "prometheus"
        for t in p["targets"]:
            used |= _query_metrics(t["expr"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("connections", "sessions placed", "lag", "event-loop", "redis", "sticky", "restarts"):
        assert topic in titles, topic
    for rule in load("prometheus/alerts.yml")["groups"][0]["rules"]:
        used |= _query_metrics(rule["expr"])
    assert used and used <= names, used - names
    ds = load("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert ds["uid"] == "prometheus" and ds["url"] == "http://prometheus:9090"


@pytest.mark.skipif(not PROMTOOL, reason="promtool not installed (tests/run installs Debian's prometheus)")
def test_promtool_accepts_the_config_and_rules(tmp_path):
    for name in ("prometheus.yml", "prometheus.scale.yml"):
        # The rule file path is the container's; point it at the shipped file.
        text = (DEPLOY / "prometheus" / name).read_text().replace("/etc/prometheus/alerts.yml",
                                                                   str(DEPLOY / "prometheus/alerts.yml"))
        (tmp_path / name).write_text(text)
        r = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / name)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "check", "rules", str(DEPLOY / "prometheus/alerts.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not PROMETHEUS, reason="prometheus not installed (tests/run installs Debian's prometheus)")
def test_real_prometheus_with_the_shipped_config_finds_every_target(closer, tmp_path, redis):
    b = closer.add(Balancer(tmp_path, redis.url, count=3))
    b.wait_ready()
    clients = [closer.add(Client(b.url, ["polling", "websocket"])).connect() for _ in range(7)]
    text = (DEPLOY / "prometheus/prometheus.yml").read_text()
    text = (text.replace("fleet:9100/sd?host=fleet", f"127.0.0.1:{b.metrics_port}/sd?host=127.0.0.1")
                .replace('"fleet:9100"', f'"127.0.0.1:{b.metrics_port}"')
                .replace("/etc/prometheus/alerts.yml", str(DEPLOY / "prometheus/alerts.yml"))
                .replace("refresh_interval: 10s", "refresh_interval: 1s")
                .replace("scrape_interval: 5s", "scrape_interval: 1s"))
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(text)
    port = free_port()
    closer.add(Proc("prometheus", [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"]))
    api = f"http://127.0.0.1:{port}/api/v1"

    def targets_up():
        r = requests.get(f"{api}/targets", timeout=2).json()["data"]["activeTargets"]
        return sorted((t["labels"]["job"], t["health"]) for t in r)
    wait_until(lambda: targets_up() == [("fleet-balancer", "up")] + [("fleet-workers", "up")] * 3, 30,
               what="balancer and 3 workers up in Prometheus")
    workers = sorted(t["labels"].get("worker") for t in requests.get(f"{api}/targets").json()["data"]["activeTargets"]
                     if t["labels"]["job"] == "fleet-workers")
    assert workers == ["w0", "w1", "w2"]

    def connections():
        r = requests.get(f"{api}/query", params={"query": "sum(fleet_worker_connections)"}, timeout=2).json()
        res = r["data"]["result"]
        return float(res[0]["value"][1]) if res else None
    wait_until(lambda: connections() == len(clients), 20, what="sum(fleet_worker_connections) == clients")
