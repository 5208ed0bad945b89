"""The bundled load generator against a real fleet: its exactly-once accounting, per transport,
over several processes, against the official npm client, and when deliveries are really lost."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from fleet_harness import BIN_DIR, LOG_DIR, NODE_DIR, Balancer, metric, wait_until


def start(closer, tmp_path, redis, **kw):
    b = closer.add(Balancer(tmp_path, redis.url, **kw))
    b.wait_ready()
    return b


def loadtest_cmd(url, tmp_path, *args):
    out = tmp_path / f"report-{time.monotonic_ns()}.json"
    return [str(BIN_DIR / "loadtest"), "--url", url, "--json", str(out), *map(str, args)], out


def run_loadtest(url, tmp_path, *args, timeout=120):
    cmd, out = loadtest_cmd(url, tmp_path, *args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    (LOG_DIR / f"loadtest-{out.stem}.log").write_text(p.stdout + p.stderr)
    assert out.exists(), p.stdout + p.stderr
    return p.returncode, json.loads(out.read_text()), p.stdout + p.stderr


SMALL = ["-c", 60, "--rooms", 6, "--publishers", 6, "--rate", 20, "--messages", 20, "-d", 3, "--settle", 1]


@pytest.mark.parametrize("transport", ["websocket", "polling", "upgrade"])
def test_exactly_once_through_the_balancer(closer, tmp_path, redis, transport):
    b = start(closer, tmp_path, redis)
    code, r, out = run_loadtest(b.url, tmp_path, *SMALL, "--transport", transport)
    assert code == 0, out
    assert r["connected"] == 60 and r["failed"] == 0, out
    d = r["deliveries"]
    # 6 publishers, each in its own room of 10 members, 20 publishes each.
    assert d == {"expected": 1200, "delivered": 1200, "duplicate": 0, "missing": 0}, out
    assert r["published"] == r["acked"] == 120
    assert set(r["clients_per_worker"]) == {"w0", "w1", "w2"}
    assert sum(r["clients_per_worker"].values()) == 60
    assert r["errors"] == {}
    assert 0 < r["delivery_ms"]["p50"] <= r["delivery_ms"]["p99"] <= r["delivery_ms"]["max"]
    assert r["connect_ms"]["count"] == 60
    assert "PASS" in out and "deliveries: expected 1200" in out  # the human table
    requests = round(r["http_requests_per_sec"] * r["publish_secs"])
    if transport == "polling":
        # Every publish is a POST and deliveries come back on GETs: at least one request per
        # publish. The balancer routed each connection's first request; the later ones went
        # from the client to its worker on the connection handed over (the default).
        routed = metric(b.metrics(), "fleet_balancer_requests_total", transport="polling")
        assert r["published"] < requests and 0 < routed < requests, (requests, routed)
        assert "HTTP requests (long-polling)" in out
    else:
        assert requests == 0  # upgraded before publishing: WebSocket only


def test_several_processes_merge_into_one_report(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis)
    code, r, out = run_loadtest(b.url, tmp_path, *SMALL, "--procs", 3)
    assert code == 0, out
    assert r["connected"] == 60
    assert r["deliveries"] == {"expected": 1200, "delivered": 1200, "duplicate": 0, "missing": 0}, out
    assert r["delivery_ms"]["count"] == 1200
    assert sum(r["clients_per_worker"].values()) == 60
    assert out.count("ready:") == 1  # one run, one report, even over 3 processes


def test_agrees_with_the_official_client(closer, tmp_path, redis):
    """The same scenario run by npm's socket.io-client and by loadtest: same accounting."""
    b = start(closer, tmp_path, redis)
    node = subprocess.run(["node", str(NODE_DIR / "sio_load.js"), b.url, "60", "6", "6", "20", "20", "upgrade"],
                          capture_output=True, text=True, timeout=120, cwd=NODE_DIR)
    assert node.returncode == 0, node.stderr
    official = json.loads(node.stdout.strip().splitlines()[-1])
    code, ours, out = run_loadtest(b.url, tmp_path, *SMALL, "--transport", "upgrade")
    assert code == 0, out
    assert official["connected"] == ours["connected"] == 60
    assert official["published"] == ours["published"] == 120
    for k in ("expected", "delivered", "duplicate", "missing"):
        assert official[k] == ours["deliveries"][k], (k, official, ours["deliveries"])
    assert sorted(official["workers"]) == sorted(ours["clients_per_worker"])


