#!/usr/bin/env python3
"""Benchmarks, one invocation, one machine, one Redis version, one load generator:

1. fleet vs the Node setup it replaces (bench/node: cluster + @socket.io/sticky + socket.io +
   @socket.io/redis-adapter): server CPU per delivered message, server memory per idle
   client, delivery p50/p99 at a fixed offered load, highest delivered/s with p99 < 100 ms;
2. the balancer tax: the same scenario through the balancer and straight to the workers;
3. `auth.mode: jwt` against `none`: CPU per delivery at the fixed load, and connections per
   second and server CPU per connection in a burst of connects;
3b. the example chat app (apps/chat) as the workers against the default app: CPU per delivery;
3c. rooms of two as workers are added (2, 4, 8, 16; Node at 2 and 8): CPU per delivery; what a
    room costs Redis (memory, SUBSCRIBE commands) when 100,000 are joined; each shard's share on
    a 3-master Redis Cluster; delivery while clients churn subscriptions;
4. long-polling through the balancer vs straight to the workers (and the Node setup): HTTP
   requests/s when flooded, and the latency it adds at a fixed load;
5. (--capacity) how many clients the fleet holds: through one balancer process, and through
   several sharing the public port (SO_REUSEPORT).

Usage: cargo build --release && (cd bench/node && npm ci) && python3 bench/run.py [--quick]
       [--capacity | --only-capacity | --only-polling | --only-fixed | --only-auth | --only-app |
        --only-scale]
       [--json FILE]
Servers and clients all run on 127.0.0.1; "server" CPU and memory include Redis.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("FLEET_BIN_DIR", ROOT / "target" / "release"))
NODE_SERVER = ROOT / "bench" / "node" / "server.js"
TICK = os.sysconf("SC_CLK_TCK")
sys.path.insert(0, str(ROOT / "tests"))
from fleet_harness import (free_port, free_port_range as free_ports, free_port_with_bus, port_open,  # noqa: E402
                           wait_until)
LOGS = Path(tempfile.mkdtemp(prefix="fleet-bench-"))


def wait_port(port, timeout=30):
    wait_until(lambda: port_open(port), timeout, interval=0.1, what=f"something listening on {port}")


def descendants(pid):
    """pid and every process below it."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / TICK


def rss_bytes(pids):
    total = 0
    for p in pids:
        try:
            m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
            total += int(m.group(1)) * 1024 if m else 0
        except OSError:
            pass
    return total


class Proc:
    def __init__(self, name, args, env=None):
        self.log = open(LOGS / f"{name}.log", "w")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}, start_new_session=True)

    def pids(self):
        return descendants(self.p.pid)

    def stop(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, 15)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, 9)
                self.p.wait()


class Redis(Proc):
    def __init__(self):
        self.port = free_port()
        super().__init__(f"redis-{self.port}", ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                                "--save", "", "--appendonly", "no"])
        wait_port(self.port)
        self.url = f"redis://127.0.0.1:{self.port}"


class Fleet:
    """The balancer spawning `workers` workers, plus `extra_balancers` more sharing its port.
    With `handoff` (the default) the spawning balancer passes WebSockets to its workers; the
    extra balancers, which spawn nothing, always relay."""

    def __init__(self, redis, workers, extra_balancers=0, ping_interval_ms=25000, handoff=True, extra_yaml="",
                 command=None, placement=None, redis_yaml="", bin_dir=None, handoff_polling=None):
        self.port, self.base = free_port(), free_ports(workers)
        self.workers = workers
        self.procs = []
        for i in range(1 + extra_balancers):
            metrics = free_port()
            cfg = LOGS / f"fleet-{self.port}-{i}.yaml"
            cfg.write_text(
                f"listen: 127.0.0.1:{self.port}\nmetrics_listen: 127.0.0.1:{metrics}\n"
                f"redis:\n  url: {redis.url}\n" + redis_yaml +
                f"workers:\n  count: {workers}\n  base_port: {self.base}\n  spawn: {'true' if i == 0 else 'false'}\n"
                f"  handoff: {'true' if handoff else 'false'}\n"
                + ("" if handoff_polling is None else f"  handoff_polling: {'true' if handoff_polling else 'false'}\n")
                + (f"  command: [{command}]\n" if command else "") +
                f"socketio:\n  ping_interval_ms: {ping_interval_ms}\n"
                f"balancer:\n  reuse_port: {'true' if extra_balancers else 'false'}\n"
                + (f"  placement: {placement}\n" if placement else "") + extra_yaml)
            self.procs.append(Proc(f"balancer-{self.port}-{i}", [str((bin_dir or BIN) / "balancer"), "--config", str(cfg)]))
            if i == 0:
                for w in range(workers):
                    wait_port(self.base + w)
            wait_port(metrics)
            self.wait_all_up(metrics)
        wait_port(self.port)

    def wait_all_up(self, metrics_port):
        """Every worker in placement, as the balancer itself reports (a worker not yet up gets no
        clients, and the run would measure fewer workers than it says)."""
        def up():
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
            return sum(1 for line in text.splitlines()
                       if line.startswith("fleet_balancer_worker_up{") and line.endswith(" 1")) == self.workers
        wait_until(up, 60, what=f"{self.workers} workers up")

    url = property(lambda self: f"http://127.0.0.1:{self.port}")
    worker_urls = property(lambda self: ",".join(f"http://127.0.0.1:{self.base + i}" for i in range(self.workers)))

    def pids(self):
        return [p for proc in self.procs for p in proc.pids()]

    def balancer_pids(self):
        return [proc.p.pid for proc in self.procs]

    def stop(self):
        for p in reversed(self.procs):
            p.stop()


