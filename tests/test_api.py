"""The server API for the app's backend, end to end: every endpoint across workers (spawned,
and attached to a second balancer), a worker's own /api/, and what bad callers get."""

import collections
import signal
import time

import requests

from fleet_harness import Balancer, Worker, free_port, free_port_range, metric, wait_until
from test_auth import Sock, jwt_auth, token

KEY = "api-key-0123456789abcdef"


def start(closer, tmp_path, redis, count=3, spawn=True, base_port=None, name="bal", auth=True):
    api = free_port()
    extra = (jwt_auth() if auth else "") + f"api:\n  listen: 127.0.0.1:{api}\n  key: {KEY}\n"
    b = closer.add(Balancer(tmp_path, redis.url, count=count, spawn=spawn, base_port=base_port, name=name,
                            extra=extra))
    b.wait_ready()
    b.api = f"http://127.0.0.1:{api}"
    return b


def call(method, url, json=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, url, json=json, headers=headers, timeout=10, **kw)


def members_on_every_worker(closer, b, user_of, room, n=12):
    """`n` clients in `room`, spread until every worker holds some (straight to each worker in
    turn, so the spread does not depend on placement)."""
    socks = []
    for i in range(n):
        s = closer.add(Sock(b.worker_url(i % b.count), auth={"token": token(user_of(i), rooms=["*"],
                                                                             publish=["*"])}))
        assert s.connect(), s.error
        assert s.call("join", room)["ok"]
        socks.append(s)
    return socks


def test_every_endpoint_across_workers(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis)
    socks = members_on_every_worker(closer, b, lambda i: "alice" if i < 2 else f"u{i}", "news")
    where = collections.Counter(s.call("whoami")["worker"] for s in socks)
    assert set(where) == {"w0", "w1", "w2"}, where

    r = call("POST", b.api + "/api/publish", {"room": "news", "data": {"headline": "one"}})
    assert r.status_code == 200 and r.json()["ok"] is True, r.text
    message = {"room": "news", "data": {"headline": "one"}}
    for s in socks:
        wait_until(lambda s=s: message in s.messages, 5, what="API publish delivered")
    time.sleep(0.3)  # a duplicate would have arrived by now
    assert all(s.messages.count(message) == 1 for s in socks)

    # Several rooms: each message names its room; a user's room reaches that user only.
    r = call("POST", b.api + "/api/publish", {"rooms": ["news", "user:alice"], "data": 2})
    assert r.status_code == 200, r.text
    for s in socks[:2]:
        wait_until(lambda s=s: {"room": "user:alice", "data": 2} in s.messages, 5, what="user room")
    assert all({"room": "user:alice", "data": 2} not in s.messages for s in socks[2:])

    r = call("GET", b.api + "/api/rooms/news")
    assert r.status_code == 200, r.text
    room = r.json()
    assert room["room"] == "news" and room["count"] == 12 and "partial" not in room
    assert {m["sid"] for m in room["members"]} == {s.sio.get_sid() for s in socks}
    assert collections.Counter(m["worker"] for m in room["members"]) == where
    assert sorted(m["user"] for m in room["members"] if m["user"] == "alice") == ["alice", "alice"]
    assert call("GET", b.api + "/api/rooms/user%3Aalice").json()["count"] == 2
    assert call("GET", b.api + "/api/rooms/nobody-here").json() == {"room": "nobody-here", "count": 0,
                                                                      "members": []}

    info = call("GET", b.api + "/api/info").json()
    assert [w["worker"] for w in info["workers"]] == ["w0", "w1", "w2"]
    assert all(w["ready"] and w["redis_up"] for w in info["workers"])
    assert info["connections"] == 12 and info["redis_up"] is True

    # One socket by sid, then every socket of a user, wherever they are.
    victim = socks[5]
    r = call("POST", b.api + "/api/disconnect", {"sid": victim.sio.get_sid()})
    assert r.json() == {"ok": True, "disconnected": 1}, r.text
    wait_until(lambda: victim.disconnects, 5, what="socket disconnected")
    r = call("POST", b.api + "/api/disconnect", {"user": "alice"})
    assert r.json() == {"ok": True, "disconnected": 2}, r.text
    wait_until(lambda: all(s.disconnects for s in socks[:2]), 5, what="alice disconnected everywhere")
    assert call("POST", b.api + "/api/disconnect", {"user": "nobody"}).json()["disconnected"] == 0
    wait_until(lambda: call("GET", b.api + "/api/info").json()["connections"] == 9, 5, what="9 left")

    m = b.metrics()
    assert metric(m, "fleet_balancer_api_requests_total", endpoint="publish", code="200") == 2
    assert metric(m, "fleet_balancer_api_requests_total", endpoint="rooms", code="200") == 3


