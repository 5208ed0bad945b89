// WebSocket clients for bench/tls.py: CLIENTS official socket.io-clients (WebSocket only) in
// rooms of ROOM_SIZE; once all have joined it prints "ready", then one member per room
// publishes RATE times a second in total for SECONDS; prints {"connected", "published",
// "delivered"} at the end. With CA_FILE the server is verified over wss://.
// Usage: node wss_clients.js URL CLIENTS ROOM_SIZE RATE SECONDS [CA_FILE]
const fs = require("node:fs");
const path = require("node:path");
const { io } = require(path.join(__dirname, "../../tests/node/node_modules/socket.io-client"));

const [url, clientsArg, roomArg, rateArg, secondsArg, caFile] = process.argv.slice(2);
const [clients, roomSize, rate, seconds] = [+clientsArg, +roomArg, +rateArg, +secondsArg];
const ca = caFile ? fs.readFileSync(caFile) : undefined;
const sockets = [];
let joined = 0, delivered = 0, published = 0;

const startPublishing = () => {
  console.log("ready");
  const rooms = Math.ceil(clients / roomSize);
  const perTick = rate / 100;
  let credit = 0, room = 0;
  const tick = setInterval(() => {
    for (credit += perTick; credit >= 1; credit--) {
      const s = sockets[(room % rooms) * roomSize];
      s.emit("publish", { room: `r${room % rooms}`, data: published++ });
      room++;
    }
  }, 10);
  setTimeout(() => {
    clearInterval(tick);
    // Let the last deliveries arrive.
    setTimeout(() => {
      console.log(JSON.stringify({ connected: joined, published, delivered }));
      process.exit(0);
    }, 1000);
  }, seconds * 1000);
};

for (let i = 0; i < clients; i++) {
  const s = io(url, { transports: ["websocket"], ca, reconnection: false, forceNew: true });
  sockets.push(s);
  s.on("message", () => { delivered++; });
  s.on("connect_error", (e) => { console.error(`connect_error: ${e.message}`); process.exit(1); });
  s.on("connect", () => s.emit("join", `r${Math.floor(i / roomSize)}`, (ack) => {
    if (!ack.ok) { console.error("join refused"); process.exit(1); }
    if (++joined === clients) startPublishing();
  }));
}
setTimeout(() => { console.error("timed out"); process.exit(1); }, (seconds + 120) * 1000);
