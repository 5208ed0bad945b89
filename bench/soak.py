#!/usr/bin/env python3
"""Chaos soak (issue 14): a long run with one fault a minute, not part of tests/run.

A fleet of standalone workers (`worker --listen ... --id wN`) behind one balancer with
`workers.spawn: false` (so workers survive a balancer restart; WebSockets are relayed by the
balancer, not handed off) and `placement: least-connections` (every client comes from
127.0.0.1: consistent hashing would fill the workers in one order), one redis-server, and `loadtest --reconnect true` with clients
alternating WebSocket and polling-then-upgrade, rooms of `--room-size` spanning the workers and
one publisher per room at a steady total `--publish-rate`. Publishing starts at T0; the first
minute is the warm-up (and the no-fault baseline); then at T0 + 60 s * k fault k, in turn:

  kill9    `kill -9` of a worker, restarted at once (as a process manager would)
  sigterm  SIGTERM of a worker (drain), restarted once it has exited
  redis    redis-server stopped (SIGTERM) for 10 s, then started on the same port
  balancer a planned restart: a new balancer started on the same port (`reuse_port`) and, once
           it sees every worker, the old one stopped with SIGTERM; with `--balancer-restart
           in-place`, the old one stopped first and the new one started once it has exited
  sigstop  a worker paused with SIGSTOP for 5 s, then SIGCONT

kill9 and sigterm rotate over every worker but the last, sigstop over all of them: the last
worker is never restarted, so its RSS over the whole soak is a leak check.

Accounting, from loadtest's event log (`--events`: joins with the worker, drops, acknowledged
publishes with the publisher's worker and send/ack times, first receipts):
  - a delivery is owed to a member of the publish's room that was joined, on one connection, from
    the moment the publish was sent until 1 s after its ack ("stable" for it); it is lost if that
    member never received it;
  - each publish belongs to the fault window in which it was sent (window 0: the warm-up);
  - for worker faults, losses are reported for members on other workers (target 0) and, apart,
    for stable members on the faulted worker itself;
  - for the Redis fault, losses are split into same-worker deliveries (target 0), cross-worker
    deliveries sent during the outage (stop until 5 s after the start: expected), and
    cross-worker deliveries sent after it (target 0);
  - recovery: for each client that dropped in the fault's window, the time from the fault to
    its next join; p50/p99/max over them, and how many never came back at all; and its gap,
    from its own drop to its next join (p50/p99);
  - errors: loadtest's errors by kind, counted in the window they happened in;
  - RSS of every process every 5 s; start = the sample just before the first fault (after the
    warm-up), end = the last sample while publishing;
  - the leak check: each worker's heap in use (`fleet_worker_heap_bytes`, from its allocator)
    and connections, read just before every fault and at the end, once settled (see
    `settled_readings`); per worker process that lived ten minutes or more, the heap in use per
    connection, averaged over its first fault cycle after the warm-up and over its last. The faults move clients
    between workers, which moves RSS and heap alike; a leak raises the heap per connection. RSS
    also keeps what the allocator holds after a peak of connections
    (`fleet_worker_heap_bytes{state="free"}`).

Usage: cargo build --release --bins && python3 bench/soak.py --minutes 20 [--clients 5000]
       [--workers 4] [--publish-rate 200] [--room-size 10] [--json bench/soak-results.json]
Everything runs on 127.0.0.1.
"""

import argparse
import bisect
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BIN, LOGS, ROOT, free_port, free_ports, port_open, rss_bytes, wait_port, wait_until  # noqa: E402

