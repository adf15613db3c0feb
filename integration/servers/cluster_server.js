// cluster_server.js: node's cluster module, a primary and N workers, for the
// integration tests (issue: pre-fork servers in exec mode and under attach).
//
// The primary listens (round-robin scheduling: it accepts and hands each
// connection to a worker). SIGTERM to the primary drains: every worker answers
// with `Connection: close` from then on, closes its idle connections and its
// server, and exits once its last connection is gone; the primary exits after
// the last worker.
//
// Usage: node cluster_server.js HOST:PORT [WORKERS]
// Routes: / -> "ok pid=<worker pid> tag=<$HUPT_TEST_TAG>\n"; /pid -> "<primary pid>\n".
'use strict';
const cluster = require('cluster');
const http = require('http');

const arg = process.argv[2] || '';
const i = arg.lastIndexOf(':');
const host = arg.slice(0, i);
const port = Number(arg.slice(i + 1));
const workers = Number(process.argv[3] || 2);

if (cluster.isPrimary) {
  for (let n = 0; n < workers; n++) cluster.fork();
  let stopping = false;
  process.on('SIGTERM', () => {
    if (stopping) return;
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.send('drain');
    cluster.on('exit', () => {
      if (Object.keys(cluster.workers).length === 0) process.exit(0);
    });
  });
  cluster.on('exit', (w, code, sig) => {
    if (!stopping) process.stderr.write(`cluster_server: worker ${w.process.pid} died (${code || sig})\n`);
  });
} else {
  let closing = false;
  const server = http.createServer((req, res) => {
    const body = req.url === '/pid'
      ? `${process.ppid}\n`
      : `ok pid=${process.pid} tag=${process.env.HUPT_TEST_TAG || ''}\n`;
    const headers = { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) };
    if (closing) headers.Connection = 'close';
    res.writeHead(200, headers);
    res.end(body);
  });
  server.listen(port, host);
  process.on('message', (m) => {
    if (m !== 'drain' || closing) return;
    closing = true;
    server.close(() => process.exit(0));
    server.closeIdleConnections();
  });
  process.on('SIGTERM', () => {});  // the primary says when (its SIGTERM goes to the group under a tty)
}
