'use strict';

// One WebSocket connection: commands in, replies and pushes out.
//
// Everything a client receives goes through its outbound queue (`push`), so
// the order it sees is the order things were queued. The queue is flushed once
// per event-loop turn for all connections (setImmediate): a connection with one
// message gets the shared pre-built frame written straight to its socket (one
// write, no copy, no per-socket header); several messages queued in the same
// turn are coalesced into one frame (MessagePack back to back, JSON lines) of
// at most 16 KiB, as the protocol allows and the Rust gateway does.
//
// The bound: when what is queued here plus what the socket still buffers would
// pass 1 MiB, the queue is dropped and the socket closed with 4004.

const crypto = require('node:crypto');
const { WebSocket } = require('ws');
const { Err, Close, ProtoError, bad, closeAfterFailedConnect, channelProblem, toUint } = require('./protocol');
const codec = require('./codec');

const AWAITING_CONNECT = 0;
const CONNECTED = 1;
const CLOSING = 2;

// ------------------------------------------------------------ flush scheduling

let dirty = [];
let spare = [];
let flushScheduled = false;

function flushAll() {
  flushScheduled = false;
  const list = dirty;
  dirty = spare;
  for (let i = 0; i < list.length; i++) list[i].flush();
  list.length = 0;
  spare = list;
}

function scheduleFlush(conn) {
  dirty.push(conn);
  if (!flushScheduled) {
    flushScheduled = true;
    setImmediate(flushAll);
  }
}

// ------------------------------------------------------------ argument parsing

function optStr(m, key) {
  const v = m[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string') throw bad(`${key} must be a string`);
  return v;
}

function reqStr(m, key) {
  const v = optStr(m, key);
  if (v === undefined) throw bad(`${key} is required`);
  return v;
}

function optBool(m, key) {
  const v = m[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'boolean') throw bad(`${key} must be a boolean`);
  return v;
}

function optUint(m, key) {
  const v = m[key];
  if (v === undefined || v === null) return undefined;
  const n = toUint(v);
  if (n === undefined) throw bad(`${key} must be a non-negative integer`);
  return n;
}

/** `{offset, epoch}`, both required when the map is given. */
function position(v, key) {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'object' || Array.isArray(v) || v instanceof Uint8Array) throw bad(`${key} must be a map`);
  const { offset, epoch } = v;
  if (offset === undefined || epoch === undefined) throw bad(`${key} needs both offset and epoch`);
  if (typeof epoch !== 'string') throw bad('epoch must be a string');
  const n = toUint(offset);
  if (n === undefined) throw bad('offset must be a non-negative integer');
  return { offset: n, epoch };
}

function isMap(v) {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Uint8Array);
}

/** The command's id: 0 for fire and forget, -1 when it breaks the protocol. */
function idOf(m) {
  const v = m.id;
  if (v === undefined || v === null) return 0;
  if (typeof v === 'number') return Number.isInteger(v) && v >= 0 && v <= 0xffffffff ? v : -1;
  if (typeof v === 'bigint') return v >= 0n && v <= 0xffffffffn ? Number(v) : -1;
  return -1;
}

// ------------------------------------------------------------ the connection

class Connection {
  constructor(server, ws, json) {
    this.server = server;
    this.config = server.config;
    this.ws = ws;
    // The raw socket: pre-built frames are written to it directly (ws's own
    // Sender writes synchronously too, with permessage-deflate off, so order
    // with ws's control frames is preserved). socket.io's engine.io does the
    // same with `wsPreEncodedFrame`.
    this.sock = ws._socket;
    this.json = json;
    this.binary = !json;
    this.clientId = crypto.randomBytes(8).toString('hex');
    this.state = AWAITING_CONNECT;
    this.subs = new Map(); // channel → token of the subscribe that owns it
    this.nextToken = 1;
    this.inflight = 0;
    this.lastSeen = Date.now();
    this.queue = [];
    this.queueBytes = 0;
    this.firstFrame = null;
    this.connectTimer = setTimeout(() => {
      if (this.state === AWAITING_CONNECT) this.fail(Close.CONNECT_TIMEOUT, 'no connect in time');
    }, this.config.connectTimeoutMs);
  }

  // ---------------------------------------------------------------- outbound

  /** Queues one encoded message; `frame` is its pre-built frame when shared. */
  push(payload, frame) {
    if (this.state === CLOSING) return;
    const len = payload.length;
    if (this.queueBytes + len + this.sock.writableLength > this.config.outboundLimit) {
      this.slowConsumer();
      return;
    }
    if (this.queue.length === 0) {
      this.firstFrame = frame;
      scheduleFlush(this);
    }
    this.queue.push(payload);
    this.queueBytes += len;
  }

