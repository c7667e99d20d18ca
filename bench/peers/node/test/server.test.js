'use strict';

// End-to-end: nats-server + the server with 2 workers, driven by real
// WebSocket clients (the `ws` package) as a stranger's client would.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const WebSocket = require('ws');
const {
  startStack, Client, connected, connectedOnOtherWorker, httpPublish, packr,
} = require('./helpers');

let stack;

before(async () => {
  stack = await startStack({ workers: 2 });
});

after(async () => {
  if (stack) await stack.stop();
});

let channelSeq = 0;
const freshChannel = (ns = 'test') => `${ns}:c${process.pid}-${++channelSeq}`;

test('subprotocol: first supported in the client order; only unsupported → 400', async () => {
  const a = await Client.open(stack.url, ['nope', 'rt.v1.msgpack', 'rt.v1.json']);
  assert.equal(a.ws.protocol, 'rt.v1.msgpack');
  a.ws.terminate();
  const b = await Client.open(stack.url, ['rt.v1.json', 'rt.v1.msgpack']);
  assert.equal(b.ws.protocol, 'rt.v1.json');
  b.ws.terminate();
  const none = await Client.open(stack.url, []);
  assert.equal(none.ws.protocol, '');
  assert.equal(typeof (await none.call('connect')).client, 'string', 'no subprotocol speaks JSON');
  none.ws.terminate();
  const status = await new Promise((resolve) => {
    const ws = new WebSocket(stack.url, ['rt.v2.cbor']);
    ws.on('unexpected-response', (_req, res) => resolve(res.statusCode));
    ws.on('error', () => {});
  });
  assert.equal(status, 400);
});

test('the first command must be connect (4000); connect reply shape', async () => {
  for (const protocols of [['rt.v1.json'], ['rt.v1.msgpack']]) {
    const c = await Client.open(stack.url, protocols);
    c.send('ping').catch(() => {});
    const { code } = await c.closed;
    assert.equal(code, 4000);
  }
  const c = await Client.open(stack.url, ['rt.v1.json']);
  const ok = await c.call('connect');
  assert.deepEqual(Object.keys(ok).sort(), ['client', 'node', 'ping_ms', 'session', 'user']);
  assert.equal(ok.user, '');
  assert.equal(ok.ping_ms, 25000);
  const again = await c.send('connect');
  assert.equal(again.error.code, 107, 'a second connect is a plain 107');
  assert.deepEqual((await c.send('ping')).ok, {});
  c.ws.terminate();
});

test('errors and protocol violations', async () => {
  const c = await connected(stack.url, ['rt.v1.json']);
  const channel = freshChannel();
  assert.equal((await c.send('frobnicate')).error.code, 104);
  assert.equal((await c.send('subscribe', {})).error.code, 107);
  assert.equal((await c.send('subscribe', { channel: 'bad..name' })).error.code, 107);
  assert.equal((await c.send('publish', { channel })).error.code, 107, 'data is required');
  assert.equal((await c.send('history', { channel, reverse: true, since: { offset: 0, epoch: 'e' } })).error.code, 107);
  await c.call('subscribe', { channel });
  const dup = await c.send('subscribe', { channel });
  assert.deepEqual(dup.error, { code: 105, message: 'already subscribed', temporary: false });
  assert.deepEqual(await c.call('unsubscribe', { channel }), {});
  assert.deepEqual(await c.call('unsubscribe', { channel }), {}, 'also when not subscribed');
  c.sendRaw('{"id":9,"op":"ping"}\n{not json');
  assert.equal((await c.closed).code, 4000, 'a malformed frame closes with 4000');

  const m = await connected(stack.url, ['rt.v1.msgpack']);
  m.sendRaw('{"id":2,"op":"ping"}'); // a text frame on rt.v1.msgpack
  assert.equal((await m.closed).code, 4000);

  const big = await connected(stack.url, ['rt.v1.json']);
  big.sendRaw(JSON.stringify({ id: 2, op: 'publish', channel, data: 'x'.repeat(70 * 1024) }));
  assert.equal((await big.closed).code, 1009);

  const neg = await connected(stack.url, ['rt.v1.json']);
  neg.sendRaw('{"id":-1,"op":"ping"}');
  assert.equal((await neg.closed).code, 4000, 'an id outside u32 closes with 4000');
});