def test_bad_callers_get_clear_answers_and_the_fleet_stays_up(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, count=2, auth=False)
    for key in (None, "wrong-key-0123456789", KEY[:-1], KEY + "x"):
        r = call("POST", b.api + "/api/publish", {"room": "r", "data": 1}, key=key)
        assert r.status_code == 401 and r.json() == {"error": "unauthorized"}, (key, r.text)
    r = requests.post(b.api + "/api/publish", data="{not json", timeout=5,
                      headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "error" in r.json(), r.text
    for body in ({"data": 1}, {"room": "", "data": 1}, {"room": 3, "data": 1}, {"room": "r"},
                 {"rooms": [], "data": 1}, {"room": "r", "rooms": ["s"], "data": 1}, {"room": "r", "data": 1, "x": 1}):
        r = call("POST", b.api + "/api/publish", body)
        assert r.status_code == 400 and r.json()["error"], (body, r.text)
    r = call("POST", b.api + "/api/disconnect", {"who": "me"})
    assert r.status_code == 400 and "user" in r.json()["error"]
    r = requests.post(b.api + "/api/publish", data=b"x" * (1024 * 1024 + 1), timeout=10,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert call("GET", b.api + "/api/nothing").status_code == 404
    assert call("GET", b.api + "/api/publish").status_code == 405
    assert call("POST", b.api + "/api/info").status_code == 405
    assert b.alive()
    m = b.metrics()
    assert metric(m, "fleet_balancer_api_requests_total", endpoint="other", code="401") == 4
    assert metric(m, "fleet_balancer_api_requests_total", endpoint="publish", code="413") == 1
    # Still serving.
    assert call("POST", b.api + "/api/publish", {"room": "r", "data": 1}).status_code == 200


def test_attached_workers_and_a_workers_own_api(closer, tmp_path, redis):
    """The API of a balancer that spawns nothing (attached workers) covers them too; and a worker
    serves the same API on its own port, under /api/, with the same key."""
    b1 = start(closer, tmp_path, redis, count=2, auth=False)
    b2 = start(closer, tmp_path, redis, count=2, spawn=False, base_port=b1.base_port, name="bal2", auth=False)
    socks = [closer.add(Sock(b1.worker_url(i % 2))) for i in range(4)]
    for s in socks:
        assert s.connect(), s.error
        assert s.call("join", "ops")["ok"]
    assert call("GET", b2.api + "/api/rooms/ops").json()["count"] == 4
    assert call("POST", b2.api + "/api/publish", {"room": "ops", "data": "via b2"}).json()["ok"]
    for s in socks:
        wait_until(lambda s=s: {"room": "ops", "data": "via b2"} in s.messages, 5, what="delivered")
    # Straight to one worker: the same API for the whole fleet; ?scope=local for its own part.
    w0 = b1.worker_url(0)
    assert call("POST", w0 + "/api/publish", {"room": "ops", "data": "via w0"}).json()["ok"]
    for s in socks:
        wait_until(lambda s=s: {"room": "ops", "data": "via w0"} in s.messages, 5, what="delivered")
    assert call("GET", w0 + "/api/rooms/ops").json()["count"] == 4
    assert call("GET", w0 + "/api/rooms/ops?scope=local").json()["count"] == 2
    assert call("GET", w0 + "/api/info", key="wrong-key-0123456789").status_code == 401


def test_standalone_workers_serve_the_fleet_wide_api_without_a_balancer(closer, redis):
    """Workers on other hosts, with no balancer in front: any one of them answers for all,
    asking the others over Redis."""
    workers = [closer.add(Worker(redis.url, wid=f"host{i}", env={"FLEET_API_KEY": KEY})) for i in range(3)]
    for w in workers:
        w.wait_ready()
    socks = []
    for i in range(6):
        s = closer.add(Sock(workers[i % 3].url))
        assert s.connect(), s.error
        assert s.call("join", "ops")["ok"]
        socks.append(s)
    for w in workers:
        room = call("GET", w.url + "/api/rooms/ops").json()
        assert room["count"] == 6 and "partial" not in room, room
        assert {m["worker"] for m in room["members"]} == {"host0", "host1", "host2"}
    info = call("GET", workers[1].url + "/api/info").json()
    assert sorted(x["worker"] for x in info["workers"]) == ["host0", "host1", "host2"]
    assert info["connections"] == 6 and info["redis_up"] is True
    victim = socks[2]  # on host2, asked of host0
    r = call("POST", workers[0].url + "/api/disconnect", {"sid": victim.sio.get_sid()}).json()
    assert r == {"ok": True, "disconnected": 1}, r
    wait_until(lambda: victim.disconnects, 5, what="disconnected from another worker")
    # A worker that hangs (still subscribed, answering nothing): the answer comes within the
    # wait, says it is partial, and counts what the others hold.
    workers[2].pause()
    try:
        t0 = time.monotonic()
        room = call("GET", workers[0].url + "/api/rooms/ops").json()
        assert room["partial"] is True and room["count"] == 4, room
        assert time.monotonic() - t0 < 4
    finally:
        workers[2].signal(signal.SIGCONT)
    assert "partial" not in call("GET", workers[0].url + "/api/rooms/ops").json()


def test_an_unreachable_worker_is_named_not_hidden(closer, tmp_path, redis):
    base = free_port_range(2)
    workers = [closer.add(Worker(redis.url, wid=f"solo{i}", port=base + i, env={"FLEET_API_KEY": KEY}))
               for i in range(2)]
    for w in workers:
        w.wait_ready()
    b = start(closer, tmp_path, redis, count=2, spawn=False, base_port=base, auth=False)
    s = closer.add(Sock(b.worker_url(0)))
    assert s.connect() and s.call("join", "x")["ok"]
    workers[1].proc.kill()
    workers[1].proc.wait(10)
    r = call("GET", b.api + "/api/rooms/x").json()
    assert r["count"] == 1 and r["partial"] is True and r["unreachable"] == ["w1"], r
    info = call("GET", b.api + "/api/info").json()
    assert [w["worker"] for w in info["workers"]] == ["solo0", "w1"]
    assert info["workers"][1]["error"] == "no answer" and info["redis_up"] is False
