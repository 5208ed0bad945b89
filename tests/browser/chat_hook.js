// Added to a copy of apps/chat/static/index.html by tests/test_chat_app.py (never shipped):
// ?nick=N&room=R&say=TEXT joins and says at once, then posts what happened to &report=URL.
const params = new URLSearchParams(location.search);
if (params.get("nick")) {
  socket.once("connect", async () => {
    const first = opened;
    const joined = await enter(params.get("nick"), params.get("room") || "lobby");
    const said = params.get("say");
    const heard = new Promise((resolve) => socket.on("line", (l) => l.text === said && resolve(l)));
    await socket.emitWithAck("say", { room, text: said });
    const line = await heard;
    for (let i = 0; i < 100 && socket.io.engine.transport.name !== "websocket"; i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const members = await refreshMembers();
    const result = { ok: true, first, transport: socket.io.engine.transport.name,
                     history: joined.history, line, members };
    if (params.get("report")) {
      fetch(params.get("report"), { method: "POST", mode: "no-cors", body: JSON.stringify(result) });
    }
  });
}
