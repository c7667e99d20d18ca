'use strict';

// The sequencer: the one owner of every channel's offsets, epoch and history
// window. It runs in the cluster's primary process and answers NATS requests
// on `<prefix>.seq.<channel>` (in a queue group) from every worker:
//
//   {op: 'p', data, info?, key?}          publish → {offset, epoch}
//   {op: 'r', since?}                     recover → {offset, epoch, recovered, pubs}
//   {op: 'h', limit, since?, reverse}     history → {pubs, offset, epoch} | {error}
//
// Each publication it sequences is published ONCE on `<prefix>.deliver.<channel>`
// as the exact MessagePack `pub` push a client receives; workers forward those
// bytes to their MessagePack subscribers without re-encoding them.
//
// It handles requests synchronously in the order NATS delivers them, so the
// publishes of one connection (one worker's NATS connection, in order) are
// sequenced in the order they were sent. Because the delivery of offset N is
// published before any later reply, and NATS keeps one publisher's messages in
// order, a worker always sees delivery N before the answer to a recover that
// reports offset >= N: that is what makes the switch-over gap-free (see hub.js).

const crypto = require('node:crypto');
const { Err } = require('./protocol');
const { pack, unpack, u64 } = require('./codec');

const MAX_IDEMPOTENCY_KEYS = 10_000;

class ChannelState {
  constructor(name, now) {
    this.name = name;
    this.epoch = crypto.randomBytes(8).toString('hex');
    this.offset = 0;
    // The history window, oldest first: {offset, ts, data, info, at}.
    this.window = [];
    this.keys = new Map(); // idempotency key → {offset, at}
    this.lastActivity = now;
  }

  expire(now, limits) {
    const w = this.window;
    let drop = 0;
    while (drop < w.length && now - w[drop].at >= limits.historyTtlMs) drop++;
    if (drop) w.splice(0, drop);
    for (const [key, entry] of this.keys) {
      if (now - entry.at < limits.idempotencyWindowMs) break; // insertion order = age order
      this.keys.delete(key);
    }
  }

  /** Whether every publication after `since` is still here (§1 SubResult). */
  servable(since) {
    if (since.epoch !== this.epoch || since.offset > this.offset) return false;
    if (since.offset === this.offset) return true;
    return this.window.length > 0 && this.window[0].offset <= since.offset + 1;
  }

  /** Publications after `offset`, oldest first, at most `limit`. */
  after(offset, limit) {
    const w = this.window;
    // Offsets in the window are consecutive: index arithmetic, no search.
    const start = w.length === 0 ? 0 : Math.max(0, offset + 1 - w[0].offset);
    const end = Math.min(w.length, start + limit);
    const out = [];
    for (let i = start; i < end; i++) out.push(this.pub(w[i]));
    return out;
  }

  pub(stored) {
    const p = { channel: this.name, offset: u64(stored.offset), data: stored.data };
    if (stored.info !== undefined) p.info = stored.info;
    p.ts = u64(stored.ts);
    return p;
  }
}

class Sequencer {
  constructor(nc, config, log) {
    this.nc = nc;
    this.config = config;
    this.log = log;
    this.prefix = config.natsPrefix;
    this.channels = new Map();
    this.sub = null;
    this.sweeper = null;
  }

  async start() {
    const seqPrefix = `${this.prefix}.seq.`;
    this.sub = this.nc.subscribe(`${seqPrefix}>`, {
      queue: `${this.prefix}.sequencer`,
      callback: (err, msg) => {
        if (err) return;
        const channel = msg.subject.slice(seqPrefix.length);
        let reply;
        try {
          reply = this.handle(channel, unpack(msg.data), Date.now());
        } catch (e) {
          reply = { error: { code: Err.BAD_REQUEST, message: `undecodable request: ${e.message}` } };
        }
        if (msg.reply) msg.respond(pack(reply));
      },
    });
    await this.nc.flush();
    this.sweeper = setInterval(() => this.sweep(Date.now()), 60_000);
    this.sweeper.unref();
  }

  stop() {
    clearInterval(this.sweeper);
    if (this.sub) this.sub.unsubscribe();
  }

  state(channel, now) {
    let state = this.channels.get(channel);
    if (!state) {
      state = new ChannelState(channel, now);
      this.channels.set(channel, state);
    } else {
      state.expire(now, this.config);
    }
    state.lastActivity = now;
    return state;
  }

  handle(channel, req, now) {
    switch (req.op) {
      case 'p': return this.publish(channel, req, now);
      case 'r': return this.recover(channel, req, now);
      case 'h': return this.history(channel, req, now);
      default: return { error: { code: Err.BAD_REQUEST, message: 'unknown sequencer op' } };
    }
  }

  publish(channel, req, now) {
    const state = this.state(channel, now);
    const key = req.key;
    if (typeof key === 'string') {
      const seen = state.keys.get(key);
      if (seen) return { offset: u64(seen.offset), epoch: state.epoch };
    }
    const offset = ++state.offset;
    const { data, info } = req;
    const limits = this.config;
    if (limits.historySize > 0 && limits.historyTtlMs > 0) {
      state.window.push({ offset, ts: now, data, info, at: now });
      if (state.window.length > limits.historySize) state.window.shift();
    }
    if (typeof key === 'string') {
      if (state.keys.size >= MAX_IDEMPOTENCY_KEYS) state.keys.delete(state.keys.keys().next().value);
      state.keys.set(key, { offset, at: now });
    }
    // The client-facing push, encoded once for the whole cluster.
    const push = { push: 'pub', channel, offset: u64(offset), data };
    if (info !== undefined) push.info = info;
    push.ts = u64(now);
    this.nc.publish(`${this.prefix}.deliver.${channel}`, pack(push));
    return { offset: u64(offset), epoch: state.epoch };
  }

  recover(channel, req, now) {
    const state = this.state(channel, now);
    const reply = { offset: u64(state.offset), epoch: state.epoch, recovered: false, pubs: [] };
    if (req.since && state.servable(req.since)) {
      reply.recovered = true;
      reply.pubs = state.after(req.since.offset, Infinity);
    }
    return reply;
  }

  history(channel, req, now) {
    const state = this.state(channel, now);
    const limit = Math.min(Number(req.limit), this.config.historyMaxLimit);
    let pubs;
    if (req.since) {
      if (!state.servable(req.since)) {
        return {
          error: {
            code: Err.UNRECOVERABLE_POSITION,
            message: 'position is in another epoch, outside the history window or ahead of the stream',
          },
        };
      }
      pubs = state.after(req.since.offset, limit);
    } else {
      const w = state.window;
      pubs = [];
      for (let i = Math.max(0, w.length - limit); i < w.length; i++) pubs.push(state.pub(w[i]));
      if (req.reverse) pubs.reverse();
    }
    return { pubs, offset: u64(state.offset), epoch: state.epoch };
  }

  /** Forgets channels with no history left and no activity for a while (a new epoch next time). */
  sweep(now) {
    for (const [name, state] of this.channels) {
      state.expire(now, this.config);
      if (state.window.length === 0 && now - state.lastActivity >= this.config.channelIdleMs) {
        this.channels.delete(name);
      }
    }
  }
}

module.exports = { Sequencer, ChannelState };