test('subscribe and publish in both encodings, multi-message frames both ways', async () => {
  const channel = freshChannel();
  const js = await connected(stack.url, ['rt.v1.json']);
  const mp = await connected(stack.url, ['rt.v1.msgpack']);
  const subJ = await js.call('subscribe', { channel });
  const subM = await mp.call('subscribe', { channel });
  assert.equal(subJ.offset, 0);
  assert.equal(subJ.recovered, false);
  assert.equal(subJ.pubs, undefined, 'no pubs without since');
  assert.equal(subM.epoch, subJ.epoch);

  // JSON publish → both encodings.
  const ack1 = await js.call('publish', { channel, data: { text: 'hi', n: 1, f: 1.5, big: 1700000000000000 } });
  assert.deepEqual(ack1, { offset: 1, epoch: subJ.epoch });
  const [pJ] = await js.takePushes(1);
  const [pM] = await mp.takePushes(1);
  assert.equal(pJ.push, 'pub');
  assert.equal(pJ.channel, channel);
  assert.equal(pJ.offset, 1);
  assert.deepEqual(pJ.data, { text: 'hi', n: 1, f: 1.5, big: 1700000000000000 });
  assert.equal(pJ.info.client, js.info.client);
  assert.equal(typeof pJ.ts, 'number');
  assert.equal(pM.offset, 1);
  assert.equal(pM.data.text, 'hi');
  assert.equal(pM.data.big, 1700000000000000n, 'a big JSON integer stays an integer in MessagePack');
  assert.equal(typeof pM.ts, 'bigint', 'ts is a MessagePack integer');

  // MessagePack publish of binary data → JSON gets data_b64.
  const ack2 = await mp.call('publish', { channel, data: Buffer.from([0, 1, 2, 255]) });
  assert.equal(Number(ack2.offset), 2);
  const [bJ] = await js.takePushes(1);
  const [bM] = await mp.takePushes(1);
  assert.equal(bJ.data_b64, 'AAEC/w==');
  assert.equal(bJ.data, undefined);
  assert.deepEqual(Buffer.from(bM.data), Buffer.from([0, 1, 2, 255]));

  // JSON publishes binary with data_b64.
  await js.call('publish', { channel, data_b64: 'AQI=' });
  assert.deepEqual(Buffer.from((await mp.takePushes(1))[0].data), Buffer.from([1, 2]));
  assert.equal((await js.takePushes(1))[0].data_b64, 'AQI=');

  // A batch of commands in one frame, each way.
  const frame = [3, 4, 5].map((id) => JSON.stringify({ id, op: 'ping' })).join('\n');
  const replies = [3, 4, 5].map((id) => new Promise((resolve) => js.waiting.set(id, { resolve, reject: () => {} })));
  js.nextId = 6;
  js.sendRaw(frame);
  assert.deepEqual((await Promise.all(replies)).map((r) => r.ok), [{}, {}, {}]);
  const mpReplies = [7, 8].map((id) => new Promise((resolve) => mp.waiting.set(id, { resolve, reject: () => {} })));
  mp.nextId = 9;
  mp.sendRaw(Buffer.concat([packr.pack({ id: 7, op: 'ping' }), packr.pack({ id: 8, op: 'ping' })]));
  assert.deepEqual((await Promise.all(mpReplies)).map((r) => r.ok), [{}, {}]);

  // History in both encodings.
  const h = await js.call('history', { channel, limit: 2 });
  assert.deepEqual(h.pubs.map((p) => p.offset), [2, 3]);
  assert.equal(h.offset, 3);
  const hr = await mp.call('history', { channel, reverse: true });
  assert.deepEqual(hr.pubs.map((p) => Number(p.offset)), [3, 2, 1]);
  const h0 = await js.call('history', { channel, limit: 0 });
  assert.deepEqual(h0.pubs, []);
  const hs = await js.call('history', { channel, since: { offset: 1, epoch: subJ.epoch } });
  assert.deepEqual(hs.pubs.map((p) => p.offset), [2, 3]);
  const bad = await js.send('history', { channel, since: { offset: 9, epoch: subJ.epoch } });
  assert.equal(bad.error.code, 112, 'since ahead of the stream');
  const other = await js.send('history', { channel, since: { offset: 1, epoch: 'other' } });
  assert.equal(other.error.code, 112, 'since in another epoch');

  // After unsubscribe, nothing more of the channel arrives.
  await js.call('unsubscribe', { channel });
  await mp.call('publish', { channel, data: 'after' });
  assert.equal((await mp.takePushes(1))[0].data, 'after');
  await js.call('ping');
  assert.equal(js.pushes.length, 0);
  js.ws.terminate();
  mp.ws.terminate();
});

