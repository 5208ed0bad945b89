// The setup fleet replaces, built the documented way: Node `cluster` forks WORKERS processes,
// @socket.io/sticky in the primary routes each request by its sid, every worker runs socket.io
// with @socket.io/redis-adapter (ioredis), speaking the fleet's default app protocol
// (whoami / echo / join / leave / publish -> message).
// Usage: PORT=8000 WORKERS=3 REDIS_URL=redis://127.0.0.1:6379 node server.js
const cluster = require("node:cluster");
const http = require("node:http");
const { Server } = require("socket.io");
const { setupMaster, setupWorker } = require("@socket.io/sticky");
const { createAdapter } = require("@socket.io/redis-adapter");
const Redis = require("ioredis");

const port = +(process.env.PORT || 8000);
const workers = +(process.env.WORKERS || 2);
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379";

if (cluster.isPrimary) {
  const httpServer = http.createServer();
  setupMaster(httpServer, { loadBalancingMethod: "least-connection" });
  httpServer.listen(port, "127.0.0.1", () => console.log(`primary ${process.pid} on ${port}`));
  cluster.setupPrimary({ serialization: "advanced" });
  for (let i = 0; i < workers; i++) cluster.fork({ WORKER_ID: `n${i}` });
  cluster.on("exit", (w) => console.log(`worker ${w.process.pid} exited`));
} else {
  const id = process.env.WORKER_ID;
  const pub = new Redis(redisUrl);
  const sub = pub.duplicate();
  const io = new Server(http.createServer());
  io.adapter(createAdapter(pub, sub));
  setupWorker(io);
  const okRoom = (r) => typeof r === "string" && r.length > 0 && Buffer.byteLength(r) <= 256;
  io.on("connection", (socket) => {
    socket.on("whoami", (ack) => typeof ack === "function" && ack({ worker: id, sid: socket.id }));
    socket.on("echo", (v, ack) => typeof ack === "function" && ack(v));
    socket.on("join", (room, ack) => {
      if (!okRoom(room)) return typeof ack === "function" && ack({ ok: false, error: "bad room" });
      socket.join(room);
      typeof ack === "function" && ack({ ok: true, room });
    });
    socket.on("leave", (room, ack) => {
      socket.leave(room);
      typeof ack === "function" && ack({ ok: true, room });
    });
    socket.on("publish", (arg, ack) => {
      if (!arg || !okRoom(arg.room)) return typeof ack === "function" && ack({ ok: false, error: "bad publish" });
      io.to(arg.room).emit("message", { room: arg.room, data: arg.data });
      typeof ack === "function" && ack({ ok: true });
    });
  });
  console.log(`worker ${id} ${process.pid} started`);
}
