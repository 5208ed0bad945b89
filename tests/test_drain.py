"""SIGTERM drain: not ready at once, transports closed (clients reconnect, no Socket.IO
disconnect packet), spread over the window, exit 0 within it."""

import signal
import time

from fleet_harness import Client, Worker, wait_until


def test_sigterm_drains_and_clients_reconnect(closer, redis):
    port = None
    w = closer.add(Worker(redis.url, wid="d0", drain_secs=3))
    port = w.port
    w.wait_ready()
    transports = [["polling"], ["websocket"], ["polling", "websocket"]] * 3
    clients = [
        closer.add(Client(w.url, t, reconnection=True, name=f"c{i}")).connect()
        for i, t in enumerate(transports)
    ]
    for c in clients:
        c.call("join", "r")
    wait_until(lambda: clients[2].transport() == "websocket", 5, what="upgrade")

    w.signal(signal.SIGTERM)
    t0 = time.monotonic()
    wait_until(lambda: w.readyz()[0] == 503, 1, what="readyz 503 at once")
    assert "draining" in w.readyz()[1]
    cut_at = {}
    def all_cut():
        for c in clients:
            if c.disconnect_reasons and c.name not in cut_at:
                cut_at[c.name] = time.monotonic() - t0
        return len(cut_at) == len(clients)
    wait_until(all_cut, 5, interval=0.01, what="every client's transport closed")
    code = w.wait_exit(5)
    exited = time.monotonic() - t0
    assert code == 0
    assert exited <= 3.5, f"exited after {exited:.2f}s, window 3s"
    # Spread, not a storm: the cuts cover most of the window.
    times = sorted(cut_at.values())
    assert times[-1] - times[0] >= 1.5, f"cuts not spread: {times}"
    for c in clients:
        assert c.disconnect_reasons[0] != "io server disconnect", (c.name, c.disconnect_reasons)

    # The clients keep trying: a new worker on the same port gets every one of them back.
    w2 = closer.add(Worker(redis.url, wid="d1", port=port))
    w2.wait_ready()
    try:
        wait_until(lambda: all(c.connects >= 2 for c in clients), 10, what="every client reconnected")
    finally:
        print([(c.name, c.transports, c.connects, c.disconnect_reasons) for c in clients])
    assert {c.call("whoami")["worker"] for c in clients} == {"d1"}
