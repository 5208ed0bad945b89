// Socket.IO 2.x clients (Engine.IO protocol 3) through the fleet: half long-polling only, half
// polling upgraded to WebSocket. Each joins room "legacy"; prints {"ready":...} when all have
// joined (and upgraded), then waits for "from-v5" (published by the test), publishes
// "from-v2" from client 0, waits for it too, and prints {"done":...}. Exits 1 after 20 s.
// Usage: node v2_clients.js URL CLIENTS
const io = require("socket.io-client-v2");

const [url, count] = process.argv.slice(2);
const n = +count;
const fail = (why) => { console.log(JSON.stringify({ error: why })); process.exit(1); };
setTimeout(() => fail("timed out"), 20000);

const clients = [];
for (let i = 0; i < n; i++) {
  const transports = i % 2 ? ["polling"] : ["polling", "websocket"];
  const s = io(url, { transports, reconnection: false, forceNew: true });
  const c = { s, polling_only: i % 2 === 1, joined: false, got: new Set(), worker: null };
  s.on("connect_error", (e) => fail(`connect_error: ${e}`));
  s.on("error", (e) => fail(`error: ${e}`));
  s.on("message", (m) => { c.got.add(m.data); check(); });
  s.on("connect", () => {
    s.emit("whoami", (who) => {
      c.worker = who.worker;
      s.emit("join", "legacy", (ack) => {
        if (!ack.ok) fail("join refused");
        c.joined = true;
        check();
      });
    });
  });
  s.io.on("upgrade", () => check());
  clients.push(c);
}

const transport = (c) => c.s.io.engine && c.s.io.engine.transport.name;
let phase = "join";
function check() {
  if (phase === "join" && clients.every((c) => c.joined && (c.polling_only || transport(c) === "websocket"))) {
    phase = "v5";
    console.log(JSON.stringify({
      ready: true,
      workers: clients.map((c) => c.worker),
      transports: clients.map(transport),
      engine_ids: clients.map((c) => c.s.io.engine.id),
    }));
  }
  if (phase === "v5" && clients.every((c) => c.got.has("from-v5"))) {
    phase = "v2";
    clients[0].s.emit("publish", { room: "legacy", data: "from-v2" }, (ack) => { if (!ack.ok) fail("publish refused"); });
  }
  if (phase === "v2" && clients.every((c) => c.got.has("from-v2"))) {
    phase = "done";
    console.log(JSON.stringify({ done: true, transports: clients.map(transport) }));
    clients.forEach((c) => c.s.close());
    process.exit(0);
  }
}
