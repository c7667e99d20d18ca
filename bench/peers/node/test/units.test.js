'use strict';

// Unit tests of the pure parts: codec (JSON form of data, frames), channel
// names, and the sequencer's window semantics.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const codec = require('../src/codec');
const { channelProblem, toUint } = require('../src/protocol');
const { Sequencer } = require('../src/sequencer');

test('JSON form of data', () => {
  assert.equal(codec.jsonDataField({ a: [1, 'x', null, true] }), '"data":{"a":[1,"x",null,true]}');
  assert.equal(codec.jsonDataField(Buffer.from([0, 1, 2])), '"data_b64":"AAEC"');
  assert.equal(codec.jsonDataField({ b: Buffer.from([255]) }), '"data":{"b":"/w=="}', 'nested binary → base64 string');
  assert.equal(codec.jsonDataField({ n: 2n ** 60n }), '"data":{"n":1152921504606846976}', 'big integers written exactly');
  assert.equal(codec.jsonDataField([NaN, Infinity]), '"data":[null,null]');
  const date = new Date(0); // a MessagePack timestamp ext has no JSON form
  assert.match(codec.jsonDataField({ d: date }), /^"data_mp64":"[A-Za-z0-9+/=]+"$/);
  assert.deepEqual(codec.jsonToData({ t: 1700000000000000, s: 5, f: 1.5 }), { t: 1700000000000000n, s: 5, f: 1.5 });
  assert.deepEqual(codec.decodeBase64('AAEC'), Buffer.from([0, 1, 2]));
  assert.equal(codec.decodeBase64('!!'), undefined);
  assert.equal(codec.decodeBase64('AAE'), undefined, 'padding is required');
});

test('client frames: multi-message, wrong type, not a map', () => {
  const two = Buffer.concat([codec.pack({ id: 1, op: 'a' }), codec.pack({ id: 2, op: 'b' })]);
  assert.deepEqual(codec.decodeFrame(false, two, true), [{ id: 1, op: 'a' }, { id: 2, op: 'b' }]);
  assert.equal(codec.decodeFrame(false, two, false), null, 'text frame on msgpack');
  assert.equal(codec.decodeFrame(true, Buffer.from('{"id":1}'), true), null, 'binary frame on json');
  assert.deepEqual(codec.decodeFrame(true, Buffer.from('{"id":1}\n\n{"id":2}\n'), false), [{ id: 1 }, { id: 2 }]);
  assert.equal(codec.decodeFrame(true, Buffer.from('[1]'), false), null);
  assert.equal(codec.decodeFrame(true, Buffer.from(''), false), null);
  assert.equal(codec.decodeFrame(true, Buffer.from([0x7b, 0xff, 0x7d]), false), null, 'invalid UTF-8');
  assert.equal(codec.decodeFrame(false, Buffer.from([0xc1]), true), null);
  const nestedC1 = Buffer.from([0x82, 0xa2, 0x69, 0x64, 0x01, 0xa4, 0x64, 0x61, 0x74, 0x61, 0xc1]);
  assert.equal(codec.decodeFrame(false, nestedC1, true), null, '0xc1 anywhere is a protocol error');
  assert.notEqual(codec.decodeFrame(false, codec.pack({ id: 1, data: Buffer.from([0xc1]) }), true), null, 'but not inside a binary');
  assert.equal(codec.decodeFrame(false, Buffer.from([0x81, 0xa1]), true), null, 'truncated');
});

test('server frames: headers for every length class and batches', () => {
  for (const len of [0, 125, 126, 65535, 65536]) {
    const f = codec.wsFrame(Buffer.alloc(len, 1), true);
    assert.equal(f[0], 0x82);
    const hl = len < 126 ? 2 : len < 65536 ? 4 : 10;
    assert.equal(f.length, hl + len);
    const declared = f[1] < 126 ? f[1] : f[1] === 126 ? f.readUInt16BE(2) : f.readUInt32BE(6);
    assert.equal(declared, len);
  }
  const batch = codec.wsBatchFrame([Buffer.from('{"a":1}'), Buffer.from('{"b":2}')], 0, 2, 14, false);
  assert.equal(batch[0], 0x81);
  assert.equal(batch.subarray(2).toString(), '{"a":1}\n{"b":2}');
});

test('channel names and integers', () => {
  for (const ok of ['a', 'chat:lobby', 'a.b.c', 'x:y:z', 'A-Z_0=9@.q']) assert.equal(channelProblem(ok), null, ok);
  for (const bad of ['', 'a..b', '.a', 'a.', ':a', 'a:', 'a b', 'a*', 'a>', 'x'.repeat(201), 5]) {
    assert.notEqual(channelProblem(bad), null, String(bad));
  }
  assert.equal(toUint(3), 3);
  assert.equal(toUint(3n), 3);
  assert.equal(toUint(-1), undefined);
  assert.equal(toUint(1.5), undefined);
  assert.equal(toUint('1'), undefined);
});

