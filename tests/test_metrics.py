"""Every worker metric of the contract is exported, labelled with the worker, and plausible."""

from fleet_harness import Client, Worker, metric, wait_until

NAMES = [
    "fleet_worker_connections",
    "fleet_worker_events_total",
    "fleet_worker_broadcasts_total",
    "fleet_worker_broadcast_duration_seconds_count",
    "fleet_worker_deliveries_dropped_total",
    "fleet_worker_pubsub_lag_seconds_count",
    "fleet_worker_event_loop_lag_seconds_count",
    "fleet_worker_redis_up",
    "fleet_worker_redis_reconnects_total",
    "fleet_worker_redis_publish_failures_total",
    "fleet_worker_redis_memory_bytes",
]


def test_metrics_present_and_plausible(closer, redis):
    w0 = closer.add(Worker(redis.url, wid="m0"))
    w1 = closer.add(Worker(redis.url, wid="m1"))
    w0.wait_ready()
    w1.wait_ready()
    clients = [closer.add(Client(w0.url, t)).connect() for t in (["polling"], ["websocket"], ["websocket"])]
    for c in clients:
        c.call("join", "room")
    for i in range(4):
        clients[0].call("publish", {"room": "room", "data": i})
    clients[1].call("whoami")
    # Probes run every second; memory is polled every 5 s.
    wait_until(lambda: metric(w0.metrics(), "fleet_worker_pubsub_lag_seconds_count") >= 2
               and metric(w0.metrics(), "fleet_worker_redis_memory_bytes") > 0, 10, what="probes")
    m = w0.metrics()
    for name in NAMES:
        samples = [k for k in m if k.split("{")[0] == name]
        assert samples, f"{name} missing"
        assert all('worker="m0"' in k for k in samples), samples
    assert metric(m, "fleet_worker_connections") == 3
    assert metric(m, "fleet_worker_events_total", event="join") == 3
    assert metric(m, "fleet_worker_events_total", event="publish") == 4
    assert metric(m, "fleet_worker_events_total", event="whoami") == 1
    assert metric(m, "fleet_worker_broadcasts_total") == 4
    assert metric(m, "fleet_worker_broadcast_duration_seconds_count") == 4
    assert 0 < metric(m, "fleet_worker_broadcast_duration_seconds_sum") < 4 * 0.5
    lag_avg = metric(m, "fleet_worker_pubsub_lag_seconds_sum") / metric(m, "fleet_worker_pubsub_lag_seconds_count")
    assert 0 <= lag_avg < 0.5, lag_avg
    assert metric(m, "fleet_worker_event_loop_lag_seconds_count") >= 5
    assert metric(m, "fleet_worker_redis_up") == 1
    assert metric(m, "fleet_worker_redis_reconnects_total") == 0
    assert metric(m, "fleet_worker_redis_publish_failures_total") == 0
    assert 100_000 < metric(m, "fleet_worker_redis_memory_bytes") < 1_000_000_000
    clients[2].close()
    wait_until(lambda: metric(w0.metrics(), "fleet_worker_connections") == 2, 5, what="gauge follows disconnect")
