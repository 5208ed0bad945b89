"""Redis going away and coming back: local delivery never stops, cross-worker delivery
resumes within 2 s of Redis returning, and the metrics tell the story."""

import time

import requests

from fleet_harness import Client, RedisServer, Worker, metric, parse_metrics, wait_until


def seconds_until_cross_worker_delivery(sender, remote):
    """Publishes into room "r" every 50 ms until `remote` (on another worker) hears one;
    returns how long that took."""
    start = time.monotonic()
    seq = 0

    def resumed():
        nonlocal seq
        seq += 1
        sender.call("publish", {"room": "r", "data": f"up{seq}"}, timeout=3)
        return any(d.startswith("up") for d in remote.data_received())
    wait_until(resumed, 5, interval=0.05, what="cross-worker delivery after redis returns")
    return time.monotonic() - start


def test_redis_restart_mid_traffic(closer, redis):
    w0 = closer.add(Worker(redis.url, wid="w0"))
    w1 = closer.add(Worker(redis.url, wid="w1"))
    w0.wait_ready()
    w1.wait_ready()
    local_ws = closer.add(Client(w0.url, ["websocket"], name="local_ws")).connect()
    local_poll = closer.add(Client(w0.url, ["polling"], name="local_poll")).connect()
    remote = closer.add(Client(w1.url, ["websocket"], name="remote")).connect()
    for c in (local_ws, local_poll, remote):
        c.call("join", "r")
    local_ws.call("publish", {"room": "r", "data": "before"})
    wait_until(lambda: remote.data_received() == ["before"], what="cross-worker before outage")

    redis.kill()
    # Degraded, not unready: the worker still serves its clients and stays in placement.
    wait_until(lambda: "degraded" in w0.readyz()[1], 5, what="w0 degraded without redis")
    status, body = w0.readyz()
    assert status == 200 and "redis" in body, (status, body)
    # During the outage, publishes are acknowledged and reach members on the same worker.
    for i in range(5):
        assert local_ws.call("publish", {"room": "r", "data": f"down{i}"}, timeout=3) == {"ok": True}
    expected_local = ["before"] + [f"down{i}" for i in range(5)]
    for c in (local_ws, local_poll):
        wait_until(lambda c=c: c.data_received() == expected_local, 5, what=f"{c.name} local during outage")
    m = w0.metrics()
    assert metric(m, "fleet_worker_redis_up") == 0
    assert metric(m, "fleet_worker_redis_publish_failures_total") >= 5

    redis.start()
    took = seconds_until_cross_worker_delivery(local_ws, remote)
    assert took < 2.0, f"cross-worker delivery resumed after {took:.2f}s"
    # Every subscription is back: the other direction works too.
    remote.call("publish", {"room": "r", "data": "from-w1"})
    wait_until(lambda: "from-w1" in local_poll.data_received(), 3, what="w1 -> w0 after restart")
    wait_until(lambda: w0.readyz()[0] == 200 and w1.readyz()[0] == 200, 3, what="ready again")
    for w in (w0, w1):
        m = w.metrics()
        assert metric(m, "fleet_worker_redis_up") == 1
        assert metric(m, "fleet_worker_redis_reconnects_total") >= 1
    # Nobody received anything twice.
    for c in (local_ws, local_poll, remote):
        got = c.data_received()
        assert len(got) == len(set(got)), f"{c.name} duplicates: {got}"


def test_worker_started_before_redis(closer):
    redis = RedisServer()
    port = redis.port
    redis.kill()
    w = closer.add(Worker(f"redis://127.0.0.1:{port}", wid="early"))
    w.wait_listening()
    status, body = w.readyz()
    assert status == 503 and f"127.0.0.1:{port}" in body, body
    assert w.alive()
    wait_until(lambda: "waiting for redis" in w.output(), 5, what="plain log line about redis")
    redis.start()
    closer.add(redis)
    w.wait_ready(timeout=5)
    other = closer.add(Worker(redis.url, wid="late"))
    other.wait_ready()
    a = closer.add(Client(w.url, ["websocket"])).connect()
    b = closer.add(Client(other.url, ["polling"])).connect()
    for c in (a, b):
        c.call("join", "r")
    b.call("publish", {"room": "r", "data": "hello"})
    wait_until(lambda: a.data_received() == ["hello"], 5, what="delivery to the early worker")
    assert metric(w.metrics(), "fleet_worker_redis_up") == 1