function sequencer(overrides = {}) {
  const published = [];
  const nc = { publish: (subject, data) => published.push({ subject, pub: codec.unpack(data) }) };
  const config = {
    natsPrefix: 'p', historySize: 3, historyTtlMs: 60_000, historyMaxLimit: 1000,
    idempotencyWindowMs: 300_000, channelIdleMs: 3_600_000, ...overrides,
  };
  return { seq: new Sequencer(nc, config, () => {}), published };
}

test('sequencer: consecutive offsets, one delivery each, window and recovery', () => {
  const { seq, published } = sequencer();
  const now = 1_795_000_000_000; // ms since the Unix epoch: ts needs 64 bits
  const acks = [1, 2, 3, 4, 5].map((n) => seq.handle('c', { op: 'p', data: n }, now));
  assert.deepEqual(acks.map((a) => a.offset), [1, 2, 3, 4, 5]);
  const { epoch } = acks[0];
  assert.equal(published.length, 5);
  assert.equal(published[0].subject, 'p.deliver.c');
  assert.deepEqual(published[4].pub, { push: 'pub', channel: 'c', offset: 5, data: 5, ts: BigInt(now) });
  // The window holds 3, 4, 5.
  const r = (since) => seq.handle('c', { op: 'r', since }, now);
  assert.deepEqual(r({ offset: 2, epoch }).pubs.map((p) => p.offset), [3, 4, 5]);
  assert.equal(r({ offset: 2, epoch }).recovered, true);
  assert.deepEqual(r({ offset: 5, epoch }), { offset: 5, epoch, recovered: true, pubs: [] });
  assert.equal(r({ offset: 1, epoch }).recovered, false, 'outside the window');
  assert.equal(r({ offset: 6, epoch }).recovered, false, 'ahead');
  assert.equal(r({ offset: 4, epoch: 'other' }).recovered, false, 'other epoch');
  assert.equal(seq.handle('c', { op: 'r' }, now).recovered, false);
  // History.
  const h = (req) => seq.handle('c', { op: 'h', limit: 100, reverse: false, ...req }, now);
  assert.deepEqual(h({ limit: 2 }).pubs.map((p) => p.offset), [4, 5]);
  assert.deepEqual(h({ reverse: true }).pubs.map((p) => p.offset), [5, 4, 3]);
  assert.deepEqual(h({ limit: 1, since: { offset: 3, epoch } }).pubs.map((p) => p.offset), [4]);
  assert.equal(h({ since: { offset: 0, epoch } }).error.code, 112);
  assert.equal(h({ since: { offset: 9, epoch } }).error.code, 112);
  // TTL.
  const later = now + 61_000;
  assert.equal(seq.handle('c', { op: 'r', since: { offset: 4, epoch } }, later).recovered, false);
  assert.equal(seq.handle('c', { op: 'r', since: { offset: 5, epoch } }, later).recovered, true);
});

test('sequencer: idempotency keys and forgetting idle channels', () => {
  const { seq, published } = sequencer({ channelIdleMs: 1000 });
  const first = seq.handle('c', { op: 'p', data: 1, key: 'k' }, 0);
  const again = seq.handle('c', { op: 'p', data: 2, key: 'k' }, 10);
  assert.deepEqual(again, first);
  assert.equal(published.length, 1, 'a repeat is not sequenced again');
  const third = seq.handle('c', { op: 'p', data: 3, key: 'k' }, 301_000);
  assert.equal(third.offset, 2, 'the window has passed');
  seq.sweep(301_000 + 61_000); // the history expired, the channel idled
  const fresh = seq.handle('c', { op: 'r' }, 400_000);
  assert.equal(fresh.offset, 0);
  assert.notEqual(fresh.epoch, first.epoch, 'a forgotten channel starts a new epoch');
});

test('requester: replies by inbox token, no-responders, timeouts', async () => {
  const { Requester } = require('../src/requester');
  let callback;
  const sent = [];
  const nc = {
    subscribe: (_subject, opts) => { callback = opts.callback; },
    publish: (subject, data, opts) => sent.push({ subject, data, reply: opts.reply }),
  };
  const r = new Requester(nc, 1000);
  const a = r.request('s.a', Buffer.from('1'));
  const b = r.request('s.b', Buffer.from('2'));
  const c = r.request('s.c', Buffer.from('3'));
  assert.equal(sent.length, 3);
  callback(null, { subject: sent[1].reply, data: Buffer.from('B') });
  callback(null, { subject: sent[0].reply, data: Buffer.from('A') });
  assert.equal((await b).toString(), 'B', 'replies may come in any order');
  assert.equal((await a).toString(), 'A');
  callback(null, { subject: sent[2].reply, headers: { code: 503 } });
  await assert.rejects(c, /no-responders/);
  const d = r.request('s.d', Buffer.from('4'));
  r.sweep(Date.now() + 999);
  r.sweep(Date.now() + 1000);
  await assert.rejects(d, /timeout/);
  callback(null, { subject: sent[3].reply, data: Buffer.from('late') }); // ignored
  r.close();
});