  pushDelivery(d) {
    if (this.json) this.push(d.json(), d.jsonFrameBuf());
    else this.push(d.payload, d.msgpackFrame());
  }

  flush() {
    const q = this.queue;
    const n = q.length;
    if (n === 0) return;
    if (this.state !== CLOSING && this.ws.readyState === WebSocket.OPEN) {
      const sock = this.sock;
      if (n === 1) {
        sock.write(this.firstFrame || codec.wsFrame(q[0], this.binary));
      } else {
        const max = this.config.maxBatchBytes;
        sock.cork();
        let i = 0;
        while (i < n) {
          let j = i + 1;
          let bytes = q[i].length;
          while (j < n && bytes + q[j].length + 1 <= max) bytes += q[j++].length;
          if (j === i + 1) sock.write(i === 0 && this.firstFrame ? this.firstFrame : codec.wsFrame(q[i], this.binary));
          else sock.write(codec.wsBatchFrame(q, i, j, bytes, this.binary));
          i = j;
        }
        sock.uncork();
      }
    }
    q.length = 0;
    this.queueBytes = 0;
    this.firstFrame = null;
  }

  encode(message) {
    return this.json ? Buffer.from(JSON.stringify(message)) : codec.pack(message);
  }

  replyOk(id, result) {
    if (id === 0) return;
    this.push(this.json ? Buffer.from('{"id":' + id + ',"ok":' + JSON.stringify(result) + '}') : codec.pack({ id, ok: result }), null);
  }

  replyError(id, error) {
    this.server.metrics.errors++;
    if (id === 0 || this.state === CLOSING) return;
    this.push(this.encode({ id, error: error.body() }), null);
  }

  // ----------------------------------------------------------------- closing

  /** Closes at once with no reply; what is queued is dropped. */
  fail(code, reason) {
    if (this.state === CLOSING) return;
    this.state = CLOSING;
    this.queue.length = 0;
    this.queueBytes = 0;
    this.firstFrame = null;
    this.cleanup();
    this.ws.close(code, reason);
  }

  /** Delivers what is queued (e.g. an error reply), then closes. */
  closeAfterDrain(code, reason) {
    if (this.state === CLOSING) return;
    this.flush();
    this.state = CLOSING;
    this.cleanup();
    this.ws.close(code, reason);
  }

  slowConsumer() {
    if (this.state === CLOSING) return;
    this.server.metrics.slowConsumers++;
    this.fail(Close.SLOW_CONSUMER, 'slow consumer');
  }

  /** Leaves every channel and the server's registry (idempotent). */
  cleanup() {
    clearTimeout(this.connectTimer);
    const hub = this.server.hub;
    for (const channel of this.subs.keys()) hub.remove(channel, this);
    this.subs.clear();
    this.server.connections.delete(this);
  }

  onClose() {
    this.state = CLOSING;
    this.queue.length = 0;
    this.cleanup();
  }

  // ----------------------------------------------------------------- inbound

  onMessage(data, isBinary) {
    this.lastSeen = Date.now();
    if (this.state === CLOSING) return;
    const messages = codec.decodeFrame(this.json, data, isBinary);
    if (messages === null) return this.fail(Close.PROTOCOL_ERROR, 'malformed frame');
    // The whole frame is checked before any of its commands runs.
    for (let i = 0; i < messages.length; i++) {
      if (idOf(messages[i]) < 0) return this.fail(Close.PROTOCOL_ERROR, 'id is not an integer in u32 range');
    }
    for (let i = 0; i < messages.length; i++) {
      if (this.state === CLOSING) return;
      const m = messages[i];
      const id = idOf(m);
      try {
        this.handle(m, id);
      } catch (e) {
        if (!(e instanceof ProtoError)) {
          this.server.logError('command failed', e);
          return this.fail(Close.INTERNAL_ERROR, 'internal error');
        }
        if (this.state === AWAITING_CONNECT) this.refuseConnect(id, e);
        else this.replyError(id, e);
      }
    }
  }

  handle(m, id) {
    const op = typeof m.op === 'string' ? m.op : undefined;
    if (this.state === AWAITING_CONNECT && op !== 'connect') {
      return this.fail(Close.PROTOCOL_ERROR, 'the first command must be connect');
    }
    switch (op) {
      case 'publish': return this.publish(m, id);
      case 'subscribe': return this.subscribe(m, id);
      case 'unsubscribe': return this.unsubscribe(m, id);
      case 'history': return this.history(m, id);
      case 'ping': return this.replyOk(id, {});
      case 'connect': return this.connect(m, id);
      case 'presence':
      case 'rpc':
      case 'refresh':
        throw new ProtoError(Err.NOT_AVAILABLE, `${op} is not enabled on this deployment`);
      case undefined: throw bad('missing or non-string op');
      default: throw new ProtoError(Err.UNKNOWN_OP, `unknown op ${JSON.stringify(op)}`);
    }
  }