def test_redis_outage_through_the_balancer(closer, tmp_path, redis):
    """An outage costs cross-worker delivery only: through the balancer, new polling,
    WebSocket and upgrading clients connect, join and hear their worker-mates while Redis is
    down; existing polling sessions keep working; cross-worker delivery resumes within 2 s."""
    from test_balancer import start

    b = start(closer, tmp_path, redis, count=2)
    before = [closer.add(Client(b.url, ["polling"], name=f"old{i}")).connect() for i in range(6)]
    for c in before:
        c.call("join", "r")
    redis.kill()
    def worker_metrics(i):
        return parse_metrics(requests.get(b.worker_url(i) + "/metrics", timeout=2).text)
    wait_until(lambda: all(metric(worker_metrics(i), "fleet_worker_redis_up") == 0 for i in range(2)),
               5, what="both workers cut off")
    assert requests.get(b.admin + "/readyz", timeout=5).status_code == 200
    kinds = [["polling"], ["websocket"], ["polling", "websocket"]]
    during = [closer.add(Client(b.url, kinds[i % 3], name=f"new{i}")).connect() for i in range(9)]
    by_worker = {}
    for c in before + during:
        assert c.call("join", "r", timeout=5) == {"ok": True, "room": "r"}
        by_worker.setdefault(c.call("whoami")["worker"], []).append(c)
    assert any(c.transport() == "websocket" for c in during)
    for worker, mates in by_worker.items():
        mates[0].call("publish", {"room": "r", "data": f"local-{worker}"}, timeout=5)
        for c in mates:
            wait_until(lambda c=c, w=worker: f"local-{w}" in c.data_received(), 5,
                       what=f"{c.name} hears its worker-mate during the outage")
    redis.start()
    sender = before[0]
    sender_worker = sender.call("whoami")["worker"]
    remote = next(c for w, cs in by_worker.items() if w != sender_worker for c in cs)
    assert seconds_until_cross_worker_delivery(sender, remote) < 2.0
    assert metric(b.metrics(), "fleet_balancer_rejects_total", **{"class": "no_worker"}) == 0


def test_no_worker_ready_panic_places_on_those_that_answer(closer, tmp_path):
    """Workers that have never reached Redis are not ready, but they answer and can serve
    their own clients: with no worker ready the balancer places new sessions on them (panic
    mode, counted) instead of refusing everyone."""
    from fleet_harness import Balancer

    dead = RedisServer()
    dead.kill()
    b = closer.add(Balancer(tmp_path, f"redis://127.0.0.1:{dead.port}", count=2))
    wait_until(lambda: all(metric(b.metrics(), "fleet_balancer_worker_up", worker=f"w{i}") == 0
                           for i in range(2)), 20, what="both workers probed, not ready")
    for i in range(2):
        wait_until(lambda i=i: requests.get(b.worker_url(i) + "/readyz", timeout=2).status_code == 503,
                   20, what=f"worker {i} answers 503")
    # The balancer's next probe (within a second) hears the answers.
    wait_until(lambda: requests.get(b.url + "/socket.io/?EIO=4&transport=polling", timeout=2).status_code == 200,
               5, what="a handshake through the balancer")
    refused = metric(b.metrics(), "fleet_balancer_rejects_total", **{"class": "no_worker"})
    clients = [closer.add(Client(b.url, ["polling", "websocket"] if i % 2 else ["polling"])).connect()
               for i in range(4)]
    for c in clients:
        assert c.call("join", "r") == {"ok": True, "room": "r"}
    assert sum(metric(b.metrics(), "fleet_balancer_panic_placements_total", worker=f"w{i}")
               for i in range(2)) >= 5
    assert metric(b.metrics(), "fleet_balancer_rejects_total", **{"class": "no_worker"}) == refused
    wait_until(lambda: "panic_placement" in b.output(), 5, what="the panic logged")
