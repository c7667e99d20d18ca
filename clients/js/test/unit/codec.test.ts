import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { decodeMulti, encode } from '@msgpack/msgpack';

import { base64Decode, base64Encode, JsonCodec, MsgpackCodec, putData } from '../../src/codec.js';

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

describe('MessagePack codec', () => {
  const codec = new MsgpackCodec();

  it('offers rt.v1.msgpack', () => {
    assert.equal(codec.subprotocol, 'rt.v1.msgpack');
  });

  it('decodes a frame of several concatenated maps, in order', () => {
    const frame = concat(
      encode({ push: 'pub', channel: 'a', offset: 1, data: 'x', ts: 1 }),
      encode({ id: 7, ok: { offset: 3, epoch: 'e' } }),
      encode({ push: 'pub', channel: 'a', offset: 2, data: new Uint8Array([1, 2]), ts: 2 }),
    );
    const messages = codec.decode(frame.buffer);
    assert.equal(messages.length, 3);
    assert.equal(messages[0]?.['offset'], 1);
    assert.deepEqual(messages[1], { id: 7, ok: { offset: 3, epoch: 'e' } });
    assert.deepEqual(messages[2]?.['data'], new Uint8Array([1, 2]));
  });

  it('accepts Node Buffers and typed array views', () => {
    const bytes = encode({ id: 1, ok: {} });
    const padded = new Uint8Array(bytes.length + 4);
    padded.set(bytes, 2);
    assert.deepEqual(codec.decode(padded.subarray(2, 2 + bytes.length)), [{ id: 1, ok: {} }]);
    assert.deepEqual(codec.decode(Buffer.from(bytes)), [{ id: 1, ok: {} }]);
  });

  it('encodes a batch as concatenated maps and leaves out undefined fields', () => {
    const frame = codec.encode([{ id: 1, op: 'ping', x: undefined }, { id: 2, op: 'ping' }]);
    assert.deepEqual([...decodeMulti(frame)], [{ id: 1, op: 'ping' }, { id: 2, op: 'ping' }]);
  });

  it('refuses text frames and non-map messages', () => {
    assert.throws(() => codec.decode('{"id":1}'), /text frame/);
    assert.throws(() => codec.decode(encode([1, 2])), /not a map/);
    assert.throws(() => codec.decode(new Uint8Array([0xc1])));
  });
});

describe('JSON codec', () => {
  const codec = new JsonCodec();

  it('offers rt.v1.json', () => {
    assert.equal(codec.subprotocol, 'rt.v1.json');
  });

  it('decodes one object per line, skipping empty lines', () => {
    const frame = '{"push":"pub","channel":"a","offset":1,"data":1,"ts":5}\n{"id":2,"ok":{}}\n\n';
    const messages = codec.decode(frame);
    assert.equal(messages.length, 2);
    assert.equal(messages[0]?.['push'], 'pub');
    assert.deepEqual(messages[1], { id: 2, ok: {} });
  });

  it('encodes a batch as lines', () => {
    assert.equal(codec.encode([{ id: 1, op: 'ping' }, { id: 2, op: 'ping' }]), '{"id":1,"op":"ping"}\n{"id":2,"op":"ping"}');
  });

  it('turns data_b64 into a Uint8Array in pushes, replies and pubs lists', () => {
    const [pub, rpc, history, connect] = codec.decode(
      [
        '{"push":"pub","channel":"a","offset":1,"data_b64":"AAE=","ts":1}',
        '{"id":3,"ok":{"data_b64":"/w=="}}',
        '{"id":4,"ok":{"pubs":[{"channel":"a","offset":1,"data_b64":"AgM=","ts":1}],"offset":1,"epoch":"e"}}',
        '{"id":5,"ok":{"client":"c","subs":{"a":{"offset":1,"epoch":"e","recovered":true,"pubs":[{"channel":"a","offset":1,"data_b64":"BA==","ts":1}]}}}}',
      ].join('\n'),
    );
    assert.deepEqual(pub?.['data'], new Uint8Array([0, 1]));
    assert.equal(pub?.['data_b64'], undefined);
    assert.deepEqual((rpc?.['ok'] as Record<string, unknown>)['data'], new Uint8Array([255]));
    const pubs = (history?.['ok'] as { pubs: Record<string, unknown>[] }).pubs;
    assert.deepEqual(pubs[0]?.['data'], new Uint8Array([2, 3]));
    const subs = (connect?.['ok'] as { subs: Record<string, { pubs: Record<string, unknown>[] }> }).subs;
    assert.deepEqual(subs['a']?.pubs[0]?.['data'], new Uint8Array([4]));
  });

  it('turns data_mp64 into the decoded MessagePack value', () => {
    // A map with an integer key has no JSON form; the server sends it whole.
    // {1: "one"}: fixmap of one entry, key positive fixint 1, value fixstr "one".
    const b64 = base64Encode(new Uint8Array([0x81, 0x01, 0xa3, 0x6f, 0x6e, 0x65]));
    const [pub] = codec.decode(`{"push":"pub","channel":"a","offset":1,"data_mp64":"${b64}","ts":1}`);
    assert.deepEqual(pub?.['data'], { 1: 'one' });
    assert.equal(pub?.['data_mp64'], undefined);
  });

  it('leaves the application data alone, even a field called data_b64 inside it', () => {
    const [pub] = codec.decode('{"push":"pub","channel":"a","offset":1,"data":{"data_b64":"AAE="},"ts":1}');
    assert.deepEqual(pub?.['data'], { data_b64: 'AAE=' });
  });

  it('refuses binary frames and bad JSON', () => {
    assert.throws(() => codec.decode(new Uint8Array([123, 125])), /binary frame/);
    assert.throws(() => codec.decode('{"id":'));
    assert.throws(() => codec.decode('[1]'), /not a map/);
  });
});

describe('data in commands', () => {
  it('sends a Uint8Array as data_b64 over JSON', () => {
    const cmd: Record<string, unknown> = { op: 'publish' };
    putData(cmd, new Uint8Array([0, 1, 255]), 'json');
    assert.deepEqual(cmd, { op: 'publish', data_b64: 'AAH/' });
  });

  it('sends a Uint8Array as binary data over MessagePack, and undefined as nil', () => {
    const cmd: Record<string, unknown> = {};
    putData(cmd, new Uint8Array([1]), 'msgpack');
    assert.deepEqual(cmd, { data: new Uint8Array([1]) });
    const empty: Record<string, unknown> = {};
    putData(empty, undefined, 'json');
    assert.deepEqual(empty, { data: null });
  });

  it('base64 round-trips every byte value (standard alphabet, padded)', () => {
    const bytes = new Uint8Array(256).map((_, i) => i);
    assert.deepEqual(base64Decode(base64Encode(bytes)), bytes);
    assert.equal(base64Encode(new Uint8Array([0xfb, 0xff])), '+/8=');
  });
});