def test_a_killed_worker_shows_as_missing_and_fails_the_run(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis)
    cmd, out = loadtest_cmd(b.url, tmp_path, "-c", 60, "--rooms", 3, "--publishers", 3, "--rate", 50, "-d", 4,
                            "--settle", 1, "--reconnect", "false")
    log = open(LOG_DIR / f"loadtest-kill-{out.stem}.log", "w+")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: "ready:" in open(log.name).read(), 30, what="publishing started")
        time.sleep(0.5)
        pid = int(re.findall(r"worker started worker=w2 pid=(\d+)", b.output())[-1])
        os.kill(pid, signal.SIGKILL)
        code = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    r = json.loads(out.read_text())
    d = r["deliveries"]
    assert code == 1, open(log.name).read()
    assert d["missing"] > 0 and d["duplicate"] == 0
    assert d["delivered"] - d["duplicate"] + d["missing"] == d["expected"]
    assert any(k.startswith("dropped_") for k in r["errors"]), r["errors"]
    assert r["pass"] is False


@pytest.mark.parametrize("transport", ["polling", "websocket", "upgrade"])
def test_kill_9_under_reconnecting_load_answers_no_502(closer, tmp_path, redis, transport):
    """kill -9 of one of three workers while 240 clients publish: its clients reconnect, and
    those new sessions arrive before the probes have seen the worker die. A new session whose
    worker refuses is placed on another in the same request; a request of a session that died
    with its worker is told "Session ID unknown". No client is ever answered 502."""
    b = start(closer, tmp_path, redis)
    cmd, out = loadtest_cmd(b.url, tmp_path, "-c", 240, "--rooms", 24, "--publishers", 24, "--rate", 20,
                            "-d", 6, "--settle", 2, "--reconnect", "true", "--transport", transport)
    log = open(LOG_DIR / f"loadtest-kill-{out.stem}.log", "w+")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: "ready:" in open(log.name).read(), 30, what="publishing started")
        time.sleep(1)
        pid = int(re.findall(r"worker started worker=w2 pid=(\d+)", b.output())[-1])
        os.kill(pid, signal.SIGKILL)
        p.wait(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    text = open(log.name).read()
    r = json.loads(out.read_text())
    victims = r["clients_per_worker"]["w2"]
    assert victims > 0, r["clients_per_worker"]
    assert any(k.startswith("dropped_") for k in r["errors"]), r["errors"]  # the kill was felt
    assert not [k for k in r["errors"] if re.search(r"http_5\d\d", k)], (r["errors"], text)
    assert r["reconnects"] >= victims, (r["reconnects"], victims, r["errors"])
    m = b.metrics()
    assert metric(m, "fleet_balancer_rejects_total", **{"class": "upstream_failed"}) == 0
    # Exactly-once still holds for what was delivered: nothing twice.
    assert r["deliveries"]["duplicate"] == 0


def test_clients_answer_heartbeats_during_a_long_connect_phase(closer, tmp_path, redis):
    """A connect phase longer than the server's ping interval + timeout: clients that are
    already in must keep answering pings, or the server drops them before publishing starts."""
    b = start(closer, tmp_path, redis, extra="socketio:\n  ping_interval_ms: 400\n  ping_timeout_ms: 400\n")
    code, r, out = run_loadtest(b.url, tmp_path, "-c", 30, "--connect-rate", 10, "--rooms", 3, "--publishers", 3,
                                "--rate", 10, "--messages", 10, "-d", 2, "--settle", 1)
    assert code == 0, out
    assert r["errors"] == {} and r["connected"] == 30, out
    assert r["deliveries"]["missing"] == 0 and r["deliveries"]["expected"] == 300