test('1,000 publications from 2 workers reach 2 subscribers on 2 workers in order, without gaps', async () => {
  const channel = freshChannel('chat');
  const s1 = await connected(stack.url, ['rt.v1.msgpack']);
  const s2 = await connectedOnOtherWorker(stack.url, ['rt.v1.json'], s1.info.node);
  const p1 = await connected(stack.url, ['rt.v1.json']);
  const p2 = await connectedOnOtherWorker(stack.url, ['rt.v1.msgpack'], p1.info.node);
  assert.notEqual(s1.info.node, s2.info.node);
  assert.notEqual(p1.info.node, p2.info.node);
  const r1 = await s1.call('subscribe', { channel });
  const r2 = await s2.call('subscribe', { channel });
  assert.equal(Number(r1.offset), 0);
  assert.equal(r2.offset, 0);

  const N = 500;
  // Each publisher pipelines its publishes in windows of 100 (the server
  // allows 256 commands in flight per connection), both at once.
  const publishAll = async (client, from) => {
    const acks = [];
    for (let i = 0; i < N; i += 100) {
      const window = [];
      for (let j = i; j < i + 100; j++) window.push(client.call('publish', { channel, data: { from, i: j } }));
      acks.push(...(await Promise.all(window)));
    }
    return acks;
  };
  const acks = (await Promise.all([publishAll(p1, 1), publishAll(p2, 2)])).flat();
  const offsets = acks.map((a) => Number(a.offset));
  assert.deepEqual([...offsets].sort((a, b) => a - b), Array.from({ length: 2 * N }, (_, i) => i + 1));

  for (const s of [s1, s2]) {
    const got = await s.takePushes(2 * N, 20_000);
    assert.deepEqual(got.map((p) => Number(p.offset)), Array.from({ length: 2 * N }, (_, i) => i + 1));
    // Each publisher's publications are sequenced in the order it sent them.
    for (const from of [1, 2]) {
      const seq = got.filter((p) => p.data.from === from).map((p) => p.data.i);
      assert.deepEqual(seq, Array.from({ length: N }, (_, i) => i));
    }
  }
  for (const c of [s1, s2, p1, p2]) c.ws.terminate();
});

