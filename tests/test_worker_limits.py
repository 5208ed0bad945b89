"""The worker's edge: WebSocket handshakes per RFC 6455, the WebSocket message limit
(socketio.max_payload_bytes, closed with 1009), and the per-socket limits of socketio.limits
(events_per_sec, max_rooms_per_socket), counted in fleet_worker_limited_total{kind}."""

import base64
import os
import socket
import struct
import threading
import time


from fleet_harness import Balancer, Client, FrameReader, Worker, free_port, metric, wait_until

MAX_PAYLOAD = 100_000
KEY = base64.b64encode(os.urandom(16)).decode()
WS_PATH = "/socket.io/?EIO=4&transport=websocket"


def limited_worker(closer, tmp_path, redis, limits=""):
    """A worker of a one-worker fleet file with `socketio.limits` set from `limits`."""
    port = free_port()
    cfg = tmp_path / f"fleet-{port}.yaml"
    cfg.write_text(
        f"redis:\n  url: {redis.url}\n"
        f"workers:\n  count: 1\n  host: 127.0.0.1\n  base_port: {port}\n"
        f"socketio:\n  max_payload_bytes: {MAX_PAYLOAD}\n  limits:\n{limits or '    {}'}\n"
    )
    w = closer.add(Worker(config=cfg, index=0, wid="w0", port=port))
    w.wait_ready()
    return w


def limited(w, kind):
    return metric(w.metrics(), "fleet_worker_limited_total", kind=kind)


# --- raw WebSockets ---------------------------------------------------------------------


def handshake_headers(**override):
    headers = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": KEY,
    }
    for name, value in override.items():
        name = name.replace("_", "-")
        headers.pop(name, None)
        if value is not None:
            headers[name] = value
    return headers


