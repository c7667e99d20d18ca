'use strict';

// A worker's channel registry and local fan-out.
//
// - ONE NATS subscription per channel per worker, however many local
//   subscribers: created with the first (pending) subscriber, dropped after the
//   last one leaves (reference counted by the subscriber sets).
// - Each delivery is decoded once, and its frame built at most once per wire
//   encoding; every local subscriber gets the same Buffer. The MessagePack
//   frame is the sequencer's bytes as they came off NATS, framed once.
// - A subscriber whose `subscribe` is still being answered is *pending*:
//   deliveries are held for it (bounded) and released right after the reply,
//   minus those the reply already covers, so the switch-over from recovery to
//   live has no gap and no duplicate.

const { unpack, pubJson, wsFrame } = require('./codec');

/** One publication as delivered to this worker, encoded lazily once per encoding. */
class Delivery {
  constructor(payload) {
    this.payload = payload; // MessagePack `pub` push, exactly as clients get it
    this.pub = unpack(payload);
    this.offset = Number(this.pub.offset);
    this.mpFrame = null;
    this.jsonPayload = null;
    this.jsonFrame = null;
  }

  msgpackFrame() {
    return this.mpFrame ??= wsFrame(this.payload, true);
  }

  json() {
    return this.jsonPayload ??= Buffer.from(pubJson(this.pub, true));
  }

  jsonFrameBuf() {
    return this.jsonFrame ??= wsFrame(this.json(), false);
  }
}

class ChannelEntry {
  constructor(name) {
    this.name = name;
    this.live = new Set(); // connections
    this.pending = new Map(); // connection → Delivery[] held while subscribing
    this.sub = null; // NATS subscription
    this.ready = null; // resolves once NATS has registered `sub`
    this.closed = false;
  }
}

class Hub {
  constructor(nc, config, metrics) {
    this.nc = nc;
    this.prefix = `${config.natsPrefix}.deliver.`;
    this.maxPending = config.maxPendingWhileSubscribing;
    this.metrics = metrics;
    this.channels = new Map();
  }

  /**
   * Registers `conn` as a pending subscriber of `channel` and returns the
   * promise to await before asking the sequencer for the position: only once
   * this worker's NATS subscription is registered with the server can no
   * publication fall between the position and the live stream.
   */
  addPending(channel, conn) {
    let entry = this.channels.get(channel);
    if (!entry) {
      entry = new ChannelEntry(channel);
      this.channels.set(channel, entry);
      const e = entry;
      entry.sub = this.nc.subscribe(this.prefix + channel, {
        callback: (err, msg) => {
          if (!err) this.deliver(e, msg.data);
        },
      });
      // A flush round-trips a PING: the SUB before it is registered.
      entry.ready = this.nc.flush();
      entry.ready.catch(() => {}); // observed by each subscribe
    }
    entry.pending.set(conn, []);
    return entry.ready;
  }

  /**
   * Makes a pending subscriber live: queues `reply` (the encoded subscribe
   * answer, if any) and then what arrived meanwhile above `covered`, in order.
   */
  activate(channel, conn, reply, covered) {
    const entry = this.channels.get(channel);
    const held = entry && entry.pending.get(conn);
    if (!held) return false;
    entry.pending.delete(conn);
    entry.live.add(conn);
    if (reply) conn.push(reply, null);
    for (let i = 0; i < held.length; i++) {
      if (held[i].offset > covered) conn.pushDelivery(held[i]);
    }
    return true;
  }

  /** Removes a subscriber (pending or live); the NATS subscription goes with the last one. */
  remove(channel, conn) {
    const entry = this.channels.get(channel);
    if (!entry) return;
    if (!entry.live.delete(conn)) entry.pending.delete(conn);
    if (entry.live.size === 0 && entry.pending.size === 0) {
      entry.closed = true;
      this.channels.delete(channel);
      entry.sub.unsubscribe();
    }
  }

  deliver(entry, payload) {
    if (entry.closed) return;
    let delivery;
    try {
      delivery = new Delivery(payload);
    } catch {
      this.metrics.badDeliveries++;
      return;
    }
    this.metrics.deliveries++;
    for (const conn of entry.live) conn.pushDelivery(delivery);
    if (entry.pending.size !== 0) {
      for (const [conn, held] of entry.pending) {
        if (held.length < this.maxPending) held.push(delivery);
        else conn.slowConsumer();
      }
    }
  }
}

module.exports = { Hub };