  /** A failed first `connect`: the error reply, then the close §6 prescribes. */
  refuseConnect(id, error) {
    this.replyError(id, error);
    this.closeAfterDrain(closeAfterFailedConnect(error.code), closeReason(error.message));
  }

  /** Reserves a slot for a command that waits on the sequencer. */
  beginInflight() {
    if (this.inflight >= this.config.maxInflightPerConnection) {
      throw new ProtoError(Err.TOO_MANY_REQUESTS, 'too many commands in flight', 100);
    }
    this.inflight++;
  }

  channelArg(m) {
    const channel = reqStr(m, 'channel');
    const problem = channelProblem(channel);
    if (problem) throw bad(`channel ${JSON.stringify(channel)}: ${problem}`);
    return channel;
  }

  // ---------------------------------------------------------------- commands

  connect(m, id) {
    if (this.state !== AWAITING_CONNECT) throw bad('already connected');
    const token = optStr(m, 'token');
    optStr(m, 'session');
    optStr(m, 'name');
    optStr(m, 'version');
    let subs;
    if (m.subs !== undefined && m.subs !== null) {
      if (!isMap(m.subs)) throw bad('subs must be a map');
      subs = m.subs;
    }
    if (token !== undefined) {
      throw new ProtoError(Err.UNAUTHORIZED, 'token authentication is not enabled on this deployment');
    }
    this.state = CONNECTED;
    clearTimeout(this.connectTimer);
    const result = {
      client: this.clientId,
      session: this.clientId,
      user: '',
      ping_ms: this.config.pingMs,
      node: this.server.node,
    };
    if (subs === undefined) return this.replyOk(id, result);
    this.connectWithSubs(id, result, subs);
  }

  /** Subscribes every `subs` entry, then answers `connect` with all results at once. */
  async connectWithSubs(id, result, subs) {
    const names = Object.keys(subs);
    const outcomes = new Array(names.length);
    const waits = [];
    for (let i = 0; i < names.length; i++) {
      const name = names[i];
      const spec = subs[name];
      try {
        if (!isMap(spec)) throw bad('subs entry must be a map');
        const hasOffset = spec.offset !== undefined && spec.offset !== null;
        const hasEpoch = spec.epoch !== undefined && spec.epoch !== null;
        const since = hasOffset || hasEpoch ? position(spec, 'subs entry') : undefined;
        const problem = channelProblem(name);
        if (problem) throw bad(`channel ${JSON.stringify(name)}: ${problem}`);
        if (this.subs.has(name)) throw new ProtoError(Err.ALREADY_SUBSCRIBED, 'already subscribed');
        const token = this.nextToken++;
        this.subs.set(name, token);
        waits.push(this.recoverFor(name, since).then(
          (reply) => { outcomes[i] = { name, token, reply, since }; },
          (error) => { outcomes[i] = { name, token, error }; },
        ));
      } catch (error) {
        if (!(error instanceof ProtoError)) throw error;
        outcomes[i] = { name, error };
      }
    }
    this.inflight++;
    await Promise.all(waits);
    this.inflight--;
    if (this.state === CLOSING) return;
    const live = [];
    for (const o of outcomes) {
      if (o.error) {
        if (o.token !== undefined && this.subs.get(o.name) === o.token) {
          this.subs.delete(o.name);
          this.server.hub.remove(o.name, this);
        }
      } else if (this.subs.get(o.name) === o.token) {
        live.push(o);
      }
    }
    if (id !== 0) {
      let payload;
      if (this.json) {
        let subsJson = '{';
        outcomes.forEach((o, i) => {
          subsJson += (i ? ',' : '') + JSON.stringify(o.name) + ':' +
            (o.error ? JSON.stringify({ error: o.error.body() }) : subResultJson(o.reply, o.since !== undefined));
        });
        const head = JSON.stringify(result);
        payload = Buffer.from('{"id":' + id + ',"ok":' + head.slice(0, -1) + ',"subs":' + subsJson + '}}}');
      } else {
        const subsOut = {};
        for (const o of outcomes) subsOut[o.name] = o.error ? { error: o.error.body() } : subResult(o.reply, o.since !== undefined);
        payload = codec.pack({ id, ok: { ...result, subs: subsOut } });
      }
      this.push(payload, null);
    }
    for (const o of live) this.server.hub.activate(o.name, this, null, Number(o.reply.offset));
  }

