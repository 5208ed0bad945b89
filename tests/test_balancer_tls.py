"""HTTPS and WSS at the balancer (`balancer.tls`), with certificates made here: python-socketio
and the official socket.io-client verify the chain over every transport, `openssl s_client`
sees TLS 1.2 and 1.3 only, a replaced certificate is served to new connections while open ones
continue, and an expired certificate or a key that does not match is refused at start."""

import json
import re
import shutil
import subprocess
import time

import pytest
import requests

from fleet_harness import NODE_DIR, Balancer, TlsClient, make_ca, make_server_cert, metric, wait_until


def tls_yaml(cert, key):
    return f"balancer:\n  tls:\n    cert_file: {cert}\n    key_file: {key}\n"


def start(closer, tmp_path, redis, cert, key, count=2, extra=""):
    b = closer.add(Balancer(tmp_path, redis.url, count=count, extra=tls_yaml(cert, key) + extra))
    b.wait_ready()
    return b


def https(b):
    return f"https://localhost:{b.port}"


def s_client(port, ca, *flags):
    """`openssl s_client` against the balancer: (exit code, output)."""
    p = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                        "-CAfile", str(ca), "-verify_return_error", *flags],
                       input=b"", capture_output=True, timeout=20)
    return p.returncode, (p.stdout + p.stderr).decode(errors="replace")


def serial_seen(port, ca):
    """The serial number of the certificate a new connection is given."""
    _, out = s_client(port, ca, "-showcerts")
    pem = out[out.index("-----BEGIN CERTIFICATE-----"):out.index("-----END CERTIFICATE-----") + 25]
    p = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem.encode(), capture_output=True, timeout=10)
    return p.stdout.decode().strip()


@pytest.fixture
def pki(tmp_path):
    ca_key, ca_cert, ca = make_ca(tmp_path, "fleet-ca")
    cert, key = make_server_cert(tmp_path, ca_key, ca_cert)
    return {"ca": ca, "ca_key": ca_key, "ca_cert": ca_cert, "cert": cert, "key": key}


@pytest.mark.parametrize("transports", [["polling"], ["websocket"], ["polling", "websocket"]],
                         ids=["polling", "websocket", "upgrade"])
def test_python_clients_over_https_and_wss_across_workers(closer, tmp_path, redis, pki, transports):
    b = start(closer, tmp_path, redis, pki["cert"], pki["key"])
    clients = [closer.add(TlsClient(https(b), transports, ca=pki["ca"])).connect() for _ in range(6)]
    assert {c.transport() for c in clients} == {transports[-1]}
    workers = {c.call("whoami")["worker"] for c in clients}
    assert len(workers) == 2, workers  # both workers hold some: cross-worker delivery is exercised
    for c in clients:
        assert c.call("join", "tls")["ok"]
    assert clients[0].call("publish", {"room": "tls", "data": "over tls"})["ok"]
    wait_until(lambda: all(c.data_received() == ["over tls"] for c in clients), 5, what="every member, once")
    time.sleep(0.3)  # a duplicate would arrive within this
    assert all(c.data_received() == ["over tls"] for c in clients)
    if "websocket" in transports:
        # Under TLS WebSockets are relayed (the session lives in the balancer), never handed off.
        m = b.metrics()
        assert sum(v for k, v in m.items() if k.startswith("fleet_balancer_websockets_active")) == 6
        assert m.get('fleet_balancer_handoffs_total{outcome="passed"}', 0) == 0


def test_the_official_client_verifies_the_chain_over_every_transport(closer, tmp_path, redis, pki):
    b = start(closer, tmp_path, redis, pki["cert"], pki["key"])
    p = subprocess.run(["node", "tls_client.js", https(b), str(pki["ca"])], cwd=NODE_DIR,
                       capture_output=True, timeout=30)
    out = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert p.returncode == 0, out
    got = {r["name"]: (r["transport"], r["echo"]) for r in out["results"]}
    assert got == {
        "polling": ("polling", "hello polling"),
        "websocket": ("websocket", "hello websocket"),
        "upgrade": ("websocket", "hello upgrade"),
    }
    # A client that does not trust the CA is refused by its own check, and the balancer counts
    # the failed handshake without an error line.
    code, _ = s_client(b.port, make_ca(tmp_path, "someone-else")[2])
    assert code != 0
    wait_until(lambda: metric(b.metrics(), "fleet_balancer_rejects_total", **{"class": "tls_handshake"}) >= 1, 5,
               what="the failed handshake counted")
    assert "ERROR" not in b.output()


