// drain_node_server.js: a node server that drains itself on SIGTERM, for
// integration/test_drain_signal.py (hupt run --drain-signal TERM).
//
// server.close() alone stops accepting and waits for every connection to end,
// which a client that keeps sending on one keep-alive connection never does.
// So while closing, every answer carries `Connection: close` (node then ends
// the connection after it) and idle connections are closed; the process
// exits once the last connection is gone.
//
// Usage: node drain_node_server.js HOST:PORT
// Routes: / -> "ok pid=<pid> tag=<$HUPT_TEST_TAG>\n";  /pid -> "<pid>\n".
'use strict';
const http = require('http');

let closing = false;

const server = http.createServer((req, res) => {
  const body = req.url === '/pid'
    ? `${process.pid}\n`
    : `ok pid=${process.pid} tag=${process.env.HUPT_TEST_TAG || ''}\n`;
  const headers = { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) };
  if (closing) headers.Connection = 'close';
  res.writeHead(200, headers);
  res.end(body);
});

if (process.argv.length !== 3) {
  process.stderr.write('usage: node drain_node_server.js HOST:PORT\n');
  process.exit(2);
}
const arg = process.argv[2];
const i = arg.lastIndexOf(':');
server.on('error', (err) => {
  process.stderr.write(`drain_node_server: ${err.message}\n`);
  process.exit(1);
});
server.listen(Number(arg.slice(i + 1)), arg.slice(0, i), () => {
  process.stderr.write(`drain_node_server pid=${process.pid} listening on ${arg}\n`);
});

process.on('SIGTERM', () => {
  if (closing) return;
  closing = true;
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
