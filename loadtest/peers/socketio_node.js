// Node.js Socket.IO peer for loadtest/bench.py: one process, WebSocket and polling transports,
// @socket.io/redis-streams-adapter on the benchmark's Redis.
//
//   node socketio_node.js --redis redis://127.0.0.1:6379 --port 0
//
// Clients emit "join" (room id) to join a room; the server acks with "joined". Messages reach
// the clients through the adapter: the benchmark publisher XADDs BROADCAST entries to the
// adapter's stream in the adapter's own format, exactly what `io.to(room).emit("message", m)`
// on another Socket.IO server process appends. Prints the same READY line as a chatcluster node.
"use strict";
const http = require("http");
const { Server } = require("socket.io");
const { createClient } = require("redis");
const { createAdapter } = require("@socket.io/redis-streams-adapter");

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
}

async function main() {
  const redisUrl = arg("--redis", "redis://127.0.0.1:6379");
  const port = Number(arg("--port", "0"));
  const redis = createClient({ url: redisUrl });
  await redis.connect();
  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    transports: ["polling", "websocket"],  // polling: the Engine.IO polling comparison
    serveClient: false,
    perMessageDeflate: false,
    adapter: createAdapter(redis),
  });
  io.on("connection", (socket) => {
    socket.on("join", (room) => {
      socket.join(String(room));
      socket.emit("joined", String(room));
    });
  });
  httpServer.listen(port, "127.0.0.1", () => {
    const p = httpServer.address().port;
    process.stdout.write(`CHATCLUSTER READY node=socketio-node ws=${p} http=0\n`);
  });
  const stop = () => { io.close(); redis.quit().finally(() => process.exit(0)); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => { console.error(e); process.exit(1); });
