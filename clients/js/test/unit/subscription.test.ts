import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it } from 'node:test';

import { Client, ErrorCode, RealtimeError } from '../../src/index.js';
import type {
  ClientOptions,
  DisconnectedContext,
  Publication,
  StateLostContext,
  SubscribedContext,
  Subscription,
  UnsubscribedContext,
} from '../../src/index.js';
import type { WireMessage } from '../../src/codec.js';
import { FakeWebSocket, handshake, sleep, socket, waitFor } from '../helpers/fake-websocket.js';

let clients: Client[] = [];

function newClient(options: ClientOptions = {}): Client {
  const client = new Client('ws://test/ws', {
    WebSocket: FakeWebSocket,
    minReconnectDelayMs: 5,
    maxReconnectDelayMs: 20,
    timeoutMs: 1000,
    ...options,
  });
  clients.push(client);
  return client;
}

/** Records what a subscription emits. */
function record(sub: Subscription) {
  const log = {
    offsets: [] as number[],
    data: [] as unknown[],
    subscribed: [] as SubscribedContext[],
    unsubscribed: [] as UnsubscribedContext[],
    stateLost: [] as StateLostContext[],
    errors: [] as number[],
  };
  sub.on('publication', (p) => {
    log.offsets.push(p.offset);
    log.data.push(p.data);
  });
  sub.on('subscribed', (c) => log.subscribed.push(c));
  sub.on('unsubscribed', (c) => log.unsubscribed.push(c));
  sub.on('stateLost', (c) => log.stateLost.push(c));
  sub.on('error', (e) => log.errors.push((e.error as RealtimeError).code));
  return log;
}

const pub = (channel: string, offset: number, data: unknown = `m${offset}`): WireMessage => ({
  push: 'pub',
  channel,
  offset,
  data,
  ts: 1_700_000_000_000 + offset,
});
const entry = (offset: number, data: unknown = `m${offset}`): WireMessage => ({
  channel: 'chat:a',
  offset,
  data,
  ts: 1_700_000_000_000 + offset,
});

/** Connects, subscribes to chat:a, answers the subscribe at `offset`. */
async function subscribed(offset = 0, options: ClientOptions = {}) {
  const client = newClient(options);
  client.connect();
  const ws = await handshake(0);
  const sub = client.newSubscription('chat:a');
  const log = record(sub);
  sub.subscribe();
  ws.replyOk('subscribe', { offset, epoch: 'E1', recovered: false });
  await sub.ready();
  return { client, ws, sub, log };
}

beforeEach(() => FakeWebSocket.reset());
afterEach(() => {
  for (const c of clients) c.disconnect();
  clients = [];
});

