"""The deployment files: compose, Prometheus, Alertmanager and Grafana parse, name only what
exists, and agree with the binaries; admin surfaces stay on 127.0.0.1 and no password is written
down; every alert has a severity, a runbook section and a promtool unit test; the shipped
Prometheus config, run for real against a local fleet, finds the balancer and every worker and
evaluates every rule. (Kubernetes: test_k8s.py.)"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from fleet_harness import BIN_DIR, Balancer, Client, Proc, free_port, wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
AMTOOL = shutil.which("amtool")
RUNBOOK = DEPLOY.parent / "docs" / "RUNBOOK.md"


def load(name):
    return yaml.safe_load((DEPLOY / name).read_text())


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def interpolate(value, env):
    """Compose's variable substitution: ${VAR:-default}, ${VAR:?error}, ${VAR}, $$."""
    def one(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, str(value)).replace("$$", "$")


def published(service, env):
    """(host address, host port, container port) of each published port, variables substituted."""
    out = []
    for p in service.get("ports", []):
        parts = interpolate(p, env).split(":")
        host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((host_ip, int(parts[-2]), int(parts[-1])))
    return out


@pytest.mark.parametrize("name", ["compose.yaml", "compose.scale.yaml"])
def test_compose_files_are_consistent(name):
    c = load(name)
    services = c["services"]
    assert {"redis", "fleet", "prometheus", "alertmanager", "grafana", "loadtest"} <= set(services)
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
    assert {host for _, host, _ in published(fleet, {})} == {port_of(listen), port_of(metrics)}
    assert services["loadtest"]["profiles"] == ["loadtest"]
    assert f"http://fleet:{port_of(listen)}" in services["loadtest"]["entrypoint"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    prom = yaml.safe_load((DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    scrape = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert scrape["fleet-balancer"]["static_configs"][0]["targets"] == [f"fleet:{port_of(metrics)}"]
    assert scrape["fleet-workers"]["http_sd_configs"][0]["url"].startswith(f"http://fleet:{port_of(metrics)}/sd")
    # Every rule file Prometheus loads is mounted, and alerts go to the compose Alertmanager.
    assert set(prom["rule_files"]) <= set(mounts) and len(prom["rule_files"]) == 2
    (am,) = prom["alerting"]["alertmanagers"]
    (target,) = am["static_configs"][0]["targets"]
    name, port = target.split(":")
    assert (name, int(port)) == ("alertmanager", published(services[name], {})[0][2])


@pytest.mark.parametrize("name", ["compose.yaml", "compose.scale.yaml"])
def test_compose_keeps_admin_surfaces_local_and_passwords_out(name):
    services = load(name)["services"]
    env = {"GRAFANA_ADMIN_PASSWORD": "from-the-environment"}
    for sname, s in services.items():
        for host_ip, host_port, _ in published(s, env):
            if (sname, host_port) == ("fleet", 8080):
                continue  # the public Socket.IO port
            assert host_ip == "127.0.0.1", f"{sname} publishes {host_port} on {host_ip} by default"
        # ADMIN_BIND opens them up on purpose.
        for host_ip, host_port, _ in published(s, {"ADMIN_BIND": "0.0.0.0"}):
            assert host_ip == "0.0.0.0"
    grafana = services["grafana"]["environment"]
    assert interpolate(grafana["GF_SECURITY_ADMIN_PASSWORD"], env) == "from-the-environment"
    with pytest.raises(KeyError, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate(grafana["GF_SECURITY_ADMIN_PASSWORD"], {})  # no default password: compose refuses


@pytest.mark.parametrize("name", ["compose.yaml", "compose.scale.yaml"])
def test_compose_fleet_containers_have_descriptors_confinement_and_time_to_drain(name):
    services = load(name)["services"]
    fleet_services = [n for n, s in services.items() if s["image"].startswith("localhost/fleet")]
    assert {"fleet", "loadtest"} <= set(fleet_services)
    for n in fleet_services:
        nofile = services[n]["ulimits"]["nofile"]
        assert int(interpolate(nofile["soft"], {})) == int(interpolate(nofile["hard"], {})) >= 65536, n
        assert int(interpolate(nofile["hard"], {"NOFILE": "20000"})) == 20000, n
    for n in fleet_services:
        if n == "loadtest":
            continue
        s = services[n]
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"], n
        assert "no-new-privileges:true" in s["security_opt"], n
    # The balancer's grace period and its 2 s shutdown timeout fit before compose's SIGKILL.
    cfg_file = "fleet.yaml" if name == "compose.yaml" else "fleet.scale.yaml"
    cfg = load(cfg_file)
    grace = cfg.get("balancer", {}).get("grace_period_secs") or cfg.get("workers", {}).get("drain_window_secs", 10) + 5
    assert int(services["fleet"]["stop_grace_period"].rstrip("s")) >= grace + 2
    if "worker" in services:
        assert int(services["worker"]["stop_grace_period"].rstrip("s")) > 10  # the drain window
        assert "--redis" not in " ".join(services["worker"]["command"]), "the URL comes from FLEET_REDIS_URL"
        assert services["worker"]["environment"]["FLEET_REDIS_URL"].startswith("redis://")


@pytest.mark.skipif(not AMTOOL, reason="amtool not installed (tests/run installs prometheus-alertmanager)")
def test_amtool_accepts_the_alertmanager_config():
    r = subprocess.run([AMTOOL, "check-config", str(DEPLOY / "alertmanager/alertmanager.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_builds_every_binary_as_non_root_with_a_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM rust:\S+ AS build", text, re.M)
    assert re.search(r"^FROM debian:bookworm-slim", text, re.M)
    for b in ("balancer", "worker", "loadtest"):
        assert f"target/release/{b}" in text
    # A numeric user, so that Kubernetes' runAsNonRoot can check it; the one useradd creates.
    uid = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert uid and int(uid.group(1)) > 0 and "HEALTHCHECK" in text
    assert f"--uid {uid.group(1)} --gid {uid.group(2)}" in text and f"--gid {uid.group(2)} fleet" in text
    assert "target/" in (DEPLOY.parent / ".dockerignore").read_text()


def _live_metric_names(closer, tmp_path, redis):
    b = closer.add(Balancer(tmp_path, redis.url, count=1))
    b.wait_ready()
    c = closer.add(Client(b.url, ["polling", "websocket"])).connect()
    c.call("join", "r")
    c.call("publish", {"room": "r", "data": 1})
    # The Redis memory gauge has a series per node once the first poll answered.
    wait_until(lambda: all(name in requests.get(b.worker_url(0) + "/metrics").text
                           for name in ("fleet_worker_pubsub_lag_seconds_bucket", "fleet_worker_redis_memory_bytes{")),
               10, what="worker probes")
    text = requests.get(b.admin + "/metrics").text + requests.get(b.worker_url(0) + "/metrics").text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def rules(name):
    return [r for g in load(f"prometheus/{name}")["groups"] for r in g["rules"]]


RECORDED = {r["record"]: r["expr"] for r in rules("rules.yml")}


def _query_metrics(expr):
    """The exported series an expression reads, through the recording rules it uses."""
    names = set()
    for rec, rec_expr in RECORDED.items():
        if rec in expr:
            expr = expr.replace(rec, "")
            names |= _query_metrics(rec_expr)
    return names | set(re.findall(r"\b((?:fleet|process)_[a-z_]+)", expr))


def test_dashboard_and_rules_query_only_metrics_the_fleet_exports(closer, tmp_path, redis):
    names = _live_metric_names(closer, tmp_path, redis)
    assert {"process_open_fds", "process_max_fds"} <= names
    dash = json.loads((DEPLOY / "grafana/dashboards/fleet.json").read_text())
    used = set()
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            used |= _query_metrics(t["expr"])
    for rule in rules("rules.yml") + rules("alerts.yml"):
        used |= _query_metrics(rule["expr"])
    assert used and used <= names, used - names
    ds = load("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert ds["uid"] == "prometheus" and ds["url"] == "http://prometheus:9090"


def test_dashboard_has_variables_rate_intervals_and_a_row_per_part():
    dash = json.loads((DEPLOY / "grafana/dashboards/fleet.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    worker = variables["worker"]
    assert worker["includeAll"] and worker["multi"] and worker["datasource"]["uid"] == "${datasource}"
    assert "label_values(fleet_worker_connections, worker)" in json.dumps(worker["query"])
    rows, current = {}, None
    for p in dash["panels"]:
        if p["type"] == "row":
            current = rows.setdefault(p["title"], [])
            continue
        current.append(p["title"].lower())
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            # Windows follow the scrape interval and the zoom, never a fixed [1m].
            assert set(re.findall(r"\[([^\]]+)\]", t["expr"])) <= {"$__rate_interval"}, t["expr"]
            # Per-worker series follow the $worker selection.
            if re.search(r"\bfleet_worker_\w+\{?", t["expr"]) and "by (le)" not in t["expr"] \
                    and "redis_memory" not in t["expr"] and "sum(rate(fleet_worker_broadcasts" not in t["expr"]:
                assert 'worker=~"$worker"' in t["expr"], t["expr"]
    assert set(rows) == {"Workers", "Balancer", "Redis and cross-worker delivery", "Processes"}
    titles = " ".join(t for ts in rows.values() for t in ts)
    for topic in ("connections", "sessions placed", "lag", "event-loop", "redis", "sticky", "restarts"):
        assert topic in titles, topic
    balancer = " ".join(rows["Balancer"])
    for topic in ("latency", "refusals", "class", "upstream errors", "handoffs", "panic"):
        assert topic in balancer, topic
    assert any("open files" in t for t in rows["Processes"])


def _slug(heading):
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_severity_a_runbook_section_and_the_named_coverage():
    alerts = rules("alerts.yml")
    sections = {_slug(h): h for h in re.findall(r"^## (.+)$", RUNBOOK.read_text(), re.M)}
    names = [a["alert"] for a in alerts]
    assert len(set(names)) == len(names)
    for a in alerts:
        assert a["labels"]["severity"] in ("critical", "warning"), a["alert"]
        path, _, anchor = a["annotations"]["runbook_url"].partition("#")
        assert path == "docs/RUNBOOK.md" and anchor == _slug(a["alert"]) and anchor in sections, a["alert"]
        assert a["annotations"]["summary"], a["alert"]
    # One section per alert, and none for an alert that does not exist.
    assert sorted(sections.values()) == sorted(names)
    exprs = {a["alert"]: a["expr"] for a in alerts}
    wanted = {
        'up{job="fleet-balancer"} == 0': "balancer down",
        "fleet_worker_deliveries_dropped": "dropped deliveries",
        'fleet_balancer_rejects_total{class="no_worker"}': "no_worker refusals",
        "fleet_balancer_panic_placements_total": "panic placements",
        "fleet_worker_redis_memory_bytes": "Redis memory",
        "process_fds_used": "open files",
    }
    for needle, what in wanted.items():
        assert any(needle in e for e in exprs.values()), what
    # Recording rules are used by the alerts, and every recorded name is a real rule.
    used = {r for r in RECORDED if any(r in e for e in exprs.values())}
    assert len(used) >= 3
    for e in exprs.values():
        for name in re.findall(r"\b\w+:\w+:\w+\b", e):
            assert name in RECORDED, name


def _promtool_config(tmp_path, name):
    """A shipped Prometheus config with its container paths pointed at the repository's files."""
    text = (DEPLOY / "prometheus" / name).read_text()
    for f in ("alerts.yml", "rules.yml"):
        text = text.replace(f"/etc/prometheus/{f}", str(DEPLOY / "prometheus" / f))
    (tmp_path / name).write_text(text)
    return tmp_path / name


@pytest.mark.skipif(not PROMTOOL, reason="promtool not installed (tests/run installs Debian's prometheus)")
def test_promtool_accepts_the_config_and_rules(tmp_path):
    for name in ("prometheus.yml", "prometheus.scale.yml"):
        r = subprocess.run([PROMTOOL, "check", "config", str(_promtool_config(tmp_path, name))],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "check", "rules", str(DEPLOY / "prometheus/rules.yml"),
                        str(DEPLOY / "prometheus/alerts.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not PROMTOOL, reason="promtool not installed (tests/run installs Debian's prometheus)")
def test_promtool_unit_tests_of_the_alerts_pass():
    """tests/prometheus/alerts_test.yml: the new alerts fire on their series and stay quiet on a
    healthy fleet."""
    tests = Path(__file__).resolve().parent / "prometheus" / "alerts_test.yml"
    r = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True, text=True, cwd=tests.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    tested = set(re.findall(r"alertname: (\w+)", tests.read_text()))
    assert {"FleetBalancerDown", "FleetNoWorkerRefusals", "FleetPanicPlacements", "FleetDeliveriesDropped",
            "FleetRedisMemoryHigh", "FleetDescriptorsNearLimit"} <= tested


@pytest.mark.skipif(not PROMETHEUS, reason="prometheus not installed (tests/run installs Debian's prometheus)")
def test_real_prometheus_with_the_shipped_config_finds_every_target(closer, tmp_path, redis):
    b = closer.add(Balancer(tmp_path, redis.url, count=3))
    b.wait_ready()
    clients = [closer.add(Client(b.url, ["polling", "websocket"])).connect() for _ in range(7)]
    text = _promtool_config(tmp_path, "prometheus.yml").read_text()
    text = (text.replace("fleet:9100/sd?host=fleet", f"127.0.0.1:{b.metrics_port}/sd?host=127.0.0.1")
                .replace('"fleet:9100"', f'"127.0.0.1:{b.metrics_port}"')
                .replace('"alertmanager:9093"', f'"127.0.0.1:{free_port()}"')
                .replace("refresh_interval: 10s", "refresh_interval: 1s")
                .replace("scrape_interval: 5s", "scrape_interval: 1s")
                .replace("evaluation_interval: 5s", "evaluation_interval: 1s"))
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

    def query(expr):
        r = requests.get(f"{api}/query", params={"query": expr}, timeout=2).json()
        return r["data"]["result"]
    wait_until(lambda: query("sum(fleet_worker_connections)")[0]["value"][1] == str(len(clients)), 20,
               what="sum(fleet_worker_connections) == clients")
    # Every rule evaluates without error, the recording rules produce series, and a healthy
    # fleet fires nothing.
    wait_until(lambda: query("job:fleet_worker_connections:sum")[0]["value"][1] == str(len(clients)), 20,
               what="the recording rule job:fleet_worker_connections:sum")
    # The balancer and 3 workers: each series appears once its target's first scrape has been
    # through a rule evaluation, which need not be the evaluation that made the one above.
    wait_until(lambda: len(query("instance:process_fds_used:ratio")) == 4, 20,
               what="instance:process_fds_used:ratio for the balancer and 3 workers")
    groups = requests.get(f"{api}/rules", timeout=2).json()["data"]["groups"]
    evaluated = [r for g in groups for r in g["rules"]]
    assert len(evaluated) == len(RECORDED) + len(rules("alerts.yml"))
    assert all(r["health"] == "ok" for r in evaluated), [(r["name"], r.get("lastError")) for r in evaluated]
    assert not [r["name"] for r in evaluated if r.get("state") == "firing"]


def test_the_chat_example_deploys_from_the_same_image_and_files():
    chat = load("compose.chat.yaml")["services"]
    assert chat["fleet"]["build"]["args"]["APPS"] == "chat"
    assert chat["fleet"]["image"] == chat["loadtest"]["image"]  # the app's image holds loadtest too
    assert "/etc/fleet/fleet.chat.yaml" in chat["fleet"]["command"]
    cfg = load("fleet.chat.yaml")
    assert cfg["workers"]["command"] == ["chat"] and cfg["balancer"]["forward_paths"] == ["/"]
    # The balancer's own parser accepts it (an index out of range is the only complaint).
    r = subprocess.run([str(BIN_DIR / "worker"), "--config", str(DEPLOY / "fleet.chat.yaml"), "--index", "99"],
                       capture_output=True, text=True, timeout=10)
    assert "out of range" in r.stderr, r.stderr
    assert "ARG APPS" in (DEPLOY / "Dockerfile").read_text()
