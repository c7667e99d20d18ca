'use strict';

// One cluster worker: HTTP + WebSocket on the shared port, one NATS
// connection, this worker's hub (local fan-out) and connections.

const http = require('node:http');
const os = require('node:os');
const { WebSocketServer } = require('ws');
const { connect } = require('nats');
const { Err, Close, ProtoError } = require('./protocol');
const { pack, unpack } = require('./codec');
const { Hub } = require('./hub');
const { Requester } = require('./requester');
const { Connection } = require('./connection');
const { createApi } = require('./http-api');

const SUBPROTOCOLS = ['rt.v1.msgpack', 'rt.v1.json'];

/** The first supported subprotocol in the client's order; null: none offered; false: only unsupported. */
function chooseSubprotocol(header) {
  if (header === undefined) return null;
  let offered = false;
  for (const raw of header.split(',')) {
    const p = raw.trim();
    if (p === '') continue;
    offered = true;
    if (SUBPROTOCOLS.includes(p)) return p;
  }
  return offered ? false : null;
}

function rejectUpgrade(socket, status, text) {
  socket.end(`HTTP/1.1 ${status} ${text}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
}

async function startWorker(config, log) {
  const nc = await connect({
    servers: config.natsUrl,
    name: `rt-node-worker-${process.pid}`,
    maxReconnectAttempts: -1,
    // No Error with a captured stack per flush or subscription for async traces.
    noAsyncTraces: true,
  });
  const metrics = { deliveries: 0, badDeliveries: 0, errors: 0, slowConsumers: 0 };
  const connections = new Set();
  const seqPrefix = `${config.natsPrefix}.seq.`;
  const requester = new Requester(nc, config.requestTimeoutMs);

  // Rate-limited: a failure repeated by every connection must not flood the log.
  let lastErrorLog = 0;
  let suppressed = 0;
  const logError = (what, error) => {
    const now = Date.now();
    if (now - lastErrorLog < 5000) {
      suppressed++;
      return;
    }
    lastErrorLog = now;
    log(what, error && error.stack ? error.stack : error, suppressed ? `(${suppressed} similar suppressed)` : '');
    suppressed = 0;
  };
  process.on('unhandledRejection', (error) => logError('unhandled rejection', error));

  const server = {
    config,
    log,
    logError,
    metrics,
    connections,
    node: `node-${os.hostname()}-${process.pid}`,
    hub: new Hub(nc, config, metrics),
    ready: () => !nc.isClosed() && !nc.isDraining(),
    /** A request to the sequencer; resolves with its answer or rejects with a ProtoError. */
    request(channel, body) {
      return requester.request(seqPrefix + channel, pack(body)).then(
        (data) => {
          const reply = unpack(data);
          if (reply.error) throw new ProtoError(reply.error.code, reply.error.message);
          return reply;
        },
        (error) => {
          if (error.message === 'no-responders') {
            throw new ProtoError(Err.BUSY, 'the service is unavailable, retry later', 1000);
          }
          if (error.message === 'timeout') throw new ProtoError(Err.TIMEOUT, 'timeout');
          throw new ProtoError(Err.INTERNAL, 'internal error');
        },
      );
    },
  };

  const wss = new WebSocketServer({
    noServer: true,
    maxPayload: config.maxMessageSize, // larger → close 1009
    perMessageDeflate: false,
    clientTracking: false,
    skipUTF8Validation: true, // JSON frames are checked by the decoder: bad UTF-8 is a 4000
    handleProtocols: (protocols) => chooseSubprotocol([...protocols].join(',')) || false,
  });

  const httpServer = http.createServer({ noDelay: true, keepAliveTimeout: 65_000 }, createApi(server));

  httpServer.on('upgrade', (req, socket, head) => {
    const url = req.url;
    const q = url.indexOf('?');
    const path = q === -1 ? url : url.slice(0, q);
    if (path !== '/ws') return rejectUpgrade(socket, 404, 'Not Found');
    const protocol = chooseSubprotocol(req.headers['sec-websocket-protocol']);
    if (protocol === false) return rejectUpgrade(socket, 400, 'Bad Request');
    socket.setNoDelay(true);
    wss.handleUpgrade(req, socket, head, (ws) => {
      const conn = new Connection(server, ws, protocol !== 'rt.v1.msgpack');
      connections.add(conn);
      ws.on('message', (data, isBinary) => conn.onMessage(data, isBinary));
      ws.on('pong', () => { conn.lastSeen = Date.now(); });
      ws.on('ping', () => { conn.lastSeen = Date.now(); });
      ws.on('close', () => conn.onClose());
      // ws closes the socket itself on protocol errors (1009 for a message over
      // maxPayload, 1002 otherwise); the error only needs observing.
      ws.on('error', () => {});
    });
  });

  // Liveness: one sweep for all connections every ping interval.
  const pinger = setInterval(() => {
    const now = Date.now();
    const stale = config.pingMs * 3;
    for (const conn of connections) {
      if (now - conn.lastSeen >= stale) conn.fail(Close.STALE, 'no pong');
      else if (conn.ws.readyState === 1) conn.ws.ping();
    }
  }, config.pingMs);
  pinger.unref();

  await new Promise((resolve, reject) => {
    httpServer.once('error', reject);
    httpServer.listen(config.port, config.host, resolve);
  });

  const stop = async () => {
    clearInterval(pinger);
    requester.close();
    httpServer.close();
    for (const conn of connections) conn.fail(1001, 'server shutting down');
    await nc.drain().catch(() => {});
  };
  return { server, stop };
}

module.exports = { startWorker, chooseSubprotocol };
