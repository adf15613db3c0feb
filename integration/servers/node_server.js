// node_server.js: the Node test server for hupt's integration tests.
//
// Node runs a libuv epoll loop and marks fds 0-2 close-on-exec, two things
// hupt must cope with. Plain `http` module, HTTP/1.1 keep-alive (Node's own
// 5 s idle timeout).
//
// Usage: node node_server.js ADDRESS
//   ADDRESS: PORT (127.0.0.1) | 127.0.0.1:PORT | [::1]:PORT | unix:/path | /path
// Routes: /  -> "ok pid=<pid> tag=<$HUPT_TEST_TAG>\n";  /pid -> "<pid>\n";
//         /slow?ms=N -> sleep N ms, then like "/".
// SIGTERM/SIGINT: server.close() (stops accepting, closes idle connections,
// waits for in-flight requests), then exit 0.
'use strict';
const http = require('http');

const MAX_SLOW_MS = 600000;

function parseAddress(arg) {
  if (arg.startsWith('unix:')) return { path: arg.slice(5) };
  if (arg.startsWith('/')) return { path: arg };
  if (/^\d+$/.test(arg)) return { host: '127.0.0.1', port: Number(arg) };
  const i = arg.lastIndexOf(':');
  let host = arg.slice(0, i);
  if (host.startsWith('[')) host = host.slice(1, -1);
  return { host, port: Number(arg.slice(i + 1)) };
}

function okBody() {
  return `ok pid=${process.pid} tag=${process.env.HUPT_TEST_TAG || ''}\n`;
}

function send(res, status, body) {
  res.writeHead(status, {
    'Content-Type': 'text/plain',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/') return send(res, 200, okBody());
  if (url.pathname === '/pid') return send(res, 200, `${process.pid}\n`);
  if (url.pathname === '/slow') {
    const ms = Number(url.searchParams.get('ms') || '0');
    if (!Number.isInteger(ms) || ms < 0) return send(res, 400, 'bad ms\n');
    setTimeout(() => send(res, 200, okBody()), Math.min(ms, MAX_SLOW_MS));
    return undefined;
  }
  return send(res, 404, 'not found\n');
});

if (process.argv.length !== 3) {
  process.stderr.write('usage: node node_server.js PORT|HOST:PORT|[::1]:PORT|unix:/path\n');
  process.exit(2);
}
const where = parseAddress(process.argv[2]);
server.on('error', (err) => {
  process.stderr.write(`node_server: ${err.message}\n`);
  process.exit(1);
});
server.listen(where, () => {
  process.stderr.write(`node_server pid=${process.pid} listening on ${process.argv[2]}\n`);
});

function shutdown() {
  server.close(() => process.exit(0));
  // Bounded: a stuck keep-alive client must not keep the process forever.
  setTimeout(() => process.exit(0), 30000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
