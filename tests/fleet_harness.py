"""Real processes for end-to-end tests: redis-server, workers, Socket.IO clients.

Every process is started on a free 127.0.0.1 port and killed when its guard is closed;
every wait is bounded (wait_until), never a bare sleep.
"""

import datetime
import json
import os
import queue
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
import requests.adapters
import socketio

ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(os.environ.get("FLEET_BIN_DIR", ROOT / "target" / "debug"))
NODE_DIR = ROOT / "tests" / "node"  # npm's socket.io-client, current and 2.x
LOG_DIR = Path(os.environ.get("FLEET_TEST_LOGS", "/tmp/fleet-test-logs"))
LOG_DIR.mkdir(parents=True, exist_ok=True)


def _listen_ports():
    """Ports to listen on: below the kernel's ephemeral range, so that no client connection
    can take one between choosing it and binding it (a worker started later, by a restart or
    a resize, binds its port seconds after the test chose it)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    return range(max(ephemeral_low - 12000, 1024), ephemeral_low)


def free_port():
    return free_port_range(1)


_handed_out = set()  # never the same port twice in one run: it may not be bound yet


def free_port_range(n):
    """n consecutive free ports (for workers.base_port)."""
    ports = _listen_ports()
    for _ in range(500):
        base = random.randrange(ports.start, ports.stop - n)
        chosen = set(range(base, base + n))
        if not chosen & _handed_out and all(_bindable(p) for p in chosen):
            _handed_out.update(chosen)
            return base
    raise RuntimeError("no free port range")


def free_port_with_bus(offset=10000):
    """A free port whose `port + offset` is free too (a Redis Cluster node's bus), both below
    the ephemeral range."""
    ports = _listen_ports()
    for _ in range(500):
        port = random.randrange(ports.start, ports.stop - offset)
        pair = {port, port + offset}
        if not pair & _handed_out and all(_bindable(p) for p in pair):
            _handed_out.update(pair)
            return port
    raise RuntimeError("no free port pair")


def _bindable(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_until(cond, timeout=10.0, interval=0.02, what="condition"):
    """Poll cond() until it returns a truthy value; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # the condition may probe a service that is not up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RedisServer:
    """A throwaway redis-server on a fixed free port; can be stopped and started again."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.proc = None
        self.start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(self.port), 10, what=f"redis on {self.port}")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        wait_until(lambda: not port_open(self.port), 10, what="redis port closed")

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def process_state(pid):
    """The state letter of /proc/PID/stat (R, S, T for stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


class Proc:
    """A spawned fleet binary with its output in a log file."""

    def __init__(self, name, args, env=None):
        self.name = name
        self.log_path = LOG_DIR / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "wb")
        full_env = dict(os.environ, NO_COLOR="1", **(env or {}))
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)

    def output(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def pause(self):
        """SIGSTOP, returning once the kernel reports the process stopped (the signal is
        delivered asynchronously)."""
        import signal as _signal
        self.proc.send_signal(_signal.SIGSTOP)
        wait_until(lambda: process_state(self.proc.pid) == "T", 5, interval=0.01, what=f"{self.name} stopped")

    def wait_exit(self, timeout):
        return self.proc.wait(timeout)

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


class Worker(Proc):
    """A standalone worker (`--listen --redis --id`), or worker `index` of a fleet file."""

    def __init__(self, redis_url=None, wid="w", port=None, drain_secs=None, config=None, index=None, env=None):
        self.port = port or free_port()
        self.id = wid
        if config is not None:
            args = [str(BIN_DIR / "worker"), "--config", str(config), "--index", str(index)]
        else:
            args = [str(BIN_DIR / "worker"), "--listen", f"127.0.0.1:{self.port}",
                    "--redis", redis_url, "--id", wid]
            if drain_secs is not None:
                args += ["--drain-window-secs", str(drain_secs)]
        super().__init__(f"worker-{wid}", args, env=env)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def readyz(self):
        r = requests.get(self.url + "/readyz", timeout=2)
        return r.status_code, r.text

    def wait_ready(self, timeout=15):
        wait_until(lambda: self.readyz()[0] == 200, timeout, what=f"{self.id} ready")

    def wait_listening(self, timeout=15):
        wait_until(lambda: port_open(self.port), timeout, what=f"{self.id} listening")

    def metrics(self):
        return parse_metrics(requests.get(self.url + "/metrics", timeout=2).text)


class Balancer(Proc):
    """`balancer --config FILE` with a fleet file written for this test."""

    def __init__(self, tmp_path, redis_url, count=3, spawn=True, base_port=None, extra="", name="bal", port=None,
                 env=None, redis_yaml=""):
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.base_port = base_port or free_port_range(count)
        self.count = count
        self.config = Path(tmp_path) / f"{name}-{self.port}.yaml"
        self.config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"metrics_listen: 127.0.0.1:{self.metrics_port}\n"
            f"redis:\n  url: {redis_url}\n" + redis_yaml +
            f"workers:\n  count: {count}\n  host: 127.0.0.1\n  base_port: {self.base_port}\n"
            f"  spawn: {'true' if spawn else 'false'}\n  drain_window_secs: 2\n" + extra
        )
        super().__init__(name, [str(BIN_DIR / "balancer"), "--config", str(self.config)], env=env)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self):
        return f"http://127.0.0.1:{self.metrics_port}"

    def worker_url(self, i):
        return f"http://127.0.0.1:{self.base_port + i}"

    def worker_metrics(self, i):
        return parse_metrics(requests.get(self.worker_url(i) + "/metrics", timeout=2).text)

    def wait_ready(self, timeout=20):
        """Every worker passes its health check, as the balancer itself reports."""
        def ready():
            m = self.metrics()
            return all(metric(m, "fleet_balancer_worker_up", worker=f"w{i}") == 1 for i in range(self.count))
        wait_until(lambda: requests.get(self.admin + "/readyz", timeout=2).status_code == 200, timeout, what="balancer ready")
        for i in range(self.count):
            wait_until(lambda i=i: requests.get(self.worker_url(i) + "/readyz", timeout=2).status_code == 200,
                       timeout, what=f"worker {i} ready")
        wait_until(ready, timeout, what="balancer sees every worker up")

    def metrics(self):
        return parse_metrics(requests.get(self.admin + "/metrics", timeout=2).text)


