// The official socket.io-client over HTTPS/WSS, verifying the server against a CA file: one
// client per transport set (polling only, WebSocket only, polling upgraded to WebSocket), each
// asks whoami and echo, then prints {"results": [...]} and exits; exits 1 on any error or after
// 20 s. Usage: node tls_client.js URL CA_FILE
const fs = require("node:fs");
const { io } = require("socket.io-client");

const [url, caFile] = process.argv.slice(2);
const ca = fs.readFileSync(caFile);
const fail = (why) => { console.log(JSON.stringify({ error: why })); process.exit(1); };
setTimeout(() => fail("timed out"), 20000);

const sets = { polling: ["polling"], websocket: ["websocket"], upgrade: ["polling", "websocket"] };
const run = (name, transports) => new Promise((resolve) => {
  const s = io(url, { transports, ca, reconnection: false, forceNew: true });
  s.on("connect_error", (e) => fail(`${name}: connect_error: ${e.message}`));
  s.on("connect", () => {
    const check = () => s.emit("whoami", (who) => s.emit("echo", `hello ${name}`, (echo) => {
      resolve({ name, transport: s.io.engine.transport.name, worker: who.worker, echo });
      s.close();
    }));
    // An upgrading client is asked once its upgrade is done.
    if (name === "upgrade" && s.io.engine.transport.name !== "websocket") s.io.engine.once("upgrade", check);
    else check();
  });
});

Promise.all(Object.entries(sets).map(([n, t]) => run(n, t))).then((results) => {
  console.log(JSON.stringify({ results }));
  process.exit(0);
});
