// A stock Socket.IO server, as an existing app would run it: socket.io with
// @socket.io/redis-adapter (ioredis), nothing of the fleet's (no /readyz, no load header),
// speaking the fleet's default app protocol (whoami / join / leave / publish -> message) so a
// test can see where each client landed and what reached it.
// Usage: PORT=8000 ID=n0 REDIS_URL=redis://127.0.0.1:6379 node stock_server.js
const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const Redis = require("ioredis");

const port = +(process.env.PORT || 8000);
const id = process.env.ID || `node-${port}`;
const pub = new Redis(process.env.REDIS_URL || "redis://127.0.0.1:6379");
const sub = pub.duplicate();
const httpServer = http.createServer();
const io = new Server(httpServer);
io.adapter(createAdapter(pub, sub));

const okRoom = (r) => typeof r === "string" && r.length > 0 && Buffer.byteLength(r) <= 256;
const reply = (ack, v) => typeof ack === "function" && ack(v);
io.on("connection", (socket) => {
  socket.on("whoami", (ack) => reply(ack, { worker: id, sid: socket.id }));
  // Engine.IO sessions open on this server, whatever opened them (probes included).
  socket.on("sessions", (ack) => reply(ack, io.engine.clientsCount));
  socket.on("join", (room, ack) => {
    if (!okRoom(room)) return reply(ack, { ok: false, error: "bad room" });
    socket.join(room);
    reply(ack, { ok: true, room });
  });
  socket.on("leave", (room, ack) => {
    socket.leave(room);
    reply(ack, { ok: true, room });
  });
  socket.on("publish", (arg, ack) => {
    if (!arg || !okRoom(arg.room)) return reply(ack, { ok: false, error: "bad publish" });
    io.to(arg.room).emit("message", { room: arg.room, data: arg.data });
    reply(ack, { ok: true });
  });
});
// Subscribed to Redis before listening: a client that can connect gets every publish.
sub.once("ready", () =>
  httpServer.listen(port, "127.0.0.1", () => console.log(`stock socket.io ${id} on ${port}`)),
);
