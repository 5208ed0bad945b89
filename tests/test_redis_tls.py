"""Redis over TLS (`rediss://`): a real `redis-server --tls-port` with certificates made here.
The worker verifies the server's certificate against `redis.tls.ca_file`; a wrong CA is refused
and said plainly; `insecure: true` skips verification."""

import requests

from fleet_harness import BIN_DIR, Client, Proc, free_port, make_ca, make_server_cert, port_open, wait_until


class _TlsRedis(Proc):
    def __init__(self, tmp_path, cert, key, ca):
        self.port = free_port()
        super().__init__("redis-tls", ["redis-server", "--port", "0", "--tls-port", str(self.port),
                                       "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
                                       "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                                       "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
        wait_until(lambda: port_open(self.port), 10, what="TLS redis listening")


def _worker(closer, tmp_path, redis_port, tls_yaml, name):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"redis:\n  url: rediss://localhost:{redis_port}\n  tls:\n{tls_yaml}")
    port = free_port()
    w = closer.add(Proc(f"worker-{name}", [str(BIN_DIR / "worker"), "--listen", f"127.0.0.1:{port}",
                                            "--id", name, "--config", str(cfg)]))
    return w, f"http://127.0.0.1:{port}"


def _readyz(url):
    r = requests.get(url + "/readyz", timeout=2)
    return r.status_code, r.text


def test_rediss_verifies_the_server_against_the_configured_ca(closer, tmp_path):
    ca_key, ca_cert, ca = make_ca(tmp_path, "fleet-ca")
    _, _, other_ca = make_ca(tmp_path, "someone-else")
    cert, key = make_server_cert(tmp_path, ca_key, ca_cert)
    redis = closer.add(_TlsRedis(tmp_path, cert, key, ca))

    _, good = _worker(closer, tmp_path, redis.port, f"    ca_file: {ca}\n", "good")
    wait_until(lambda: _readyz(good)[0] == 200, 15, what="worker ready over TLS")
    c = closer.add(Client(good, ["websocket"])).connect()
    assert c.call("join", "r")["ok"] and c.call("publish", {"room": "r", "data": 1})["ok"]
    wait_until(lambda: 1 in c.data_received(), 5, what="delivered")

    # A CA that did not sign the server's certificate: refused, and said plainly.
    bad_worker, bad = _worker(closer, tmp_path, redis.port, f"    ca_file: {other_ca}\n", "bad")
    wait_until(lambda: "certificate" in bad_worker.output().lower(), 15, what="the certificate refusal logged")
    status, body = _readyz(bad)
    assert status == 503 and "invalid peer certificate" in body, body

    # insecure: true connects whatever the certificate (tests only).
    _, lax = _worker(closer, tmp_path, redis.port, f"    ca_file: {other_ca}\n    insecure: true\n", "lax")
    wait_until(lambda: _readyz(lax)[0] == 200, 15, what="insecure worker ready")
