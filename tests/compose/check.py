"""From the host, against `docker compose up` of deploy/compose.yaml: official-protocol clients
connect through the published port and a room broadcast crosses workers; Prometheus shows the
balancer and every worker up and counts the clients, evaluates every rule, and reaches
Alertmanager; the fleet container runs as uid 10001 on a read-only root with no capabilities,
its admin port published on 127.0.0.1 only, every process at the open-file limit compose gave
it; the image's HEALTHCHECK passes."""

import os
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fleet_harness import Client, metric, parse_metrics, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
COUNT = yaml.safe_load((ROOT / "deploy/fleet.yaml").read_text())["workers"]["count"]
FLEET, ADMIN, PROM = "http://127.0.0.1:8080", "http://127.0.0.1:9100", "http://127.0.0.1:9090/api/v1"
ALERTMANAGER = "http://127.0.0.1:9093"
NOFILE = int(os.environ.get("NOFILE", "65536"))  # what tests/compose/run asked compose for


def ok(url):
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def main():
    wait_until(lambda: ok(ADMIN + "/readyz"), 240, interval=1, what="balancer ready in its container")
    wait_until(lambda: requests.get(ADMIN + "/readyz", timeout=2).text.startswith(f"ready: {COUNT} "), 60,
               interval=1, what=f"all {COUNT} workers ready")
    clients = [Client(FLEET, ["polling", "websocket"] if i % 2 else ["websocket"]).connect() for i in range(3 * COUNT)]
    workers = {c.call("whoami")["worker"] for c in clients}
    assert len(workers) >= 2, workers
    for c in clients:
        c.call("join", "compose")
    clients[0].call("publish", {"room": "compose", "data": "across"})
    for c in clients:
        wait_until(lambda c=c: c.data_received() == ["across"], 10, what="broadcast reached every member")
    time.sleep(0.5)
    assert all(c.data_received() == ["across"] for c in clients), "exactly once"
    print(f"compose check: {len(clients)} clients on {sorted(workers)}, broadcast delivered once to each")
    # Inside the container too, as its non-root user, every WebSocket was handed to its worker.
    m = parse_metrics(requests.get(ADMIN + "/metrics", timeout=2).text)
    assert metric(m, "fleet_balancer_websocket_handoffs_total", outcome="passed") == len(clients), m
    assert metric(m, "fleet_balancer_websocket_handoffs_total", outcome="relayed") == 0, m
    print(f"compose check: all {len(clients)} WebSockets handed off to the workers")

    def targets():
        t = requests.get(PROM + "/targets", timeout=2).json()["data"]["activeTargets"]
        return sorted((x["labels"]["job"], x["health"]) for x in t)
    want = [("fleet-balancer", "up")] + [("fleet-workers", "up")] * COUNT
    wait_until(lambda: targets() == want, 90, interval=1, what="Prometheus sees the balancer and every worker up")

    def connections():
        r = requests.get(PROM + "/query", params={"query": "sum(fleet_worker_connections)"}, timeout=2).json()
        res = r["data"]["result"]
        return float(res[0]["value"][1]) if res else None
    wait_until(lambda: connections() == len(clients), 60, interval=1, what="sum(fleet_worker_connections) == clients")
    print(f"compose check: Prometheus has {len(want)} targets up and counts {len(clients)} connections")

    # Every fleet process (the balancer and each worker) raised its soft limit to compose's.
    def max_fds():
        r = requests.get(PROM + "/query", params={"query": 'process_max_fds{job=~"fleet-.*"}'}, timeout=2).json()
        return sorted(float(x["value"][1]) for x in r["data"]["result"])
    wait_until(lambda: max_fds() == [NOFILE] * (COUNT + 1), 30, interval=1,
               what=f"process_max_fds == {NOFILE} for the balancer and {COUNT} workers")
    print(f"compose check: the balancer and {COUNT} workers run with {NOFILE} open files (ulimits: nofile)")

    def rules_healthy():
        groups = requests.get(PROM + "/rules", timeout=2).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) > 10 and all(r["health"] == "ok" and r.get("lastEvaluation", "").startswith("2")
                                       for r in rules) and len(rules)
    n = wait_until(rules_healthy, 30, interval=1, what="every rule evaluated without error")
    wait_until(lambda: requests.get(PROM + "/alertmanagers", timeout=2).json()["data"]["activeAlertmanagers"], 30,
               interval=1, what="Prometheus discovers Alertmanager")
    assert requests.get(ALERTMANAGER + "/api/v2/status", timeout=2).status_code == 200
    print(f"compose check: {n} recording and alerting rules evaluate; Prometheus sends alerts to Alertmanager")

    cid = subprocess.run(["docker-compose", "-f", str(ROOT / "deploy/compose.yaml"), "ps", "-q", "fleet"],
                         capture_output=True, text=True, check=True).stdout.strip()
    hc = subprocess.run(["podman", "healthcheck", "run", cid], capture_output=True, text=True)
    assert hc.returncode == 0, f"HEALTHCHECK failed: {hc.stdout} {hc.stderr}"
    print("compose check: the image's HEALTHCHECK passes")
    uid = subprocess.run(["podman", "exec", cid, "id", "-u"], capture_output=True, text=True, check=True).stdout
    assert uid.strip() == "10001", uid
    write = subprocess.run(["podman", "exec", cid, "sh", "-c", "touch /usr/local/bin/x"], capture_output=True, text=True)
    assert write.returncode != 0 and "Read-only" in write.stderr, write
    caps = subprocess.run(["podman", "exec", cid, "grep", "CapBnd", "/proc/1/status"], capture_output=True,
                          text=True, check=True).stdout
    assert caps.split()[-1].strip("0") == "", caps
    ports = subprocess.run(["podman", "port", cid], capture_output=True, text=True, check=True).stdout
    assert "9100/tcp -> 127.0.0.1:9100" in ports and "8080/tcp -> 0.0.0.0:8080" in ports, ports
    print("compose check: the fleet runs as uid 10001, read-only, no capabilities; 9100 on 127.0.0.1 only")
    for c in clients:
        c.close()


if __name__ == "__main__":
    main()
