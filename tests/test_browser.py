"""Browsers on another origin: CORS answers and origin checks, through the balancer and straight
to a worker, then a real headless Chromium loading a page that uses npm's socket.io-client."""

import json

import pytest
import requests
import websocket

from fleet_harness import NODE_DIR, ROOT, Balancer, Chromium, Client, WebSite, wait_until

APP = "http://127.0.0.1:{port}"
CORS = "socketio:\n  cors:\n    origins: [{origins}]\n    credentials: {credentials}\n"


def start(closer, tmp_path, redis, origins, credentials="false", workers_extra="", **kw):
    extra = workers_extra + CORS.format(origins=", ".join(origins), credentials=credentials)
    b = closer.add(Balancer(tmp_path, redis.url, extra=extra, **kw))
    b.wait_ready()
    return b


def handshake(url, origin=None):
    headers = {"Origin": origin} if origin else {}
    return requests.get(url + "/socket.io/?EIO=4&transport=polling", headers=headers, timeout=5)


def preflight(url, origin, query="EIO=4&transport=polling"):
    return requests.options(f"{url}/socket.io/?{query}", timeout=5, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})


def ws_status(url, origin):
    """The status a WebSocket handshake from `origin` gets (101 when accepted)."""
    ws = websocket.WebSocket()
    try:
        ws.connect(url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket",
                   origin=origin, timeout=5)
        return 101
    except websocket.WebSocketBadStatusException as e:
        return e.status_code
    finally:
        ws.close()


@pytest.mark.parametrize("handoff", [True, False])
def test_listed_origins_through_the_balancer_and_straight_to_a_worker(closer, tmp_path, redis, handoff):
    app, evil = "http://app.test:3000", "http://evil.test"
    b = start(closer, tmp_path, redis, [app], credentials="true",
              workers_extra="" if handoff else "  handoff: false\n", count=2)
    for url in (b.url, b.worker_url(0)):
        r = handshake(url, app)
        assert r.status_code == 200, r.text
        assert r.headers["Access-Control-Allow-Origin"] == app
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in r.headers["Vary"]
        sid = json.loads(r.text[1:])["sid"]
        # A long-poll of that session carries them too.
        r = requests.post(f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}", data="40",
                          headers={"Origin": app}, timeout=5)
        assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == app
        # Preflights: answered, never "Session ID unknown", whatever the sid.
        for query in ("EIO=4&transport=polling", f"EIO=4&transport=polling&sid={sid}",
                      "EIO=4&transport=polling&sid=nosuchsession"):
            r = preflight(url, app, query)
            assert r.status_code == 204, (url, query, r.status_code, r.text)
            assert r.headers["Access-Control-Allow-Origin"] == app
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert r.headers["Access-Control-Allow-Headers"] == "content-type"
        # Another origin learns nothing and cannot open a session, by polling or WebSocket.
        r = preflight(url, evil)
        assert r.status_code == 204 and "Access-Control-Allow-Origin" not in r.headers
        r = handshake(url, evil)
        assert r.status_code == 403 and r.json() == {"code": 4, "message": "Forbidden"}
        assert "Access-Control-Allow-Origin" not in r.headers
        assert ws_status(url, evil) == 403
        assert ws_status(url, app) == 101
        # Clients that are not browsers send no Origin: let through.
        assert handshake(url).status_code == 200
    m = b.metrics()
    assert m.get('fleet_balancer_rejects_total{class="forbidden"}', 0) >= 2
    assert b.alive()


def test_any_origin_and_cors_off(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis, ['"*"'], count=1)
    r = handshake(b.url, "http://anywhere.test")
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in r.headers
    assert ws_status(b.url, "http://anywhere.test") == 101
    off = start(closer, tmp_path, redis, [], count=1, name="off")
    r = handshake(off.url, "http://anywhere.test")
    assert r.status_code == 200 and not any(k.lower().startswith("access-control") for k in r.headers)
    r = preflight(off.url, "http://anywhere.test")
    assert r.status_code == 204 and "Access-Control-Allow-Origin" not in r.headers


def _site():
    """A web app's origin: the test page and npm's client bundle."""
    return WebSite({
        "/page.html": (ROOT / "tests" / "browser" / "page.html", "text/html"),
        "/socket.io.min.js": (NODE_DIR / "node_modules" / "socket.io-client" / "dist" / "socket.io.min.js",
                              "application/javascript"),
    })


def _browse(closer, tmp_path, site, fleet_url, room, name):
    url = f"{site.origin}/page.html?fleet={fleet_url}&room={room}"
    closer.add(Chromium(url, tmp_path / f"profile-{name}"))
    return site.reports.get(timeout=60)


def test_a_browser_on_another_origin_connects_upgrades_joins_publishes_receives(closer, tmp_path, redis):
    site = closer.add(_site())
    stranger = closer.add(_site())  # another origin, not listed
    b = start(closer, tmp_path, redis, [site.origin])
    listener = closer.add(Client(b.url, ["polling", "websocket"])).connect()
    assert listener.call("join", "browser-room")["ok"]

    result = _browse(closer, tmp_path, site, b.url, "browser-room", "listed")
    assert result["ok"], result
    assert (result["first"], result["transport"]) == ("polling", "websocket"), result
    assert result["who"]["worker"] in {"w0", "w1", "w2"}
    assert result["joined"] == {"ok": True, "room": "browser-room"}
    assert result["message"] == {"room": "browser-room", "data": "from the browser"}
    # Its publish reached a member on whatever worker holds it.
    wait_until(lambda: "from the browser" in listener.data_received(), 5, what="listener got it")

    refused = _browse(closer, tmp_path, stranger, b.url, "browser-room", "stranger")
    assert refused == {"ok": False, "error": "xhr poll error"}, refused
    assert b.alive()
