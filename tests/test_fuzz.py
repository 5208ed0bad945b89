"""Hostile input, generated: random request heads, bodies, upgrade requests and WebSocket
frames against the balancer and against a worker directly, a few seconds each. Whatever
arrives, the process stays up, answers or closes every connection in bounded time, logs no
ERROR, and holds no more descriptors or memory afterwards than before.

The same suite runs longer outside `tests/run`:
    FLEET_FUZZ_SECONDS=600 python3 -m pytest -q tests/test_fuzz.py
"""

import os
import random
import socket
import struct
import threading
import time

from fleet_harness import Balancer, Client, Worker, wait_until

SECONDS = float(os.environ.get("FLEET_FUZZ_SECONDS", "3"))
SEED = int(os.environ.get("FLEET_FUZZ_SEED", str(random.randrange(1 << 30))))

METHODS = [b"GET", b"POST", b"OPTIONS", b"PUT", b"CONNECT", b"G\x00T", b"", b"GET GET", b"\xff" * 8]
PATHS = [b"/socket.io/", b"/", b"/metrics", b"/api/x", b"*", b"/socket.io/../", b"/%00", b"//", b"/" + b"a" * 9000]
QUERIES = [b"EIO=4&transport=polling", b"EIO=4&transport=websocket", b"EIO=3&transport=polling",
           b"EIO=4&transport=polling&sid=AAAAAAAAAAAAAAAA", b"EIO=4&transport=polling&sid=x.y.z", b"EIO=9",
           b"transport=websocket&sid=" + b"%" * 40, b"EIO=4&transport=polling&t=" + b"9" * 300, b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"", b"HTTP/9"]
HEADERS = [
    b"Host: x", b"Upgrade: websocket", b"Connection: Upgrade", b"Connection: keep-alive, upgrade",
    b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    b"Sec-WebSocket-Key: " + b"A" * 5000, b"Upgrade: h2c", b"Content-Length: 5", b"Content-Length: -1",
    b"Content-Length: 99999999999999999999", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
    b"Content-Length: 2\r\nContent-Length: 3", b"Origin: https://evil.example", b"X-Forwarded-For: 1.2.3.4, ::1",
    b"Content-Type: text/plain;charset=UTF-8", b"Expect: 100-continue", b"Cookie: " + b"c" * 3000,
    b"Bad Header: x", b": empty", b"X-Nul: a\x00b", b"X-Long: " + b"l" * 20000,
]
BODIES = [b"", b"hello", b"40", b"1", b"4" * 100, b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\nxx\r\n", b"\x1e".join([b"42[]"] * 50),
          os.urandom(64), b"0{}", b"2probe"]


def random_request(rng):
    """A request head (maybe broken), a body, and sometimes raw bytes spliced in."""
    line = b" ".join([rng.choice(METHODS), rng.choice(PATHS) + b"?" + rng.choice(QUERIES), rng.choice(VERSIONS)])
    headers = rng.sample(HEADERS, rng.randrange(0, 6))
    eol = rng.choice([b"\r\n", b"\r\n", b"\n", b"\r"])
    head = line + eol + eol.join(headers) + (eol if headers else b"") + eol
    data = head + rng.choice(BODIES)
    if rng.random() < 0.2:  # cut it short
        data = data[:rng.randrange(len(data) + 1)]
    if rng.random() < 0.2:  # flip some bytes
        data = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
    if rng.random() < 0.2:  # pipeline another
        data += data
    return data


def random_frames(rng):
    """After a valid upgrade: random WebSocket frames, masked or not, lengths that lie."""
    out = b""
    for _ in range(rng.randrange(1, 6)):
        opcode = rng.choice([0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0xF])
        fin = rng.choice([0x80, 0x00])
        payload = rng.choice([b"40", b"42[\"echo\",1]", b"2", b"3", os.urandom(rng.randrange(0, 300)), b"4" * 1000])
        masked = rng.random() < 0.85
        n = len(payload)
        announce = rng.choice([n, n, n + 10, max(0, n - 1), 126, 127, 1 << 40])
        if announce < 126:
            header = struct.pack(">BB", fin | opcode, (0x80 if masked else 0) | announce)
        elif announce < 65536:
            header = struct.pack(">BBH", fin | opcode, (0x80 if masked else 0) | 126, announce)
        else:
            header = struct.pack(">BBQ", fin | opcode, (0x80 if masked else 0) | 127, announce)
        mask = os.urandom(4) if masked else b""
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if masked else payload
        out += header + mask + body
    return out


