"""Long-polling requests handed to the workers: with `workers.handoff` and
`workers.handoff_polling` on (and TLS off), the first request of a connection that names a
session leaves the balancer as a file descriptor, and the connection stays with the worker for
the later requests of sessions it holds; any other request on it (another worker's session, a
new session) sends the connection back to the balancer, which routes it. Raw sockets check the framing (a POST body in the head's
packet or after it), python-socketio clients the delivery, stickiness and worker death."""

import collections
import json
import os
import signal
import socket
import time

import pytest
import requests

from fleet_harness import Balancer, Client, metric, wait_until
from test_balancer import _worker_pid, balancer_sockets, websockets_active

POLL = "/socket.io/?EIO=4&transport=polling"
LIMITS = "balancer:\n  limits:\n    connections_per_ip: {conns}\n    handshakes_per_ip_per_sec: 0\n"


def start(closer, tmp_path, redis, handoff_polling=True, extra="", **kw):
    """A fleet with polling connections handed off (the default), or as `extra` says."""
    extra = ("  handoff_polling: true\n" if handoff_polling else "") + extra
    b = closer.add(Balancer(tmp_path, redis.url, extra=extra, **kw))
    b.wait_ready()
    return b


def connect(port, timeout=10):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def answer(s, wait_close=True):
    """One response read off `s` (Content-Length or chunked): (status line, headers, body, closed),
    `closed` telling whether the peer closed the connection right after it (None unless
    `wait_close`)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"closed before a full head: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk, f"closed partway through the body: {body!r}"
            body += chunk
        body, raw = b"", body
        while True:
            size, _, raw = raw.partition(b"\r\n")
            if int(size, 16) == 0:
                break
            body, raw = body + raw[:int(size, 16)], raw[int(size, 16) + 2:]
        length = len(body)
    else:
        length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"closed partway through the body: {body!r}"
        body += chunk
    closed = None
    if wait_close:
        try:
            s.settimeout(5)
            closed = s.recv(1) == b""
        except (socket.timeout, ConnectionResetError):
            closed = False
    return lines[0], headers, body[:length].decode(), closed


def send(s, method, target, body=b"", split=None, pause=0.3):
    """Writes one request on `s`. `split`: how many body bytes go in the head's packet (all of
    them when None); the rest follows `pause` seconds later."""
    head = (f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain;charset=UTF-8\r\n"
            + (f"Content-Length: {len(body)}\r\n" if method == "POST" else "") + "\r\n").encode()
    cut = len(body) if split is None else split
    s.sendall(head + body[:cut])
    if cut < len(body):
        time.sleep(pause)
        s.sendall(body[cut:])


def request(port, method, target, body=b"", split=None, pause=0.3, wait_close=False):
    """One request on a fresh connection, closed after its answer."""
    s = connect(port)
    send(s, method, target, body, split, pause)
    try:
        return answer(s, wait_close)
    finally:
        s.close()


def handshake(port):
    status, headers, body, closed = request(port, "GET", POLL, wait_close=True)
    assert status == "HTTP/1.1 200 OK", (status, body)
    return json.loads(body[1:])["sid"], headers, closed


def open_session(port):
    """A handshake and the Socket.IO connect; returns the (tagged) sid."""
    sid, _, _ = handshake(port)
    status, _, body, _ = request(port, "POST", f"{POLL}&sid={sid}", b"40")
    assert (status, body) == ("HTTP/1.1 200 OK", "ok")
    poll_for(port, sid, "40{")
    return sid


def poll_for(port, sid, prefix):
    """Polls (a few times: a ping may come first) until a packet starting with `prefix`."""
    seen = []
    for _ in range(5):
        status, _, body, _ = request(port, "GET", f"{POLL}&sid={sid}")
        assert status == "HTTP/1.1 200 OK", (status, body)
        seen += packets(body)
        found = [p for p in seen if p.startswith(prefix)]
        if found:
            return found
    raise AssertionError(f"no {prefix!r} in {seen}")


def hold_poll(port, sid):
    """A poll the worker holds (nothing to send yet): its socket. One answered at once (a ping
    was waiting) is ponged and tried again."""
    for _ in range(5):
        c = connect(port, timeout=0.5)
        c.sendall(f"GET {POLL}&sid={sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        try:
            c.recv(65536)
        except socket.timeout:
            return c
        c.close()
        assert request(port, "POST", f"{POLL}&sid={sid}", b"3")[2] == "ok"
    raise AssertionError("every poll was answered at once")


def packets(payload):
    """The Engine.IO packets of a polling payload (a ping may come first)."""
    return payload.split("\x1e")


def test_polling_requests_with_a_sid_leave_the_balancer(closer, tmp_path, redis):
    """The handshake is proxied (its sid gets the worker's tag) and answered `Connection:
    close`; the next request, on a new connection, takes that connection to the worker, which
    answers the session's later requests on it without the balancer. A request of another
    worker's session, or a new session, on that connection sends it back to the balancer: each
    is answered as through the balancer, in order, on the same connection. None counts as a
    WebSocket."""
    b = start(closer, tmp_path, redis, count=2)
    sid, headers, closed = handshake(b.port)
    assert "." in sid and headers.get("connection", "").lower() == "close" and closed, headers
    kept = connect(b.port)
    send(kept, "POST", f"{POLL}&sid={sid}", b"40")
    status, headers, body, _ = answer(kept, wait_close=False)
    assert (status, body) == ("HTTP/1.1 200 OK", "ok")
    assert headers.get("connection", "").lower() != "close", headers

    def polls():
        return metric(b.metrics(), "fleet_balancer_requests_total", transport="polling")

    # The session's next requests on the kept connection never reach the balancer.
    before = polls()
    seen = []
    for _ in range(5):
        send(kept, "GET", f"{POLL}&sid={sid}")
        status, _, body, _ = answer(kept, wait_close=False)
        assert status == "HTTP/1.1 200 OK", (status, body)
        seen += packets(body)
        if any(p.startswith("40{") for p in seen):
            break
    assert any(p.startswith("40{") for p in seen), seen
    assert polls() == before, "answered by the worker alone"

    # A session of the other worker on the same connection: given back, routed, answered.
    other = sid
    for _ in range(40):
        other = open_session(b.port)
        if other.split(".")[0] != sid.split(".")[0]:
            break
    assert other.split(".")[0] != sid.split(".")[0], "no session landed on the other worker"
    send(kept, "POST", f"{POLL}&sid={other}", b'421["echo","there"]')
    status, _, body, _ = answer(kept, wait_close=False)
    assert (status, body) == ("HTTP/1.1 200 OK", "ok"), body
    assert any(json.loads(p[3:]) == ["there"] for p in poll_for(b.port, other, "431"))
    # ... and the first session's requests on it again, now from the other worker's keeping.
    send(kept, "POST", f"{POLL}&sid={sid}", b'422["echo","back"]')
    status, _, body, _ = answer(kept, wait_close=False)
    assert (status, body) == ("HTTP/1.1 200 OK", "ok"), body
    assert any(json.loads(p[3:]) == ["back"] for p in poll_for(b.port, sid, "432"))

    # A new session on it: given back and placed by the balancer (its sid tagged).
    send(kept, "GET", POLL)
    status, headers, body, _ = answer(kept, wait_close=False)
    assert status == "HTTP/1.1 200 OK" and "." in json.loads(body[1:])["sid"], (status, body)
    kept.close()
    kept_total = lambda outcome: sum(metric(b.worker_metrics(i), "fleet_worker_kept_requests_total",  # noqa: E731
                                            outcome=outcome) or 0 for i in range(2))
    # The polls above were served on the kept connection; the other session's POST, the first
    # session's back on the other worker, and the handshake were given back.
    assert kept_total("served") >= 1 and kept_total("given_back") >= 3, (kept_total("served"),
                                                                        kept_total("given_back"))

    # Pending polls, each held by its worker: the balancer holds none of their sockets.
    sids = [open_session(b.port) for _ in range(20)]
    before = balancer_sockets(b)
    held = [hold_poll(b.port, s) for s in sids]
    assert balancer_sockets(b) - before < 10, balancer_sockets(b) - before  # proxied: 40 or more
    m = b.metrics()
    assert websockets_active(b) == 0
    assert metric(m, "fleet_balancer_requests_total", transport="polling") >= 3 + 20 * 3 + 20
    assert metric(m, "fleet_balancer_websocket_handoffs_total", outcome="passed") == 0
    for c in held:
        c.close()


@pytest.mark.parametrize("split", [None, 0, 7], ids=["same-packet", "later-packet", "split"])
def test_a_post_body_arrives_whole_wherever_it_was_in_the_packets(closer, tmp_path, redis, split):
    """A handed-off POST whose body came with its head (read by the balancer, passed on with
    the head), after it (left in the socket for the worker), or partly each: the worker reads
    all of it, once."""
    b = start(closer, tmp_path, redis, count=2)
    sid = open_session(b.port)
    text = "x" * 3000 + "é"
    packet = ('421' + json.dumps(["echo", text])).encode()
    status, _, body, _ = request(b.port, "POST", f"{POLL}&sid={sid}", packet, split=split)
    assert (status, body) == ("HTTP/1.1 200 OK", "ok")
    acks = poll_for(b.port, sid, "431")
    assert len(acks) == 1 and json.loads(acks[0][len("431"):]) == [text], acks[0][:80]


def test_polling_clients_exactly_once_and_sticky(closer, tmp_path, redis):
    """60 polling-only clients over three workers, in one room: every publish reaches every
    client once, in order, and every request of a session reaches its worker."""
    b = start(closer, tmp_path, redis)
    clients = [closer.add(Client(b.url, ["polling"])).connect() for _ in range(60)]
    where = {c: c.call("whoami")["worker"] for c in clients}
    assert set(where.values()) == {"w0", "w1", "w2"}
    for c in clients:
        assert c.call("join", "all")["ok"]
    for i in range(20):
        assert clients[i * 3].call("publish", {"room": "all", "data": i})["ok"]
    for c in clients:
        wait_until(lambda c=c: len(c.data_received()) >= 20, 15, what="20 deliveries")
    time.sleep(0.5)
    for c in clients:
        assert c.data_received() == list(range(20)), c.data_received()
        assert c.call("whoami")["worker"] == where[c]
    m = b.metrics()
    assert sum(v for k, v in m.items() if k.startswith("fleet_balancer_sticky_rejects_total")) == 0
    assert websockets_active(b) == 0
    assert collections.Counter(where.values()).most_common(1)[0][1] <= 35


def test_a_request_after_its_worker_died_is_told_its_session_is_unknown(closer, tmp_path, redis):
    """Killed between two polling requests: the next one is answered 400 "Session ID unknown"
    (whether the handoff fails, the probes already caught up, or the restarted worker answers),
    and the polling client reconnects."""
    b = start(closer, tmp_path, redis, count=2)
    client = closer.add(Client(b.url, ["polling"], reconnection=True)).connect()
    worker, sid = client.call("whoami")["worker"], client.sio.eio.sid
    os.kill(_worker_pid(b, worker), signal.SIGKILL)
    time.sleep(0.05)
    status, _, body, _ = request(b.port, "GET", f"{POLL}&sid={sid}")
    assert status.startswith("HTTP/1.1 400 "), (status, body)
    assert json.loads(body) == {"code": 1, "message": "Session ID unknown"}
    wait_until(lambda: client.connects >= 2 and client.call("whoami", timeout=2)["worker"], 10, interval=0.2,
               what="the client works again")


def test_connections_per_ip_count_handed_off_polls_until_they_close(closer, tmp_path, redis):
    """Three polls held by the workers fill 127.0.0.1's three connections: a fourth is refused
    429 until one of them closes, which the worker reports back."""
    b = start(closer, tmp_path, redis, count=2, extra=LIMITS.format(conns=3))
    sids = [open_session(b.port) for _ in range(3)]
    held = [hold_poll(b.port, s) for s in sids]

    # Probed with handshakes: a poll of a held session would end the held one (two at once).
    def status():
        return request(b.port, "GET", POLL)[0]
    wait_until(lambda: status().startswith("HTTP/1.1 429 "), 5, interval=0.2, what="a fourth connection refused")
    assert status().startswith("HTTP/1.1 429 ")
    held.pop().close()
    wait_until(lambda: status() == "HTTP/1.1 200 OK", 10, interval=0.2, what="a slot freed by the closed poll")
    assert websockets_active(b) == 0
    for c in held:
        c.close()


@pytest.mark.parametrize("extra", ["  handoff_polling: false\n", "  handoff: false\n  handoff_polling: true\n"],
                         ids=["handoff-polling-off", "handoff-off"])
def test_without_it_polling_is_proxied_on_kept_alive_connections(closer, tmp_path, redis, extra):
    """With `handoff_polling: false`, or with `workers.handoff: false`, the balancer
    proxies every polling request and keeps the client's connection open between them."""
    b = start(closer, tmp_path, redis, count=1, handoff_polling=False, extra=extra)
    http = requests.Session()
    r = http.get(b.url + POLL, timeout=5)
    assert r.headers.get("connection", "").lower() == "keep-alive", r.headers
    sid = json.loads(r.text[1:])["sid"]
    r = http.post(f"{b.url}{POLL}&sid={sid}", data="40", timeout=5)
    assert r.text == "ok" and r.headers.get("connection", "").lower() == "keep-alive", r.headers


def test_a_kept_connection_answers_pipelined_requests_in_order(closer, tmp_path, redis):
    """Two requests of the session in one write on a kept connection: both answered, in order,
    by the worker; then one of a new session, pipelined behind a third: the third answered by
    the worker, the handshake given back with the bytes read and answered by the balancer."""
    b = start(closer, tmp_path, redis, count=2)
    sid = open_session(b.port)
    kept = connect(b.port)
    send(kept, "POST", f"{POLL}&sid={sid}", b"3")  # a pong: hands the connection over
    assert answer(kept, wait_close=False)[2] == "ok"
    post = lambda text: (f"POST {POLL}&sid={sid} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(text)}\r\n\r\n"  # noqa: E731
                         f"{text}").encode()
    kept.sendall(post('421["echo","one"]') + post('422["echo","two"]'))
    assert [body for _, body in answers(kept, 2)] == ["ok", "ok"]
    kept.sendall(post('423["echo","three"]') + f"GET {POLL} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    (_, third), (status, body) = answers(kept, 2)
    assert third == "ok"
    assert status == "HTTP/1.1 200 OK" and "." in json.loads(body[1:])["sid"], (status, body)
    kept.close()
    seen = []
    for _ in range(6):
        seen += [p[:3] for p in poll_for(b.port, sid, "43")]
        if {"431", "432", "433"} <= set(seen):
            break
    assert {"431", "432", "433"} <= set(seen), seen


def answers(s, n):
    """`n` responses read off `s` that may have arrived together (Content-Length framed; the
    balancer's tagged handshake answer chunked): [(status line, body)]."""
    buf, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" in buf:
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if headers.get("transfer-encoding", "").lower() == "chunked":
                if b"0\r\n\r\n" not in rest:
                    break
                raw, _, buf = rest.partition(b"0\r\n\r\n")
                body = b""
                while raw:
                    size, _, raw = raw.partition(b"\r\n")
                    body, raw = body + raw[:int(size, 16)], raw[int(size, 16) + 2:]
            else:
                length = int(headers.get("content-length", "0"))
                if len(rest) < length:
                    break
                body, buf = rest[:length], rest[length:]
            out.append((lines[0], body.decode()))
            if len(out) == n:
                return out
        chunk = s.recv(65536)
        assert chunk, f"closed after {out}: {buf!r}"
        buf += chunk
    return out


def test_a_client_cannot_ask_for_its_connection_to_be_kept(closer, tmp_path, redis):
    """`x-fleet-keep` is the balancer's to set: sent by a client on a WebSocket upgrade or a
    handshake it is dropped, and each is served as usual."""
    b = start(closer, tmp_path, redis, count=1)
    s = connect(b.port)
    s.sendall(f"GET {POLL} HTTP/1.1\r\nHost: x\r\nX-Fleet-Keep: AAAAAAAA\r\n\r\n".encode())
    status, _, body, _ = answer(s, wait_close=False)
    assert status == "HTTP/1.1 200 OK", (status, body)
    sid = json.loads(body[1:])["sid"]
    s.close()
    ws = connect(b.port)
    ws.sendall((f"GET /socket.io/?EIO=4&transport=websocket&sid={sid} HTTP/1.1\r\nHost: x\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Fleet-Keep: AAAAAAAA\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = ws.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    ws.close()
