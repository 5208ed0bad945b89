"""Redis Cluster, for real: three masters and three replicas (redis-server processes this test
starts, joined by `redis-cli --cluster create`). Room channels are sharded (SSUBSCRIBE/
SPUBLISH), so rooms spread over the shards; every member gets each publish once. A master is
killed under traffic: members on the publishing worker keep hearing it, new clients still
connect through the balancer, and cross-worker delivery in the dead master's rooms resumes
within 10 s of the kill on the promoted replica, with no worker restarted."""

import re
import subprocess
import time

from fleet_harness import Balancer, Client, Proc, SteadyPublisher, free_port_with_bus, metric, port_open, wait_until


def cli(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port), *map(str, args)], capture_output=True, text=True,
                         timeout=20)
    return out.stdout.strip().split("\n")


class ClusterNode(Proc):
    def __init__(self, tmp_path):
        self.port = free_port_with_bus()
        super().__init__(f"redis-cluster-{self.port}", [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path), "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
            "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0"])
        wait_until(lambda: port_open(self.port), 10, what=f"cluster node {self.port}")

    def info(self, section):
        return dict(line.split(":", 1) for line in cli(self.port, *section.split()) if ":" in line)


def make_cluster(closer, tmp_path):
    nodes = [closer.add(ClusterNode(tmp_path)) for _ in range(6)]
    out = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                          "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_until(lambda: all(n.info("CLUSTER INFO").get("cluster_state") == "ok" for n in nodes), 30,
               interval=0.2, what="cluster ok")
    # Every replica in sync with its master: one that is not may not take over.
    wait_until(lambda: all(n.info("INFO replication").get("master_link_status", "up") == "up" for n in nodes),
               30, interval=0.2, what="replicas in sync")
    return nodes


def masters(nodes):
    return [n for n in nodes if n.info("INFO replication").get("role") == "master"]


def owner(nodes, channel):
    """The master serving `channel`'s slot."""
    slot = int(cli(nodes[0].port, "CLUSTER", "KEYSLOT", channel)[0])
    for n in masters(nodes):
        for line in cli(n.port, "CLUSTER", "NODES"):
            fields = line.split()
            if "myself" in fields[2]:
                for span in fields[8:]:
                    lo, _, hi = span.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return n
    raise AssertionError(f"no master for slot {slot}")


def channel(room):
    return f"fleet-room#/#{room}#"


def test_rooms_spread_over_shards_and_a_master_failover_costs_seconds(closer, tmp_path):
    nodes = make_cluster(closer, tmp_path)
    seeds = ", ".join(f"127.0.0.1:{n.port}" for n in masters(nodes))
    b = closer.add(Balancer(tmp_path, "redis://127.0.0.1:6379", count=2,
                            redis_yaml=f"  cluster: [{seeds}]\n  reconnect_max_ms: 250\n"))
    b.wait_ready()
    a = closer.add(Client(b.worker_url(0), transports=("websocket",), name="a").connect())
    a2 = closer.add(Client(b.worker_url(0), transports=("polling",), name="a2").connect())
    c = closer.add(Client(b.worker_url(1), transports=("polling", "websocket"), name="c").connect())
    rooms = [f"room-{n}" for n in range(30)]
    for room in rooms:
        for m in (a, a2, c):
            assert m.call("join", room)["ok"]
    # Each master serves some of the rooms' channels, two workers listening to each.
    spread = {n.port: len([ch for ch in cli(n.port, "PUBSUB", "SHARDCHANNELS", "fleet-room#*") if ch])
              for n in masters(nodes)}
    assert sum(spread.values()) == 30 and all(v > 0 for v in spread.values()), spread
    assert cli(owner(nodes, channel("room-0")).port, "PUBSUB", "SHARDNUMSUB", channel("room-0"))[1] == "2"

    # Redis memory per master, one series each.
    def memory_nodes():
        return {re.search(r'node="([^"]*)"', k).group(1) for k in b.worker_metrics(0)
                if k.startswith("fleet_worker_redis_memory_bytes{")}

    wait_until(lambda: len(memory_nodes()) == 3, 15, what="a memory series per master")
    assert memory_nodes() == {f"127.0.0.1:{n.port}" for n in masters(nodes)}

    # Exactly once in every room, across the shards.
    for room in rooms:
        assert a.call("publish", {"room": room, "data": room})["ok"]
    for m in (a, a2, c):
        wait_until(lambda m=m: len(m.data_received()) >= 30, what=f"{m.name}: 30 messages")
    assert c.call("echo", 1) == 1
    for m in (a, a2, c):
        assert sorted(m.data_received()) == sorted(rooms), m.name

    # Under traffic in room-0, kill the master serving its channel.
    victim = owner(nodes, channel("room-0"))
    publisher = SteadyPublisher(a, "room-0")
    killed_at = time.monotonic()
    victim.proc.kill()
    newcomers = [closer.add(Client(b.url, name=f"newcomer{i}").connect()) for i in range(4)]
    for n in newcomers:
        assert n.call("join", "room-0")["ok"]

    wait_until(lambda: publisher.reached_since(c, killed_at + 0.05), 20, interval=0.05,
               what="cross-worker delivery after the failover")
    resumed_after = time.monotonic() - killed_at
    numbers = publisher.stop()
    print(f"cross-worker delivery resumed {resumed_after:.2f} s after the kill")
    assert resumed_after < 10, f"cross-worker delivery resumed {resumed_after:.1f} s after the kill"
    # Delivery resumes on the first renewed channel; a worker reports Redis up once every
    # room channel is renewed, which may take a moment longer on the other worker.
    for i in range(2):
        wait_until(lambda i=i: metric(b.worker_metrics(i), "fleet_worker_redis_up") == 1, 10,
                   what=f"w{i} reports Redis up after the failover")
        assert metric(b.worker_metrics(i), "fleet_worker_redis_up") == 1
    # Members on the publishing worker heard every publish, once.
    wait_until(lambda: set(numbers) <= set(a2.data_received()), what="every publish on w0")
    assert len(a2.data_received()) == len(set(a2.data_received()))
    # After the failover every member hears every room again, newcomers included.
    assert a.call("publish", {"room": "room-0", "data": "after"})["ok"]
    for m in [c, *newcomers]:
        wait_until(lambda m=m: "after" in m.data_received(), what=f"{m.name} hears after the failover")
    assert owner(nodes, channel("room-0")) is not victim
