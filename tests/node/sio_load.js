// The load generator's scenario, run with the official socket.io-client: client i joins room
// r(i mod rooms); clients 0..publishers publish `rate` times a second for `duration` seconds;
// every member counts each `message` once. Prints {expected, delivered, duplicate, ...} as JSON.
// Usage: node sio_load.js URL CLIENTS ROOMS PUBLISHERS RATE MESSAGES TRANSPORT
// (each publisher publishes MESSAGES times at RATE per second, then everyone listens 2 s more).
const { io } = require("socket.io-client");

const [url, clients, rooms, publishers, rate, messages, transport] = process.argv.slice(2);
const n = +clients, nRooms = +rooms, nPub = +publishers;
const transports = transport === "websocket" ? ["websocket"]
  : transport === "polling" ? ["polling"] : ["polling", "websocket"];

const members = new Array(nRooms).fill(0);
const publishes = new Array(nRooms).fill(0);
let delivered = 0, duplicate = 0, acked = 0;
const errors = {};
const workers = {};
const err = (k) => { errors[k] = (errors[k] || 0) + 1; };

function connectOne(i) {
  return new Promise((resolve) => {
    const s = io(url, { transports, reconnection: false, forceNew: true, timeout: 20000 });
    const seen = new Set();
    s.on("message", (m) => {
      const key = `${m.data.p}:${m.data.s}`;
      delivered++;
      if (seen.has(key)) duplicate++; else seen.add(key);
    });
    s.on("connect_error", (e) => { err("connect_error"); resolve(null); });
    s.on("connect", () => {
      s.emit("whoami", (who) => {
        workers[who.worker] = (workers[who.worker] || 0) + 1;
        s.emit("join", `r${i % nRooms}`, (ack) => {
          if (!ack.ok) { err("join_refused"); resolve(null); return; }
          members[i % nRooms]++;
          resolve(s);
        });
      });
    });
  });
}

(async () => {
  const sockets = [];
  for (let i = 0; i < n; i++) sockets.push(connectOne(i));
  const ready = await Promise.all(sockets);
  const publishers = [];
  for (let i = 0; i < nPub; i++) {
    const s = ready[i];
    if (!s) continue;
    const room = `r${i % nRooms}`;
    publishers.push(new Promise((done) => {
      let seq = 0;
      const timer = setInterval(() => {
        if (seq >= +messages) { clearInterval(timer); done(); return; }
        publishes[i % nRooms]++;
        s.emit("publish", { room, data: { p: i, s: seq++, t: Date.now() * 1000 } }, (a) => {
          if (a && a.ok) acked++; else err("publish_refused");
        });
      }, 1000 / +rate);
    }));
  }
  await Promise.all(publishers);
  await new Promise((r) => setTimeout(r, 2000));
  const expected = members.reduce((sum, m, r) => sum + m * publishes[r], 0);
  const published = publishes.reduce((a, b) => a + b, 0);
  console.log(JSON.stringify({
    connected: ready.filter(Boolean).length, published, acked, expected, delivered, duplicate,
    missing: Math.max(0, expected - (delivered - duplicate)), errors, workers,
  }));
  ready.forEach((s) => s && s.close());
  process.exit(0);
})();