def test_tls_1_2_and_1_3_only(closer, tmp_path, redis, pki):
    b = start(closer, tmp_path, redis, pki["cert"], pki["key"], count=1)
    for flag, proto in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")]:
        code, out = s_client(b.port, pki["ca"], flag)
        assert code == 0 and (f"Protocol  : {proto}" in out or f"New, {proto}" in out), out
        assert "Verify return code: 0 (ok)" in out
    for old in ("-tls1_1", "-tls1"):
        code, out = s_client(b.port, pki["ca"], old)
        assert code != 0, out
    # Plain HTTP on the TLS port is not served.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{b.port}/socket.io/?EIO=4&transport=polling", timeout=5)
    assert b.alive()


def test_a_replaced_certificate_is_served_to_new_connections_while_open_ones_continue(closer, tmp_path, redis, pki):
    b = start(closer, tmp_path, redis, pki["cert"], pki["key"])
    before = serial_seen(b.port, pki["ca"])
    open_clients = [closer.add(TlsClient(https(b), t, ca=pki["ca"])).connect()
                    for t in (["websocket"], ["polling"], ["polling", "websocket"])]
    # The new pair is written beside and moved in: key first, as a deploy tool would.
    new_cert, new_key = make_server_cert(tmp_path, pki["ca_key"], pki["ca_cert"], name="renewed")
    shutil.copy(new_key, tmp_path / "key.tmp")
    (tmp_path / "key.tmp").replace(pki["key"])
    shutil.copy(new_cert, tmp_path / "cert.tmp")
    (tmp_path / "cert.tmp").replace(pki["cert"])
    wait_until(lambda: serial_seen(b.port, pki["ca"]) != before, 10, interval=0.3, what="the new certificate served")
    assert "TLS certificate reloaded" in b.output()
    for c in open_clients:
        assert c.call("echo", "still here") == "still here"
    fresh = closer.add(TlsClient(https(b), ["websocket"], ca=pki["ca"])).connect()
    assert fresh.call("echo", "new") == "new"
    # A broken replacement (a key of another certificate) is refused; the current one stays.
    other_cert, other_key = make_server_cert(tmp_path, pki["ca_key"], pki["ca_cert"], name="other")
    current = serial_seen(b.port, pki["ca"])
    shutil.copy(other_key, pki["key"])
    wait_until(lambda: "not reloaded" in b.output(), 10, interval=0.3, what="the mismatch refused")
    assert serial_seen(b.port, pki["ca"]) == current
    assert fresh.call("echo", "still") == "still"


@pytest.mark.parametrize("case", ["expired", "not-yet-valid", "mismatched-key", "missing-file"])
def test_a_certificate_that_cannot_be_served_stops_the_start_with_a_clear_message(closer, tmp_path, redis, pki, case):
    cert, key = pki["cert"], pki["key"]
    if case == "expired":
        cert, key = make_server_cert(tmp_path, pki["ca_key"], pki["ca_cert"], name="old", valid_days=(-30, -1))
        expected = r"certificate expired on"
    elif case == "not-yet-valid":
        cert, key = make_server_cert(tmp_path, pki["ca_key"], pki["ca_cert"], name="future", valid_days=(2, 30))
        expected = r"certificate is not valid before"
    elif case == "mismatched-key":
        _, key = make_server_cert(tmp_path, pki["ca_key"], pki["ca_cert"], name="another")
        expected = r"private key does not match the certificate"
    else:
        cert = tmp_path / "nowhere.pem"
        expected = r"nowhere\.pem: .*(No such file|not found)"
    b = closer.add(Balancer(tmp_path, redis.url, count=1, extra=tls_yaml(cert, key)))
    assert b.wait_exit(15) == 2
    out = b.output()
    assert re.search(r"balancer\.tls: .*" + expected, out), out
