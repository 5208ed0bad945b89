"""Authenticated clients and room permissions, end to end: tokens made with PyJWT (valid,
expired, wrong key, `alg: none`, HS/RS confusion, missing `sub`), the connect proxy against a
real HTTP backend (admit, refuse, down, slow), permissions, and `user:` rooms across workers."""

import base64
import hashlib
import hmac
import json
import subprocess
import time
from http.server import BaseHTTPRequestHandler

import jwt
import pytest
import socketio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fleet_harness import NODE_DIR, Balancer, HttpServer, free_port, metric, wait_until

SECRET = "s3cret-that-is-at-least-32-bytes-long!"


def token(sub="alice", key=SECRET, alg="HS256", ttl=300, **claims):
    body = {"exp": int(time.time()) + ttl, **claims}
    if sub is not None:
        body["sub"] = sub
    return jwt.encode(body, key, algorithm=alg)


def forged_hs256(key, sub="eve"):
    """An HS256 token whose HMAC key is `key` (a public key's PEM: the HS/RS confusion attack),
    made by hand, since PyJWT refuses to."""
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "exp": int(time.time()) + 300}).encode())
    sig = b64(hmac.new(key, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


def start(closer, tmp_path, redis, auth, rooms="", count=2, name="bal"):
    b = closer.add(Balancer(tmp_path, redis.url, count=count, name=name, extra=auth + rooms))
    b.wait_ready()
    return b


def jwt_auth(leeway=0, key_file=None):
    key = f"    public_key_file: {key_file}\n" if key_file else f"    hs256_secret: {SECRET}\n"
    return f"auth:\n  mode: jwt\n  jwt:\n{key}    leeway_secs: {leeway}\n"


class Sock:
    """A python-socketio client that keeps its connect error and messages."""

    def __init__(self, url, auth=None, headers=None, transports=("polling", "websocket")):
        self.error = None
        self.messages = []
        self.disconnects = []
        self.sio = socketio.Client(reconnection=False, request_timeout=5)
        self.sio.on("connect_error", self._on_error)
        self.sio.on("message", self.messages.append)
        self.sio.on("disconnect", lambda *reason: self.disconnects.append(reason))
        self.url, self.auth, self.headers, self.transports = url, auth, headers or {}, list(transports)

    def _on_error(self, data=None):
        self.error = data

    def connect(self):
        """True when connected; else the refusal is in `error`."""
        try:
            self.sio.connect(self.url, auth=self.auth, headers=self.headers, transports=self.transports,
                             wait_timeout=10)
            return True
        except socketio.exceptions.ConnectionError:
            return False

    def call(self, event, data=None):
        return self.sio.call(event, data, timeout=10)

    def close(self):
        try:
            self.sio.disconnect()
        except Exception:
            pass


def refused(closer, url, reason, **kw):
    s = closer.add(Sock(url, **kw))
    assert not s.connect(), f"admitted, expected {reason}"
    assert s.error == {"message": "unauthorized", "data": {"reason": reason}}, s.error
    return s


def auth_total(b, result):
    return sum(metric(b.worker_metrics(i), "fleet_worker_auth_total", result=result) for i in range(b.count))


def test_jwt_hs256_admits_valid_tokens_and_refuses_every_forgery(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, jwt_auth())
    for transports in (["polling", "websocket"], ["websocket"]):
        s = closer.add(Sock(b.url, auth={"token": token("alice")}, transports=transports))
        assert s.connect(), s.error
        assert s.call("whoami")["user"] == "alice"
    # Authorization: Bearer on the handshake works too.
    s = closer.add(Sock(b.url, headers={"Authorization": f"Bearer {token('bob')}"}))
    assert s.connect(), s.error
    assert s.call("whoami")["user"] == "bob"

    refused(closer, b.url, "missing")
    refused(closer, b.url, "missing", auth={"token": ""})
    refused(closer, b.url, "expired", auth={"token": token(ttl=-60)})
    refused(closer, b.url, "invalid", auth={"token": token(key="another-secret-of-at-least-32-bytes!!")})
    refused(closer, b.url, "invalid", auth={"token": jwt.encode({"sub": "eve", "exp": int(time.time()) + 300},
                                                                None, algorithm="none")})
    refused(closer, b.url, "invalid", auth={"token": token(sub=None)})
    refused(closer, b.url, "invalid", auth={"token": token(sub="")})
    refused(closer, b.url, "invalid", auth={"token": "not.a.token"})
    refused(closer, b.url, "invalid", auth={"token": token() + "x"})  # signature altered
    refused(closer, b.url, "invalid", auth={"token": token(nbf=int(time.time()) + 600)})  # not yet valid
    wait_until(lambda: auth_total(b, "ok") == 3 and auth_total(b, "invalid") == 7
               and auth_total(b, "missing") == 2 and auth_total(b, "expired") == 1, 5, what="auth counted")
    # A refusal says nothing of the token in the worker logs either.
    assert SECRET not in b.output()


def test_issuer_and_audience_are_checked_when_set(closer, tmp_path, redis):
    auth = jwt_auth() + "    issuer: https://auth.example.com\n    audience: fleet\n"
    b = start(closer, tmp_path, redis, auth, count=1)
    good = {"iss": "https://auth.example.com", "aud": "fleet"}
    s = closer.add(Sock(b.url, auth={"token": token(**good)}))
    assert s.connect(), s.error
    refused(closer, b.url, "invalid", auth={"token": token()})  # neither claim
    refused(closer, b.url, "invalid", auth={"token": token(**{**good, "iss": "https://evil.example.com"})})
    refused(closer, b.url, "invalid", auth={"token": token(**{**good, "aud": "other"})})


def test_the_official_client_sees_the_reason(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, jwt_auth(), count=1)
    script = """
const { io } = require("socket.io-client");
const s = io(process.argv[1], { auth: { token: process.argv[2] }, reconnection: false });
s.on("connect_error", (err) => { console.log(JSON.stringify({ message: err.message, data: err.data })); s.close(); });
s.on("connect", () => { console.log(JSON.stringify({ connected: true })); s.close(); });
"""
    def run(tok):
        p = subprocess.run(["node", "-e", script, b.url, tok], capture_output=True, text=True, timeout=30,
                           cwd=NODE_DIR)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])
    assert run(token(ttl=-60)) == {"message": "unauthorized", "data": {"reason": "expired"}}
    assert run(token()) == {"connected": True}


