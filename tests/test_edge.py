"""The balancer's public edge against hostile clients and floods, through spawned workers and
a real redis-server: whole-head timeouts, half-sent heads, long URIs, upgrade edge cases,
pipelining, per-address limits, and a prompt exit on SIGTERM."""

import base64
import json
import os
import signal
import socket
import threading
import time

import pytest
import requests

from fleet_harness import Balancer, Client, FrameReader, metric, wait_until

WS_KEY = base64.b64encode(b"0123456789abcdef").decode()


def start(closer, tmp_path, redis, **kw):
    b = closer.add(Balancer(tmp_path, redis.url, **kw))
    b.wait_ready()
    return b


def rejects(b, cls):
    return metric(b.metrics(), "fleet_balancer_rejects_total", **{"class": cls})


def connect(port, source="127.0.0.1", timeout=5):
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_all(s, limit=1 << 20):
    """Everything until the peer closes (or the socket's timeout)."""
    out = b""
    try:
        while len(out) < limit and (chunk := s.recv(65536)):
            out += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return out


def ws_head(extra="", query="EIO=4&transport=websocket"):
    return (f"GET /socket.io/?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
            f"{extra}\r\n").encode()


def ws_frame(text):
    """A masked client text frame."""
    data = text.encode()
    mask = os.urandom(4)
    assert len(data) < 126
    return bytes([0x81, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def upgrade(s, early=b""):
    """Sends a WebSocket upgrade (and `early` bytes in the same write); returns the status line
    and a reader positioned after the answer's head."""
    s.sendall(ws_head() + early)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], head, FrameReader(s, rest)


def test_a_head_sent_a_byte_at_a_time_is_dropped_when_its_time_is_up(closer, tmp_path, redis):
    """Slow-loris: 100 connections each send a byte every 0.3 s, forever. The whole head must
    arrive within header_timeout_secs, so every one is answered 408 and closed in time, while a
    normal client is served meanwhile; nothing is logged as an error."""
    b = start(closer, tmp_path, redis, extra="balancer:\n  header_timeout_secs: 2\n")
    closed_after = []
    lock = threading.Lock()

    def drip():
        s = connect(b.port, timeout=0.3)
        t0 = time.monotonic()
        answer = b""
        s.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n")
        for _ in range(40):  # 12 s at most
            try:
                s.sendall(b"X")
            except OSError:
                break
            try:
                chunk = s.recv(4096)
                answer += chunk
                if not chunk:
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        s.close()
        with lock:
            closed_after.append((time.monotonic() - t0, answer))

    threads = [threading.Thread(target=drip) for _ in range(100)]
    for t in threads:
        t.start()
    c = closer.add(Client(b.url, ["polling"])).connect()
    assert c.call("echo", "still served") == "still served"
    for t in threads:
        t.join(20)
    assert len(closed_after) == 100
    assert max(t for t, _ in closed_after) < 5, sorted(t for t, _ in closed_after)[-5:]
    assert all(a.startswith(b"HTTP/1.1 408 ") for _, a in closed_after)
    assert rejects(b, "header_timeout") == 100
    assert "ERROR" not in b.output()


def test_connections_closed_partway_through_a_head_are_counted_not_logged(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis)
    for _ in range(200):
        s = connect(b.port)
        s.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n")
        s.close()
    wait_until(lambda: rejects(b, "incomplete_head") == 200, 10, what="200 half heads counted")
    log = b.output()
    assert "ERROR" not in log
    # Logged once, then counted.
    assert log.count("incomplete_head") == 1, log


def test_a_long_request_line_is_414_and_a_large_head_431(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis)
    s = connect(b.port)
    s.sendall(b"GET /socket.io/?EIO=4&transport=polling&x=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_all(s).startswith(b"HTTP/1.1 414 ")
    s = connect(b.port)
    s.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 20_000 + b"\r\n\r\n")
    assert read_all(s).startswith(b"HTTP/1.1 431 ")
    assert rejects(b, "uri_too_long") == 1
    assert b.alive()


def test_a_polling_request_with_upgrade_headers_is_polling_not_a_websocket(closer, tmp_path, redis):
    """It is proxied, answered with a (tagged) open packet, and never counted as an open
    WebSocket; its session works."""
    b = start(closer, tmp_path, redis)
    s = connect(b.port)
    s.sendall(ws_head(query="EIO=4&transport=polling"))
    buf = b""
    while b"\r\n\r\n" not in buf or b"}" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    assert buf.startswith(b"HTTP/1.1 200 "), buf
    sid = json.loads(buf[buf.index(b"0{") + 1:buf.rindex(b"}") + 1])["sid"]
    m = b.metrics()
    assert sum(v for k, v in m.items() if k.startswith("fleet_balancer_websockets_active")) == 0
    r = requests.post(f"{b.url}/socket.io/?EIO=4&transport=polling&sid={sid}", data="40", timeout=5)
    assert r.status_code == 200 and r.text == "ok", (r.status_code, r.text)


@pytest.mark.parametrize("body", [
    b"Content-Length: 5\r\n\r\nhello",
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
], ids=["content-length", "chunked"])
def test_an_upgrade_request_with_a_body_is_refused(closer, tmp_path, redis, body):
    b = start(closer, tmp_path, redis, count=1)
    s = connect(b.port)
    s.sendall(ws_head()[:-2] + body)
    answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"\x81" not in answer  # no WebSocket frame
    assert rejects(b, "bad_request") == 1


@pytest.mark.parametrize("handoff", [True, False], ids=["handoff", "relay"])
def test_bytes_sent_right_after_an_upgrade_request_reach_the_worker(closer, tmp_path, redis, handoff):
    """A client that sends its first frame (the Socket.IO connect, "40") in the same write as
    the upgrade request gets the open packet and then the connect's answer: nothing dropped."""
    b = start(closer, tmp_path, redis, count=1, extra="" if handoff else "  handoff: false\n")
    s = connect(b.port)
    status, _, frames = upgrade(s, early=ws_frame("40"))
    assert status == b"HTTP/1.1 101 Switching Protocols", status
    op, payload = frames.next()
    assert op == 1 and payload.startswith(b"0{"), payload
    op, payload = frames.next()
    if payload == b"2":  # Engine.IO's first ping may come before the connect's answer
        op, payload = frames.next()
    assert op == 1 and payload.startswith(b"40{"), payload
    assert "sid" in json.loads(payload[2:])


def test_pipelined_requests_are_each_answered_in_order(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, count=1)
    s = connect(b.port)
    handshake = b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n"
    s.sendall(handshake * 3)
    buf = b""
    deadline = time.monotonic() + 10
    while buf.count(b"HTTP/1.1 200 ") < 3 or buf.count(b"0{") < 3:
        assert time.monotonic() < deadline, buf
        chunk = s.recv(65536)
        assert chunk, f"closed after {buf.count(b'HTTP/1.1 ')} answers: {buf!r}"
        buf += chunk
    sids = [json.loads(b"{" + part[:part.index(b"}") + 1])["sid"] for part in buf.split(b"0{")[1:]]
    assert len(set(sids)) == 3
    # A POST and a poll of one session, pipelined on one connection: both answered.
    sid = requests.get(b.url + "/socket.io/?EIO=4&transport=polling", timeout=5).text
    sid = json.loads(sid[1:])["sid"]
    s = connect(b.port)
    post = (f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: text/plain;charset=UTF-8\r\nContent-Length: 2\r\n\r\n40").encode()
    poll = f"GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    s.sendall(post + poll)
    buf = b""
    deadline = time.monotonic() + 10
    while buf.count(b"HTTP/1.1 200 ") < 2 or b"40{" not in buf:
        assert time.monotonic() < deadline, buf
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    assert buf.index(b"ok") < buf.index(b"40{")


def test_sigterm_with_every_worker_gone_exits_without_waiting_out_the_grace_period(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, extra="balancer:\n  grace_period_secs: 60\n")
    t0 = time.monotonic()
    b.signal(signal.SIGTERM)
    assert b.wait_exit(30) == 0
    # The workers drain (their 2 s window) and the balancer follows at once.
    assert time.monotonic() - t0 < 8


LIMITS = "balancer:\n  limits:\n    connections_per_ip: {conns}\n    handshakes_per_ip_per_sec: {rate}\n"


def handshake_status(port, source):
    s = connect(port, source)
    s.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = read_all(s)
    s.close()
    return answer


def test_one_address_flooding_handshakes_is_held_to_its_rate_while_another_is_served(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, extra=LIMITS.format(conns=0, rate=5))
    answers = []
    stop = threading.Event()

    def flood():
        while not stop.is_set() and len(answers) < 2000:
            answers.append(handshake_status(b.port, "127.0.0.1"))

    t0 = time.monotonic()
    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        # Meanwhile another address connects and receives normally.
        wait_until(lambda: len(answers) >= 20, 10, what="the flood under way")
        clients = [closer.add(Client(b.url, ["polling"], source="127.0.0.2")).connect() for _ in range(8)]
        for c in clients:
            assert c.call("join", "edge")["ok"]
        assert clients[0].call("publish", {"room": "edge", "data": "hello"})["ok"]
        wait_until(lambda: all(c.data_received() == ["hello"] for c in clients), 5, what="all 8 received")
    finally:
        stop.set()
        flooder.join(20)
    elapsed = time.monotonic() - t0
    ok = sum(a.startswith(b"HTTP/1.1 200 ") for a in answers)
    limited = [a for a in answers if a.startswith(b"HTTP/1.1 429 ")]
    assert ok + len(limited) == len(answers)
    # A burst of twice the rate, then the rate.
    assert 10 <= ok <= 10 + 5 * elapsed + 1, (ok, len(answers), elapsed)
    assert len(limited) >= len(answers) // 2, (ok, len(answers))
    assert all(b"Retry-After: " in a for a in limited)
    assert rejects(b, "rate_limited") == len(limited)


@pytest.mark.parametrize("handoff", [True, False], ids=["handoff", "relay"])
def test_one_address_is_held_to_its_connections_including_websockets(closer, tmp_path, redis, handoff):
    """5 WebSockets from 127.0.0.1 (handed to workers or relayed): a 6th connection is refused
    429 until one closes; 127.0.0.2 connects and receives meanwhile."""
    b = start(closer, tmp_path, redis,
              extra=("" if handoff else "  handoff: false\n") + LIMITS.format(conns=5, rate=0))
    sockets = []
    for _ in range(5):
        s = connect(b.port)
        status, _, frames = upgrade(s)
        assert status == b"HTTP/1.1 101 Switching Protocols"
        assert frames.next()[1].startswith(b"0{")
        sockets.append(s)
    s = connect(b.port)
    status, head, _ = upgrade(s)
    assert status.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 1" in head, head
    assert handshake_status(b.port, "127.0.0.1").startswith(b"HTTP/1.1 429 ")
    other = closer.add(Client(b.url, ["polling"], source="127.0.0.2")).connect()
    assert other.call("join", "edge")["ok"]
    assert other.call("publish", {"room": "edge", "data": "x"})["ok"]
    wait_until(lambda: other.data_received() == ["x"], 5, what="127.0.0.2 received")
    # One WebSocket closes: once the balancer learns it, the address may connect again.
    sockets.pop().close()

    def admitted():
        return handshake_status(b.port, "127.0.0.1").startswith(b"HTTP/1.1 200 ")
    wait_until(admitted, 10, interval=0.2, what="a slot freed by the closed WebSocket")
    assert rejects(b, "rate_limited") >= 2
    for s in sockets:
        s.close()


def test_session_unknown_reads_the_same_from_the_balancer_and_from_a_worker(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, count=1)
    via_balancer = requests.get(b.url + "/socket.io/?EIO=4&transport=polling&sid=nosuchsession", timeout=5)
    direct = requests.get(b.worker_url(0) + "/socket.io/?EIO=4&transport=polling&sid=AAAAAAAAAAAAAAAA", timeout=5)
    expected = {"code": 1, "message": "Session ID unknown"}
    assert (via_balancer.status_code, via_balancer.json()) == (400, expected)
    assert (direct.status_code, direct.json()) == (400, expected)
