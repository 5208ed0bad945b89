"""Redis going away and coming back: local delivery never stops, cross-worker delivery
resumes within 2 s of Redis returning, and the metrics tell the story."""

import time

from fleet_harness import Client, RedisServer, Worker, metric, wait_until


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
    wait_until(lambda: w0.readyz()[0] == 503, 5, what="w0 not ready without redis")
    assert "redis" in w0.readyz()[1]
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
    back = time.monotonic()
    # Publish every 50 ms until the remote worker's client sees one: cross-worker resumed.
    seq = 0
    def resumed():
        nonlocal seq
        seq += 1
        local_ws.call("publish", {"room": "r", "data": f"up{seq}"}, timeout=3)
        return any(d.startswith("up") for d in remote.data_received())
    wait_until(resumed, 5, interval=0.05, what="cross-worker delivery after redis returns")
    took = time.monotonic() - back
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