FAULTS = ["kill9", "sigterm", "redis", "balancer", "sigstop"]
STABLE_AFTER_ACK_US = 1_000_000
REDIS_OUTAGE_TAIL_US = 5_000_000


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Daemon:
    """One long-running process (a worker, the balancer, redis) that the soak may kill and start
    again; each start is a new instance with its own pid and log."""

    def __init__(self, role, args, port):
        """`args`: the command line, or a function of the instance number giving it."""
        self.role, self.args, self.port = role, args, port
        self.proc = None
        self.instances = []  # {"pid", "started", "ended", "how"}
        self.start()

    def spawn(self):
        """A new instance, without waiting for its port (a successor may share it)."""
        n = len(self.instances)
        out = open(LOGS / f"{self.role}-{n}.log", "w")
        args = self.args(n) if callable(self.args) else self.args
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "NO_COLOR": "1"}, start_new_session=True)
        self.instances.append({"pid": proc.pid, "started": time.time(), "ended": None, "how": None})
        return proc

    def start(self):
        self.proc = self.spawn()
        wait_port(self.port, 30)

    def _ended(self, how):
        self.instances[-1]["ended"] = time.time()
        self.instances[-1]["how"] = how

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout):
        """Waits for the process to exit; kills it after `timeout` s. Returns seconds taken, or
        None if it had to be killed."""
        t = time.monotonic()
        try:
            self.proc.wait(timeout)
            return time.monotonic() - t
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def stop(self, how="end"):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            if self.wait_exit(20) is None:
                how += " (killed after 20 s)"
        if self.instances[-1]["ended"] is None:
            self._ended(how)


