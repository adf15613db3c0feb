// Injection target: two node http servers (libuv epoll loop, one JS thread).
// Prints "MAIN_PORT AUX_PORT" once both listen.
'use strict';
const http = require('http');
const handler = (req, res) => { res.writeHead(200, {'Connection': 'close'}); res.end('ok\n'); };
const main = http.createServer(handler);
const aux = http.createServer(handler);
main.listen(0, '127.0.0.1', () => {
  aux.listen(0, '127.0.0.1', () => {
    process.stdout.write(`${main.address().port} ${aux.address().port}\n`);
  });
});
