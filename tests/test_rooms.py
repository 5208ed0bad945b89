"""The default app across workers: exactly-once room delivery, leave, bad arguments."""

import time

from fleet_harness import Client, Worker, wait_until


def start_workers(closer, redis, n):
    workers = [closer.add(Worker(redis.url, wid=f"w{i}")) for i in range(n)]
    for w in workers:
        w.wait_ready()
    return workers


def test_cross_worker_broadcast_exactly_once(closer, redis):
    """Polling-only and websocket-only clients on two workers all get each publish once,
    the publisher included, whoever publishes."""
    w0, w1 = start_workers(closer, redis, 2)
    clients = [
        closer.add(Client(w0.url, ["polling"], name="p0")).connect(),
        closer.add(Client(w0.url, ["websocket"], name="s0")).connect(),
        closer.add(Client(w1.url, ["polling"], name="p1")).connect(),
        closer.add(Client(w1.url, ["websocket"], name="s1")).connect(),
        closer.add(Client(w1.url, ["polling", "websocket"], name="u1")).connect(),
    ]
    assert [c.call("whoami")["worker"] for c in clients] == ["w0", "w0", "w1", "w1", "w1"]
    assert clients[0].transport() == "polling" and clients[1].transport() == "websocket"
    outsider = closer.add(Client(w0.url, ["websocket"], name="out")).connect()
    for c in clients:
        assert c.call("join", "lobby") == {"ok": True, "room": "lobby"}
    sent = []
    for i in range(20):
        publisher = clients[i % len(clients)]
        payload = {"seq": i, "from": publisher.name}
        assert publisher.call("publish", {"room": "lobby", "data": payload}) == {"ok": True}
        sent.append(payload)
    for c in clients:
        wait_until(lambda c=c: len(c.data_received()) >= len(sent), 10, what=f"{c.name} deliveries")
    # Let any duplicate arrive before judging exactly-once.
    time.sleep(0.3)
    for c in clients:
        got = c.data_received()
        assert sorted(got, key=lambda d: d["seq"]) == sent, f"{c.name} got {got}"
        assert all(m["room"] == "lobby" for m in c.messages)
    assert outsider.messages == []


def test_leave_stops_delivery(closer, redis):
    w0, w1 = start_workers(closer, redis, 2)
    a = closer.add(Client(w0.url, ["websocket"])).connect()
    b = closer.add(Client(w1.url, ["polling"])).connect()
    for c in (a, b):
        c.call("join", "r")
    a.call("publish", {"room": "r", "data": 1})
    wait_until(lambda: b.data_received() == [1], what="first delivery")
    assert b.call("leave", "r") == {"ok": True, "room": "r"}
    a.call("publish", {"room": "r", "data": 2})
    wait_until(lambda: a.data_received() == [1, 2], what="publisher's own copy")
    # The publisher's own copy arrived; give the other worker the same time again.
    time.sleep(0.3)
    assert b.data_received() == [1]


def test_whoami_echo_and_bad_arguments(closer, redis):
    (w0,) = start_workers(closer, redis, 1)
    c = closer.add(Client(w0.url, ["websocket"])).connect()
    me = c.call("whoami")
    assert me["worker"] == "w0" and me["sid"] == c.sio.get_sid()
    assert c.call("echo", {"a": [1, "x", None]}) == {"a": [1, "x", None]}
    watcher = closer.add(Client(w0.url, ["polling"])).connect()
    watcher.call("join", "r")
    bad = [
        ("join", None, "missing room"),
        ("join", 42, "must be a string"),
        ("join", "x" * 257, "257 bytes"),
        ("join", "", "empty"),
        ("leave", ["r"], "must be a string"),
        ("publish", None, "publish expects"),
        ("publish", "r", "publish expects"),
        ("publish", {"data": 1}, "missing room"),
        ("publish", {"room": 5, "data": 1}, "must be a string"),
        ("publish", {"room": "r"}, "missing data"),
        ("publish", {"room": "x" * 300, "data": 1}, "300 bytes"),
    ]
    for event, arg, why in bad:
        ack = c.call(event, arg)
        assert ack["ok"] is False and why in ack["error"], (event, arg, ack)
    assert c.call("join", "x" * 256)["ok"] is True
    # Still connected and nothing was broadcast by the refused publishes.
    assert c.call("echo", "alive") == "alive"
    c.call("publish", {"room": "r", "data": "after"})
    wait_until(lambda: watcher.data_received() == ["after"], what="valid publish delivered")