class NodeSetup(Proc):
    def __init__(self, redis, workers):
        self.port = free_port()
        super().__init__(f"node-{self.port}", ["node", str(NODE_SERVER)],
                         env={"PORT": str(self.port), "WORKERS": str(workers), "REDIS_URL": redis.url})
        wait_port(self.port)
        time.sleep(1.5)  # workers forked and subscribed

    url = property(lambda self: f"http://127.0.0.1:{self.port}")

    def pids(self):
        return self.p and descendants(self.p.pid)

    def balancer_pids(self):
        return [self.p.pid]  # the cluster primary, which balances with @socket.io/sticky


def loadtest(url, args, on_ready=None, name="loadtest"):
    """Runs the load generator; calls on_ready() when publishing starts; returns its report."""
    out = LOGS / f"{name}-{time.monotonic_ns()}.json"
    cmd = [str(BIN / "loadtest"), "--url", url, "--json", str(out), *map(str, args)]
    log = open(LOGS / f"{out.stem}.log", "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        log.write(line)
        if line.startswith("[") or line.startswith("ready"):
            print("    " + line.rstrip(), file=sys.stderr, flush=True)
        if line.startswith("ready:") and on_ready:
            on_ready()
    p.wait()
    if not out.exists():
        raise RuntimeError(f"loadtest failed: see {log.name}")
    return json.loads(out.read_text())


def measured_run(server_pids, url, args, name, balancer_pids=None, on_ready_too=None):
    """A load run with the servers' CPU seconds counted from the start of publishing to the end;
    with `balancer_pids`, the balancer processes' share of it too; `on_ready_too` is called when
    publishing starts."""
    mark = {}

    def on_ready():
        mark["cpu"] = cpu_seconds(server_pids())
        mark["bal"] = cpu_seconds(balancer_pids()) if balancer_pids else 0
        if on_ready_too:
            on_ready_too()

    report = loadtest(url, args, on_ready=on_ready, name=name)
    cpu = cpu_seconds(server_pids()) - mark.get("cpu", 0)
    bal = cpu_seconds(balancer_pids()) - mark.get("bal", 0) if balancer_pids else None
    delivered = max(report["deliveries"]["delivered"], 1)
    extra = {} if bal is None else {
        "balancer_cpu_s": round(bal, 3),
        # The balancer's CPU over everything else's in the same run: the tax without the noise
        # of comparing two runs.
        "balancer_share_pct": round(bal / max(cpu - bal, 1e-9) * 100, 1),
    }
    return {
        **extra,
        "connected": report["connected"],
        "connect_errors": report["failed"],
        "errors": report["errors"],
        "delivered": report["deliveries"]["delivered"],
        "missing": report["deliveries"]["missing"],
        "duplicate": report["deliveries"]["duplicate"],
        "delivered_per_sec": round(report["delivered_per_sec"]),
        "http_requests_per_sec": round(report.get("http_requests_per_sec", 0)),
        "p50_ms": report["delivery_ms"]["p50"],
        "p99_ms": report["delivery_ms"]["p99"],
        "cpu_s": round(cpu, 2),
        "cpu_us_per_delivery": round(cpu * 1e6 / delivered, 2),
    }


def memory_per_client(server_pids, url, clients, name):
    base = rss_bytes(server_pids())
    sample = {}

    def on_ready():
        def later():
            time.sleep(3)
            sample["rss"] = rss_bytes(server_pids())
        threading.Thread(target=later, daemon=True).start()

    report = loadtest(url, ["-c", clients, "--publishers", 0, "-d", 6, "--settle", 0, "--connect-rate", 1000,
                            "--connect-timeout", 90], on_ready=on_ready, name=name)
    connected = max(report["connected"], 1)
    return {
        "clients": clients,
        "connected": report["connected"],
        "connect_errors": report["failed"],
        "errors": report["errors"],
        "rss_idle_mb": round(base / 2**20, 1),
        "rss_loaded_mb": round(sample.get("rss", 0) / 2**20, 1),
        "kb_per_client": round((sample.get("rss", 0) - base) / 1024 / connected, 1),
    }


def scenario(rate, duration, clients=1000):
    return ["-c", clients, "--rooms", 10, "--publishers", 10, "--rate", rate, "-d", duration, "--settle", 1,
            "--connect-rate", 500, "--connect-timeout", 90, "--transport", "websocket"]


def max_rate(server_pids, url, rates, duration, name):
    """The highest delivered/s whose p99 stays under 100 ms with nothing lost."""
    best, steps = None, []
    for rate in rates:
        r = measured_run(server_pids, url, scenario(rate, duration), f"{name}-rate{rate}")
        r["rate_per_publisher"] = rate
        steps.append(r)
        ok = r["p99_ms"] < 100 and r["missing"] == 0 and r["duplicate"] == 0
        print(f"  {name} rate {rate}/s/publisher: {r['delivered_per_sec']} delivered/s, p99 {r['p99_ms']} ms"
              f" {'ok' if ok else 'over'}", file=sys.stderr)
        if not ok:
            break
        best = r
    return {"best_delivered_per_sec": best and best["delivered_per_sec"], "steps": steps}


def compare(args, results):
    workers = args.workers
    # WebSockets are handed to the workers, so one balancer process holds any number of them.
    for name, make in (("fleet", lambda r, big: Fleet(r, workers)),
                       ("node", lambda r, big: NodeSetup(r, workers))):
        print(f"== {name}: {workers} workers", file=sys.stderr)
        res = {}
        for big in (False,) if args.only_fixed else (False, True):
            redis = Redis()
            setup = make(redis, big)
            pids = lambda: setup.pids() + redis.pids()  # noqa: E731
            try:
                if big:
                    res["memory"] = memory_per_client(pids, setup.url, args.idle_clients, f"{name}-idle")
                else:
                    res["fixed_load"] = measured_run(pids, setup.url, scenario(args.rate, args.duration),
                                                     f"{name}-fixed", balancer_pids=setup.balancer_pids)
                    if not args.only_fixed:
                        res["max_rate"] = max_rate(pids, setup.url, args.rates, args.step_duration, name)
            finally:
                setup.stop()
                redis.stop()
        results[name] = {**results.get(name, {}), **res}


def balancer_tax(args, results):
    """The same scenario through the balancer (WebSockets handed to the workers), through the
    balancer relaying them (`handoff: false`), and straight to the workers."""
    print("== balancer tax", file=sys.stderr)
    out = {}
    for rate in args.tax_rates:
        runs = {}
        for mode in ("through_balancer", "relayed", "direct"):
            redis = Redis()
            fleet = Fleet(redis, args.workers, handoff=mode != "relayed")
            pids = lambda: fleet.pids() + redis.pids()  # noqa: E731
            url = fleet.worker_urls if mode == "direct" else fleet.url
            try:
                runs[mode] = measured_run(pids, url, scenario(rate, args.duration), f"tax-{mode}-{rate}",
                                          balancer_pids=fleet.balancer_pids)
            finally:
                fleet.stop()
                redis.stop()
        direct = runs["direct"]["cpu_us_per_delivery"]
        out[f"rate_{rate}"] = {
            "offered_per_sec": rate * 10 * 100, **runs,
            "cpu_tax_pct": round((runs["through_balancer"]["cpu_us_per_delivery"] / direct - 1) * 100, 1),
            "relayed_cpu_tax_pct": round((runs["relayed"]["cpu_us_per_delivery"] / direct - 1) * 100, 1),
        }
    results["balancer_tax"] = out


JWT_SECRET = "bench-secret-that-is-at-least-32-bytes"


def hs256_token(sub, ttl=3600):
    """An HS256 JWT for `JWT_SECRET`, made with the standard library."""
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "exp": int(time.time()) + ttl, "rooms": ["*"], "publish": ["*"]}).encode())
    sig = b64(hmac.new(JWT_SECRET.encode(), head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


def auth(args, results):
    """`auth.mode: jwt` against `none`, in alternating rounds, medians reported: server CPU per
    delivery at the fixed load (authentication is per connection, so it should not move), and
    the connect phase of `auth_clients` clients as fast as they come: connections per second
    and server CPU per connection."""
    print("== auth: jwt vs none", file=sys.stderr)
    runs = {mode: [] for mode in ("none", "jwt")}
    for _ in range(args.auth_rounds):
        for mode, runs_of in runs.items():
            extra = f"auth:\n  mode: jwt\n  jwt:\n    hs256_secret: {JWT_SECRET}\n" if mode == "jwt" else ""
            token = ["--token", hs256_token("bench")] if mode == "jwt" else []
            redis = Redis()
            fleet = Fleet(redis, args.workers, extra_yaml=extra)
            pids = lambda: fleet.pids() + redis.pids()  # noqa: E731
            try:
                run = measured_run(pids, fleet.url, scenario(args.rate, args.duration) + token, f"auth-{mode}",
                                   balancer_pids=fleet.balancer_pids)
                run.update(connect_phase(pids, fleet.url, args.auth_clients, token, f"auth-connect-{mode}"))
                runs_of.append(run)
            finally:
                fleet.stop()
                redis.stop()
    out = {}
    for mode, rs in runs.items():
        med = lambda k: round(statistics.median(r[k] for r in rs), 2)  # noqa: E731
        out[mode] = {"runs": rs, "median": {k: med(k) for k in (
            "cpu_us_per_delivery", "p50_ms", "p99_ms", "connects_per_sec", "cpu_us_per_connect")}}
    results["auth"] = out


def own_app(args, results):
    """The example chat app (apps/chat) as the workers against the default app, the same fixed
    load in alternating rounds, medians: what an app of its own costs per delivery. (Each chat
    line is also pushed to its room's history in Redis: one more Redis command per publish.)"""
    print("== own app: chat vs rooms", file=sys.stderr)
    runs = {app: [] for app in ("rooms", "chat")}
    for _ in range(args.app_rounds):
        for app, runs_of in runs.items():
            redis = Redis()
            fleet = Fleet(redis, args.workers, command=BIN / "chat" if app == "chat" else None)
            pids = lambda: fleet.pids() + redis.pids()  # noqa: E731
            try:
                runs_of.append(measured_run(pids, fleet.url, scenario(args.rate, args.duration) + ["--app", app],
                                            f"app-{app}", balancer_pids=fleet.balancer_pids))
            finally:
                fleet.stop()
                redis.stop()
    out = {}
    for app, rs in runs.items():
        med = lambda k: round(statistics.median(r[k] for r in rs), 2)  # noqa: E731
        out[app] = {"runs": rs, "median": {k: med(k) for k in ("cpu_us_per_delivery", "p50_ms", "p99_ms")}}
    results["own_app"] = out


def pairs_scenario(duration):
    """Rooms of two (1:1 chats): 2,000 WebSocket clients, client i in room i mod 1000, 1,000
    publishers at 5/s: 10,000 deliveries/s offered."""
    return ["-c", 2000, "--rooms", 1000, "--publishers", 1000, "--rate", 5, "-d", duration, "--settle", 1,
            "--connect-rate", 500, "--connect-timeout", 90, "--transport", "websocket"]


def scale(args, results):
    """Rooms of two at a fixed load as workers are added (fleet at 2, 4, 8, 16 workers; the Node
    setup at 2 and 8), in alternating rounds, medians: server CPU (balancer, workers, Redis) per
    delivery. A worker hears only the broadcasts of rooms it holds, so the cost should not grow
    with the number of workers. The fleet places clients at random, so a room's two members
    share a worker with probability 1/workers, as when they arrive independently (all clients
    come from one address here: hashing it would fill workers one after another)."""
    print("== scale: rooms of two", file=sys.stderr)
    plan = [("fleet", n) for n in args.scale_workers] + [("node", n) for n in args.scale_node_workers]
    runs = {f"{name}_{n}": [] for name, n in plan}
    for rnd in range(args.scale_rounds):
        for name, n in plan:
            redis = Redis()
            setup = NodeSetup(redis, n) if name == "node" else Fleet(redis, n, placement="random")
            try:
                runs[f"{name}_{n}"].append(measured_run(lambda: setup.pids() + redis.pids(), setup.url,
                                                        pairs_scenario(args.scale_duration),
                                                        f"scale-{name}-{n}-{rnd}",
                                                        balancer_pids=setup.balancer_pids))
            finally:
                setup.stop()
                redis.stop()
    if runs:
        results["scale"] = {key: {"median": median_run(rs), "runs": rs} for key, rs in runs.items()}


class RedisCluster:
    """`masters` redis-server processes in cluster mode, no replicas, joined by `redis-cli --cluster
    create`."""

    def __init__(self, masters):
        self.dir = Path(tempfile.mkdtemp(prefix="fleet-cluster-"))
        self.ports = [free_port_with_bus() for _ in range(masters)]
        self.procs = [Proc(f"redis-cluster-{p}", [
            "redis-server", "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf"])
            for p in self.ports]
        for p in self.ports:
            wait_port(p)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-yes"], capture_output=True, check=True, timeout=60)
        wait_until(lambda: all(redis_info(p, "CLUSTER INFO").get("cluster_state") == "ok"
                               for p in self.ports), 30, what="cluster ok")

    def pids(self):
        return [pid for proc in self.procs for pid in proc.pids()]

    def stop(self):
        for p in self.procs:
            p.stop()


def cluster_spread(args, results):
    """Rooms of two on a 3-master Redis Cluster (2 workers, the scale section's load): each
    shard's share of the room publishes (SPUBLISH calls) and of Redis CPU, and the servers' CPU
    per delivery."""
    print("== scale: rooms of two on a 3-shard Redis Cluster", file=sys.stderr)
    cluster = RedisCluster(3)

    class Seeds:
        url = "redis://127.0.0.1:6379"

    seeds = ", ".join(f"127.0.0.1:{p}" for p in cluster.ports)
    fleet = None
    try:
        before = {p: (redis_info(p, "commandstats"), redis_info(p, "cpu")) for p in cluster.ports}
        fleet = Fleet(Seeds, args.workers, placement="random", redis_yaml=f"  cluster: [{seeds}]\n")
        run = measured_run(lambda: fleet.pids() + cluster.pids(), fleet.url, pairs_scenario(args.scale_duration),
                           "scale-cluster", balancer_pids=fleet.balancer_pids)
        shards = {}
        for p in cluster.ports:
            stats, cpu = redis_info(p, "commandstats"), redis_info(p, "cpu")

            def calls(info):
                entry = info.get("cmdstat_spublish", "calls=0")
                return int(entry.split("calls=")[1].split(",")[0])

            used = lambda info: float(info["used_cpu_sys"]) + float(info["used_cpu_user"])  # noqa: E731
            shards[str(p)] = {"spublish": calls(stats) - calls(before[p][0]),
                              "cpu_s": round(used(cpu) - used(before[p][1]), 2)}
        total_pub = max(sum(s["spublish"] for s in shards.values()), 1)
        total_cpu = max(sum(s["cpu_s"] for s in shards.values()), 1e-9)
        for sh in shards.values():
            sh["publish_share"] = round(sh["spublish"] / total_pub, 3)
            sh["cpu_share"] = round(sh["cpu_s"] / total_cpu, 3)
        results["cluster"] = {"run": run, "shards": shards}
    finally:
        if fleet:
            fleet.stop()
        cluster.stop()


def churn(args, results):
    """Does subscription churn stall delivery? Section 1's fixed load (rooms of 100) on 2 workers,
    alone and while 4 more clients (2 per worker) join and leave rooms of their own as fast as
    they can, 50 requests in flight each: every join and every leave changes a subscription.
    Alternating rounds, medians; the churning clients run on the same two cores."""
    import socketio
    print("== scale: delivery under subscription churn", file=sys.stderr)
    runs = {"quiet": [], "churn": []}
    for rnd in range(args.churn_rounds):
        for mode in runs:
            redis = Redis()
            fleet = Fleet(redis, args.workers)
            stop, done, clients = threading.Event(), [0], []

            def churner(url, n):
                c = socketio.Client(reconnection=False)
                c.connect(url, transports=["websocket"], wait_timeout=10)
                clients.append(c)
                window = threading.Semaphore(50)

                def acked(*_):
                    done[0] += 1
                    window.release()

                i = 0
                while not stop.is_set():
                    room = f"churn-{n}-{i % 200}"
                    for event in ("join", "leave"):
                        if not window.acquire(timeout=10):
                            return
                        c.emit(event, room, callback=acked)
                    i += 1

            mark = {}

            def on_ready():
                mark["done"], mark["t"] = done[0], time.monotonic()
                if mode == "churn":
                    for n in range(4):
                        url = f"http://127.0.0.1:{fleet.base + n % args.workers}"
                        threading.Thread(target=churner, args=(url, n), daemon=True).start()

            try:
                run = measured_run(lambda: fleet.pids() + redis.pids(), fleet.url, scenario(args.rate, args.duration),
                                   f"churn-{mode}-{rnd}", balancer_pids=fleet.balancer_pids, on_ready_too=on_ready)
                stop.set()
                secs = time.monotonic() - mark.get("t", time.monotonic())
                run["subscription_changes_per_sec"] = round((done[0] - mark.get("done", 0)) / max(secs, 1e-9))
                runs[mode].append(run)
            finally:
                stop.set()
                for c in clients:
                    c.disconnect()
                fleet.stop()
                redis.stop()
    results["churn"] = {mode: {"median": median_run(rs), "runs": rs} for mode, rs in runs.items()}


def redis_info(port, section="memory"):
    """`INFO section` as a dict; a section of two words (`CLUSTER INFO`) is that command."""
    command = section.split() if " " in section else ["INFO", section]
    out = subprocess.run(["redis-cli", "-p", str(port), *command], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith("#"))


def room_channels(args, results):
    """What a room costs Redis, and how fast subscriptions follow joins: one client of a one-worker
    fleet joins `rooms` rooms, 100 joins in flight (a socket's send buffer holds 128 packets, acks
    included), then leaves them; Redis `used_memory` and SUBSCRIBE/UNSUBSCRIBE command counts
    before and after."""
    import socketio
    print(f"== room channels: {args.scale_rooms} rooms", file=sys.stderr)
    redis = Redis()
    fleet = Fleet(redis, 1)
    try:
        client = socketio.Client(reconnection=False)
        client.connect(fleet.url, transports=["websocket"], wait_timeout=10)
        channels = lambda: int(redis_info(redis.port, "stats")["pubsub_channels"])  # noqa: E731
        channels0 = channels()
        mem0 = int(redis_info(redis.port)["used_memory"])
        cmds0 = redis_info(redis.port, "commandstats")
        window = threading.Semaphore(100)

        def all_of(event):
            for n in range(args.scale_rooms):
                if not window.acquire(timeout=30):
                    raise RuntimeError(f"{event}s not acknowledged")
                client.emit(event, f"room-{n}", callback=lambda *_: window.release())
            for _ in range(100):
                if not window.acquire(timeout=30):
                    raise RuntimeError(f"{event}s not acknowledged")
            for _ in range(100):
                window.release()

        t0 = time.monotonic()
        all_of("join")
        join_s = time.monotonic() - t0
        subscribed = channels() - channels0
        mem1 = int(redis_info(redis.port)["used_memory"])
        t1 = time.monotonic()
        all_of("leave")
        wait_until(lambda: channels() == channels0, 60, what="unsubscribed")
        leave_s = time.monotonic() - t1
        cmds1 = redis_info(redis.port, "commandstats")
        client.disconnect()

        def calls(stats, name):
            entry = stats.get(f"cmdstat_{name}", "calls=0")
            return int(entry.split("calls=")[1].split(",")[0])

        per_room = (mem1 - mem0) / args.scale_rooms
        results["room_channels"] = {
            "rooms": args.scale_rooms,
            "channels_subscribed": subscribed,
            "redis_bytes_per_room": round(per_room),
            "redis_mb_per_100k_rooms": round(per_room * 100_000 / 2**20, 1),
            "joins_per_sec": round(args.scale_rooms / join_s),
            "leaves_per_sec": round(args.scale_rooms / leave_s),
            "subscribe_commands": calls(cmds1, "subscribe") - calls(cmds0, "subscribe"),
            "unsubscribe_commands": calls(cmds1, "unsubscribe") - calls(cmds0, "unsubscribe"),
        }
    finally:
        fleet.stop()
        redis.stop()


def connect_phase(server_pids, url, clients, token, name):
    """Connects `clients` as fast as they come (no rate limit) and publishes once: the time and
    server CPU from the generator's start to its "ready" line."""
    mark = {"t0": time.monotonic(), "cpu0": cpu_seconds(server_pids())}

    def on_ready():
        mark["t"] = time.monotonic()
        mark["cpu"] = cpu_seconds(server_pids())

    report = loadtest(url, ["-c", clients, "--rooms", 10, "--publishers", 1, "--messages", 1, "-d", 1,
                            "--settle", 1, "--connect-rate", 100000, "--connect-timeout", 90,
                            "--transport", "websocket", *token], on_ready=on_ready, name=name)
    secs = mark["t"] - mark["t0"]
    return {
        "connect_clients": report["connected"],
        "connects_per_sec": round(report["connected"] / secs),
        "cpu_us_per_connect": round((mark["cpu"] - mark["cpu0"]) * 1e6 / max(report["connected"], 1), 1),
        "connect_p99_ms": report["connect_ms"]["p99"],
    }


def polling_scenario(load, duration):
    """Each of 200 long-polling clients alone in its room, publishing to it: every publish is a
    POST, and its delivery and ack come back on the client's pending GET."""
    pace = ["--window", 1] if load == "flood" else ["--rate", load]
    return ["-c", 200, "--rooms", 200, "--publishers", 200, *pace, "-d", duration, "--settle", 1,
            "--connect-rate", 1000, "--connect-timeout", 60, "--transport", "polling"]


def polling(args, results):
    """Long-polling through the balancer (by default the connections handed to the workers and
    kept there; and with `workers.handoff_polling: false`, every request proxied) vs straight
    to the workers, and Node's setup, in alternating rounds; with --polling-old-bin, another
    build's balancer in the same rounds; medians reported."""
    print("== long-polling", file=sys.stderr)
    out = {}
    modes = (("through_balancer", "through_balancer_proxied", "direct", "node")
             + (("through_balancer_old",) if args.polling_old_bin else ()))
    for load in (args.polling_rate, "flood"):
        runs = {mode: [] for mode in modes}
        for rnd in range(args.polling_rounds):
            for mode in runs:
                redis = Redis()
                old = Path(args.polling_old_bin) if mode == "through_balancer_old" else None
                setup = (NodeSetup(redis, args.workers) if mode == "node"
                         else Fleet(redis, args.workers, bin_dir=old,
                                    handoff_polling=False if mode == "through_balancer_proxied" else None))
                url = setup.worker_urls if mode == "direct" else setup.url
                try:
                    runs[mode].append(measured_run(lambda: setup.pids() + redis.pids(), url,
                                                   polling_scenario(load, args.polling_duration),
                                                   f"polling-{mode}-{load}-{rnd}", balancer_pids=setup.balancer_pids))
                finally:
                    setup.stop()
                    redis.stop()
        key = "flood" if load == "flood" else f"rate_{load}"
        out[key] = {mode: {"median": median_run(rs), "runs": rs} for mode, rs in runs.items()}
    results["polling"] = out
    results["polling_duration_s"] = args.polling_duration


def args_duration(results):
    """The long-polling runs' publishing time, in seconds (kept with the results)."""
    return results.get("polling_duration_s", 10)


def median_run(runs):
    """Field by field, the median of several runs' numbers."""
    med = {k: statistics.median(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, (int, float))}
    # Failures are not a median: any in any run counts.
    med["failures_all_runs"] = sum(sum(r["errors"].values()) + r["connect_errors"] + r["missing"] + r["duplicate"]
                                   for r in runs)
    return med


def capacity(args, results):
    out = {}
    # Clients come from 127.0.0.2-5 so that 127.0.0.1's ephemeral ports stay for the balancers'
    # own connections to the workers (40k of them would not fit beside 10k clients).
    many = ["--source", "127.0.0.2-127.0.0.5"]
    for label, clients, workers, balancers, procs, sources, handoff in (
        ("one balancer process", args.cap_one, 2, 0, 1, [], True),
        ("one balancer process, many clients", args.cap_many, 3, 0, 3, many, True),
        # Relayed WebSockets cost a balancer 2 descriptors each (at most 20,000 here), so past
        # ~9,900 they need several balancer processes on one port.
        ("several balancer processes, relayed", args.cap_many, 3, 4, 3, many, False),
    ):
        if args.only_many and clients != args.cap_many:
            continue
        print(f"== capacity: {clients} clients, {label}", file=sys.stderr)
        redis = Redis()
        fleet = Fleet(redis, workers, extra_balancers=balancers, handoff=handoff)
        pids = lambda: fleet.pids() + redis.pids()  # noqa: E731
        try:
            base = rss_bytes(pids())
            sample = {}

            def on_ready():
                def later():
                    time.sleep(27)  # every client has been pinged (25 s interval) and answered
                    sample["rss"] = rss_bytes(pids())
                    sample["balancers"] = rss_bytes(fleet.balancer_pids())
                threading.Thread(target=later, daemon=True).start()

            r = loadtest(fleet.url, ["-c", clients, "--publishers", 10, "--rooms", 100, "--rate", 2, "-d", 30,
                                     "--settle", 1, "--connect-rate", 1000, "--connect-timeout", 120,
                                     "--procs", procs, *sources], on_ready=on_ready, name=f"cap-{clients}")
            held = max(r["connected"], 1)
            out[label] = {
                "clients": clients, "balancer_processes": 1 + balancers, "workers": workers,
                "websockets": "handed off" if handoff else "relayed",
                "connected": r["connected"], "connect_errors": r["failed"], "errors": r["errors"],
                "missing": r["deliveries"]["missing"], "p99_ms": r["delivery_ms"]["p99"],
                "server_rss_mb": round(sample.get("rss", 0) / 2**20, 1),
                "kb_per_client": round((sample.get("rss", 0) - base) / 1024 / held, 1),
                "balancer_kb_per_client": round(sample.get("balancers", 0) / 1024 / held, 1),
            }
        finally:
            fleet.stop()
            redis.stop()
    results["capacity"] = out


def table(results):
    lines = []
    f, n = results.get("fleet"), results.get("node")
    if f and n:
        def ratio(a, b):
            return f"{a / b:.1f}x" if a and b else "-"
        ff, nf = f["fixed_load"], n["fixed_load"]
        lines += [
            f"{'':38}{'fleet':>14}{'node':>14}{'node/fleet':>12}",
            f"{'server CPU per delivery (us)':38}{ff['cpu_us_per_delivery']:>14}{nf['cpu_us_per_delivery']:>14}"
            f"{ratio(nf['cpu_us_per_delivery'], ff['cpu_us_per_delivery']):>12}",
            f"{'delivery p50 at fixed load (ms)':38}{ff['p50_ms']:>14}{nf['p50_ms']:>14}{ratio(nf['p50_ms'], ff['p50_ms']):>12}",
            f"{'delivery p99 at fixed load (ms)':38}{ff['p99_ms']:>14}{nf['p99_ms']:>14}{ratio(nf['p99_ms'], ff['p99_ms']):>12}",
            f"{'balancer / primary CPU share (%)':38}{ff['balancer_share_pct']:>14}{nf['balancer_share_pct']:>14}",
            f"{'delivered/s at fixed load':38}{ff['delivered_per_sec']:>14}{nf['delivered_per_sec']:>14}",
            f"{'connect errors at fixed load':38}{ff['connect_errors']:>14}{nf['connect_errors']:>14}",
            f"{'server KB per idle client':38}{f['memory']['kb_per_client']:>14}{n['memory']['kb_per_client']:>14}"
            f"{ratio(n['memory']['kb_per_client'], f['memory']['kb_per_client']):>12}",
            f"{'idle clients connected':38}{f['memory']['connected']:>14}{n['memory']['connected']:>14}",
            f"{'max delivered/s with p99 < 100 ms':38}{str(f['max_rate']['best_delivered_per_sec']):>14}"
            f"{str(n['max_rate']['best_delivered_per_sec']):>14}",
        ]
    for t in results.get("balancer_tax", {}).values():
        lines += [f"balancer tax at {t['offered_per_sec']} deliveries/s offered: "
                  f"{t['through_balancer']['cpu_us_per_delivery']} us/delivery through (handed off), "
                  f"{t['relayed']['cpu_us_per_delivery']} relayed, "
                  f"{t['direct']['cpu_us_per_delivery']} direct: {t['cpu_tax_pct']}% more CPU "
                  f"({t['relayed_cpu_tax_pct']}% relayed); within the run, the balancer's own CPU is "
                  f"{t['through_balancer']['balancer_share_pct']}% of the rest's "
                  f"({t['relayed']['balancer_share_pct']}% relayed); p99 {t['through_balancer']['p99_ms']} / "
                  f"{t['relayed']['p99_ms']} / {t['direct']['p99_ms']} ms"]
    for load, p in results.get("polling", {}).items():
        t, d, n = (p[m]["median"] for m in ("through_balancer", "direct", "node"))
        lines.append(f"long-polling {load}: HTTP requests/s through {t['http_requests_per_sec']}, direct "
                     f"{d['http_requests_per_sec']}, node {n['http_requests_per_sec']}; delivery p50/p99 "
                     f"{t['p50_ms']}/{t['p99_ms']} through, {d['p50_ms']}/{d['p99_ms']} direct, "
                     f"{n['p50_ms']}/{n['p99_ms']} node ms; balancer CPU {t['balancer_share_pct']}% of the rest's; "
                     f"failures (errors, missing, duplicate) {t['failures_all_runs']} / {d['failures_all_runs']} / "
                     f"{n['failures_all_runs']}")
        for mode, what in (("through_balancer_proxied", "workers.handoff_polling: false"),
                           ("through_balancer_old", "the balancer built in --polling-old-bin")):
            if mode not in p:
                continue
            o = p[mode]["median"]
            lines.append(f"long-polling {load}, {what}: HTTP requests/s "
                         f"{o['http_requests_per_sec']}; delivery p50/p99 {o['p50_ms']}/{o['p99_ms']} ms; balancer "
                         f"CPU {o['balancer_share_pct']}% of the rest's; failures {o['failures_all_runs']}")
        for mode in p:
            per_request = [r["balancer_cpu_s"] * 1e6 / (r["http_requests_per_sec"] * args_duration(results))
                           for r in p[mode]["runs"] if "balancer_cpu_s" in r and r["http_requests_per_sec"]]
            if per_request:
                lines.append(f"long-polling {load}, {mode}: balancer (Node: the primary) CPU per request, median "
                             f"{statistics.median(per_request):.1f} us (of {len(per_request)} runs)")
    a = results.get("auth")
    if a:
        n, j = a["none"]["median"], a["jwt"]["median"]
        lines.append(f"auth.mode jwt vs none (medians): CPU per delivery {j['cpu_us_per_delivery']} vs "
                     f"{n['cpu_us_per_delivery']} us; p50/p99 {j['p50_ms']}/{j['p99_ms']} vs {n['p50_ms']}/{n['p99_ms']} ms; "
                     f"connects/s {j['connects_per_sec']} vs {n['connects_per_sec']}; server CPU per connect "
                     f"{j['cpu_us_per_connect']} vs {n['cpu_us_per_connect']} us")
    o = results.get("own_app")
    if o:
        r, c = o["rooms"]["median"], o["chat"]["median"]
        lines.append(f"own app (apps/chat) vs default (medians): CPU per delivery {c['cpu_us_per_delivery']} vs "
                     f"{r['cpu_us_per_delivery']} us; p50/p99 {c['p50_ms']}/{c['p99_ms']} vs {r['p50_ms']}/{r['p99_ms']} ms")
    sc = results.get("scale")
    if sc:
        lines.append(f"{'rooms of two, 10,000 deliveries/s offered':44}{'CPU/delivery us':>17}{'p50 ms':>9}"
                     f"{'p99 ms':>9}{'delivered/s':>13}{'failures':>10}")
        for key, r in sc.items():
            m = r["median"]
            lines.append(f"{key.replace('_', ' ') + ' workers':44}{m['cpu_us_per_delivery']:>17.1f}{m['p50_ms']:>9}"
                         f"{m['p99_ms']:>9}{round(m['delivered_per_sec']):>13}{m['failures_all_runs']:>10}")
    ch = results.get("churn")
    if ch:
        q, c = ch["quiet"]["median"], ch["churn"]["median"]
        lines.append(f"subscription churn ({c['subscription_changes_per_sec']} joins+leaves/s): delivery p50/p99 "
                     f"{c['p50_ms']}/{c['p99_ms']} ms vs {q['p50_ms']}/{q['p99_ms']} quiet; CPU per delivery "
                     f"{c['cpu_us_per_delivery']} vs {q['cpu_us_per_delivery']} us; failures {c['failures_all_runs']}")
    cl = results.get("cluster")
    if cl:
        r = cl["run"]
        lines.append(f"3-shard Redis Cluster, rooms of two, {r['cpu_us_per_delivery']} us/delivery, p99 {r['p99_ms']} ms: "
                     + ", ".join(f"shard {port}: {s['publish_share'] * 100:.0f}% of SPUBLISH, {s['cpu_share'] * 100:.0f}% of "
                                 f"Redis CPU" for port, s in cl["shards"].items()))
    rc = results.get("room_channels")
    if rc:
        lines.append(f"room channels: {rc['rooms']} rooms joined at {rc['joins_per_sec']}/s with "
                     f"{rc['subscribe_commands']} SUBSCRIBE commands, left at {rc['leaves_per_sec']}/s with "
                     f"{rc['unsubscribe_commands']} UNSUBSCRIBE; Redis {rc['redis_bytes_per_room']} bytes per room "
                     f"({rc['redis_mb_per_100k_rooms']} MB per 100,000 rooms)")
    for label, c in results.get("capacity", {}).items():
        lines.append(f"capacity, {label}: {c['connected']}/{c['clients']} held, {c['connect_errors']} failed, "
                     f"errors {c['errors'] or 'none'}, {c['kb_per_client']} KB/client server side "
                     f"(balancers {c['balancer_kb_per_client']} KB/client), p99 {c['p99_ms']} ms")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    ap.add_argument("--capacity", action="store_true", help="also the capacity runs (minutes)")
    ap.add_argument("--only-capacity", action="store_true")
    ap.add_argument("--only-polling", action="store_true", help="only the long-polling section")
    ap.add_argument("--only-auth", action="store_true", help="only auth.mode jwt against none")
    ap.add_argument("--only-app", action="store_true", help="only the example chat app against the default app")
    ap.add_argument("--only-fixed", action="store_true",
                    help="only the fixed-load comparison (fleet vs node); the other figures are kept")
    ap.add_argument("--only-many", action="store_true", help="capacity: only the 40,000-client runs")
    ap.add_argument("--only-scale", action="store_true",
                    help="only rooms of two as workers are added, and what a room costs Redis")
    ap.add_argument("--polling-old-bin", help="long-polling: also through the balancer (and its workers) built "
                    "in this directory, in the same alternating rounds: an A/B of two builds")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scale-workers", help="scale: the fleet's worker counts, comma-separated (2,4,8,16)")
    ap.add_argument("--scale-node-workers", help="scale: the Node setup's worker counts (2,8); 0 for none")
    ap.add_argument("--scale-rounds", type=int, help="scale: alternating rounds (3)")
    ap.add_argument("--scale-churn", type=int, default=1, help="scale: delivery under subscription churn (1); 0 skips")
    ap.add_argument("--scale-cluster", type=int, default=1, help="scale: the 3-shard Redis Cluster run (1); 0 skips")
    ap.add_argument("--scale-rooms", type=int, help="rooms joined to measure what a room costs Redis (100000); 0 skips")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    args = ap.parse_args()
    given = {k: getattr(args, k) for k in ("scale_workers", "scale_node_workers", "scale_rounds", "scale_rooms")}
    args.rate, args.duration, args.step_duration, args.tax_rates = 20, 15, 8, [20, 100]
    args.idle_clients, args.rates = 10_000, [20, 50, 100, 200, 400]
    args.cap_one, args.cap_many = 9_500, 40_000
    args.polling_rate, args.polling_duration, args.polling_rounds = 5, 10, 3
    args.auth_rounds, args.auth_clients = 3, 3000
    args.app_rounds = 3
    args.scale_workers, args.scale_node_workers, args.scale_rounds, args.scale_duration = [2, 4, 8, 16], [2, 8], 3, 15
    args.scale_rooms = 100_000
    args.churn_rounds = 2
    if args.quick:
        args.duration, args.step_duration, args.idle_clients, args.rates = 3, 3, 500, [20, 50]
        args.tax_rates = [20]
        args.cap_one, args.cap_many = 500, 1500
        args.polling_duration, args.polling_rounds = 3, 1
        args.auth_rounds, args.auth_clients = 1, 300
        args.app_rounds = 1
        args.scale_workers, args.scale_node_workers, args.scale_rounds, args.scale_duration = [2, 4], [2], 1, 3
        args.scale_rooms = 2000
    for key, value in given.items():
        if value is not None:
            setattr(args, key, value if isinstance(value, int) else [int(n) for n in value.split(",") if int(n) > 0])
    print(f"logs in {LOGS}", file=sys.stderr)
    results = {"machine": {"cpus": os.cpu_count(), "quick": args.quick}}
    partial = (args.only_capacity or args.only_polling or args.only_fixed or args.only_auth or args.only_app
               or args.only_scale)
    if partial and Path(args.json).exists():  # one section re-run: the others are kept
        results = {**json.loads(Path(args.json).read_text()), **results}
    if not partial or args.only_fixed:
        compare(args, results)
    if not partial:
        balancer_tax(args, results)
    if not partial or args.only_auth:
        auth(args, results)
    if not partial or args.only_app:
        own_app(args, results)
    if not partial or args.only_scale:
        scale(args, results)
        if args.scale_rooms:
            room_channels(args, results)
        if args.scale_cluster:
            cluster_spread(args, results)
        if args.scale_churn:
            churn(args, results)
    if not (args.only_capacity or args.only_fixed or args.only_auth or args.only_app or args.only_scale):
        polling(args, results)
    if args.capacity or args.only_capacity:
        capacity(args, results)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
