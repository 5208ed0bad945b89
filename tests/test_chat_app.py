"""An app of its own as the fleet's workers: the balancer spawns the example chat
(`apps/chat`, `workers.command`), and official clients use two namespaces across three workers;
history agrees whichever worker a client lands on; a kick from /admin reaches another worker;
kill -9, drain and WebSocket handoff work as for the default worker; the page works in a
browser through the balancer."""

import os
import shutil
import signal
import time

import requests
import socketio

from fleet_harness import BIN_DIR, NODE_DIR, ROOT, Balancer, Chromium, WebSite, metric, wait_until

ADMIN_KEY = "chat-admin-key-0123456789"


def start(closer, tmp_path, redis, count=3, static_dir=None):
    extra = (f"  command: [{BIN_DIR / 'chat'}]\n"
             "balancer:\n  forward_paths: [/]\n")
    env = {"CHAT_ADMIN_KEY": ADMIN_KEY}
    if static_dir:
        env["CHAT_STATIC_DIR"] = str(static_dir)
    b = closer.add(Balancer(tmp_path, redis.url, count=count, extra=extra, env=env))
    b.wait_ready()
    return b


class Chatter:
    """An official-protocol client (python-socketio) in `/` (and `/admin` when asked)."""

    def __init__(self, url, namespaces=("/",), headers=None, transports=("polling", "websocket")):
        self.lines, self.typing, self.disconnects = [], [], []
        self.sio = socketio.Client(reconnection=False, request_timeout=5)
        self.sio.on("line", self.lines.append)
        self.sio.on("typing", self.typing.append)
        self.sio.on("disconnect", lambda *r: self.disconnects.append(r), namespace="/")
        self.sio.connect(url, namespaces=list(namespaces), headers=headers or {},
                         transports=list(transports), wait_timeout=10)

    def call(self, event, data=None, namespace="/"):
        return self.sio.call(event, data, namespace=namespace, timeout=10)

    def close(self):
        try:
            self.sio.disconnect()
        except Exception:
            pass


def spread(closer, b, n, nick_prefix, room):
    """`n` chatters straight to each worker in turn, nicknamed and in `room`."""
    out = []
    for i in range(n):
        c = closer.add(Chatter(b.worker_url(i % b.count)))
        assert c.call("nick", f"{nick_prefix}{i}")["ok"]
        assert c.call("join", room)["ok"]
        out.append(c)
    return out


def test_two_namespaces_history_members_typing_and_a_kick_across_workers(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis)
    # Lines said through w0, history asked through w1 and w2: the same, oldest first.
    first = closer.add(Chatter(b.worker_url(0)))
    assert first.call("nick", "ann") == {"ok": True, "nick": "ann"}
    joined = first.call("join", "general")
    assert joined["ok"] and joined["history"] == []
    for i in range(55):
        assert first.call("say", {"room": "general", "text": f"line {i}"}) == {"ok": True}
    for i in (1, 2):
        late = closer.add(Chatter(b.worker_url(i)))
        late.call("nick", f"late{i}")
        h = late.call("join", "general")["history"]
        assert [l["text"] for l in h] == [f"line {i}" for i in range(5, 55)], h[:3]
        assert all(l["nick"] == "ann" and l["room"] == "general" for l in h)

    # Through the balancer: lines and typing reach members on every worker, once.
    crowd = spread(closer, b, 6, "c", "team")
    crowd[0].call("say", {"room": "team", "text": "hello team"})
    for c in crowd:
        wait_until(lambda c=c: any(l["text"] == "hello team" for l in c.lines), 5, what="line delivered")
    time.sleep(0.2)
    assert all(sum(l["text"] == "hello team" for l in c.lines) == 1 for c in crowd)
    crowd[1].sio.emit("typing", {"room": "team", "typing": True})
    for c in crowd[:1] + crowd[2:]:
        wait_until(lambda c=c: {"room": "team", "nick": "c1", "typing": True} in c.typing, 5, what="typing")
    assert crowd[1].typing == []  # not to the one typing

    # Members across workers, by nickname only (a socket id is its session's id).
    members = crowd[3].call("members", "team")["members"]
    assert sorted(m["nick"] for m in members) == [f"c{i}" for i in range(6)]
    assert all(set(m) == {"nick"} for m in members)
    assert crowd[3].call("members", "general")["ok"] is False  # not a member of it
    # The fleet's permissions hold in the app: nobody joins a user's room or leaves their own.
    assert crowd[3].call("join", "user:alice") == {"ok": False, "error": "forbidden"}
    assert crowd[3].call("join", "nick:c1") == {"ok": False, "error": "forbidden"}
    crowd[3].sio.emit("typing", {"room": "general", "typing": True})  # not its room: dropped
    time.sleep(0.2)
    assert all(t["room"] == "team" for c in crowd for t in c.typing)

    # /admin: refused without the key; with it, a kick on w0 disconnects c2 on w2.
    refused = socketio.Client(reconnection=False)
    errors = []
    refused.on("connect_error", lambda data=None: errors.append(data), namespace="/admin")
    try:
        refused.connect(b.url, namespaces=["/admin"], wait_timeout=5)
    except socketio.exceptions.ConnectionError:
        pass
    assert errors and errors[0] == {"message": "admins only"}, errors
    admin = closer.add(Chatter(b.worker_url(0), namespaces=["/admin"], headers={"x-chat-admin-key": ADMIN_KEY}))
    assert admin.call("kick", {"nick": "c2"}, namespace="/admin") == {"ok": True, "kicked": 1}
    wait_until(lambda: crowd[2].disconnects, 5, what="c2 kicked from another worker")
    assert all(not c.disconnects for c in crowd[:2] + crowd[3:])
    assert admin.call("kick", {"nick": "nobody"}, namespace="/admin") == {"ok": True, "kicked": 0}
    assert admin.call("kick", "c3", namespace="/admin")["ok"] is False


