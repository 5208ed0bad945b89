"""Redis Sentinel, for real: a master, a replica and three sentinels (redis-server processes
this test starts). The fleet asks the sentinels for the master; the master is killed under
traffic; while the sentinels fail over, members on one worker keep hearing each other and new
clients still connect through the balancer; cross-worker delivery resumes within 5 s of the kill
on the promoted replica, with no worker restarted."""

import subprocess
import time

from fleet_harness import Balancer, Client, Proc, SteadyPublisher, free_port, metric, port_open, wait_until

MASTER = "fleetmaster"


def cli(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port), *map(str, args)], capture_output=True, text=True,
                         timeout=10)
    return out.stdout.strip().split("\n")


class RedisNode(Proc):
    def __init__(self, tmp_path, name, args):
        self.port = free_port()
        super().__init__(name, ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(tmp_path), *map(str, args)])
        wait_until(lambda: port_open(self.port), 10, what=f"{name} listening")


class Sentinel(Proc):
    def __init__(self, tmp_path, master_port, n):
        self.port = free_port()
        conf = tmp_path / f"sentinel-{n}.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n")
        super().__init__(f"sentinel-{n}", ["redis-server", str(conf), "--sentinel"])
        wait_until(lambda: port_open(self.port), 10, what=f"sentinel {n} listening")

    def master_info(self):
        lines = cli(self.port, "SENTINEL", "master", MASTER)
        return dict(zip(lines[::2], lines[1::2]))

    def master_port(self):
        lines = cli(self.port, "SENTINEL", "get-master-addr-by-name", MASTER)
        return int(lines[1]) if len(lines) == 2 else None


def test_a_sentinel_failover_costs_seconds_not_the_fleet(closer, tmp_path):
    master = closer.add(RedisNode(tmp_path, "redis-master", []))
    replica = closer.add(RedisNode(tmp_path, "redis-replica", ["--replicaof", "127.0.0.1", master.port]))
    wait_until(lambda: "master_link_status:up" in cli(replica.port, "INFO", "replication"), 15,
               what="replica in sync")
    sentinels = [closer.add(Sentinel(tmp_path, master.port, n)) for n in range(3)]
    # Each sentinel knows the replica and the two others before anything fails.
    wait_until(lambda: all(int(s.master_info().get("num-slaves", 0)) == 1
                           and int(s.master_info().get("num-other-sentinels", 0)) == 2 for s in sentinels),
               30, interval=0.2, what="sentinels know each other and the replica")

    nodes = ", ".join(f"127.0.0.1:{s.port}" for s in sentinels)
    b = closer.add(Balancer(tmp_path, "redis://127.0.0.1:6379", count=2,
                            redis_yaml=f"  sentinel: {{master: {MASTER}, nodes: [{nodes}]}}\n"
                                       "  reconnect_max_ms: 250\n"))
    b.wait_ready()
    # Members of one room on both workers, by polling and by WebSocket; two on w0.
    a = closer.add(Client(b.worker_url(0), transports=("websocket",), name="a").connect())
    a2 = closer.add(Client(b.worker_url(0), transports=("polling",), name="a2").connect())
    c = closer.add(Client(b.worker_url(1), transports=("polling", "websocket"), name="c").connect())
    for m in (a, a2, c):
        assert m.call("join", "room")["ok"]
    assert a.call("publish", {"room": "room", "data": "before"})["ok"]
    wait_until(lambda: "before" in c.data_received(), what="cross-worker delivery before the kill")

    # Publishes from w0 all along, one every 20 ms.
    publisher = SteadyPublisher(a, "room")
    killed_at = time.monotonic()
    master.proc.kill()
    # New clients arrive through the balancer during the failover.
    newcomers = []
    for _ in range(4):
        n = closer.add(Client(b.url, name="newcomer").connect())
        assert n.call("join", "room")["ok"]
        newcomers.append(n)

    wait_until(lambda: publisher.reached_since(c, killed_at + 0.05), 15, interval=0.05,
               what="cross-worker delivery after the failover")
    resumed_after = time.monotonic() - killed_at
    numbers = publisher.stop()
    print(f"cross-worker delivery resumed {resumed_after:.2f} s after the kill")
    assert resumed_after < 5, f"cross-worker delivery resumed {resumed_after:.1f} s after the kill"

    # The sentinels promoted the replica; the workers follow it, with no restart.
    assert sentinels[0].master_port() == replica.port
    for i in range(2):
        m = b.worker_metrics(i)
        assert metric(m, "fleet_worker_redis_up") == 1
        assert metric(m, "fleet_worker_redis_reconnects_total") >= 1
    assert "master" in cli(replica.port, "ROLE")[0]
    # Local delivery never stopped: a2 (same worker as the publisher) got every publish.
    wait_until(lambda: set(numbers) <= set(a2.data_received()), what="every publish on w0")
    assert len(a2.data_received()) == len(set(a2.data_received())), "no duplicates"
    # Every newcomer is a member that hears publishes again, wherever it was placed.
    assert a.call("publish", {"room": "room", "data": "after"})["ok"]
    for m in [c, *newcomers]:
        wait_until(lambda m=m: "after" in m.data_received(), what=f"{m.name} hears after the failover")