describe('subscribing', () => {
  it('subscribes, reports the position, delivers publications in order', async () => {
    const { client, ws, sub, log } = await subscribed(5);
    const all: Publication[] = [];
    client.on('publication', (p) => all.push(p));
    assert.equal(ws.lastOp('subscribe')['since'], undefined, 'a first subscribe does not recover');
    assert.deepEqual(log.subscribed, [{ channel: 'chat:a', offset: 5, epoch: 'E1', wasRecovering: false, recovered: false }]);
    assert.equal(log.stateLost.length, 0, 'not recovering: nothing was lost');
    ws.push(pub('chat:a', 6), pub('chat:a', 7, { text: 'hi' }));
    assert.deepEqual(log.offsets, [6, 7]);
    assert.deepEqual(log.data[1], { text: 'hi' });
    assert.deepEqual(sub.streamPosition, { offset: 7, epoch: 'E1' });
    assert.deepEqual(
      all.map((p) => [p.channel, p.offset]),
      [
        ['chat:a', 6],
        ['chat:a', 7],
      ],
    );
  });

  it('subscribes within connect when created before connecting', async () => {
    const client = newClient();
    const sub = client.newSubscription('chat:a');
    const log = record(sub);
    sub.subscribe();
    assert.equal(sub.state, 'subscribing');
    client.connect();
    const ws = await handshake(0, { subs: { 'chat:a': { offset: 3, epoch: 'E', recovered: false } } });
    assert.deepEqual(ws.lastOp('connect')['subs'], { 'chat:a': {} });
    assert.equal(ws.sentOps('subscribe').length, 0, 'no separate subscribe');
    assert.equal(sub.state, 'subscribed');
    assert.equal(log.subscribed[0]?.offset, 3);
  });

  it('starts from a given position (since) and recovers from it', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const sub = client.newSubscription('chat:a', { since: { offset: 2, epoch: 'E1' } });
    const log = record(sub);
    sub.subscribe();
    assert.deepEqual(ws.lastOp('subscribe')['since'], { offset: 2, epoch: 'E1' });
    ws.replyOk('subscribe', { offset: 4, epoch: 'E1', recovered: true, pubs: [entry(3), entry(4)] });
    ws.push(pub('chat:a', 5));
    assert.deepEqual(log.offsets, [3, 4, 5]);
    assert.equal(log.subscribed[0]?.recovered, true);
    assert.equal(log.subscribed[0]?.wasRecovering, true);
  });

  it('sends the channel token with subscribe (and not in connect subs)', async () => {
    const client = newClient();
    const sub = client.newSubscription('secret:a', { token: 'chan-token' });
    sub.subscribe();
    client.connect();
    const ws = await handshake(0);
    assert.equal(ws.lastOp('connect')['subs'], undefined);
    assert.equal(ws.lastOp('subscribe')['token'], 'chan-token');
  });

  it('becomes unsubscribed on a permanent subscribe error', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const sub = client.newSubscription('nope:a');
    const log = record(sub);
    sub.subscribe();
    const ready = sub.ready();
    ws.replyError('subscribe', { code: 102, message: 'unknown namespace' });
    await assert.rejects(ready, (e: RealtimeError) => e.code === 102);
    assert.equal(sub.state, 'unsubscribed');
    assert.deepEqual(log.unsubscribed, [{ channel: 'nope:a', code: 102, reason: 'unknown namespace' }]);
    assert.deepEqual(log.errors, [102]);
  });

  it('retries a subscribe refused with a temporary error after retry_after_ms', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const sub = client.newSubscription('chat:a');
    sub.subscribe();
    ws.replyError('subscribe', { code: 113, message: 'busy', temporary: true, retry_after_ms: 40 });
    await sleep(20);
    assert.equal(ws.sentOps('subscribe').length, 1);
    await waitFor(() => ws.sentOps('subscribe').length === 2, 'retry');
    // The first attempt may have left a subscription on the server: unsubscribe first.
    const ops = ws.sent().map((m) => m['op']);
    assert.deepEqual(ops.slice(-2), ['unsubscribe', 'subscribe']);
    ws.replyOk('subscribe', { offset: 0, epoch: 'E', recovered: false });
    await sub.ready();
  });

  it('unsubscribe() tells the server and delivers nothing afterwards', async () => {
    const { ws, sub, log } = await subscribed(0);
    sub.unsubscribe();
    assert.equal(sub.state, 'unsubscribed');
    const unsub = ws.lastOp('unsubscribe');
    assert.equal(unsub['channel'], 'chat:a');
    assert.equal(unsub['id'], undefined, 'fire and forget');
    ws.push(pub('chat:a', 1));
    assert.deepEqual(log.offsets, []);
    assert.deepEqual(log.unsubscribed, [{ channel: 'chat:a', code: 0, reason: 'unsubscribe called' }]);
  });

  it('refuses two subscription objects for one channel', () => {
    const client = newClient();
    client.newSubscription('chat:a');
    assert.throws(() => client.newSubscription('chat:a'), /already exists/);
    const sub = client.getSubscription('chat:a');
    assert.ok(sub);
    client.removeSubscription(sub);
    assert.ok(client.newSubscription('chat:a'));
  });

  it('relays join and leave', async () => {
    const { ws, sub } = await subscribed(0);
    const seen: string[] = [];
    sub.on('join', (e) => seen.push(`join ${e.info.user}/${e.info.client}`));
    sub.on('leave', (e) => seen.push(`leave ${e.info.user}/${e.info.client}`));
    ws.push(
      { push: 'join', channel: 'chat:a', info: { user: 'u1', client: 'c1' } },
      { push: 'leave', channel: 'chat:a', info: { user: 'u1', client: 'c1' } },
    );
    assert.deepEqual(seen, ['join u1/c1', 'leave u1/c1']);
  });

  it('publishes through the subscription', async () => {
    const { ws, sub } = await subscribed(0);
    const result = sub.publish({ text: 'x' }, { idempotencyKey: 'k1' });
    const cmd = ws.lastOp('publish');
    assert.equal(cmd['channel'], 'chat:a');
    assert.equal(cmd['idempotency_key'], 'k1');
    ws.replyOk('publish', { offset: 1, epoch: 'E1' });
    assert.deepEqual(await result, { offset: 1, epoch: 'E1' });
  });
});