def test_kill_9_drain_and_handoff_as_for_the_default_worker(closer, tmp_path, redis):
    b = start(closer, tmp_path, redis)
    ws = [closer.add(Chatter(b.url, transports=("websocket",))) for _ in range(12)]
    for i, c in enumerate(ws):
        c.call("nick", f"w{i}")
        c.call("join", "ops")
    m = b.metrics()
    assert metric(m, "fleet_balancer_websocket_handoffs_total", outcome="passed") == 12  # handed off
    # kill -9 of one app worker: the supervisor restarts it.
    pid = int([l for l in b.output().splitlines() if "worker started worker=w1" in l][-1].split("pid=")[1].split()[0])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: metric(b.metrics(), "fleet_balancer_worker_restarts_total", worker="w1") >= 1, 10,
               what="w1 restarted")
    wait_until(lambda: requests.get(b.worker_url(1) + "/readyz", timeout=2).status_code == 200, 10,
               what="the new w1 ready")
    fresh = closer.add(Chatter(b.worker_url(1)))
    assert fresh.call("nick", "after-restart")["ok"]
    # SIGTERM to the balancer: the app workers drain and the fleet exits cleanly.
    b.signal(signal.SIGTERM)
    assert b.wait_exit(15) == 0
    assert "drained, exiting" in b.output()


def test_the_page_in_a_browser_through_the_balancer(closer, tmp_path, redis):
    static = tmp_path / "static"
    shutil.copytree(ROOT / "apps" / "chat" / "static", static)
    shutil.copy(NODE_DIR / "node_modules" / "socket.io-client" / "dist" / "socket.io.min.js", static)
    # The test's own script, added to this copy only: join, say, report.
    shutil.copy(ROOT / "tests" / "browser" / "chat_hook.js", static)
    page = static / "index.html"
    page.write_text(page.read_text().replace("</body>", '<script src="/chat_hook.js"></script>\n</body>'))
    b = start(closer, tmp_path, redis, static_dir=static)
    # Pages go through the balancer to a worker; the workers' own endpoints do not.
    assert "fleet chat" in requests.get(b.url + "/", timeout=5).text
    assert requests.get(b.url + "/metrics", timeout=5).status_code == 404
    listener = closer.add(Chatter(b.url))
    listener.call("nick", "listener")
    listener.call("join", "lobby")
    listener.call("say", {"room": "lobby", "text": "before the browser"})

    reports = closer.add(WebSite())
    url = f"{b.url}/?nick=browser&room=lobby&say=hello+from+chromium&report={reports.origin}/"
    closer.add(Chromium(url, tmp_path / "profile"))
    result = reports.reports.get(timeout=60)
    assert result["ok"] and (result["first"], result["transport"]) == ("polling", "websocket"), result
    assert [l["text"] for l in result["history"]] == ["before the browser"]
    assert result["line"]["nick"] == "browser" and result["line"]["text"] == "hello from chromium"
    assert sorted(m["nick"] for m in result["members"]["members"]) == ["browser", "listener"]
    wait_until(lambda: any(l["text"] == "hello from chromium" for l in listener.lines), 5, what="heard")


def test_the_load_generator_speaks_the_chat(closer, tmp_path, redis):
    """`loadtest --app chat`: the same exactly-once accounting over the chat's events (`say`
    and `line`), so the app can be load-tested and its cost compared with the default app's."""
    from test_loadtest import run_loadtest
    b = start(closer, tmp_path, redis)
    for transport in ("websocket", "polling"):
        code, r, out = run_loadtest(b.url, tmp_path, "-c", 60, "--rooms", 6, "--publishers", 6, "--rate", 20,
                                    "--messages", 20, "-d", 3, "--settle", 1, "--app", "chat",
                                    "--transport", transport)
        assert code == 0, out
        assert r["deliveries"] == {"expected": 1200, "delivered": 1200, "duplicate": 0, "missing": 0}, out
        assert r["published"] == r["acked"] == 120 and r["errors"] == {}, out
