'use strict';

// HTTP for backend services (PROTOCOL.md §5, subset): POST /api/publish,
// GET /healthz, GET /readyz. The API key is checked before the route.
// Bodies are JSON, or MessagePack with `Content-Type: application/msgpack`;
// the answer follows `Accept`, else the request's encoding.

const { Err, ProtoError, bad, channelProblem } = require('./protocol');
const codec = require('./codec');

const MSGPACK = 'application/msgpack';

function statusOf(code, retryAfterMs) {
  switch (code) {
    case Err.BAD_REQUEST: case Err.UNKNOWN_CHANNEL: return 400;
    case Err.UNAUTHORIZED: case Err.TOKEN_EXPIRED: return 401;
    case Err.PERMISSION_DENIED: return 403;
    case Err.UNKNOWN_OP: return 404;
    case Err.ALREADY_SUBSCRIBED: case Err.UNRECOVERABLE_POSITION: return 409;
    case Err.LIMIT_EXCEEDED: case Err.TOO_MANY_REQUESTS: return 429;
    case Err.NOT_AVAILABLE: return 501;
    case Err.BUSY: return retryAfterMs !== undefined ? 503 : 500;
    case Err.TIMEOUT: return 504;
    default: return 500;
  }
}

function wantsMsgpack(req) {
  const accept = req.headers.accept;
  if (accept) {
    if (accept.startsWith(MSGPACK)) return true;
    if (accept.startsWith('application/json')) return false;
  }
  const type = req.headers['content-type'];
  return typeof type === 'string' && type.startsWith(MSGPACK);
}

function send(req, res, status, body, headers) {
  const msgpack = wantsMsgpack(req);
  const payload = msgpack ? codec.pack(body) : Buffer.from(JSON.stringify(body));
  res.writeHead(status, {
    'content-type': msgpack ? MSGPACK : 'application/json',
    'content-length': payload.length,
    ...headers,
  });
  res.end(payload);
}

function sendError(req, res, error, status) {
  const headers = error.code === Err.BUSY && error.retryAfterMs !== undefined
    ? { 'retry-after': String(Math.max(1, Math.ceil(error.retryAfterMs / 1000))) }
    : undefined;
  send(req, res, status ?? statusOf(error.code, error.retryAfterMs),
    { error: { code: error.code, message: error.message } }, headers);
}

function readBody(req, limit) {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length']);
    if (declared > limit) return reject(new ProtoError(Err.LIMIT_EXCEEDED, 'body too large'));
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > limit) {
        req.removeAllListeners('data');
        req.resume();
        reject(new ProtoError(Err.LIMIT_EXCEEDED, 'body too large'));
      } else {
        chunks.push(chunk);
      }
    });
    req.on('end', () => resolve(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size)));
    req.on('error', reject);
  });
}

function parseBody(req, body) {
  const type = req.headers['content-type'];
  const msgpack = typeof type === 'string' && type.startsWith(MSGPACK);
  let value;
  try {
    value = msgpack ? codec.unpack(body) : JSON.parse(body.toString('utf8'));
  } catch {
    throw bad(msgpack ? 'body is not valid MessagePack' : 'body is not valid JSON');
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value) || value instanceof Uint8Array) {
    throw bad('body must be a map');
  }
  return { value, json: !msgpack };
}

function createApi(server) {
  const { config } = server;
  const expected = `apikey ${config.apiKey}`;

  async function publish(req, res) {
    const body = await readBody(req, config.maxMessageSize);
    const { value, json } = parseBody(req, body);
    const { channel, info, idempotency_key: key } = value;
    if (typeof channel !== 'string') throw bad('channel is required');
    const problem = channelProblem(channel);
    if (problem) throw bad(`channel ${JSON.stringify(channel)}: ${problem}`);
    let data = value.data;
    const b64 = json ? value.data_b64 : undefined;
    if (data !== undefined && b64 !== undefined) throw bad('send data or data_b64, not both');
    if (b64 !== undefined) {
      if (typeof b64 !== 'string' || (data = codec.decodeBase64(b64)) === undefined) {
        throw bad('data_b64 is not valid base64');
      }
    } else if (data === undefined) {
      throw bad('data is required');
    } else if (json) {
      data = codec.jsonToData(data);
    }
    const pubInfo = { user: '', client: '' };
    if (info !== undefined && info !== null) {
      if (typeof info !== 'object' || Array.isArray(info) || info instanceof Uint8Array) throw bad('info must be a map');
      pubInfo.info = json ? codec.jsonToData(info) : info;
    }
    if (key !== undefined && key !== null && typeof key !== 'string') throw bad('idempotency_key must be a string');
    const request = { op: 'p', data, info: pubInfo };
    if (typeof key === 'string') request.key = key;
    const ack = await server.request(channel, request);
    send(req, res, 200, { offset: Number(ack.offset), epoch: ack.epoch });
  }

  async function route(req, res) {
    const url = req.url;
    const q = url.indexOf('?');
    const path = q === -1 ? url : url.slice(0, q);
    if (path.startsWith('/api/')) {
      if (!config.apiKey || req.headers.authorization !== expected) {
        req.resume();
        return sendError(req, res, new ProtoError(Err.UNAUTHORIZED, 'missing or bad API key'));
      }
      if (path === '/api/publish' && req.method === 'POST') return publish(req, res);
      req.resume();
      return sendError(req, res, new ProtoError(Err.UNKNOWN_OP, 'unknown route'));
    }
    req.resume();
    if (path === '/healthz' && req.method === 'GET') return res.end('ok\n');
    if (path === '/readyz' && req.method === 'GET') {
      const ready = server.ready();
      res.statusCode = ready ? 200 : 503;
      return res.end(ready ? 'ready\n' : 'not ready\n');
    }
    res.statusCode = path === '/ws' ? 400 : 404;
    res.end(path === '/ws' ? 'websocket upgrade required\n' : 'not found\n');
  }

  return function handler(req, res) {
    route(req, res).catch((error) => {
      if (res.headersSent) return res.destroy();
      if (error instanceof ProtoError) {
        const status = error.code === Err.LIMIT_EXCEEDED && error.message === 'body too large' ? 413 : undefined;
        return sendError(req, res, error, status);
      }
      server.logError('http error', error);
      sendError(req, res, new ProtoError(Err.INTERNAL, 'internal error'));
    });
  };
}

module.exports = { createApi };