describe('gaps and recovery', () => {
  it('a skipped offset triggers a resubscribe with since = last seen; the missed ones arrive once, in order', async () => {
    const { ws, sub, log } = await subscribed(0);
    ws.push(pub('chat:a', 1), pub('chat:a', 2));
    ws.push(pub('chat:a', 4)); // 3 is missing
    assert.equal(sub.state, 'subscribing');
    assert.deepEqual(
      ws.sent().slice(-2).map((m) => m['op']),
      ['unsubscribe', 'subscribe'],
      'the server still holds the subscription: unsubscribe first',
    );
    assert.deepEqual(ws.lastOp('subscribe')['since'], { offset: 2, epoch: 'E1' });
    ws.push(pub('chat:a', 5)); // still from the old subscription: dropped
    ws.replyOk('subscribe', { offset: 5, epoch: 'E1', recovered: true, pubs: [entry(3), entry(4), entry(5)] });
    ws.push(pub('chat:a', 6));
    assert.deepEqual(log.offsets, [1, 2, 3, 4, 5, 6]);
    assert.equal(log.subscribed[1]?.recovered, true);
    assert.equal(log.subscribed[1]?.wasRecovering, true);
    assert.equal(log.stateLost.length, 0);
  });

  it('an offset going back (history lost, new epoch) recovers and signals stateLost', async () => {
    const { ws, log } = await subscribed(10);
    ws.push(pub('chat:a', 11));
    ws.push(pub('chat:a', 1)); // offsets restarted: a new epoch
    assert.deepEqual(ws.lastOp('subscribe')['since'], { offset: 11, epoch: 'E1' });
    ws.replyOk('subscribe', { offset: 1, epoch: 'E2', recovered: false, pubs: [] });
    ws.push(pub('chat:a', 2));
    assert.deepEqual(log.offsets, [11, 2]);
    assert.equal(log.subscribed[1]?.recovered, false);
    assert.equal(log.stateLost.length, 1);
    assert.deepEqual(log.stateLost[0]?.since, { offset: 11, epoch: 'E1' });
    assert.equal(log.stateLost[0]?.epoch, 'E2');
  });

  it('recoverGaps: false delivers jumps as they come (conflating namespaces)', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const sub = client.newSubscription('chat:a', { recoverGaps: false });
    const log = record(sub);
    sub.subscribe();
    ws.replyOk('subscribe', { offset: 0, epoch: 'E', recovered: false });
    ws.push(pub('chat:a', 1), pub('chat:a', 5));
    assert.deepEqual(log.offsets, [1, 5]);
    assert.equal(ws.sentOps('subscribe').length, 1);
  });

  it('the unsubscribed push with 112 resubscribes with since (no unsubscribe needed)', async () => {
    const { ws, log } = await subscribed(0);
    ws.push(pub('chat:a', 1));
    const before = ws.sent().length;
    ws.push({ push: 'unsubscribed', channel: 'chat:a', code: 112, reason: 'could not deliver' });
    const after = ws.sent().slice(before);
    assert.deepEqual(after.map((m) => m['op']), ['subscribe']);
    assert.deepEqual(after[0]?.['since'], { offset: 1, epoch: 'E1' });
    ws.replyOk('subscribe', { offset: 3, epoch: 'E1', recovered: true, pubs: [entry(2), entry(3)] });
    assert.deepEqual(log.offsets, [1, 2, 3]);
    assert.equal(log.unsubscribed.length, 0);
  });

  it('an unsubscribed push with another code ends the subscription', async () => {
    const { ws, sub, log } = await subscribed(0);
    ws.push({ push: 'unsubscribed', channel: 'chat:a', code: 103, reason: 'permission revoked' });
    assert.equal(sub.state, 'unsubscribed');
    assert.deepEqual(log.unsubscribed, [{ channel: 'chat:a', code: 103, reason: 'permission revoked' }]);
  });

  it('a reconnect restores every subscription in the connect, with positions, and recovers', async () => {
    const client = newClient();
    client.connect();
    const ws0 = await handshake(0);
    const a = client.newSubscription('chat:a');
    const b = client.newSubscription('chat:b');
    const c = client.newSubscription('chat:c');
    const la = record(a);
    const lb = record(b);
    const lc = record(c);
    a.subscribe();
    b.subscribe();
    c.subscribe();
    const subscribes = ws0.sentOps('subscribe');
    for (const [i, offset] of [7, 0, 2].entries()) {
      ws0.push({ id: subscribes[i]?.['id'], ok: { offset, epoch: `E${i}`, recovered: false } });
    }
    ws0.push(pub('chat:a', 8));
    ws0.serverClose(1006);
    assert.equal(a.state, 'subscribing');
    const ws1 = await handshake(1, {
      subs: {
        'chat:a': { offset: 10, epoch: 'E0', recovered: true, pubs: [entry(9), { ...entry(10), channel: 'chat:a' }] },
        'chat:b': { offset: 0, epoch: 'E1', recovered: true, pubs: [] },
        'chat:c': { offset: 1, epoch: 'NEW', recovered: false, pubs: [] },
      },
    });
    assert.deepEqual(ws1.lastOp('connect')['subs'], {
      'chat:a': { offset: 8, epoch: 'E0' },
      'chat:b': { offset: 0, epoch: 'E1' },
      'chat:c': { offset: 2, epoch: 'E2' },
    });
    assert.equal(ws1.lastOp('connect')['session'], 's0');
    assert.equal(ws1.sentOps('subscribe').length, 0, 'one round trip');
    assert.deepEqual(la.offsets, [8, 9, 10]);
    assert.deepEqual(la.subscribed[1], { channel: 'chat:a', offset: 10, epoch: 'E0', wasRecovering: true, recovered: true });
    assert.equal(lb.subscribed[1]?.recovered, true);
    assert.equal(lc.subscribed[1]?.recovered, false);
    assert.equal(lc.stateLost.length, 1, 'c lost its state: the app must refetch');
    assert.equal(la.stateLost.length + lb.stateLost.length, 0);
    ws1.push(pub('chat:a', 11), pub('chat:c', 2));
    assert.deepEqual(la.offsets, [8, 9, 10, 11]);
    assert.deepEqual(lc.offsets, [2]);
  });

  it('4004 (slow consumer): reconnects after a backoff and resubscribes from the last position (since)', async () => {
    const { client, ws: ws0, sub, log } = await subscribed(5);
    // A subscription with a channel token cannot ride in connect: it resubscribes with `subscribe`.
    const priv = client.newSubscription('secret:a', { token: 'chan-token' });
    const lPriv = record(priv);
    priv.subscribe();
    ws0.replyOk('subscribe', { offset: 2, epoch: 'S1', recovered: false });
    ws0.push(pub('chat:a', 6), pub('chat:a', 7), pub('secret:a', 3));
    const disconnected: DisconnectedContext[] = [];
    client.on('disconnected', (e) => disconnected.push(e));
    ws0.push({ push: 'disconnect', code: 4004, reason: 'slow consumer', reconnect: true });
    ws0.serverClose(4004, 'slow consumer');
    assert.equal(client.state, 'connecting');
    assert.equal(sub.state, 'subscribing');
    assert.equal(priv.state, 'subscribing');
    assert.equal(disconnected.length, 1);
    const [closed] = disconnected;
    assert.equal(closed?.code, 4004);
    assert.equal(closed?.willReconnect, true);
    // Backoff, first attempt: below minReconnectDelayMs (5).
    assert.ok(closed?.delayMs !== undefined && closed.delayMs >= 0 && closed.delayMs < 5, `delay ${closed?.delayMs}`);
    const ws1 = await handshake(1, {
      subs: { 'chat:a': { offset: 9, epoch: 'E1', recovered: true, pubs: [entry(8), entry(9)] } },
    });
    assert.deepEqual(ws1.lastOp('connect')['subs'], { 'chat:a': { offset: 7, epoch: 'E1' } }, 'since = the last delivered');
    assert.equal(ws1.lastOp('connect')['session'], 's0');
    const resubscribe = ws1.lastOp('subscribe');
    assert.equal(resubscribe['channel'], 'secret:a');
    assert.deepEqual(resubscribe['since'], { offset: 3, epoch: 'S1' });
    assert.equal(resubscribe['token'], 'chan-token');
    ws1.push({
      id: resubscribe['id'],
      ok: { offset: 4, epoch: 'S1', recovered: true, pubs: [{ ...entry(4), channel: 'secret:a' }] },
    });
    ws1.push(pub('chat:a', 10));
    assert.equal(sub.state, 'subscribed');
    assert.equal(priv.state, 'subscribed');
    assert.deepEqual(log.offsets, [6, 7, 8, 9, 10], 'each once, in order');
    assert.deepEqual(lPriv.offsets, [3, 4]);
    assert.deepEqual(log.subscribed[1], { channel: 'chat:a', offset: 9, epoch: 'E1', wasRecovering: true, recovered: true });
    assert.equal(lPriv.subscribed[1]?.recovered, true);
    assert.equal(log.stateLost.length + lPriv.stateLost.length, 0);
  });

  it('a connect subs entry that failed: permanent → unsubscribed, temporary → subscribe again', async () => {
    const client = newClient();
    const bad = client.newSubscription('nope:a');
    const busy = client.newSubscription('chat:b');
    const lBad = record(bad);
    bad.subscribe();
    busy.subscribe();
    client.connect();
    const ws = await handshake(0, {
      subs: {
        'nope:a': { error: { code: 102, message: 'unknown namespace' } },
        'chat:b': { error: { code: 113, message: 'busy', temporary: true, retry_after_ms: 10 } },
      },
    });
    assert.equal(bad.state, 'unsubscribed');
    assert.equal(lBad.unsubscribed[0]?.code, 102);
    assert.equal(busy.state, 'subscribing');
    await waitFor(() => ws.sentOps('subscribe').length === 1, 'retry of chat:b');
    assert.equal(ws.lastOp('subscribe')['channel'], 'chat:b');
  });

  it('drops publications that arrive while resubscribing', async () => {
    const { ws, log } = await subscribed(0);
    ws.push(pub('chat:a', 1), pub('chat:a', 3)); // gap → recovering
    ws.push(pub('chat:a', 4), pub('chat:a', 5));
    ws.replyOk('subscribe', { offset: 5, epoch: 'E1', recovered: true, pubs: [entry(2), entry(3), entry(4), entry(5)] });
    assert.deepEqual(log.offsets, [1, 2, 3, 4, 5]);
  });

  it('a subscribe that times out is retried (after unsubscribing)', async () => {
    const client = newClient({ timeoutMs: 30 });
    client.connect();
    const ws = await handshake(0);
    const sub = client.newSubscription('chat:a');
    const log = record(sub);
    sub.subscribe();
    await waitFor(() => ws.sentOps('subscribe').length === 2, 'retry after timeout');
    assert.deepEqual(log.errors, [ErrorCode.TIMEOUT]);
    assert.deepEqual(ws.sent().slice(-2).map((m) => m['op']), ['unsubscribe', 'subscribe']);
    ws.replyOk('subscribe', { offset: 0, epoch: 'E', recovered: false });
    await sub.ready();
  });

  it('JSON: binary publications arrive as Uint8Array (data_b64), binary publishes go as data_b64', async () => {
    const client = newClient({ encoding: 'json' });
    client.connect();
    const ws = await handshake(0);
    const sub = client.newSubscription('chat:a');
    const log = record(sub);
    sub.subscribe();
    ws.replyOk('subscribe', { offset: 0, epoch: 'E', recovered: false });
    ws.pushRaw('{"push":"pub","channel":"chat:a","offset":1,"data_b64":"AQID","ts":1}');
    assert.deepEqual(log.data, [new Uint8Array([1, 2, 3])]);
    sub.publish(new Uint8Array([9])).catch(() => {}); // never answered
    const cmd = ws.lastOp('publish');
    assert.equal(cmd['data_b64'], 'CQ==');
    assert.equal(cmd['data'], undefined);
  });
});

