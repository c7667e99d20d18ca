/**
 * Against the real services (see test/helpers/cluster.ts): both encodings,
 * publish/subscribe, history, recovery on reconnect, streaming RPC, errors.
 */

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { Client, ErrorCode, RealtimeError } from '../../src/index.js';
import type { ClientOptions, Encoding, Publication, RpcChunk, SubscribedContext } from '../../src/index.js';
import { clusterUnavailable, startCluster, type Cluster } from '../helpers/cluster.js';
import { waitFor } from '../helpers/fake-websocket.js';

const skip = clusterUnavailable();
if (skip !== undefined) console.log(`# ${skip}`);

let cluster: Cluster;
let clients: Client[] = [];
let unique = 0;
const channel = (ns: string) => `${ns}:js-${process.pid}-${++unique}`;

async function connected(encoding: Encoding, options: ClientOptions = {}): Promise<Client> {
  const client = new Client(cluster.wsUrl, { encoding, name: 'js-tests', version: '0.1.0', ...options });
  clients.push(client);
  client.connect();
  await client.ready(10_000);
  return client;
}

describe('against the real cluster', { skip }, () => {
  before(async () => {
    cluster = await startCluster();
  });

  after(async () => {
    for (const c of clients) c.disconnect();
    clients = [];
    await cluster?.stop();
  });

  for (const encoding of ['msgpack', 'json'] as const) {
    describe(`${encoding} encoding`, () => {
      it('connects and reports the connect result', async () => {
        const client = await connected(encoding);
        const ctx = client.connection;
        assert.ok(ctx);
        assert.ok(ctx.client.length > 0, 'client id');
        assert.ok(ctx.session.length > 0, 'session');
        assert.equal(ctx.user, '', 'anonymous');
        assert.ok(ctx.node.length > 0, 'node');
        assert.ok(ctx.pingMs > 0);
        assert.equal(ctx.encoding, encoding);
        assert.ok((await client.ping()) >= 0);
      });

      it('publishes and subscribes: a round trip between two clients, binary data included', async () => {
        const ch = channel('chat');
        const subscriber = await connected(encoding);
        const publisher = await connected(encoding === 'json' ? 'msgpack' : 'json');
        const sub = subscriber.newSubscription(ch);
        const received: Publication[] = [];
        sub.on('publication', (p) => received.push(p));
        sub.subscribe();
        const ctx = await sub.ready(10_000);
        assert.equal(ctx.offset, 0, 'a new channel starts at 0');
        assert.equal(ctx.recovered, false);

        const sent: unknown[] = [
          { text: 'hello', n: 1, nested: { list: [1, 2, 3], ok: true } },
          'plain string',
          42,
          new Uint8Array([0, 1, 2, 254, 255]),
          null,
        ];
        const results = [];
        for (const data of sent) results.push(await publisher.publish(ch, data));
        assert.deepEqual(
          results.map((r) => r.offset),
          [1, 2, 3, 4, 5],
        );
        assert.ok(results.every((r) => r.epoch === ctx.epoch));
        await waitFor(() => received.length === sent.length, 'publications', 5000);
        assert.deepEqual(
          received.map((p) => p.offset),
          [1, 2, 3, 4, 5],
        );
        assert.deepEqual(
          received.map((p) => p.data),
          sent,
        );
        assert.ok(received[3]?.data instanceof Uint8Array, 'binary arrives as Uint8Array');
        const info = received[0]?.info;
        assert.equal(info?.client, publisher.connection?.client, 'info names the publishing client');
        assert.ok((received[0]?.ts ?? 0) > 1_600_000_000_000, 'ts in ms');
      });

      it('receives HTTP publishes, with their info', async () => {
        const ch = channel('news');
        const client = await connected(encoding);
        const sub = client.newSubscription(ch);
        const received: Publication[] = [];
        sub.on('publication', (p) => received.push(p));
        sub.subscribe();
        await sub.ready(10_000);
        await cluster.publish(ch, { headline: 'x' }, 'main');
        await waitFor(() => received.length === 1, 'the HTTP publication', 5000);
        assert.deepEqual(received[0]?.data, { headline: 'x' });
      });

      it('reads history: newest first with reverse, after a position with since', async () => {
        const ch = channel('chat');
        const client = await connected(encoding);
        for (let i = 1; i <= 5; i++) await client.publish(ch, { i });
        const last3 = await client.history<{ i: number }>(ch, { limit: 3 });
        assert.deepEqual(
          last3.publications.map((p) => p.data.i),
          [3, 4, 5],
        );
        assert.equal(last3.offset, 5);
        const reversed = await client.history<{ i: number }>(ch, { limit: 2, reverse: true });
        assert.deepEqual(
          reversed.publications.map((p) => p.data.i),
          [5, 4],
        );
        const since = await client.history<{ i: number }>(ch, { since: { offset: 2, epoch: last3.epoch } });
        assert.deepEqual(
          since.publications.map((p) => p.offset),
          [3, 4, 5],
        );
        const position = await client.history(ch, { limit: 0 });
        assert.deepEqual(position.publications, []);
        assert.equal(position.offset, 5);
        await assert.rejects(
          client.history(ch, { since: { offset: 1, epoch: 'not-the-epoch' } }),
          (e: RealtimeError) => e instanceof RealtimeError && e.code === ErrorCode.UNRECOVERABLE_POSITION,
        );
      });

      it('recovers missed publications when it reconnects (connect subs, one round trip)', async () => {
        const ch = channel('chat');
        const client = await connected(encoding);
        const sub = client.newSubscription(ch);
        const offsets: number[] = [];
        const subscribed: SubscribedContext[] = [];
        sub.on('publication', (p) => offsets.push(p.offset));
        sub.on('subscribed', (c) => subscribed.push(c));
        sub.subscribe();
        await sub.ready(10_000);
        await cluster.publish(ch, 'before');
        await waitFor(() => offsets.length === 1, 'first publication', 5000);
        client.disconnect();
        for (let i = 0; i < 3; i++) await cluster.publish(ch, `while away ${i}`);
        client.connect();
        await client.ready(10_000);
        await sub.ready(10_000);
        await cluster.publish(ch, 'after');
        await waitFor(() => offsets.length === 5, 'missed and new publications', 5000);
        assert.deepEqual(offsets, [1, 2, 3, 4, 5]);
        assert.equal(subscribed[1]?.wasRecovering, true);
        assert.equal(subscribed[1]?.recovered, true);
      });

      it('signals stateLost when the position cannot be recovered', async () => {
        const ch = channel('chat');
        await cluster.publish(ch, 'x');
        const client = await connected(encoding);
        const sub = client.newSubscription(ch, { since: { offset: 0, epoch: 'an-epoch-that-never-was' } });
        let lost = 0;
        sub.on('stateLost', () => lost++);
        sub.subscribe();
        const ctx = await sub.ready(10_000);
        assert.equal(ctx.recovered, false);
        assert.equal(ctx.wasRecovering, true);
        assert.equal(ctx.offset, 1);
        assert.equal(lost, 1);
      });

      it('streams RPC parts (stats.summarize), then the final result', async () => {
        const client = await connected(encoding);
        const values = Array.from({ length: 10 }, (_, i) => i + 1);
        type Part = { processed: number; count: number; mean: number; min: number; max: number };
        type Summary = { count: number; mean: number; min: number; max: number; stddev: number; p50: number; p90: number; p99: number };
        const chunks: RpcChunk<Part, Summary>[] = [];
        for await (const chunk of client.rpcStream<Part, Summary>('stats.summarize', { values, chunk: 3 })) {
          chunks.push(chunk);
        }
        const parts = chunks.filter((c) => !c.final);
        assert.deepEqual(
          parts.map((p) => p.data.processed),
          [3, 6, 9],
        );
        const final = chunks[chunks.length - 1];
        assert.ok(final?.final);
        assert.equal(final.data.count, 10);
        assert.equal(final.data.mean, 5.5);
        assert.equal(final.data.min, 1);
        assert.equal(final.data.max, 10);
        assert.equal(final.data.p50, 5);
        // rpc() gives the final result only.
        const summary = await client.rpc<Summary>('stats.summarize', { values: [2, 4, 4, 4, 5, 5, 7, 9] });
        assert.equal(summary.stddev, 2);
      });

      it('maps server errors to RealtimeError', async () => {
        const client = await connected(encoding);
        await assert.rejects(client.publish(channel('news'), 'x'), (e: RealtimeError) => {
          assert.ok(e instanceof RealtimeError);
          assert.equal(e.code, ErrorCode.PERMISSION_DENIED); // 103: only backends publish to news:*
          assert.equal(e.temporary, false);
          assert.equal(e.local, false);
          return true;
        });
        await assert.rejects(client.rpc('no.such.method', {}), (e: RealtimeError) => e.code === ErrorCode.UNKNOWN_METHOD);
        await assert.rejects(client.rpc('stats.summarize', { values: 'nope' }), (e: RealtimeError) => e.code === ErrorCode.BAD_REQUEST);
        await assert.rejects(client.publish('bad..name', 1), (e: RealtimeError) => e.code === ErrorCode.BAD_REQUEST);

        const sub = client.newSubscription(channel('nope'));
        const unsubscribed: number[] = [];
        sub.on('unsubscribed', (c) => unsubscribed.push(c.code));
        sub.subscribe();
        await assert.rejects(sub.ready(10_000), (e: RealtimeError) => e.code === ErrorCode.UNKNOWN_CHANNEL);
        assert.deepEqual(unsubscribed, [ErrorCode.UNKNOWN_CHANNEL]);
        assert.equal(client.state, 'connected', 'errors do not cost the connection');
      });

      it('idempotent publishes return the first result', async () => {
        const client = await connected(encoding);
        const ch = channel('chat');
        const first = await client.publish(ch, 'once', { idempotencyKey: 'k-1' });
        const again = await client.publish(ch, 'twice?', { idempotencyKey: 'k-1' });
        assert.deepEqual(again, first);
        const history = await client.history(ch);
        assert.equal(history.publications.length, 1);
      });
    });
  }
});
