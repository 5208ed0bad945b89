"""A worker hears only the rooms it holds: a broadcast to one room travels on that room's Redis
channel, which a worker subscribes when the room gets its first member there and unsubscribes
when the last one leaves (leave, disconnect, remote leave). Checked against Redis itself
(`PUBSUB NUMSUB`, `INFO commandstats`) and the worker's metrics; every Socket.IO server operator
still acts across workers (the example app `operators` exposes one event per operator); exactly
once everywhere, the publisher's own worker included."""

import subprocess
import threading
import time

from fleet_harness import BIN_DIR, Balancer, Client, metric, wait_until

PREFIX = "fleet"


def start(closer, tmp_path, redis, count=3):
    extra = f"  command: [{BIN_DIR / 'examples' / 'operators'}]\n"
    b = closer.add(Balancer(tmp_path, redis.url, count=count, extra=extra))
    b.wait_ready()
    return b


def redis_cli(redis, *args):
    out = subprocess.run(["redis-cli", "-p", str(redis.port), *map(str, args)],
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.split("\n")


def channel(room, ns="/"):
    return f"{PREFIX}-room#{ns}#{room}#"


def numsub(redis, room):
    """How many workers listen to `room`'s channel, as Redis counts them."""
    lines = redis_cli(redis, "PUBSUB", "NUMSUB", channel(room))
    return int(lines[1])


def room_channels(redis):
    return {c for c in redis_cli(redis, "PUBSUB", "CHANNELS", f"{PREFIX}-room#*") if c}


def commands(redis, name):
    """Calls of one Redis command so far (INFO commandstats)."""
    for line in redis_cli(redis, "INFO", "commandstats"):
        if line.startswith(f"cmdstat_{name}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def pubsub(b, i, kind):
    return metric(b.worker_metrics(i), "fleet_worker_pubsub_messages_total", kind=kind)


def subscribed(b, i):
    return metric(b.worker_metrics(i), "fleet_worker_rooms_subscribed")


class Member(Client):
    """A client that also records `all`, `multi` and `ask` events and answers `ask`."""

    def __init__(self, url, transports=("polling", "websocket")):
        super().__init__(url, transports=transports)
        self.events = {"all": [], "multi": []}
        for name in self.events:
            self.sio.on(name, lambda data, name=name: self._record(name, data))
        self.sio.on("ask", lambda *_: self.sio.get_sid())

    def _record(self, name, data):
        with self._lock:
            self.events[name].append(data)

    def got(self, name):
        with self._lock:
            return list(self.events[name])

    def op(self, event, data=None):
        res = self.call(event, data)
        assert res["ok"], res
        return res.get("result")


def members(closer, b, where, transports=("polling", "websocket")):
    """One connected Member per worker index in `where`."""
    return [closer.add(Member(b.worker_url(i), transports).connect()) for i in where]


def test_a_worker_listens_only_to_rooms_it_holds(closer, tmp_path, redis):
    """Room members on w0 and w1 only: Redis counts exactly those two listeners, w2 hears none
    of the room's broadcasts, every member gets each once (the publisher's worker included, which
    ignores its own message coming back), and the subscription follows leave and disconnect."""
    b = start(closer, tmp_path, redis)
    a, c = members(closer, b, [0, 1])
    for m in (a, c):
        assert m.call("join", "pair")["ok"]
    assert numsub(redis, "pair") == 2
    assert room_channels(redis) == {channel("pair")}
    wait_until(lambda: [subscribed(b, i) for i in range(3)] == [1, 1, 0], what="gauges")
    before = {i: (pubsub(b, i, "delivered"), pubsub(b, i, "ignored")) for i in range(3)}
    for n in range(20):
        assert a.call("publish", {"room": "pair", "data": n})["ok"]
    for m in (a, c):
        wait_until(lambda m=m: len(m.data_received()) >= 20, what="20 messages")
    # Settle: anything extra would have arrived with the rest.
    assert a.call("echo", 1) == 1 and c.call("echo", 1) == 1
    assert a.data_received() == list(range(20)) and c.data_received() == list(range(20))
    after = {i: (pubsub(b, i, "delivered"), pubsub(b, i, "ignored")) for i in range(3)}
    assert after[1][0] - before[1][0] == 20, "w1 delivered each once"
    assert after[0][1] - before[0][1] == 20, "w0 ignored its own 20 coming back"
    assert after[0][0] == before[0][0], "w0 delivered none from Redis (it delivered at once)"
    assert after[2] == before[2], "w2 heard none of them"

    assert c.call("leave", "pair")["ok"]
    wait_until(lambda: numsub(redis, "pair") == 1, what="w1 unsubscribed on leave")
    a.close()
    wait_until(lambda: numsub(redis, "pair") == 0, what="w0 unsubscribed on disconnect")
    wait_until(lambda: room_channels(redis) == set(), what="no room channel left")
    wait_until(lambda: [subscribed(b, i) for i in range(3)] == [0, 0, 0], what="gauges back to 0")


def test_a_join_is_acknowledged_once_other_workers_reach_it(closer, tmp_path, redis):
    """A publish from another worker right after the join's ack is never missed: the ack waits
    for Redis to confirm the room's subscription."""
    b = start(closer, tmp_path, redis, count=2)
    pub, = members(closer, b, [0])
    for transports in (("polling",), ("websocket",)):
        sub, = members(closer, b, [1], transports)
        for n in range(30):
            room = f"fresh-{transports[0]}-{n}"
            assert sub.call("join", room)["ok"]
            assert pub.call("publish", {"room": room, "data": n})["ok"]
        wait_until(lambda sub=sub: len(sub.data_received()) >= 30, what="every first message")
        assert sub.call("echo", 1) == 1
        assert sub.data_received() == list(range(30))


def test_join_churn_is_batched_and_exact(closer, tmp_path, redis):
    """400 joins sent at once cost far fewer SUBSCRIBE commands (changes that pile up during one
    round trip go out together), every ack comes, and the subscriptions end exactly right after
    leaving half."""
    b = start(closer, tmp_path, redis, count=2)
    m, = members(closer, b, [1], ("websocket",))
    acks = []
    done = threading.Event()

    def acked(res):
        acks.append(res)
        if len(acks) == 400:
            done.set()

    before = commands(redis, "subscribe")
    for n in range(400):
        m.sio.emit("join", f"churn-{n}", callback=acked)
    assert done.wait(20), f"{len(acks)} of 400 joins acknowledged"
    assert all(a["ok"] for a in acks)
    assert numsub(redis, "churn-0") == 1 and numsub(redis, "churn-399") == 1
    calls = commands(redis, "subscribe") - before
    print(f"{calls} SUBSCRIBE commands for 400 joins")
    assert calls <= 100, f"{calls} SUBSCRIBE commands for 400 joins"
    for n in range(0, 400, 2):
        m.sio.emit("leave", f"churn-{n}")
    wait_until(lambda: len(room_channels(redis)) == 200, what="200 rooms left")
    assert room_channels(redis) == {channel(f"churn-{n}") for n in range(1, 400, 2)}
    wait_until(lambda: subscribed(b, 1) == 200, what="gauge 200")


def test_every_operator_acts_across_workers(closer, tmp_path, redis):
    """io.emit, a broadcast to several rooms, fetch_sockets, broadcast with acks, remote
    join/leave, rooms() and remote disconnect, each from w0 over members on all three workers."""
    b = start(closer, tmp_path, redis)
    ctl, = members(closer, b, [0])
    m0, m1, m2 = members(closer, b, [0, 1, 2])
    for m in (m0, m1, m2):
        assert m.call("join", "blue")["ok"]
    assert m1.call("join", "green")["ok"] and m2.call("join", "green")["ok"]
    sids = {m.sio.get_sid() for m in (m0, m1, m2)}

    # io.emit: every socket of every worker, once.
    ctl.op("op:emit_all", "hello all")
    for m in (ctl, m0, m1, m2):
        wait_until(lambda m=m: m.got("all"), what="emit to all")
    # Several rooms: a member of both gets it once.
    ctl.op("op:emit_rooms", {"rooms": ["blue", "green"], "data": "to both"})
    for m in (m0, m1, m2):
        wait_until(lambda m=m: m.got("multi"), what="emit to two rooms")
    # fetch_sockets and broadcast with acks gather every worker's members.
    assert set(ctl.op("op:fetch", "blue")) == sids
    assert sorted(ctl.op("op:ask", "blue")) == sorted(sids)
    # rooms(): every worker's rooms.
    assert {"blue", "green"} <= set(ctl.op("op:rooms"))
    # Remote join: blue's members join red on their own workers, whose subscriptions follow.
    ctl.op("op:add", {"room": "blue", "target": "red"})
    wait_until(lambda: numsub(redis, "red") == 3, what="red subscribed on 3 workers")
    assert ctl.call("publish", {"room": "red", "data": "red 1"})["ok"]
    for m in (m0, m1, m2):
        wait_until(lambda m=m: "red 1" in m.data_received(), what="publish to remotely joined room")
    # Remote leave: only green's members leave red.
    ctl.op("op:del", {"room": "green", "target": "red"})
    wait_until(lambda: numsub(redis, "red") == 1, what="red left on w1 and w2")
    assert ctl.call("publish", {"room": "red", "data": "red 2"})["ok"]
    wait_until(lambda: "red 2" in m0.data_received(), what="red 2 on w0")
    # Remote disconnect: green's members, on w1 and w2.
    ctl.op("op:disconnect", "green")
    wait_until(lambda: not m1.sio.connected and not m2.sio.connected, what="green disconnected")
    wait_until(lambda: numsub(redis, "blue") == 1, what="blue only on w0 now")
    assert m0.sio.connected and ctl.sio.connected

    for m in (ctl, m0, m1, m2):
        assert m.got("all") == ["hello all"]
    for m in (m0, m1, m2):
        assert m.got("multi") == ["to both"]
    assert m0.data_received() == ["red 1", "red 2"]
    assert m1.data_received() == ["red 1"] and m2.data_received() == ["red 1"]


def test_subscriptions_are_renewed_after_a_redis_restart(closer, tmp_path, redis):
    """Redis restarted empty: every room channel is subscribed again before the worker reports
    ready, and cross-worker room delivery resumes."""
    b = start(closer, tmp_path, redis, count=2)
    a, c = members(closer, b, [0, 1], ("websocket",))
    rooms = [f"r{n}" for n in range(50)]
    for room in rooms:
        assert c.call("join", room)["ok"]
    assert a.call("join", "r0")["ok"]
    redis.kill()
    wait_until(lambda: metric(b.worker_metrics(1), "fleet_worker_redis_up") == 0, what="w1 sees redis down")
    # Local delivery goes on meanwhile.
    assert a.call("publish", {"room": "r0", "data": "during"})["ok"]
    wait_until(lambda: "during" in a.data_received(), what="local delivery during the outage")
    redis.start()
    started = time.monotonic()
    wait_until(lambda: all(metric(b.worker_metrics(i), "fleet_worker_redis_up") == 1 for i in (0, 1)),
               timeout=10, what="both workers back")
    assert len(room_channels(redis)) == 50
    assert numsub(redis, "r0") == 2
    assert a.call("publish", {"room": "r0", "data": "after"})["ok"]
    wait_until(lambda: "after" in c.data_received(), what="cross-worker delivery resumed")
    assert time.monotonic() - started < 10
    assert subscribed(b, 1) == 50

