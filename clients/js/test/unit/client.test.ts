import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it } from 'node:test';

import { Client, ErrorCode, RealtimeError } from '../../src/index.js';
import type { ClientOptions, ClientState, DisconnectedContext, RpcChunk } from '../../src/index.js';
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

/** A JWT-shaped token (unsigned: the client only reads `exp`). */
function jwt(claims: Record<string, unknown>): string {
  const b64url = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(claims)}.sig`;
}

beforeEach(() => {
  FakeWebSocket.reset();
});

afterEach(() => {
  for (const c of clients) c.disconnect();
  clients = [];
});

describe('connecting', () => {
  it('goes disconnected → connecting → connected and reports the connect result', async () => {
    const client = newClient({ name: 'tests', version: '1.2.3' });
    const states: ClientState[] = [];
    client.on('state', ({ newState }) => states.push(newState));
    assert.equal(client.state, 'disconnected');
    client.connect();
    assert.equal(client.state, 'connecting');
    const ready = client.ready();
    const ws = await handshake(0);
    const ctx = await ready;
    assert.deepEqual(ctx, {
      client: 'c0',
      session: 's0',
      user: '',
      node: 'gw-test',
      pingMs: 25000,
      resumed: false,
      encoding: 'msgpack',
    });
    assert.deepEqual(states, ['connecting', 'connected']);
    assert.deepEqual(ws.protocols, ['rt.v1.msgpack']);
    assert.equal(ws.binaryType, 'arraybuffer');
    const connect = ws.lastOp('connect');
    assert.equal(connect['id'], 1);
    assert.equal(connect['name'], 'tests');
    assert.equal(connect['version'], '1.2.3');
    assert.equal(connect['token'], undefined, 'anonymous: no token sent');
    assert.equal(connect['subs'], undefined, 'no subscriptions: no subs');
  });

  it('offers rt.v1.json and sends text frames with the json encoding', async () => {
    const client = newClient({ encoding: 'json' });
    client.connect();
    const ws = await handshake(0);
    assert.deepEqual(ws.protocols, ['rt.v1.json']);
    assert.equal(typeof ws.frames[0], 'string');
    await client.ready();
  });

  it('gives command ids that increase and are never 0; matches replies in any order', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const p1 = client.publish('chat:a', 1);
    const p2 = client.publish('chat:a', 2);
    const ping = client.ping();
    const ids = ws.sent().map((m) => m['id'] as number);
    assert.deepEqual(ids, [1, 2, 3, 4]);
    ws.push({ id: 4, ok: {} }, { id: 3, ok: { offset: 2, epoch: 'e' } });
    ws.push({ id: 2, ok: { offset: 1, epoch: 'e' } });
    assert.deepEqual(await p2, { offset: 2, epoch: 'e' });
    assert.deepEqual(await p1, { offset: 1, epoch: 'e' });
    assert.ok((await ping) >= 0);
  });

  it('handles several replies in one frame', async () => {
    const client = newClient({ encoding: 'json' });
    client.connect();
    const ws = await handshake(0);
    const a = client.rpc('m', 1);
    const b = client.rpc('m', 2);
    ws.push({ id: 2, ok: { data: 'a' } }, { id: 3, ok: { data: 'b' } });
    assert.deepEqual(await Promise.all([a, b]), ['a', 'b']);
  });

  it('queues commands issued while connecting and sends them once connected', async () => {
    const client = newClient();
    client.connect();
    const publish = client.publish('chat:a', 'early');
    const ws = await socket(0);
    ws.open();
    await waitFor(() => ws.sentOps('connect').length === 1);
    assert.equal(ws.sentOps('publish').length, 0, 'not before the connect reply');
    ws.replyOk('connect', { client: 'c', session: 's' });
    const sent = ws.lastOp('publish');
    assert.equal(sent['data'], 'early');
    ws.push({ id: sent['id'], ok: { offset: 1, epoch: 'e' } });
    assert.deepEqual(await publish, { offset: 1, epoch: 'e' });
  });

  it('fails commands at once while disconnected (CLIENT_CLOSED)', async () => {
    const client = newClient();
    await assert.rejects(client.publish('chat:a', 1), (e: RealtimeError) => {
      assert.ok(e instanceof RealtimeError);
      assert.equal(e.code, ErrorCode.CLIENT_CLOSED);
      assert.equal(e.local, true);
      return true;
    });
  });

  it('times a command out with a local 114 and ignores the late reply', async () => {
    const client = newClient({ timeoutMs: 40 });
    client.connect();
    const ws = await handshake(0);
    const started = Date.now();
    await assert.rejects(client.rpc('slow.method'), (e: RealtimeError) => {
      assert.equal(e.code, ErrorCode.TIMEOUT);
      assert.equal(e.temporary, true);
      assert.equal(e.local, true);
      return true;
    });
    assert.ok(Date.now() - started >= 35);
    ws.replyOk('rpc', { data: 'late' }); // must not throw or resolve anything
    assert.equal(client.state, 'connected');
  });

  it('sends rpc timeoutMs to the server as timeout_ms', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const call = client.rpc('m', { a: 1 }, { timeoutMs: 300 });
    assert.equal(ws.lastOp('rpc')['timeout_ms'], 300);
    ws.replyOk('rpc', { data: 42 });
    assert.equal(await call, 42);
  });

  it('maps error replies to RealtimeError', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const publish = client.publish('news:x', 1);
    ws.replyError('publish', { code: 103, message: 'permission denied', temporary: false });
    await assert.rejects(publish, (e: RealtimeError) => {
      assert.equal(e.code, 103);
      assert.equal(e.message, 'permission denied');
      assert.equal(e.temporary, false);
      assert.equal(e.local, false);
      return true;
    });
    const busy = client.rpc('m');
    ws.replyError('rpc', { code: 113, message: 'busy', temporary: true, retry_after_ms: 250 });
    await assert.rejects(busy, (e: RealtimeError) => e.code === 113 && e.temporary && e.retryAfterMs === 250);
  });

  it('fails commands in flight with CONNECTION_LOST when the socket drops', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const publish = client.publish('chat:a', 1);
    ws.serverClose(1006);
    await assert.rejects(publish, (e: RealtimeError) => e.code === ErrorCode.CONNECTION_LOST && e.temporary);
  });

  it('streams rpc parts, then the final result', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const stream = client.rpcStream<{ processed: number }, { count: number }>('stats.summarize', { values: [1, 2, 3] });
    const id = ws.lastOp('rpc')['id'];
    ws.push({ push: 'rpc_part', id, data: { processed: 1 } }, { push: 'rpc_part', id, data: { processed: 2 } });
    ws.push({ id, ok: { data: { count: 3 } } });
    const chunks: RpcChunk<{ processed: number }, { count: number }>[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    assert.deepEqual(chunks, [
      { final: false, data: { processed: 1 } },
      { final: false, data: { processed: 2 } },
      { final: true, data: { count: 3 } },
    ]);
  });

  it('throws a streamed rpc error from the iteration, after the parts', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const stream = client.rpcStream('m');
    const id = ws.lastOp('rpc')['id'];
    ws.push({ push: 'rpc_part', id, data: 1 }, { id, error: { code: 107, message: 'bad input' } });
    const seen: unknown[] = [];
    await assert.rejects(async () => {
      for await (const chunk of stream) seen.push(chunk.data);
    }, (e: RealtimeError) => e.code === 107);
    assert.deepEqual(seen, [1]);
  });

  it('disconnect() stops everything: state disconnected, no reconnect', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const events: DisconnectedContext[] = [];
    client.on('disconnected', (e) => events.push(e));
    client.disconnect();
    assert.equal(client.state, 'disconnected');
    assert.equal(ws.closedByClient?.code, 1000);
    assert.deepEqual(events, [{ code: 1000, reason: 'disconnect called', willReconnect: false }]);
    await sleep(50);
    assert.equal(FakeWebSocket.instances.length, 1);
    await assert.rejects(client.ready(), (e: RealtimeError) => e.code === ErrorCode.CLIENT_CLOSED);
  });

  it('closes and reconnects when a frame does not decode', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    const errors: string[] = [];
    client.on('error', (e) => errors.push(e.type));
    ws.pushRaw('text on a msgpack socket');
    assert.deepEqual(errors, ['decode']);
    assert.equal(client.state, 'connecting');
    await handshake(1);
    assert.equal(client.state, 'connected');
  });
});

describe('reconnecting and close codes', () => {
  it('reconnects with backoff after 1006 and resumes the session', async () => {
    const client = newClient();
    client.connect();
    const ws0 = await handshake(0);
    const disconnected: DisconnectedContext[] = [];
    client.on('disconnected', (e) => disconnected.push(e));
    ws0.serverClose(1006);
    assert.equal(client.state, 'connecting');
    assert.equal(disconnected[0]?.willReconnect, true);
    assert.equal(disconnected[0]?.code, 1006);
    const ws1 = await handshake(1);
    assert.equal(ws1.lastOp('connect')['session'], 's0', 'the previous session is sent back');
    assert.equal(client.state, 'connected');
  });

  for (const code of [4001, 4004, 4006, 4009, 1011]) {
    it(`reconnects with backoff after ${code}`, async () => {
      const client = newClient();
      client.connect();
      (await handshake(0)).serverClose(code);
      await handshake(1);
      assert.equal(client.state, 'connected');
    });
  }

  for (const [code, meaning] of [
    [4000, 'protocol error'],
    [4002, 'unauthorized'],
    [4008, 'kicked'],
  ] as const) {
    it(`stays closed after ${code} (${meaning})`, async () => {
      const client = newClient();
      client.connect();
      const ws = await handshake(0);
      const events: DisconnectedContext[] = [];
      client.on('disconnected', (e) => events.push(e));
      ws.push({ push: 'disconnect', code, reason: meaning, reconnect: false });
      ws.serverClose(code, meaning);
      assert.equal(client.state, 'closed');
      assert.deepEqual(events, [{ code, reason: meaning, willReconnect: false }]);
      assert.deepEqual(client.lastDisconnect, { code, reason: meaning, willReconnect: false });
      await sleep(60);
      assert.equal(FakeWebSocket.instances.length, 1, 'no reconnect');
    });
  }

  it('closes after a connect refused with 101, without waiting for the close frame', async () => {
    const client = newClient();
    client.connect();
    const ready = client.ready();
    const ws = await socket(0);
    ws.open();
    await waitFor(() => ws.sentOps('connect').length === 1);
    ws.replyError('connect', { code: 101, message: 'bad token', temporary: false });
    await assert.rejects(ready, (e: RealtimeError) => e.code === ErrorCode.CLIENT_CLOSED);
    assert.equal(client.state, 'closed');
  });

  it('waits retry_after_ms (from the disconnect push) after 4005, with jitter', async () => {
    const client = newClient();
    client.connect();
    const ws = await handshake(0);
    let delayMs: number | undefined;
    client.on('disconnected', (e) => (delayMs = e.delayMs));
    const closedAt = Date.now();
    ws.push({ push: 'disconnect', code: 4005, reason: 'server draining', reconnect: true, retry_after_ms: 200 });
    ws.serverClose(4005, 'draining');
    assert.ok(delayMs !== undefined && delayMs >= 200 && delayMs < 300, `delay ${delayMs}`);
    await sleep(150);
    assert.equal(FakeWebSocket.instances.length, 1, 'not before retry_after_ms');
    await socket(1);
    assert.ok(Date.now() - closedAt >= 195);
  });

  it("waits the connect error's retry_after_ms after a 113 refusal (4007)", async () => {
    const client = newClient();
    client.connect();
    const ws = await socket(0);
    ws.open();
    await waitFor(() => ws.sentOps('connect').length === 1);
    let delayMs: number | undefined;
    let code: number | undefined;
    client.on('disconnected', (e) => ((delayMs = e.delayMs), (code = e.code)));
    ws.replyError('connect', { code: 113, message: 'busy', temporary: true, retry_after_ms: 120 });
    assert.equal(code, 4007);
    assert.ok(delayMs !== undefined && delayMs >= 120 && delayMs < 180, `delay ${delayMs}`);
    await sleep(80);
    assert.equal(FakeWebSocket.instances.length, 1);
    await handshake(1);
  });

  // Math.random picks the jitter: pinned to its extremes, the delay is exact.
  for (const [random, expected] of [
    [0, 200],
    [0.999999, 299],
  ] as const) {
    it(`waits retry_after_ms from the disconnect push after 4007 (no connect error): ${expected} ms at jitter ${random}`, async (t) => {
      const client = newClient(); // its backoff would be at most 20 ms
      client.connect();
      const ws = await handshake(0);
      const events: DisconnectedContext[] = [];
      client.on('disconnected', (e) => events.push(e));
      t.mock.method(Math, 'random', () => random);
      ws.push({ push: 'disconnect', code: 4007, reason: 'overloaded', reconnect: true, retry_after_ms: 200 });
      const closedAt = Date.now();
      ws.serverClose(4007, 'overloaded');
      t.mock.restoreAll();
      assert.deepEqual(events, [{ code: 4007, reason: 'overloaded', willReconnect: true, delayMs: expected }]);
      assert.equal(client.state, 'connecting');
      await sleep(150);
      assert.equal(FakeWebSocket.instances.length, 1, 'not before retry_after_ms');
      await socket(1);
      const waited = Date.now() - closedAt;
      // At least the delay (timers never fire early; Date.now() is whole ms), and not much later.
      assert.ok(waited >= expected - 2 && waited < expected + 250, `reconnected after ${waited} ms, delay ${expected}`);
      await handshake(1);
      assert.equal(client.state, 'connected');
    });
  }

  it("4007's retry_after_ms comes from the disconnect push before that close only; without one it backs off", async () => {
    const client = newClient();
    client.connect();
    const ws0 = await handshake(0);
    const events: DisconnectedContext[] = [];
    client.on('disconnected', (e) => events.push(e));
    ws0.push({ push: 'disconnect', code: 4007, reason: 'overloaded', reconnect: true, retry_after_ms: 100 });
    ws0.serverClose(4007, 'overloaded');
    const first = events[0]?.delayMs;
    assert.ok(first !== undefined && first >= 100 && first < 150, `delay ${first}: retry_after_ms plus at most 50 %`);
    const ws1 = await handshake(1);
    ws1.serverClose(4007, 'overloaded'); // no push this time
    const second = events[1]?.delayMs;
    assert.ok(second !== undefined && second >= 0 && second < 5, `delay ${second}: backoff, first attempt (< minReconnectDelayMs)`);
    await handshake(2);
    assert.equal(client.state, 'connected');
  });

  for (const code of [4006, 4009]) {
    it(`${code}: reconnects with full-jitter backoff growing per failed attempt, not retry_after_ms`, async (t) => {
      t.mock.method(Math, 'random', () => 0.999999); // every delay at its ceiling, less 1 ms
      const client = newClient(); // ceilings 5, 10, 20, 20 ms
      const events: DisconnectedContext[] = [];
      client.on('disconnected', (e) => events.push(e));
      client.connect();
      const ws0 = await handshake(0);
      const started = Date.now();
      // A retry_after_ms only counts for 4005 and 4007.
      ws0.push({ push: 'disconnect', code, reason: 'go away', reconnect: true, retry_after_ms: 5000 });
      ws0.serverClose(code, 'go away');
      // Three attempts that fail the same way before their connect is answered.
      for (let i = 1; i <= 3; i++) {
        const ws = await socket(i);
        ws.open();
        ws.serverClose(code, 'go away');
      }
      const ws4 = await handshake(4);
      assert.ok(Date.now() - started < 1000, 'the push asked for 5 s: ignored');
      assert.deepEqual(
        events.map((e) => [e.code, e.willReconnect, e.delayMs]),
        [
          [code, true, 4],
          [code, true, 9],
          [code, true, 19],
          [code, true, 19],
        ],
      );
      // Connected again: the next close starts over from the smallest window.
      ws4.serverClose(code, 'go away');
      assert.deepEqual(events[4], { code, reason: 'go away', willReconnect: true, delayMs: 4 });
      await handshake(5);
      assert.equal(client.state, 'connected');
    });
  }

  it('backs off after 4005 without retry_after_ms', async () => {
    const client = newClient();
    client.connect();
    (await handshake(0)).serverClose(4005);
    await handshake(1);
  });

  it('gets a new token with getToken after 4003, then reconnects with it', async () => {
    let calls = 0;
    const client = newClient({ getToken: async () => `token-${++calls}` });
    client.connect();
    const ws0 = await handshake(0);
    assert.equal(ws0.lastOp('connect')['token'], 'token-1', 'no token yet: getToken is asked first');
    ws0.push({ push: 'disconnect', code: 4003, reason: 'token expired', reconnect: true });
    ws0.serverClose(4003, 'token expired');
    const ws1 = await handshake(1);
    assert.equal(calls, 2);
    assert.equal(ws1.lastOp('connect')['token'], 'token-2');
    // A plain network drop keeps the (still valid) token.
    ws1.serverClose(1006);
    const ws2 = await handshake(2);
    assert.equal(calls, 2);
    assert.equal(ws2.lastOp('connect')['token'], 'token-2');
  });

  it('handles a connect refused with 109 (token expired) like 4003', async () => {
    let calls = 0;
    const client = newClient({ token: 'old', getToken: async () => `new-${++calls}` });
    client.connect();
    const ws0 = await socket(0);
    ws0.open();
    await waitFor(() => ws0.sentOps('connect').length === 1);
    assert.equal(ws0.lastOp('connect')['token'], 'old');
    ws0.replyError('connect', { code: 109, message: 'token expired' });
    const ws1 = await handshake(1);
    assert.equal(ws1.lastOp('connect')['token'], 'new-1');
  });

  it('stays closed after 4003 when there is no getToken', async () => {
    const client = newClient({ token: 'static' });
    client.connect();
    (await handshake(0)).serverClose(4003);
    assert.equal(client.state, 'closed');
  });

  it('closes when getToken returns an empty token', async () => {
    const client = newClient({ getToken: async () => '' });
    const disconnected: DisconnectedContext[] = [];
    client.on('disconnected', (e) => disconnected.push(e));
    client.connect();
    await waitFor(() => client.state === 'closed');
    assert.equal(disconnected[0]?.code, 3004);
    assert.equal(FakeWebSocket.instances.length, 0);
  });

  it('retries with backoff when getToken throws', async () => {
    let calls = 0;
    const client = newClient({
      getToken: async () => {
        if (++calls === 1) throw new Error('auth service down');
        return 'tok';
      },
    });
    const errors: string[] = [];
    client.on('error', (e) => errors.push(`${e.type}: ${e.error.message}`));
    client.connect();
    const ws = await handshake(0);
    assert.deepEqual(errors, ['token: auth service down']);
    assert.equal(ws.lastOp('connect')['token'], 'tok');
  });

  it('refreshes the token before it expires', async () => {
    // Expires in 2 s: refreshed 1 s ahead (the minimum lead).
    const exp = Math.floor(Date.now() / 1000) + 2;
    let calls = 0;
    const client = newClient({
      token: jwt({ sub: 'u', exp }),
      getToken: async () => `fresh-${++calls}`,
    });
    client.connect();
    const ws = await handshake(0);
    await waitFor(() => ws.sentOps('refresh').length === 1, 'refresh', 3000);
    assert.equal(ws.lastOp('refresh')['token'], 'fresh-1');
    ws.replyOk('refresh', { expires_at: 0 }); // never expires: no further refresh
    await sleep(20);
    assert.equal(ws.sentOps('refresh').length, 1);
  });

  it('gets a token first when the current one already expired', async () => {
    const client = newClient({
      token: jwt({ sub: 'u', exp: Math.floor(Date.now() / 1000) - 10 }),
      getToken: async () => 'renewed',
    });
    client.connect();
    const ws = await handshake(0);
    assert.equal(ws.lastOp('connect')['token'], 'renewed');
  });

  it('reconnects after a connect timeout', async () => {
    const client = newClient({ timeoutMs: 50 });
    const codes: number[] = [];
    client.on('disconnected', (e) => codes.push(e.code));
    client.connect();
    const ws0 = await socket(0);
    ws0.open(); // but never answers connect
    await handshake(1);
    assert.deepEqual(codes, [3001]);
  });

  it('heartbeat: reconnects when the ping gets no reply', async () => {
    const client = newClient({ pingIntervalMs: 20, timeoutMs: 60 });
    client.connect();
    const ws0 = await handshake(0);
    await waitFor(() => ws0.sentOps('ping').length > 0, 'heartbeat ping');
    const ws1 = await handshake(1); // the ping timed out: new socket
    assert.ok(ws1);
    assert.equal(ws0.closedByClient?.reason, 'no reply to ping');
  });

  it('uses full-jitter backoff that grows with failed attempts', async () => {
    const client = newClient({ minReconnectDelayMs: 1, maxReconnectDelayMs: 4 });
    const delays: number[] = [];
    client.on('disconnected', (e) => delays.push(e.delayMs ?? -1));
    client.connect();
    for (let i = 0; i < 5; i++) (await socket(i)).serverClose(1006);
    await socket(5);
    assert.equal(delays.length, 5);
    assert.ok(delays.every((d) => d >= 0 && d <= 4), `delays ${delays}`);
  });
});