def parse_metrics(text):
    """Prometheus text → {'name{labels}': value}, plus bare names for unlabelled lookups."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def metric(metrics, name, **labels):
    """Sum of every sample of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
            found = True
    if not found:
        raise KeyError(f"{name} {labels} not in metrics")
    return total


class FrameReader:
    """Server WebSocket frames (unmasked) from a raw socket, after the bytes `rest` already read."""

    def __init__(self, s, rest=b""):
        self.s = s
        self.buf = rest

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def next(self):
        self._need(2)
        first, second = self.buf[0], self.buf[1]
        length, at = second & 0x7F, 2
        if length == 126:
            self._need(4)
            length, at = struct.unpack("!H", self.buf[2:4])[0], 4
        elif length == 127:
            self._need(10)
            length, at = struct.unpack("!Q", self.buf[2:10])[0], 10
        self._need(at + length)
        payload = self.buf[at:at + length]
        self.buf = self.buf[at + length:]
        return first & 0x0F, payload

    def close_code(self):
        """Reads until a close frame: its code (None when the connection ends without one)."""
        try:
            while True:
                opcode, payload = self.next()
                if opcode == 0x8:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        except (EOFError, OSError):
            return None


def make_ca(tmp_path, name):
    """A self-signed CA: (key, certificate, path of its PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = Path(tmp_path) / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_server_cert(tmp_path, ca_key, ca_cert, name="server", valid_days=(-1, 30)):
    """A certificate for localhost and 127.0.0.1 signed by the CA, valid from/to the given days
    relative to now: (cert path, key path), the chain being the leaf then the CA."""
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=valid_days[0]))
            .not_valid_after(now + datetime.timedelta(days=valid_days[1]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = Path(tmp_path) / f"{name}.pem", Path(tmp_path) / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                          + ca_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _SourceAddress(requests.adapters.HTTPAdapter):
    def __init__(self, source):
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(source):
    """A requests session whose connections come from local address `source` (127.0.0.2: a
    second client address on one machine)."""
    s = requests.Session()
    s.mount("http://", _SourceAddress(source))
    return s


class _Recorder:
    """What a test client records: the messages it receives, its connects and disconnects."""

    def __init__(self, url, transports, name):
        self.name = name
        self.url = url
        self.transports = list(transports)
        self.messages = []
        self.connects = 0
        self.disconnect_reasons = []
        self.disconnected_at = []  # time.monotonic() of each disconnect
        self._lock = threading.Lock()

    def _listen_to(self, sio):
        sio.on("message", self._on_message)
        sio.on("connect", self._on_connect)
        sio.on("disconnect", self._on_disconnect)

    def _on_message(self, data):
        with self._lock:
            self.messages.append(data)

    def _on_connect(self):
        with self._lock:
            self.connects += 1

    def _on_disconnect(self, reason=None):
        with self._lock:
            self.disconnect_reasons.append(reason)
            self.disconnected_at.append(time.monotonic())

    def transport(self):
        return self.sio.transport()

    def data_received(self):
        with self._lock:
            return [m["data"] for m in self.messages]


class Client(_Recorder):
    """A python-socketio client that records what it receives and how it disconnects."""

    def __init__(self, url, transports=("polling", "websocket"), reconnection=False, name="c", source=None):
        """`source`: a local address to connect from (polling only: the WebSocket library
        cannot bind one). For https:// servers use TlsClient."""
        super().__init__(url, transports, name)
        extra = {}
        if source is not None:
            assert self.transports == ["polling"], "a source address is for polling clients"
            extra["http_session"] = session_from(source)
        self.sio = socketio.Client(
            reconnection=reconnection, reconnection_delay=0.2, reconnection_delay_max=0.5,
            randomization_factor=0.2, request_timeout=5, **extra,
        )
        self._listen_to(self.sio)

    def connect(self):
        self.sio.connect(self.url, transports=self.transports, wait_timeout=10)
        return self

    def call(self, event, data=None, timeout=10):
        if data is None:
            return self.sio.call(event, timeout=timeout)
        return self.sio.call(event, data, timeout=timeout)

    def close(self):
        try:
            self.sio.disconnect()
        except Exception:
            pass


