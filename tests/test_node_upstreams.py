"""The balancer in front of stock Node socket.io servers (tests/node/stock_server.js: socket.io
and its Redis adapter, nothing of the fleet's), listed as `workers.upstreams` and checked with
`balancer.health_check: engineio`: every transport placed on both and sticky, a room publish
reaching each member once, a SIGKILLed server ejected with its clients moving to the other,
the load the balancer's own count of open sessions, and without `engineio` never ready."""

import collections
import signal

import requests

from fleet_harness import NODE_DIR, Balancer, Client, Proc, free_port, metric, port_open, wait_until

TRANSPORTS = {"polling": ["polling"], "websocket": ["websocket"], "upgrade": ["polling", "websocket"]}


class NodeServer(Proc):
    """`node stock_server.js` on a free port, `whoami` answering `name`."""

    def __init__(self, redis_url, name):
        self.port = free_port()
        self.id = name
        super().__init__(f"node-{name}", ["node", str(NODE_DIR / "stock_server.js")],
                         env={"PORT": str(self.port), "ID": name, "REDIS_URL": redis_url})
        wait_until(lambda: port_open(self.port), 15, what=f"{name} listening")

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"


def node_fleet(closer, tmp_path, redis, health_check="engineio", placement="consistent"):
    """Two stock servers and a balancer in front of them (probed every 250 ms)."""
    servers = [closer.add(NodeServer(redis.url, f"n{i}")) for i in range(2)]
    upstreams = ", ".join(f'"{s.addr}"' for s in servers)
    b = closer.add(Balancer(
        tmp_path, redis.url, count=2, spawn=False,
        extra=f"  upstreams: [{upstreams}]\n"
              f"balancer:\n  health_check: {health_check}\n  health_check_interval_ms: 250\n"
              f"  placement: {placement}\n"))
    return servers, b


def up(b, server):
    return metric(b.metrics(), "fleet_balancer_worker_up", worker=server.addr)


def wait_all_up(b, servers):
    wait_until(lambda: all(up(b, s) == 1 for s in servers), 15, what="the balancer sees both servers up")
    wait_until(lambda: requests.get(b.admin + "/readyz", timeout=2).status_code == 200, 10,
               what="balancer ready")


def test_stock_socketio_servers_every_transport_sticky_ejected_on_kill(closer, tmp_path, redis):
    servers, b = node_fleet(closer, tmp_path, redis)
    wait_all_up(b, servers)

    clients = {name: [closer.add(Client(b.url, t, reconnection=True, name=f"{name}{i}")).connect()
                      for i in range(10)]
               for name, t in TRANSPORTS.items()}
    everyone = [c for group in clients.values() for c in group]
    home = {c: c.call("whoami")["worker"] for c in everyone}
    for name, group in clients.items():
        assert {home[c] for c in group} == {"n0", "n1"}, (name, collections.Counter(home[c] for c in group))
        if name != "polling":
            assert all(c.transport() == "websocket" for c in group), name
    # Sticky: every call of a session, polling ones through many requests, reaches its server.
    for _ in range(5):
        for c in everyone:
            assert c.call("whoami")["worker"] == home[c], c.name

    # One publish reaches every member once, on whichever server it is.
    for c in everyone:
        assert c.call("join", "all")["ok"]
    assert everyone[0].call("publish", {"room": "all", "data": "hello"})["ok"]
    wait_until(lambda: all(c.data_received() == ["hello"] for c in everyone), 10,
               what="the publish reached every member")

    # Probe sessions are closed as they are made: a server holds its clients' sessions and at
    # most the odd probe in flight, not one per probe (4 a second) since it started.
    per_server = collections.Counter(home.values())
    for server in ("n0", "n1"):
        asker = next(c for c in everyone if home[c] == server)
        held = asker.call("sessions")
        assert per_server[server] <= held <= per_server[server] + 2, (server, held, per_server)

    # SIGKILL n1: the balancer ejects it, its clients come back on n0, n0's never notice.
    victim = servers[1]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    wait_until(lambda: up(b, victim) == 0, 5, what="the killed server ejected")
    moved = [c for c in everyone if home[c] == "n1"]
    stayed = [c for c in everyone if home[c] == "n0"]
    wait_until(lambda: all(c.connects >= 2 and c.call("whoami", timeout=2)["worker"] == "n0" for c in moved),
               20, interval=0.1, what="n1's clients reconnected to n0")
    assert all(c.connects == 1 for c in stayed), [c.disconnect_reasons for c in stayed if c.connects != 1]
    # Polling sessions on the dead server were told their session is gone, not a 502.
    assert metric(b.metrics(), "fleet_balancer_sticky_rejects_total", reason="worker_down") >= 1
    for name, t in TRANSPORTS.items():
        fresh = [closer.add(Client(b.url, t, name=f"new-{name}{i}")).connect() for i in range(3)]
        assert {c.call("whoami")["worker"] for c in fresh} == {"n0"}, name


def test_load_is_the_count_of_sessions_still_open(closer, tmp_path, redis):
    """A stock server reports no load: the balancer counts the sessions it placed, less those it
    saw end, so after n0's sessions close the next ones all go to n0."""
    servers, b = node_fleet(closer, tmp_path, redis, placement="least-connections")
    wait_all_up(b, servers)
    first = [closer.add(Client(b.url, ["websocket"])).connect() for _ in range(6)]
    by_server = collections.defaultdict(list)
    for c in first:
        by_server[c.call("whoami")["worker"]].append(c)
    assert {k: len(v) for k, v in by_server.items()} == {"n0": 3, "n1": 3}
    for c in by_server["n0"]:
        c.close()
    wait_until(lambda: metric(b.metrics(), "fleet_balancer_websockets_active", worker=servers[0].addr) == 0,
               10, what="n0's WebSockets closed")
    later = [closer.add(Client(b.url, ["websocket"])).connect() for _ in range(3)]
    assert [c.call("whoami")["worker"] for c in later] == ["n0"] * 3


def test_without_engineio_checks_stock_servers_are_never_ready(closer, tmp_path, redis):
    """A stock server leaves `/readyz` hanging: the default check finds it down, and no
    session is placed on it."""
    servers, b = node_fleet(closer, tmp_path, redis, health_check="readyz")
    # Each server has been probed once (its series exists) and failed.
    wait_until(lambda: all(up(b, s) == 0 for s in servers), 10, what="both servers probed")
    assert requests.get(b.admin + "/readyz", timeout=2).status_code == 503
    for s in servers:
        try:
            requests.get(f"http://{s.addr}/readyz", timeout=1)
            raise AssertionError("a stock server answered /readyz")
        except requests.exceptions.Timeout:
            pass
    # A handshake through the balancer finds no worker (nor any still answering its probe).
    r = requests.get(b.url + "/socket.io/?EIO=4&transport=polling", timeout=5)
    assert r.status_code == 503, (r.status_code, r.text)
    assert all(up(b, s) == 0 for s in servers)