UPGRADE = (b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def exchange(port, data, deadline_s):
    """Sends `data`, reads until the peer closes or `deadline_s` passes. Returns whether the
    connection ended (answered and closed, or reset) in time, or is still legitimately open
    (an upgraded WebSocket or a kept-alive connection that answered)."""
    s = socket.socket()
    s.settimeout(deadline_s)
    got = b""
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            chunk = s.recv(65536)
            if not chunk:
                return "closed"
            got += chunk
    except (socket.timeout, TimeoutError):
        pass
    except OSError:
        return "reset"
    finally:
        s.close()
    return "answered-open" if got.startswith(b"HTTP/1.") else ("silent" if not got else "garbage")


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fuzz(port, rng):
    """Runs the generators against `port` for SECONDS from 4 threads; returns how the
    connections ended, by kind."""
    outcomes = {}
    lock = threading.Lock()
    stop = time.monotonic() + SECONDS

    def run(seed):
        r = random.Random(seed)
        while time.monotonic() < stop:
            if r.random() < 0.25:
                data = UPGRADE + random_frames(r)
            else:
                data = random_request(r)
            outcome = exchange(port, data, 2.0)
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    threads = [threading.Thread(target=run, args=(rng.randrange(1 << 30),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 30)
    return outcomes


def check_after(proc, pid, fds_before, rss_before, outcomes):
    assert proc.alive(), f"died under fuzzing (seed {SEED}); outcomes {outcomes}"
    # Every descriptor the fuzzing opened is given back (a WebSocket it left open ends with
    # its heartbeat at the latest, so allow that long).
    wait_until(lambda: fds(pid) <= fds_before + 2, 60, interval=0.5,
               what=f"descriptors back to {fds_before} (seed {SEED})")
    assert rss_kb(pid) < rss_before + 64 * 1024, (rss_before, rss_kb(pid), SEED)
    assert "ERROR" not in proc.output(), f"seed {SEED}"
    assert sum(outcomes.values()) > 0
    # Every answer is HTTP (a WebSocket's frames follow its 101).
    assert outcomes.get("garbage", 0) == 0, (outcomes, SEED)
    print(outcomes)


def test_fuzzing_the_balancer(closer, tmp_path, redis):
    b = closer.add(Balancer(tmp_path, redis.url, count=2,
                            extra="socketio:\n  ping_interval_ms: 2000\n  ping_timeout_ms: 2000\n"
                                  "balancer:\n  header_timeout_secs: 2\n"))
    b.wait_ready()
    pid = b.proc.pid
    fds_before, rss_before = fds(pid), rss_kb(pid)
    outcomes = fuzz(b.port, random.Random(SEED))
    check_after(b, pid, fds_before, rss_before, outcomes)
    # Still serving, every transport.
    for transports in (["polling"], ["websocket"], ["polling", "websocket"]):
        c = closer.add(Client(b.url, transports)).connect()
        assert c.call("echo", "after fuzz") == "after fuzz"
    for i in range(2):
        assert b.worker_metrics(i)  # the workers too


def test_fuzzing_a_worker_directly(closer, tmp_path, redis):
    w = closer.add(Worker(redis.url, "w0"))
    w.wait_ready()
    pid = w.proc.pid
    fds_before, rss_before = fds(pid), rss_kb(pid)
    outcomes = fuzz(w.port, random.Random(SEED + 1))
    check_after(w, pid, fds_before, rss_before, outcomes)
    c = closer.add(Client(w.url, ["polling", "websocket"])).connect()
    assert c.call("echo", "after fuzz") == "after fuzz"