def _key_files(tmp_path):
    """PEM key pairs: RSA, EC P-256, Ed25519, with the algorithm each signs with."""
    out = {}
    for name, key, alg in (("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
                           ("ec", ec.generate_private_key(ec.SECP256R1()), "ES256"),
                           ("ed", ed25519.Ed25519PrivateKey.generate(), "EdDSA")):
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        path = tmp_path / f"{name}.pem"
        path.write_bytes(public)
        out[name] = (key, public, path, alg)
    return out


@pytest.mark.parametrize("kind", ["rsa", "ec", "ed"])
def test_jwt_public_keys_fix_the_algorithm(closer, tmp_path, redis, kind):
    keys = _key_files(tmp_path)
    private, public, path, alg = keys[kind]
    b = start(closer, tmp_path, redis, jwt_auth(key_file=path), count=1)
    s = closer.add(Sock(b.url, auth={"token": token("carol", key=private, alg=alg)}))
    assert s.connect(), s.error
    assert s.call("whoami")["user"] == "carol"
    # The public key used as an HMAC secret (HS/RS confusion): refused.
    refused(closer, b.url, "invalid", auth={"token": forged_hs256(public)})
    # Another key of the same type, and a key of another type: refused.
    other = [k for k in keys if k != kind][0]
    refused(closer, b.url, "invalid", auth={"token": token("eve", key=keys[other][0], alg=keys[other][3])})
    fresh = {"rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
             "ec": lambda: ec.generate_private_key(ec.SECP256R1()),
             "ed": ed25519.Ed25519PrivateKey.generate}[kind]()
    refused(closer, b.url, "invalid", auth={"token": token("eve", key=fresh, alg=alg)})
    refused(closer, b.url, "expired", auth={"token": token("carol", key=private, alg=alg, ttl=-60)})


def test_a_bad_key_file_stops_the_worker_with_a_clear_error(tmp_path):
    from fleet_harness import BIN_DIR
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(f"workers:\n  base_port: {free_port()}\n" + jwt_auth(key_file=bad))
    r = subprocess.run([str(BIN_DIR / "worker"), "--config", str(cfg), "--index", "0"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode != 0 and "not an RSA, EC P-256 or Ed25519 public key" in r.stderr, r.stderr
    cfg.write_text(f"workers:\n  base_port: {free_port()}\nauth:\n  mode: jwt\n")
    r = subprocess.run([str(BIN_DIR / "worker"), "--config", str(cfg), "--index", "0"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 2 and ":4: key `auth.mode`" in r.stderr and "FLEET_JWT_SECRET" in r.stderr, r.stderr


def test_permissions_and_user_rooms_across_workers(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, jwt_auth())
    alice = token("alice", rooms=["chat:*", "lobby"], publish=["chat:general"])
    # Alice on both workers (straight to each), Bob through the balancer.
    a = [closer.add(Sock(b.worker_url(i), auth={"token": alice})) for i in range(2)]
    for s in a:
        assert s.connect(), s.error
    assert {s.call("whoami")["worker"] for s in a} == {"w0", "w1"}
    bob = closer.add(Sock(b.url, auth={"token": token("bob", rooms=["chat:*"], publish=["user:*", "chat:*"])}))
    assert bob.connect(), bob.error

    forbidden = {"ok": False, "error": "forbidden"}
    assert a[0].call("join", "chat:general") == {"ok": True, "room": "chat:general"}
    assert a[0].call("join", "lobby") == {"ok": True, "room": "lobby"}
    assert a[0].call("join", "secret") == forbidden
    assert a[0].call("join", "user:bob") == forbidden  # nobody joins a user's room
    assert a[0].call("leave", "user:alice") == forbidden  # nor leaves their own (kick by user)
    assert a[0].call("publish", {"room": "chat:random", "data": "x"}) == forbidden
    assert a[0].call("publish", {"room": "chat:general", "data": "hi"}) == {"ok": True}
    assert a[0].call("leave", "lobby") == {"ok": True, "room": "lobby"}
    # A message to user:alice reaches each of her sockets, on both workers, once.
    assert bob.call("publish", {"room": "user:alice", "data": "for alice"}) == {"ok": True}
    for s in a:
        wait_until(lambda s=s: {"room": "user:alice", "data": "for alice"} in s.messages, 5, what="user room")
    time.sleep(0.3)  # a duplicate would arrive within this
    for s in a:
        assert s.messages.count({"room": "user:alice", "data": "for alice"}) == 1, s.messages
    assert bob.messages == []
    # "*" is not a user's private channel: only a "user:" pattern reaches one.
    anyone = closer.add(Sock(b.url, auth={"token": token("mallory", rooms=["*"], publish=["*"])}))
    assert anyone.connect(), anyone.error
    assert anyone.call("publish", {"room": "user:alice", "data": "spoof"}) == forbidden
    forbidden_total = sum(metric(b.worker_metrics(i), "fleet_worker_forbidden_total", action=act)
                          for i in range(2) for act in ("join", "publish", "leave"))
    assert forbidden_total == 5


def test_tokens_expire_into_a_disconnect(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, jwt_auth(), count=1)
    s = closer.add(Sock(b.url, auth={"token": token("dave", ttl=2)}))
    assert s.connect(), s.error
    t0 = time.monotonic()
    wait_until(lambda: s.disconnects, 6, interval=0.05, what="disconnected at exp")
    assert 0.5 < time.monotonic() - t0 < 4.0


def test_client_publish_off_leaves_publishing_to_the_server(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, jwt_auth(), rooms="rooms:\n  client_publish: false\n", count=1)
    s = closer.add(Sock(b.url, auth={"token": token("erin", rooms=["*"], publish=["*"])}))
    assert s.connect(), s.error
    assert s.call("join", "news") == {"ok": True, "room": "news"}
    assert s.call("publish", {"room": "news", "data": "x"}) == {"ok": False, "error": "forbidden"}


class _Backend(HttpServer):
    """The app's backend for `auth.mode: proxy`: admits `good-<user>`, 401s `bad`, 403s
    `nope`, answers `slow` after 3 s, `junk` with a broken body; keeps what it was asked."""

    def __init__(self):
        self.asked = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                q = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                backend.asked.append(q)
                tok = (q.get("auth") or {}).get("token", "")
                if tok.startswith("good-"):
                    self.answer(200, {"user": tok[5:], "rooms": ["team:*"], "publish": ["team:*"]})
                elif tok == "bad":
                    self.answer(401, {"message": "who are you"})
                elif tok == "nope":
                    self.answer(403, {"message": "not you"})
                elif tok == "old":
                    self.answer(200, {"user": "old", "exp": int(time.time()) - 5})
                elif tok == "slow":
                    time.sleep(3)
                    self.answer(200, {"user": "late"})
                else:
                    self.answer(200, None, raw=b"{not json")

            def answer(self, code, body, raw=None):
                data = raw if raw is not None else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def test_connect_proxy_admits_refuses_and_never_admits_when_it_cannot_ask(closer, tmp_path, redis):
    backend = closer.add(_Backend())
    auth = (f"auth:\n  mode: proxy\n  proxy:\n    url: http://127.0.0.1:{backend.port}/fleet/auth\n"
            "    timeout_ms: 1000\n")
    b = start(closer, tmp_path, redis, auth)
    s = closer.add(Sock(b.url, auth={"token": "good-frank"}, headers={"X-App": "demo",
                                                                      "X-Fleet-Client-IP": "6.6.6.6"}))
    assert s.connect(), s.error
    assert s.call("whoami")["user"] == "frank"
    assert s.call("join", "team:red") == {"ok": True, "room": "team:red"}
    assert s.call("join", "other") == {"ok": False, "error": "forbidden"}
    q = backend.asked[-1]
    assert q["auth"] == {"token": "good-frank"} and q["transport"] in ("polling", "websocket")
    # The address is the balancer's judgement, whatever the client claims.
    assert q["headers"].get("x-app") == "demo" and q["address"] == "127.0.0.1", q

    refused(closer, b.url, "expired", auth={"token": "old"})  # the backend's exp already past

    refused(closer, b.url, "invalid", auth={"token": "bad"})
    refused(closer, b.url, "forbidden", auth={"token": "nope"})
    t0 = time.monotonic()
    refused(closer, b.url, "unavailable", auth={"token": "slow"})
    assert time.monotonic() - t0 < 2.5  # the 1 s timeout, not the backend's 3 s
    refused(closer, b.url, "unavailable", auth={"token": "junk"})
    backend.close()  # down
    refused(closer, b.url, "unavailable", auth={"token": "good-frank"})
    assert b.alive()


def test_loadtest_sends_a_token_and_keeps_it_out_of_its_report(closer, tmp_path, redis):
    from test_loadtest import run_loadtest
    b = start(closer, tmp_path, redis, jwt_auth())
    small = ["-c", 30, "--rooms", 3, "--publishers", 3, "--rate", 20, "--messages", 10, "-d", 2, "--settle", 1]
    tok = token("load", rooms=["*"], publish=["*"])
    code, r, out = run_loadtest(b.url, tmp_path, *small, "--token", tok)
    assert code == 0, out
    assert r["connected"] == 30 and r["deliveries"]["missing"] == 0 and r["deliveries"]["duplicate"] == 0
    assert r["scenario"]["token"] == "<redacted>" and tok not in json.dumps(r) and tok not in out
    # Without one, every client is refused and says why.
    code, r, out = run_loadtest(b.url, tmp_path, *small, "--connect-timeout", 3)
    assert code != 0 and r["connected"] == 0, out
    assert any("protocol" in k for k in r["errors"]), r["errors"]


def test_a_standalone_worker_takes_auth_from_the_fleet_file(closer, tmp_path, redis):
    """Workers on other hosts run with --listen --id --config: the fleet file's auth applies to
    them as to spawned ones (without --config a standalone worker would let anyone in)."""
    from fleet_harness import BIN_DIR, Proc
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(f"redis:\n  url: {redis.url}\n" + jwt_auth())
    port = free_port()
    closer.add(Proc("worker-standalone-auth", [str(BIN_DIR / "worker"), "--listen", f"127.0.0.1:{port}",
                                               "--id", "far-1", "--config", str(cfg)]))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: __import__("requests").get(url + "/readyz", timeout=2).status_code == 200, 15,
               what="standalone worker ready")
    refused(closer, url, "missing")
    s = closer.add(Sock(url, auth={"token": token("gina")}))
    assert s.connect(), s.error
    assert s.call("whoami") == {"worker": "far-1", "sid": s.sio.get_sid(), "user": "gina"}