class Soak:
    def __init__(self, args):
        self.args = args
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}"
        self.redis = Daemon("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], self.redis_port)
        self.base = free_ports(args.workers)
        self.workers = [
            Daemon(f"w{i}", [str(BIN / "worker"), "--listen", f"127.0.0.1:{self.base + i}", "--redis",
                             self.redis_url, "--id", f"w{i}", "--drain-window-secs", str(args.drain_secs)],
                   self.base + i)
            for i in range(args.workers)]
        # Two configurations the balancer's instances alternate between: the same public port
        # (shared by a successor during a handover, `reuse_port`), each its own metrics port.
        self.port, metrics = free_port(), free_ports(2)
        self.metrics_ports = [metrics, metrics + 1]
        cfgs = []
        for i, mport in enumerate(self.metrics_ports):
            cfg = LOGS / f"fleet-{i}.yaml"
            cfg.write_text(
                f"listen: 127.0.0.1:{self.port}\nmetrics_listen: 127.0.0.1:{mport}\n"
                f"redis:\n  url: {self.redis_url}\n"
                f"workers:\n  count: {args.workers}\n  host: 127.0.0.1\n  base_port: {self.base}\n  spawn: false\n"
                f"balancer:\n  reuse_port: {'true' if args.balancer_restart == 'handover' else 'false'}\n"
                f"  placement: {args.placement}\n")
            cfgs.append(cfg)
        self.balancer = Daemon("balancer", lambda n: [str(BIN / "balancer"), "--config", str(cfgs[n % 2])],
                               self.port)
        self.wait_balancer_sees_all(self.metrics_ports[0])
        self.rss = []  # (t, role, pid, bytes)
        self.heap = []  # (t, role, pid, connections, heap in use, heap free): workers only
        self.faults = []
        self.live = ""
        self.t0 = None
        self.done = threading.Event()

    def nwin(self):
        """Windows: the warm-up, then one per fault."""
        return int(self.args.minutes * 60 // self.args.fault_interval)

    def daemons(self):
        return [self.balancer, *self.workers, self.redis]

    def wait_balancer_sees_all(self, metrics_port, timeout=60):
        def up():
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
            return sum(1 for line in text.splitlines()
                       if line.startswith("fleet_balancer_worker_up{") and line.endswith(" 1")) == self.args.workers
        wait_until(up, timeout, interval=0.2, what="balancer sees every worker up")

    # --- faults -------------------------------------------------------------------------
    def fault(self, k, kind, target):
        t = time.time()
        rec = {"k": k, "kind": kind, "target": target, "at": t}
        if kind == "kill9":
            w = self.workers[target]
            w.signal(signal.SIGKILL)
            w.proc.wait()
            w._ended("kill -9")
            w.start()
            rec["restarted_after_s"] = round(time.time() - t, 2)
        elif kind == "sigterm":
            w = self.workers[target]
            w.signal(signal.SIGTERM)
            took = w.wait_exit(self.args.drain_secs + 30)
            w._ended("SIGTERM" if took is not None else "SIGTERM, then killed")
            rec["exit_after_s"] = took and round(took, 2)
            w.start()
            rec["restarted_after_s"] = round(time.time() - t, 2)
        elif kind == "redis":
            self.redis.signal(signal.SIGTERM)
            self.redis.wait_exit(10)
            self.redis._ended("SIGTERM (outage)")
            wait_until(lambda: not port_open(self.redis_port), 10, what="redis port closed")
            time.sleep(max(0.0, t + self.args.redis_outage - time.time()))
            rec["redis_start"] = time.time()
            self.redis.start()
            rec["restarted_after_s"] = round(time.time() - t, 2)
        elif kind == "balancer" and self.args.balancer_restart == "handover":
            # A planned restart as the README describes it: the new balancer starts on the same
            # port (`reuse_port`) and sees every worker before the old one is told to go; the
            # old one closes its listener and the WebSockets it relays, spread over the drain
            # window.
            b = self.balancer
            old, old_instance = b.proc, b.instances[-1]
            b.proc = b.spawn()
            self.wait_balancer_sees_all(self.metrics_ports[(len(b.instances) - 1) % 2])
            rec["successor_ready_after_s"] = round(time.time() - t, 2)
            old.send_signal(signal.SIGTERM)
            try:
                old.wait(30)
                how = "SIGTERM after its successor was ready"
            except subprocess.TimeoutExpired:
                old.kill()
                old.wait()
                how = "SIGTERM, then killed after 30 s"
            old_instance.update(ended=time.time(), how=how)
            rec["exit_after_s"] = round(time.time() - t, 2)
            rec["restarted_after_s"] = rec["successor_ready_after_s"]
        elif kind == "balancer":
            self.balancer.signal(signal.SIGTERM)
            took = self.balancer.wait_exit(30)
            self.balancer._ended("SIGTERM" if took is not None else "SIGTERM, then killed after 30 s")
            rec["exit_after_s"] = took and round(took, 2)
            self.balancer.start()
            rec["restarted_after_s"] = round(time.time() - t, 2)
        elif kind == "sigstop":
            w = self.workers[target]
            w.signal(signal.SIGSTOP)
            time.sleep(self.args.pause)
            w.signal(signal.SIGCONT)
            rec["restarted_after_s"] = round(time.time() - t, 2)
        self.faults.append(rec)
        where = f" w{target}" if target is not None else ""
        log(f"fault {k}: {kind}{where} done in {rec['restarted_after_s']} s")

    def schedule(self):
        """(k, kind, target) for each fault minute."""
        out, kill_targets, stop_targets = [], 0, 0
        restartable = max(1, self.args.workers - 1)
        for k in range(1, self.nwin()):
            kind = FAULTS[(k - 1) % len(FAULTS)]
            target = None
            if kind in ("kill9", "sigterm"):
                target = kill_targets % restartable
                kill_targets += 1
            elif kind == "sigstop":
                target = stop_targets % self.args.workers
                stop_targets += 1
            out.append((k, kind, target))
        return out

    # --- background threads ---------------------------------------------------------------
    def sample_rss(self):
        while not self.done.is_set():
            t = time.time()
            for d in self.daemons():
                if d.proc and d.proc.poll() is None:
                    self.rss.append((t, d.role, d.proc.pid, rss_bytes([d.proc.pid])))
            for w in self.workers:
                if w.proc and w.proc.poll() is None:
                    got = worker_heap(w.port)
                    if got:
                        self.heap.append((t, w.role, w.proc.pid, *got))
            self.done.wait(5)

    def run_faults(self):
        for k, kind, target in self.schedule():
            at = self.t0 + self.args.fault_interval * k
            while time.time() < at:
                if self.done.wait(min(1.0, at - time.time())):
                    return
            self.fault(k, kind, target)

    def progress(self):
        sched = self.schedule()
        while not self.done.wait(5):
            if self.t0 is None:
                log(f"connecting: {self.live}")
                continue
            el = time.time() - self.t0
            iv = self.args.fault_interval
            nxt = next(((k, kind, tg) for k, kind, tg in sched if iv * k > el), None)
            upcoming = f"next fault {nxt[1]}{'' if nxt[2] is None else f' w{nxt[2]}'} in {iv * nxt[0] - el:.0f} s" \
                if nxt else "no more faults"
            log(f"{el:6.0f} s | {upcoming} | {self.live}")

    # --- the run --------------------------------------------------------------------------
    def run(self):
        a = self.args
        rooms = max(1, a.clients // a.room_size)
        per_publisher = a.publish_rate / rooms
        events = LOGS / "events"
        out = LOGS / "loadtest.json"
        cmd = [str(BIN / "loadtest"), "--url", f"http://127.0.0.1:{self.port}", "-c", a.clients,
               "--transport", "mixed", "--rooms", rooms, "--publishers", rooms, "--rate", f"{per_publisher:.6f}",
               "-d", a.minutes * 60, "--settle", 5, "--connect-rate", a.connect_rate, "--connect-timeout", 180,
               "--reconnect", "true", "--procs", a.procs, "--events", events, "--json", out]
        cmd = [str(c) for c in cmd]
        self.params = {"clients": a.clients, "workers": a.workers, "minutes": a.minutes, "rooms": rooms,
                       "room_size": a.room_size, "publishers": rooms, "publish_rate": a.publish_rate,
                       "transport": "mixed (even clients websocket, odd polling then upgrade)",
                       "drain_window_secs": a.drain_secs, "redis_outage_secs": a.redis_outage,
                       "pause_secs": a.pause, "balancer_restart": a.balancer_restart, "placement": a.placement,
                       "fault_interval_secs": a.fault_interval, "loadtest_procs": a.procs, "loadtest": " ".join(cmd)}
        log(f"parameters: {json.dumps({k: v for k, v in self.params.items() if k != 'loadtest'})}")
        log(f"logs in {LOGS}")
        lt_log = open(LOGS / "loadtest.log", "w")
        p = subprocess.Popen(cmd, stdout=lt_log, stderr=subprocess.PIPE, text=True)
        threads = [threading.Thread(target=f, daemon=True) for f in (self.sample_rss, self.progress)]
        for th in threads:
            th.start()
        faults = None
        for line in p.stderr:
            lt_log.write(line)
            if line.startswith("["):
                m = re.search(r"connected\s+(\d+)\s+published\s+(\S+)\s+delivered\s+(\S+)\s+errors\s+(\d+)", line)
                if m:
                    self.live = (f"connected {m[1]}, published {m[2]}, delivered {m[3]}, errors {m[4]}")
            elif line.startswith("ready:"):
                self.t0 = time.time()
                log(line.strip())
                faults = threading.Thread(target=self.run_faults, daemon=True)
                faults.start()
        p.wait()
        self.t_end = self.t0 + a.minutes * 60 if self.t0 else time.time()
        self.done.set()
        if faults:
            faults.join(60)
        for d in self.daemons():
            d.stop()
        if not out.exists():
            raise SystemExit(f"loadtest wrote no report; see {LOGS / 'loadtest.log'}")
        self.report = json.loads(out.read_text())
        files = sorted(LOGS.glob("events*"))
        return analyse(self, files)


# --- analysis ------------------------------------------------------------------------------
def read_events(files):
    joins = collections.defaultdict(list)   # client -> [(t, worker)]
    drops = collections.defaultdict(list)   # client -> [(t, kind)]
    acks = []                               # (p, s, room, worker, sent, acked)
    receipts = []                           # (client, p, s)
    errors = []                             # (t, kind)
    for f in files:
        with open(f) as fh:
            for line in fh:
                x = line.split()
                if not x:
                    continue
                if x[0] == "r":
                    receipts.append((int(x[1]), int(x[2]), int(x[3])))
                elif x[0] == "a":
                    acks.append((int(x[1]), int(x[2]), int(x[3]), x[4], int(x[5]), int(x[6])))
                elif x[0] == "j":
                    joins[int(x[1])].append((int(x[3]), x[2]))
                elif x[0] == "d":
                    drops[int(x[1])].append((int(x[2]), x[3]))
                elif x[0] == "e":
                    errors.append((int(x[1]), x[2]))
    return joins, drops, acks, receipts, errors


def intervals(joins, drops, end):
    """client -> sorted [(start, end, worker)]: each connection from its join to its drop."""
    out = {}
    for c, js in joins.items():
        js.sort()
        ds = sorted(t for t, _ in drops.get(c, []))
        ivs = []
        for t, w in js:
            i = bisect.bisect_right(ds, t)
            ivs.append((t, ds[i] if i < len(ds) else end, w))
        out[c] = ivs
    return out


def stable_worker(ivs, start, end):
    """The worker a client was on for all of [start, end] on one connection, else None."""
    for s, e, w in reversed(ivs or ()):
        if s <= start:
            return w if e >= end else None
    return None


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def analyse(soak, files):
    a = soak.args
    t0 = int(soak.t0 * 1e6)
    end = int((soak.t_end + 10) * 1e6)
    joins, drops, acks, receipts, errors = read_events(files)
    ivs = intervals(joins, drops, end)
    rooms = soak.params["rooms"]
    members = collections.defaultdict(list)
    for c in ivs:
        members[c % rooms].append(c)

    # Windows: 0 = warm-up, k = fault k.
    by_k = {f["k"]: f for f in soak.faults}
    nwin = soak.nwin()
    iv_us = int(a.fault_interval * 1e6)

    def window(t_us):
        k = (t_us - t0) // iv_us
        return k if 0 <= k < nwin else None

    def fault_worker(k):
        f = by_k.get(k)
        return f"w{f['target']}" if f and f["target"] is not None and f["kind"] != "redis" else None

    def category(k, pub_worker, member_worker, sent):
        """Which count a delivery goes to in window k."""
        f = by_k.get(k)
        kind = f["kind"] if f else "baseline"
        if kind == "redis":
            if member_worker == pub_worker:
                return "local"
            outage_end = int(f["redis_start"] * 1e6) + REDIS_OUTAGE_TAIL_US
            return "cross_outage" if int(f["at"] * 1e6) <= sent < outage_end else "cross_after"
        if fault_worker(k) == member_worker:
            return "faulted_worker"
        return "other"

    ack_index = {}
    owed = collections.defaultdict(collections.Counter)
    for p, s, room, pw, sent, acked in acks:
        k = window(sent)
        if k is None:
            continue
        ack_index[(p, s)] = (room, pw, sent, acked, k)
        for c in members[room]:
            w = stable_worker(ivs.get(c), sent, acked + STABLE_AFTER_ACK_US)
            if w is not None:
                owed[k][category(k, pw, w, sent)] += 1
    got = collections.defaultdict(collections.Counter)
    for c, p, s in receipts:
        info = ack_index.get((p, s))
        if info is None:
            continue
        room, pw, sent, acked, k = info
        w = stable_worker(ivs.get(c), sent, acked + STABLE_AFTER_ACK_US)
        if w is not None:
            got[k][category(k, pw, w, sent)] += 1

    errs = collections.defaultdict(collections.Counter)
    for t, kind in errors:
        k = window(t)
        if k is not None:
            errs[k][kind] += 1

    rows = []
    for k in range(nwin):
        f = by_k.get(k)
        row = {"k": k, "kind": f["kind"] if f else "baseline", "target": fault_worker(k)}
        row["owed"] = dict(owed[k])
        row["lost"] = {c: owed[k][c] - got[k][c] for c in owed[k]}
        row["errors"] = dict(errs[k])
        if f:
            at = int(f["at"] * 1e6)
            rec, gaps, never = [], [], 0
            for c, ds in drops.items():
                dropped = [t for t, _ in ds if at <= t < at + iv_us]
                if not dropped:
                    continue
                back = [t for t, _ in joins.get(c, []) if t > dropped[0]]
                if back:
                    rec.append((back[0] - at) / 1e6)
                    gaps.append((back[0] - dropped[0]) / 1e6)
                else:
                    never += 1
            row.update(dropped=len(rec) + never, never_back=never, recovery_p50_s=pct(rec, 0.5),
                       recovery_p99_s=pct(rec, 0.99), recovery_max_s=max(rec) if rec else None,
                       gap_p50_s=pct(gaps, 0.5), gap_p99_s=pct(gaps, 0.99), fault=f)
        rows.append(row)

    # Rooms spanning workers at the start of publishing.
    spans = collections.Counter()
    for room, cs in members.items():
        ws = {stable_worker(ivs.get(c), t0, t0) for c in cs} - {None}
        spans[len(ws)] += 1

    return {"parameters": soak.params, "windows": rows, "rss": rss_table(soak), "leak_check": leak_table(soak), "room_worker_spans": dict(spans),
            "rss_samples": [(round(t - soak.t0, 1), role, pid, b) for t, role, pid, b in soak.rss],
            "heap_samples": [(round(t - soak.t0, 1), role, pid, c, used, free)
                             for t, role, pid, c, used, free in soak.heap],
            "loadtest": {k: soak.report[k] for k in ("connected", "failed", "reconnects", "published", "acked",
                                                     "deliveries", "errors", "clients_per_worker", "delivery_ms")}}


def worker_heap(port):
    """(connections, heap in use, heap free) from a worker's /metrics, or None (a paused worker
    does not answer)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=0.5).read().decode()
    except OSError:
        return None
    got = {}
    for line in text.splitlines():
        m = re.match(r'(fleet_worker_connections|fleet_worker_heap_bytes\{state="(in_use|free)")[^ ]* (\S+)$', line)
        if m:
            got[m.group(2) or "connections"] = float(m.group(3))
    if len(got) < 3:
        return None
    return int(got["connections"]), int(got["in_use"]), int(got["free"])


def settled_readings(samples, moments, interval):
    """Of one process's heap samples `(t, connections, in use, free)`, the last one before each
    moment (a fault, or the end) that is 45 s or more after the previous fault: the heap is
    recorded every 30 s, so such a reading has seen the connections that fault moved."""
    out = []
    for at in moments:
        before = [r for r in samples if at - 15 <= r[0] <= at]
        if before and before[-1][0] - (at - interval) >= 45 and before[-1][1] > 0:
            out.append(before[-1])
    return out


def leak_table(soak):
    """Per worker process that lived ten minutes or more of the soak: its heap in use per
    connection at each settled reading (see `settled_readings`), and the growth from its first
    fault cycle after the warm-up to its last, each the mean over its readings (one before each
    kind of fault: a cycle's readings see every phase, so the phase a single reading falls in
    does not decide).
    A leak raises it; clients moving between workers do not, as RSS would."""
    if not soak.t0:
        return []
    moments = [soak.t0 + soak.args.fault_interval * k for k in range(1, soak.nwin())] + [soak.t_end]
    out = []
    for w in soak.workers:
        for inst in w.instances:
            rows = [(t, c, used, free) for t, role, pid, c, used, free in soak.heap
                    if role == w.role and pid == inst["pid"]]
            readings = settled_readings(rows, moments, soak.args.fault_interval)
            cycle = len(FAULTS)
            if len(readings) < 1 + 2 * cycle or readings[-1][0] - readings[0][0] < 600:
                continue
            per_conn = [used / c for _, c, used, _ in readings]
            # The first reading is the warm-up's (no fault yet: no client has moved, no session
            # has lived through a fault); the first cycle starts after it.
            first_cycle = sum(per_conn[1:1 + cycle]) / cycle
            last_cycle = sum(per_conn[-cycle:]) / cycle
            first, last = readings[0], readings[-1]
            out.append({"role": w.role, "pid": inst["pid"], "readings": len(readings),
                        "minutes": round((last[0] - first[0]) / 60, 1),
                        "start": {"connections": first[1], "heap_in_use_mb": round(first[2] / 2**20, 1),
                                  "heap_free_mb": round(first[3] / 2**20, 1)},
                        "end": {"connections": last[1], "heap_in_use_mb": round(last[2] / 2**20, 1),
                                "heap_free_mb": round(last[3] / 2**20, 1)},
                        "per_connection_kb": [round(x / 1024, 1) for x in per_conn],
                        "first_cycle_kb": round(first_cycle / 1024, 1), "last_cycle_kb": round(last_cycle / 1024, 1),
                        "growth_pct": round(100 * (last_cycle - first_cycle) / first_cycle, 1)})
    return out


def rss_table(soak):
    """Per role: RSS at the warm-up's end and at the end of publishing; and per instance that
    lived at least 3 minutes, from 60 s after its start to its last sample."""
    warm = soak.t0 + soak.args.fault_interval - 5 if soak.t0 else 0
    end = soak.t_end
    out = []
    roles = [d.role for d in soak.daemons()]
    for d in soak.daemons():
        samples = [(t, pid, b) for t, role, pid, b in soak.rss if role == d.role]
        start = next(((t, pid, b) for t, pid, b in samples if t >= warm), None)
        last = [x for x in samples if x[0] <= end]
        last = last[-1] if last else None
        row = {"role": d.role, "restarts": len(d.instances) - 1,
               "start_mb": start and round(start[2] / 2**20, 1), "end_mb": last and round(last[2] / 2**20, 1),
               "same_process": bool(start and last and start[1] == last[1])}
        if start and last and start[2]:
            row["growth_pct"] = round(100 * (last[2] - start[2]) / start[2], 1)
        inst = []
        for i in d.instances:
            ss = [(t, b) for t, pid, b in samples if pid == i["pid"]]
            if not ss or ss[-1][0] - i["started"] < 180:
                continue
            first = next(((t, b) for t, b in ss if t >= max(i["started"] + 60, warm)), None)
            if first and first[1]:
                inst.append({"pid": i["pid"], "from_mb": round(first[1] / 2**20, 1),
                             "to_mb": round(ss[-1][1] / 2**20, 1), "minutes": round((ss[-1][0] - first[0]) / 60, 1),
                             "growth_pct": round(100 * (ss[-1][1] - first[1]) / first[1], 1)})
        row["instances"] = inst
        out.append(row)
    assert roles
    return out


def fmt_lost(row):
    lost, owed = row["lost"], row["owed"]
    return " ".join(f"{c}={lost[c]}/{owed[c]}" for c in sorted(owed)) or "-"


def table(res):
    lines = []
    p = res["parameters"]
    lines.append(f"\n{p['clients']} clients ({p['transport']}), {p['workers']} workers, {p['rooms']} rooms of "
                 f"{p['room_size']}, {p['publish_rate']} publishes/s, {p['minutes']} min")
    lines.append(f"rooms by number of workers their members were on at T0: {res['room_worker_spans']}")
    lines.append("\nper fault window (lost/owed by category; recovery of clients that dropped):")
    lines.append(f"{'k':>3} {'fault':<9}{'target':<7}{'dropped':>8}{'never':>6}{'p50 s':>7}{'p99 s':>7}{'max s':>7}"
                 f"{'gap50':>7}{'gap99':>7}  lost/owed  |  errors")
    for r in res["windows"]:
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        errs = " ".join(f"{k}={v}" for k, v in sorted(r["errors"].items())) or "none"
        lines.append(f"{r['k']:>3} {r['kind']:<9}{r['target'] or '-':<7}{r.get('dropped', 0):>8}"
                     f"{r.get('never_back', 0):>6}{f(r.get('recovery_p50_s')):>7}{f(r.get('recovery_p99_s')):>7}"
                     f"{f(r.get('recovery_max_s')):>7}{f(r.get('gap_p50_s')):>7}{f(r.get('gap_p99_s')):>7}"
                     f"  {fmt_lost(r)}  |  {errs}")
    lines.append("\nper fault kind (all windows of that kind):")
    for kind, agg in summary(res).items():
        lines.append(f"  {kind:<9} n={agg['n']}  dropped {agg['dropped']}  never back {agg['never_back']}  "
                     f"recovery p50 {agg['recovery_p50_s']} s p99 {agg['recovery_p99_s']} s  "
                     f"gap p50 {agg['gap_p50_s']} s p99 {agg['gap_p99_s']} s  "
                     f"lost/owed {' '.join(f'{c}={v[0]}/{v[1]}' for c, v in sorted(agg['lost'].items()))}")
        lines.append(f"  {'':<9} errors {' '.join(f'{k}={v}' for k, v in sorted(agg['errors'].items())) or 'none'}")
    lines.append("\nRSS (MB): start = after warm-up, end = end of publishing")
    for r in res["rss"]:
        inst = "; ".join(f"{i['from_mb']}->{i['to_mb']} over {i['minutes']} min ({i['growth_pct']:+}%)"
                         for i in r["instances"])
        lines.append(f"  {r['role']:<9} start {r['start_mb']}  end {r['end_mb']}  growth "
                     f"{r.get('growth_pct', '-')}%  restarts {r['restarts']}  "
                     f"{'same process' if r['same_process'] else 'restarted'}  instances>=3min: {inst or '-'}")
    lines.append("\nleak check (heap in use per connection, settled, just before each fault and at the end;"
                 " growth: mean of the last fault cycle's readings against the first's after the warm-up):")
    for r in res.get("leak_check", []):
        a, b = r["start"], r["end"]
        lines.append(f"  {r['role']:<4} pid {r['pid']:<7} over {r['minutes']} min: {a['heap_in_use_mb']} MB at "
                     f"{a['connections']} connections -> {b['heap_in_use_mb']} MB at {b['connections']} "
                     f"(free {a['heap_free_mb']} -> {b['heap_free_mb']} MB); per connection, first cycle "
                     f"{r['first_cycle_kb']} KB -> last {r['last_cycle_kb']} KB ({r['growth_pct']:+}%); "
                     f"readings {r['per_connection_kb']}")
    lt = res["loadtest"]
    lines.append(f"\nloadtest: connected {lt['connected']} failed {lt['failed']} reconnects {lt['reconnects']} "
                 f"published {lt['published']} acked {lt['acked']} deliveries {lt['deliveries']}")
    return "\n".join(lines)


def summary(res):
    """Windows of each kind merged; recovery percentiles pooled by re-weighting is not possible
    from percentiles, so they are the worst window's."""
    out = {}
    for r in res["windows"]:
        a = out.setdefault(r["kind"], {"n": 0, "dropped": 0, "never_back": 0, "lost": {}, "errors": collections.Counter(),
                                       "recovery_p50_s": None, "recovery_p99_s": None,
                                       "gap_p50_s": None, "gap_p99_s": None})
        a["n"] += 1
        a["dropped"] += r.get("dropped", 0)
        a["never_back"] += r.get("never_back", 0)
        for c, n in r["owed"].items():
            lo, ow = a["lost"].get(c, (0, 0))
            a["lost"][c] = (lo + r["lost"][c], ow + n)
        a["errors"].update(r["errors"])
        for q in ("recovery_p50_s", "recovery_p99_s", "gap_p50_s", "gap_p99_s"):
            v = r.get(q)
            if v is not None and (a[q] is None or v > a[q]):
                a[q] = round(v, 2)
    for a in out.values():
        a["errors"] = dict(a["errors"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=int, default=20)
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--publish-rate", type=float, default=200.0, help="publishes per second over all rooms")
    ap.add_argument("--room-size", type=int, default=10)
    ap.add_argument("--connect-rate", type=float, default=250.0)
    ap.add_argument("--procs", type=int, default=2, help="loadtest processes")
    ap.add_argument("--drain-secs", type=int, default=5, help="workers' drain window")
    ap.add_argument("--redis-outage", type=float, default=10.0)
    ap.add_argument("--pause", type=float, default=5.0, help="SIGSTOP seconds")
    ap.add_argument("--fault-interval", type=float, default=60.0, help="seconds between faults")
    ap.add_argument("--balancer-restart", choices=("handover", "in-place"), default="handover",
                    help="handover: the new balancer starts on the port (reuse_port) before the old one "
                         "is stopped; in-place: stopped, then started")
    ap.add_argument("--placement", default="least-connections",
                    help="balancer.placement: every client comes from 127.0.0.1, so `consistent` would fill "
                         "the workers in one order and leave the last (the never-restarted one) a remainder")
    ap.add_argument("--json", default=str(ROOT / "bench" / "soak-results.json"))
    args = ap.parse_args()
    if args.minutes < 2:
        ap.error("--minutes must be at least 2 (one warm-up minute, then faults)")
    soak = Soak(args)
    try:
        res = soak.run()
    finally:
        soak.done.set()
        for d in soak.daemons():
            if d.proc and d.proc.poll() is None:
                d.stop()
    res["summary"] = summary(res)
    try:
        res["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    print(table(res))
    Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
