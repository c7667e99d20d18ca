'use strict';

// Request/reply to the sequencer over one wildcard inbox subscription.
//
// nats.js's `nc.request()` builds two Error objects with captured stack traces
// per request (one even on success, to reject an already-resolved promise)
// and arms a timer per request; at thousands of publishes a second that was a
// visible share of a worker's profile. Here a request is a publish with a reply
// subject `<inbox>.<n>`, the answer resolves the matching promise, and one
// sweep per interval times out what is overdue (the map is in send order).
// NATS's no-responders status (503) arrives on the inbox like a reply.

const { createInbox } = require('nats');

class Requester {
  constructor(nc, timeoutMs) {
    this.nc = nc;
    this.timeoutMs = timeoutMs;
    this.prefix = `${createInbox()}.`;
    this.pending = new Map(); // n → {resolve, reject, at}
    this.next = 1;
    this.sub = nc.subscribe(`${this.prefix}*`, {
      callback: (err, msg) => {
        if (!err) this.onReply(msg);
      },
    });
    this.sweeper = setInterval(() => this.sweep(Date.now()), Math.min(250, timeoutMs));
    this.sweeper.unref();
  }

  /** Resolves with the reply's payload; rejects with 'no-responders', 'timeout' or 'closed'. */
  request(subject, payload) {
    const n = this.next++;
    return new Promise((resolve, reject) => {
      try {
        this.nc.publish(subject, payload, { reply: this.prefix + n });
      } catch {
        reject(new Error('closed'));
        return;
      }
      this.pending.set(n, { resolve, reject, at: Date.now() });
    });
  }

  onReply(msg) {
    const n = Number(msg.subject.slice(this.prefix.length));
    const waiter = this.pending.get(n);
    if (waiter === undefined) return; // timed out already
    this.pending.delete(n);
    if (msg.headers && msg.headers.code === 503) waiter.reject(new Error('no-responders'));
    else waiter.resolve(msg.data);
  }

  sweep(now) {
    const overdue = now - this.timeoutMs;
    for (const [n, waiter] of this.pending) {
      if (waiter.at > overdue) break;
      this.pending.delete(n);
      waiter.reject(new Error('timeout'));
    }
  }

  close() {
    clearInterval(this.sweeper);
    for (const waiter of this.pending.values()) waiter.reject(new Error('closed'));
    this.pending.clear();
  }
}

module.exports = { Requester };