describe('unsubscribing while a subscribe is in flight', () => {
  it('unsubscribes on the server when the connect reply subscribed a channel the app dropped meanwhile', async () => {
    const client = newClient();
    const sub = client.newSubscription('chat:a');
    const log = record(sub);
    sub.subscribe();
    client.connect();
    const ws = await socket(0);
    ws.open();
    await waitFor(() => ws.sentOps('connect').length === 1);
    sub.unsubscribe(); // not connected yet: nothing can be sent
    assert.equal(ws.sentOps('unsubscribe').length, 0);
    ws.replyOk('connect', { client: 'c', session: 's', subs: { 'chat:a': { offset: 0, epoch: 'E', recovered: false } } });
    assert.equal(ws.lastOp('unsubscribe')['channel'], 'chat:a');
    ws.push(pub('chat:a', 1));
    assert.deepEqual(log.offsets, []);
    assert.equal(sub.state, 'unsubscribed');
  });
});

describe('resumed sessions', () => {
  it('channels the connect did not list: a token subscription is resubscribed with since, others are let go', async () => {
    const client = newClient();
    client.connect();
    const ws0 = await handshake(0);
    const priv = client.newSubscription('secret:a', { token: 'chan-token' });
    const log = record(priv);
    priv.subscribe();
    ws0.replyOk('subscribe', { offset: 4, epoch: 'E', recovered: false });
    ws0.serverClose(1006);
    const ws1 = await handshake(1, {
      resumed: true,
      subs: {
        'secret:a': { offset: 6, epoch: 'E', recovered: false },
        'chat:forgotten': { offset: 1, epoch: 'F', recovered: false },
      },
    });
    assert.equal((await client.ready()).resumed, true);
    assert.equal(ws1.lastOp('connect')['subs'], undefined, 'a channel token cannot ride in connect');
    const ops = ws1.sent().slice(1).map((m) => [m['op'], m['channel']]);
    assert.deepEqual(ops, [
      ['unsubscribe', 'chat:forgotten'],
      ['unsubscribe', 'secret:a'],
      ['subscribe', 'secret:a'],
    ]);
    assert.deepEqual(ws1.lastOp('subscribe')['since'], { offset: 4, epoch: 'E' });
    assert.equal(ws1.lastOp('subscribe')['token'], 'chan-token');
    ws1.replyOk('subscribe', { offset: 6, epoch: 'E', recovered: true, pubs: [{ ...entry(5), channel: 'secret:a' }, { ...entry(6), channel: 'secret:a' }] });
    assert.deepEqual(log.offsets, [5, 6]);
  });
});