  subscribe(m, id) {
    const channel = this.channelArg(m);
    const since = position(m.since, 'since');
    optStr(m, 'token');
    if (this.subs.has(channel)) throw new ProtoError(Err.ALREADY_SUBSCRIBED, 'already subscribed');
    if (this.subs.size >= this.config.maxSubscriptionsPerConnection) {
      throw new ProtoError(Err.LIMIT_EXCEEDED, 'too many subscriptions on this connection');
    }
    this.beginInflight();
    const token = this.nextToken++;
    this.subs.set(channel, token);
    this.recoverFor(channel, since).then(
      (reply) => {
        this.inflight--;
        if (this.state === CLOSING) return;
        if (this.subs.get(channel) !== token) {
          return this.replyError(id, bad('unsubscribed before the subscription completed'));
        }
        const payload = id === 0 ? null : this.json
          ? Buffer.from('{"id":' + id + ',"ok":' + subResultJson(reply, since !== undefined) + '}')
          : codec.pack({ id, ok: subResult(reply, since !== undefined) });
        this.server.hub.activate(channel, this, payload, Number(reply.offset));
      },
      (error) => {
        this.inflight--;
        if (this.state === CLOSING) return;
        if (this.subs.get(channel) === token) {
          this.subs.delete(channel);
          this.server.hub.remove(channel, this);
        }
        this.replyError(id, error);
      },
    );
  }

  /** Pending subscriber first, NATS subscription registered, then the position. */
  async recoverFor(channel, since) {
    const ready = this.server.hub.addPending(channel, this);
    try {
      await ready;
    } catch {
      throw new ProtoError(Err.INTERNAL, 'channel subscription failed');
    }
    const request = since === undefined ? { op: 'r' } : { op: 'r', since };
    return this.server.request(channel, request);
  }

  unsubscribe(m, id) {
    const channel = reqStr(m, 'channel');
    if (this.subs.delete(channel)) this.server.hub.remove(channel, this);
    this.replyOk(id, {});
  }

  publish(m, id) {
    const channel = this.channelArg(m);
    let data = m.data;
    const b64 = this.json ? m.data_b64 : undefined;
    if (data !== undefined && b64 !== undefined) throw bad('send data or data_b64, not both');
    if (b64 !== undefined) {
      if (typeof b64 !== 'string') throw bad('data_b64 must be a string');
      data = codec.decodeBase64(b64);
      if (data === undefined) throw bad('data_b64 is not valid base64');
    } else if (data === undefined) {
      throw bad('data is required');
    } else if (this.json) {
      data = codec.jsonToData(data);
    }
    const key = optStr(m, 'idempotency_key');
    this.beginInflight();
    const request = { op: 'p', data, info: { user: '', client: this.clientId } };
    if (key !== undefined) request.key = key;
    this.server.request(channel, request).then(
      (ack) => {
        this.inflight--;
        this.replyOk(id, { offset: Number(ack.offset), epoch: ack.epoch });
      },
      (error) => {
        this.inflight--;
        this.replyError(id, error);
      },
    );
  }

  history(m, id) {
    const since = position(m.since, 'since');
    const reverse = optBool(m, 'reverse') ?? false;
    if (reverse && since !== undefined) throw bad('reverse cannot be combined with since');
    const channel = this.channelArg(m);
    const limit = Math.min(optUint(m, 'limit') ?? 100, this.config.historyMaxLimit);
    this.beginInflight();
    const request = { op: 'h', limit, reverse };
    if (since !== undefined) request.since = since;
    this.server.request(channel, request).then(
      (reply) => {
        this.inflight--;
        if (id === 0) return;
        const payload = this.json
          ? Buffer.from('{"id":' + id + ',"ok":{"pubs":' + codec.pubsJson(reply.pubs) +
            ',"offset":' + reply.offset + ',"epoch":' + JSON.stringify(reply.epoch) + '}}')
          : codec.pack({ id, ok: { pubs: reply.pubs, offset: reply.offset, epoch: reply.epoch } });
        this.push(payload, null);
      },
      (error) => {
        this.inflight--;
        this.replyError(id, error);
      },
    );
  }
}

/** A close reason fits in 123 bytes of UTF-8. */
function closeReason(text) {
  let reason = text;
  while (Buffer.byteLength(reason) > 123) reason = reason.slice(0, -1);
  return reason;
}

/** SubResult: offset, epoch, recovered, and pubs when `since` was given. */
function subResult(reply, withPubs) {
  const r = { offset: reply.offset, epoch: reply.epoch, recovered: reply.recovered };
  if (withPubs) r.pubs = reply.recovered ? reply.pubs : [];
  return r;
}

function subResultJson(reply, withPubs) {
  let out = '{"offset":' + reply.offset + ',"epoch":' + JSON.stringify(reply.epoch) + ',"recovered":' + reply.recovered;
  if (withPubs) out += ',"pubs":' + (reply.recovered ? codec.pubsJson(reply.pubs) : '[]');
  return out + '}';
}

module.exports = { Connection };