test('recovery with since: exactly the missed ones, then live; wrong epoch → not recovered', async () => {
  const channel = freshChannel();
  const c = await connected(stack.url, ['rt.v1.json']);
  await httpPublish(stack, { channel, data: 'before' });
  const first = await c.call('subscribe', { channel });
  assert.equal(first.offset, 1);
  await c.call('unsubscribe', { channel });
  for (let i = 0; i < 5; i++) await httpPublish(stack, { channel, data: { missed: i } });

  const other = await connectedOnOtherWorker(stack.url, ['rt.v1.msgpack'], c.info.node);
  const rec = await other.call('subscribe', { channel, since: { offset: 1, epoch: first.epoch } });
  assert.equal(rec.recovered, true);
  assert.equal(Number(rec.offset), 6);
  assert.deepEqual(rec.pubs.map((p) => Number(p.offset)), [2, 3, 4, 5, 6]);
  assert.deepEqual(rec.pubs.map((p) => p.data.missed), [0, 1, 2, 3, 4]);

  const same = await c.call('subscribe', { channel, since: { offset: 6, epoch: first.epoch } });
  assert.equal(same.recovered, true);
  assert.deepEqual(same.pubs, [], 'nothing missed');
  await c.call('unsubscribe', { channel });

  const wrong = await c.call('subscribe', { channel, since: { offset: 1, epoch: 'not-the-epoch' } });
  assert.equal(wrong.recovered, false);
  assert.deepEqual(wrong.pubs, []);
  assert.equal(wrong.offset, 6);
  await c.call('unsubscribe', { channel });
  const ahead = await c.call('subscribe', { channel, since: { offset: 60, epoch: first.epoch } });
  assert.equal(ahead.recovered, false, 'ahead of the stream');

  await httpPublish(stack, { channel, data: 'live' });
  assert.deepEqual([(await c.nextPush()).offset, Number((await other.nextPush()).offset)], [7, 7]);
  c.ws.terminate();
  other.ws.terminate();
});

test('recovery while publishing: no gap and no duplicate at the switch-over', async () => {
  const channel = freshChannel();
  const pub = await connected(stack.url, ['rt.v1.msgpack']);
  let stop = false;
  let sent = 0;
  const publishing = (async () => {
    while (!stop) await pub.call('publish', { channel, data: sent++ });
  })();
  try {
    await new Promise((r) => setTimeout(r, 30));
    for (let round = 0; round < 10; round++) {
      const position = await pub.call('history', { channel, limit: 0 });
      const sub = await connected(stack.url, ['rt.v1.json']);
      const since = Math.max(0, Number(position.offset) - 5);
      const r = await sub.call('subscribe', { channel, since: { offset: since, epoch: position.epoch } });
      assert.equal(r.recovered, true, `round ${round}: since ${since}, now ${r.offset}`);
      const recovered = r.pubs.map((p) => p.offset);
      assert.deepEqual(recovered, Array.from({ length: r.offset - since }, (_, i) => since + 1 + i));
      const live = await sub.takePushes(30);
      assert.deepEqual(live.map((p) => p.offset), Array.from({ length: 30 }, (_, i) => r.offset + 1 + i));
      sub.ws.terminate();
    }
  } finally {
    stop = true;
    await publishing;
    pub.ws.terminate();
  }
});

test('connect with subs recovers several channels in one round trip', async () => {
  const a = freshChannel();
  const b = freshChannel();
  const ack = (await httpPublish(stack, { channel: a, data: 1 })).body;
  await httpPublish(stack, { channel: a, data: 2 });
  const c = await Client.open(stack.url, ['rt.v1.json']);
  const ok = await c.call('connect', {
    subs: { [a]: { offset: 1, epoch: ack.epoch }, [b]: {}, 'bad..x': {}, [freshChannel()]: { offset: 1 } },
  });
  assert.equal(ok.subs[a].recovered, true);
  assert.deepEqual(ok.subs[a].pubs.map((p) => p.data), [2]);
  assert.equal(ok.subs[b].offset, 0);
  assert.equal(ok.subs['bad..x'].error.code, 107);
  await httpPublish(stack, { channel: b, data: 'live' });
  assert.equal((await c.nextPush()).data, 'live');
  c.ws.terminate();
});