class TlsClient(_Recorder):
    """A python-socketio client for https:// servers, verifying them against the CA file `ca`,
    with Client's interface.

    It is python-socketio's asyncio client run on a loop of its own: the threaded client reads
    and writes one SSL socket from two threads, which Python's ssl module does not support, and
    over wss:// its reader now and then sees the connection as closed while the writer sends
    (python-socketio#1568, python-engineio#461: any server, about one connection in fifty
    here). The asyncio client does both on one thread."""

    def __init__(self, url, transports=("polling", "websocket"), ca=None, name="c"):
        import asyncio
        super().__init__(url, transports, name)
        self.ca = str(ca)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"tls-client-{name}")
        self._thread.start()
        self.sio = None
        self._http = None
        self._run(self._make(), 10)

    async def _make(self):
        import ssl

        import aiohttp
        context = ssl.create_default_context(cafile=self.ca)
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context), trust_env=False)
        self.sio = socketio.AsyncClient(reconnection=False, request_timeout=5, http_session=self._http)
        self._listen_to(self.sio)

    def _run(self, coro, timeout):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self):
        self._run(self.sio.connect(self.url, transports=self.transports, wait_timeout=10), 20)
        return self

    def call(self, event, data=None, timeout=10):
        args = () if data is None else (data,)
        return self._run(self.sio.call(event, *args, timeout=timeout), timeout + 5)

    def close(self):
        async def shut():
            try:
                await self.sio.disconnect()
            finally:
                await self._http.close()
        try:
            self._run(shut(), 10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class Closer:
    """Collects guards and closes them in reverse order."""

    def __init__(self):
        self.items = []

    def add(self, item):
        self.items.append(item)
        return item

    def close_all(self):
        for item in reversed(self.items):
            try:
                item.close()
            except Exception:
                pass


__all__ = [
    "Balancer", "Client", "Closer", "TlsClient", "NODE_DIR", "Proc", "free_port_range", "RedisServer", "Worker", "free_port", "metric",
    "parse_metrics", "port_open", "wait_until",
]


class HttpServer:
    """A small HTTP server on 127.0.0.1 for a test (a web origin, an app's backend): `handler`
    is a `BaseHTTPRequestHandler` subclass; served from a thread until closed."""

    def __init__(self, handler):
        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def origin(self):
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class WebSite(HttpServer):
    """A web origin: serves `files` ({url path: (file, content type)}) and takes the JSON a
    page POSTs to any path into `reports` (a queue)."""

    def __init__(self, files=None):
        files = files or {}
        reports = self.reports = queue.Queue()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.partition("?")[0]
                if path not in files:
                    self.send_error(404)
                    return
                file, kind = files[path]
                body = Path(file).read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                reports.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(Handler)


class Chromium:
    """Headless Chromium (Debian's `chromium`) showing one page; its output in the test logs."""

    def __init__(self, url, profile):
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "chromium is not installed (tests/run installs it)"
        self.log = open(LOG_DIR / f"chromium-{Path(profile).name}-{time.monotonic_ns()}.log", "w")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             f"--user-data-dir={profile}", url],
            stdout=self.log, stderr=subprocess.STDOUT)

    def close(self):
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()


class SteadyPublisher:
    """Publishes 0, 1, 2, ... to `room` from `client`, one every 20 ms on a thread, noting when
    each was acknowledged: traffic to keep up through a fault."""

    def __init__(self, client, room):
        self.client, self.room = client, room
        self.sent = []  # (n, acknowledged at, monotonic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(lambda: len(self.sent) > 5, what="publishing")

    def _run(self):
        n = 0
        while not self._stop.is_set():
            if self.client.call("publish", {"room": self.room, "data": n})["ok"]:
                self.sent.append((n, time.monotonic()))
            n += 1
            time.sleep(0.02)

    def reached_since(self, member, t):
        """Whether `member` got a publish acknowledged after `t`."""
        got = {d for d in member.data_received() if isinstance(d, int)}
        return any(n in got and at > t for n, at in self.sent)

    def stop(self):
        """Stops publishing; returns every number published."""
        self._stop.set()
        self._thread.join(5)
        return [n for n, _ in self.sent]