def open_ws(port, headers=None, timeout=5):
    """Sends a handshake; returns (status, head, socket, bytes read past the head)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or handshake_headers()).items())
    s.sendall(f"GET {WS_PATH} HTTP/1.1\r\n{head}\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, head.decode("latin-1"), s, rest


def handshake_status(port, **override):
    status, head, s, _ = open_ws(port, handshake_headers(**override))
    s.close()
    return status, head


def client_frame(opcode, payload, fin=True, announce=None):
    """A masked client frame; `announce` claims a payload length other than the one sent."""
    length = len(payload) if announce is None else announce
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def engine_ws(port):
    """An open Engine.IO WebSocket session: its socket and a reader past the open packet."""
    status, head, s, rest = open_ws(port)
    assert status == 101, head
    reader = FrameReader(s, rest)
    opcode, payload = reader.next()
    assert opcode == 0x1 and payload.startswith(b"0{"), payload
    return s, reader


def send_oversized_frame(s):
    """A text frame announcing 15 MB, of which only its first 64 KiB are sent."""
    s.sendall(client_frame(0x1, b"4" + b"x" * 65535, announce=15_000_000))


def send_fragments(s, stop, sent, total=60_000_000, fragment=32 * 1024):
    """A text message in fragments of `fragment` bytes, up to `total`, until `stop` is set or
    the connection fails; `sent[0]` counts the bytes sent."""
    chunk = b"x" * fragment
    try:
        s.sendall(client_frame(0x1, b"4" + chunk[1:], fin=False))
        sent[0] += fragment
        while sent[0] < total and not stop.is_set():
            s.sendall(client_frame(0x0, chunk, fin=False))
            sent[0] += fragment
    except OSError:
        pass


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- handshakes ---------------------------------------------------------------------------

INVALID = [
    ({"Sec-WebSocket-Version": "8"}, 426),
    ({"Sec-WebSocket-Version": None}, 426),
    ({"Upgrade": "h2c"}, 400),
    ({"Sec-WebSocket-Key": "a" * 5000}, 400),
    ({"Sec-WebSocket-Key": base64.b64encode(os.urandom(15)).decode()}, 400),
    ({"Connection": "keep-alive"}, 400),
]


def check_handshakes(port):
    for override, expected in INVALID:
        status, head = handshake_status(port, **{k.replace("-", "_"): v for k, v in override.items()})
        assert status == expected, (override, head)
        if expected == 426:
            assert "sec-websocket-version: 13" in head.lower(), head
        # A refused upgrade ends its connection.
        assert "connection: close" in head.lower(), head
    status, head = handshake_status(port)
    assert status == 101, head


def test_invalid_handshakes_are_refused_by_a_worker(closer, tmp_path, redis):
    w = limited_worker(closer, tmp_path, redis)
    check_handshakes(w.port)
    # Token case and lists are as RFC 7230 has them.
    status, head = handshake_status(w.port, Upgrade="WebSocket", Connection="keep-alive, Upgrade")
    assert status == 101, head
    assert w.alive()


def test_handshakes_and_message_limit_through_the_balancer(closer, tmp_path, redis):
    """Through a balancer that hands WebSocket connections to its workers."""
    b = closer.add(Balancer(tmp_path, redis.url, count=1))
    b.wait_ready()
    check_handshakes(b.port)
    # A handed-over WebSocket has the message limit too.
    s, reader = engine_ws(b.port)
    send_oversized_frame(s)
    assert reader.close_code() == 1009
    s.close()
    wait_until(lambda: metric(b.worker_metrics(0), "fleet_worker_limited_total", kind="message_size") == 1, 5,
               what="the close counted")
    # Every refused connection was reported closed: none stays counted as a WebSocket.
    wait_until(lambda: metric(b.metrics(), "fleet_balancer_websockets_active") == 0, 5,
               what="no WebSocket left counted")
    assert b.alive()


# --- WebSocket message size ----------------------------------------------------------------


def test_oversized_websocket_frames_are_closed_with_1009(closer, tmp_path, redis):
    w = limited_worker(closer, tmp_path, redis)
    pid = w.proc.pid
    before = rss_kb(pid)
    conns = [engine_ws(w.port) for _ in range(8)]
    codes = [None] * len(conns)

    def oversize(i):
        s, reader = conns[i]
        send_oversized_frame(s)
        codes[i] = reader.close_code()

    threads = [threading.Thread(target=oversize, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert codes == [1009] * len(conns), codes
    growth_mb = (rss_kb(pid) - before) / 1024
    print(f"RSS growth with {len(conns)} clients announcing 15 MB frames: {growth_mb:.1f} MB")
    assert growth_mb < 100, growth_mb
    wait_until(lambda: limited(w, "message_size") == len(conns), 5, what="the closes counted")
    for s, _ in conns:
        s.close()

    # A message in fragments: closed as soon as it passes the limit, not after 60 MB.
    s, reader = engine_ws(w.port)
    stop, sent = threading.Event(), [0]
    sender = threading.Thread(target=send_fragments, args=(s, stop, sent))
    sender.start()
    code = reader.close_code()
    stop.set()
    sender.join(10)
    s.close()
    assert code == 1009
    print(f"fragmented message: closed after {sent[0]} bytes sent")
    assert sent[0] < 10_000_000, sent
    wait_until(lambda: limited(w, "message_size") == len(conns) + 1, 5, what="the close counted")
    assert (rss_kb(pid) - before) / 1024 < 100
    assert w.alive()


def test_a_message_just_under_the_limit_is_served(closer, tmp_path, redis):
    w = limited_worker(closer, tmp_path, redis)
    c = closer.add(Client(w.url, ["websocket"])).connect()
    # `42["echo","..."]` framing included, just under the limit.
    text = "y" * (MAX_PAYLOAD - 100)
    assert c.call("echo", text) == text
    assert limited(w, "message_size") == 0


# --- events_per_sec -----------------------------------------------------------------------

RATE = 20


def test_a_flooding_socket_is_held_to_its_rate(closer, tmp_path, redis):
    w = limited_worker(closer, tmp_path, redis, f"    events_per_sec: {RATE}")
    flood = closer.add(Client(w.url, ["websocket"], name="flood")).connect()
    calm = closer.add(Client(w.url, ["websocket"], name="calm")).connect()
    flood_acks, calm_acks = [], []
    lock = threading.Lock()

    def ack_to(acks):
        def cb(*args):
            with lock:
                acks.append(args)
        return cb

    window, sent_calm, sent_flood = 2.0, 0, 0
    started = time.monotonic()
    next_calm = started
    # The flood sends about 2,000 a second for the whole window, the calm socket 5 a second.
    while time.monotonic() - started < window:
        for _ in range(20):
            flood.sio.emit("echo", sent_flood, callback=ack_to(flood_acks))
            sent_flood += 1
        if time.monotonic() >= next_calm:
            calm.sio.emit("echo", sent_calm, callback=ack_to(calm_acks))
            sent_calm += 1
            next_calm += 0.2
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    wait_until(lambda: len(calm_acks) == sent_calm, 5, what="every calm ack")
    # The flood's answers stop coming once its burst and refills are answered.
    def settled():
        n = len(flood_acks)
        time.sleep(0.3)
        return n == len(flood_acks)
    wait_until(settled, 5, what="the flood's acks settle")
    got = len(flood_acks)
    allowed = 2 * RATE + RATE * elapsed
    print(f"flood: {sent_flood} sent in {elapsed:.2f}s, {got} acked (allowed ~{allowed:.0f})")
    assert sent_flood > 4 * allowed, "the flood did not flood"
    assert 2 * RATE <= got <= allowed * 1.5 + 10, (got, allowed)
    dropped = limited(w, "events")
    assert dropped == sent_flood - got, (dropped, sent_flood, got)
    assert calm.sio.connected and flood.sio.connected


# --- max_rooms_per_socket -----------------------------------------------------------------


def test_joins_beyond_the_room_limit_are_refused(closer, tmp_path, redis):
    w = limited_worker(closer, tmp_path, redis, "    max_rooms_per_socket: 3")
    c = closer.add(Client(w.url, ["websocket"])).connect()
    for room in ["a", "b", "c"]:
        assert c.call("join", room) == {"ok": True, "room": room}
    assert c.call("join", "d") == {"ok": False, "error": "too many rooms"}
    # A room it is in already is no new room.
    assert c.call("join", "a") == {"ok": True, "room": "a"}
    assert limited(w, "rooms") == 1
    assert c.call("leave", "b") == {"ok": True, "room": "b"}
    assert c.call("join", "d") == {"ok": True, "room": "d"}
    assert c.call("join", "e") == {"ok": False, "error": "too many rooms"}
    assert limited(w, "rooms") == 2
    # The limit is per socket.
    other = closer.add(Client(w.url, ["polling"])).connect()
    assert other.call("join", "e") == {"ok": True, "room": "e"}


def test_every_kind_is_exported_from_the_start(closer, tmp_path, redis):
    w = limited_worker(closer, tmp_path, redis)
    m = w.metrics()
    for kind in ["events", "rooms", "message_size"]:
        assert f'fleet_worker_limited_total{{kind="{kind}",worker="w0"}}' in m, kind


# --- an app of its own --------------------------------------------------------------------


def test_an_app_of_its_own_is_limited_too(closer, tmp_path, redis):
    """apps/chat, spawned by a balancer: its events meet the same gate, and its `join`
    (Fleet::join) the same room limit."""
    from fleet_harness import BIN_DIR
    rate = 10
    extra = (f"  command: [{BIN_DIR / 'chat'}]\n"
             f"socketio:\n  limits:\n    events_per_sec: {rate}\n    max_rooms_per_socket: 2\n")
    b = closer.add(Balancer(tmp_path, redis.url, count=1, extra=extra))
    b.wait_ready()
    c = closer.add(Client(b.url, ["websocket"])).connect()
    assert c.call("join", "a")["ok"] is True
    assert c.call("join", "b")["ok"] is True
    assert c.call("join", "c") == {"ok": False, "error": "too many rooms"}
    acks, lock = [], threading.Lock()

    def cb(*args):
        with lock:
            acks.append(args)

    sent, started = 0, time.monotonic()
    while time.monotonic() - started < 1.0:
        for _ in range(20):
            c.sio.emit("join", "a", callback=cb)
            sent += 1
        time.sleep(0.01)
    elapsed = time.monotonic() - started

    def settled():
        n = len(acks)
        time.sleep(0.3)
        return n == len(acks)
    wait_until(settled, 5, what="the acks settle")
    # The three joins above took 3 of the bucket's 2 x rate.
    assert len(acks) <= 2 * rate + rate * elapsed + 10, (len(acks), sent)
    wm = b.worker_metrics(0)
    assert metric(wm, "fleet_worker_limited_total", kind="events") == sent - len(acks)
    assert metric(wm, "fleet_worker_limited_total", kind="rooms") == 1