test('HTTP publish: with the key → {offset, epoch}; without or wrong → 401', async () => {
  const channel = freshChannel();
  const sub = await connected(stack.url, ['rt.v1.json']);
  await sub.call('subscribe', { channel });
  const ok = await httpPublish(stack, { channel, data: { hello: 'http' }, info: { from: 'backend' } });
  assert.equal(ok.status, 200);
  assert.equal(ok.body.offset, 1);
  assert.equal(typeof ok.body.epoch, 'string');
  const p = await sub.nextPush();
  assert.deepEqual(p.data, { hello: 'http' });
  assert.deepEqual(p.info, { user: '', client: '', info: { from: 'backend' } });

  const missing = await httpPublish(stack, { channel, data: 1 }, null);
  assert.equal(missing.status, 401);
  assert.equal(missing.body.error.code, 101);
  const wrong = await httpPublish(stack, { channel, data: 1 }, 'nope');
  assert.equal(wrong.status, 401);
  const badChannel = await httpPublish(stack, { channel: '', data: 1 });
  assert.equal(badChannel.status, 400);
  assert.equal(badChannel.body.error.code, 107);
  const unknown = await fetch(`${stack.http}/api/nope`, { headers: { authorization: 'apikey test-key' } });
  assert.equal(unknown.status, 404);
  const unknownNoKey = await fetch(`${stack.http}/api/nope`);
  assert.equal(unknownNoKey.status, 401, 'the key is checked before the route');
  const tooBig = await httpPublish(stack, { channel, data: 'x'.repeat(70 * 1024) });
  assert.equal(tooBig.status, 413);
  sub.ws.terminate();
});

test('slow consumer: a client that does not read is closed with 4004', async () => {
  const channel = freshChannel();
  const slow = await connected(stack.url, ['rt.v1.msgpack']);
  await slow.call('subscribe', { channel });
  slow.ws._socket.pause(); // stop reading: the server's buffers fill up
  const pub = await connected(stack.url, ['rt.v1.msgpack']);
  const data = Buffer.alloc(60 * 1024, 7);
  let closedBy;
  slow.closed.then((info) => { closedBy = info; });
  // Publish until the server gave up on the slow client (its close frame is
  // queued behind what it already buffered; the socket closes once read).
  let published = 0;
  for (; published < 2000; published += 20) {
    await Promise.all(Array.from({ length: 20 }, () => pub.call('publish', { channel, data })));
    const hist = await pub.call('ping');
    assert.ok(hist);
    if (published >= 400 && published % 200 === 0) {
      slow.ws._socket.resume();
      await new Promise((r) => setTimeout(r, 200));
      if (closedBy) break;
      slow.ws._socket.pause();
    }
  }
  slow.ws._socket.resume();
  const info = await slow.closed;
  assert.equal(info.code, 4004, `closed with ${info.code} after ${published} publications`);
  pub.ws.terminate();
});

test('liveness: server pings every ping_ms; three silent intervals → 4009; no connect → 4001', async () => {
  // A separate one-worker stack with short intervals keeps this quick.
  const quick = await startStack({ workers: 1, env: { PING_MS: '200', CONNECT_TIMEOUT_MS: '300' } });
  try {
    const idle = await Client.open(quick.url, ['rt.v1.json']);
    assert.equal((await idle.closed).code, 4001, 'no connect in time');
    const alive = await connected(quick.url, ['rt.v1.json']);
    let pings = 0;
    alive.ws.on('ping', () => pings++);
    const stale = await new Promise((resolve) => {
      // A client that never answers pings and sends nothing is closed with 4009.
      const ws = new WebSocket(quick.url, ['rt.v1.json'], { autoPong: false });
      ws.on('open', () => ws.send('{"id":1,"op":"connect"}'));
      ws.on('close', (code) => resolve(code));
    });
    assert.equal(stale, 4009);
    assert.ok(pings >= 2, `pings seen: ${pings}`);
    assert.equal(alive.closeInfo, null, 'a client that answers pings stays');
    alive.ws.terminate();
  } finally {
    await quick.stop();
  }
});
