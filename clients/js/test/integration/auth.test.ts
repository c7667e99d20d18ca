/**
 * Tokens against the real cluster: connect with a JWT, refresh before
 * expiry, close 4003 then getToken and reconnect, a bad token closing for
 * good, session resume. Needs a build with the session service (rt-session,
 * JWT verification); skipped otherwise, unless RT_REQUIRE_CLUSTER=1 (then a
 * missing rt-session fails, like a missing gateway).
 */

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { after, before, describe, it } from 'node:test';

import { Client, ErrorCode } from '../../src/index.js';
import type { ClientOptions, DisconnectedContext, ErrorContext } from '../../src/index.js';
import { clusterUnavailable, sessionServiceUnavailable, startCluster, type Cluster } from '../helpers/cluster.js';
import { sleep, waitFor } from '../helpers/fake-websocket.js';

const SECRET = 'js-client-test-secret';

// Skipped without the binaries; with RT_REQUIRE_CLUSTER=1 (CI) a missing one fails instead.
const skip = clusterUnavailable() ?? sessionServiceUnavailable();
if (skip !== undefined) console.log(`# ${skip}`);

let cluster: Cluster;
const clients: Client[] = [];

/** An HS256 JWT, as an app's backend would issue it. */
function sign(claims: Record<string, unknown>, secret = SECRET): string {
  const part = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const unsigned = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

const nowSecs = () => Math.floor(Date.now() / 1000);

function newClient(options: ClientOptions): Client {
  const client = new Client(cluster.wsUrl, { minReconnectDelayMs: 100, maxReconnectDelayMs: 500, ...options });
  clients.push(client);
  return client;
}

describe('tokens against the real cluster', { skip }, () => {
  before(async () => {
    cluster = await startCluster({
      RT_SESSION__JWT_HMAC_SECRET: SECRET,
      // No clock-skew allowance: expiry happens when the test expects it.
      RT_SESSION__JWT_LEEWAY_SECS: '0',
    });
  });

  after(async () => {
    for (const c of clients) c.disconnect();
    await cluster?.stop();
  });

  it('connects with a token: the user is its sub', async () => {
    const client = newClient({ token: sign({ sub: 'alice', exp: nowSecs() + 600 }) });
    client.connect();
    const ctx = await client.ready(10_000);
    assert.equal(ctx.user, 'alice');
  });

  it('a token that does not verify closes for good (101, close 4002, state closed)', async () => {
    const client = newClient({ token: sign({ sub: 'mallory', exp: nowSecs() + 600 }, 'wrong-secret') });
    const errors: ErrorContext[] = [];
    client.on('error', (e) => errors.push(e));
    client.connect();
    await waitFor(() => client.state === 'closed', 'closed', 10_000);
    assert.equal(client.lastDisconnect?.code, 4002);
    assert.equal(client.lastDisconnect?.willReconnect, false);
    assert.equal(errors[0]?.type, 'connect');
    assert.equal((errors[0]?.error as { code?: number }).code, ErrorCode.UNAUTHORIZED);
  });

  it('refreshes the token before it expires and stays connected', async () => {
    let issued = 0;
    const client = newClient({
      getToken: async () => {
        issued++;
        return sign({ sub: 'bob', exp: nowSecs() + 3 });
      },
    });
    const disconnects: DisconnectedContext[] = [];
    const errors: ErrorContext[] = [];
    client.on('disconnected', (d) => disconnects.push(d));
    client.on('error', (e) => errors.push(e));
    client.connect();
    await client.ready(10_000);
    await sleep(5_000); // past the first token's expiry
    assert.deepEqual(disconnects, [], 'never disconnected');
    assert.deepEqual(errors, []);
    assert.ok(issued >= 2, `getToken called ${issued} times`);
    assert.equal(client.state, 'connected');
    assert.ok((await client.ping()) >= 0, 'the connection still works');
  });

  it('close 4003 (token expired): gets a new token and reconnects', async () => {
    let refusing = true; // the app's token endpoint is down for a while
    let issued = 0;
    const client = newClient({
      getToken: async () => {
        if (issued > 0 && refusing) throw new Error('token endpoint down');
        issued++;
        return sign({ sub: 'carol', exp: nowSecs() + 2 });
      },
    });
    const disconnects: DisconnectedContext[] = [];
    client.on('disconnected', (d) => {
      disconnects.push(d);
      if (d.code === 4003) refusing = false; // back up just as the server gives up on the token
    });
    client.connect();
    await client.ready(10_000);
    await waitFor(() => disconnects.length > 0, 'the token to expire', 10_000);
    assert.equal(disconnects[0]?.code, 4003);
    assert.equal(disconnects[0]?.willReconnect, true);
    await waitFor(() => client.state === 'connected', 'the reconnect with a new token', 10_000);
    assert.equal(client.connection?.user, 'carol');
    assert.ok(issued >= 2);
  });

  it('presence lists the subscribers; join and leave are pushed', async () => {
    const ch = `chat:presence-${process.pid}`;
    const a = newClient({ token: sign({ sub: 'ann', exp: nowSecs() + 600 }) });
    const b = newClient({ token: sign({ sub: 'ben', exp: nowSecs() + 600 }), encoding: 'json' });
    a.connect();
    b.connect();
    await Promise.all([a.ready(10_000), b.ready(10_000)]);
    const subA = a.newSubscription(ch);
    const events: string[] = [];
    subA.on('join', (e) => events.push(`join ${e.info.user}`));
    subA.on('leave', (e) => events.push(`leave ${e.info.user}`));
    subA.subscribe();
    await subA.ready(10_000);
    const subB = b.newSubscription(ch);
    subB.subscribe();
    await subB.ready(10_000);
    await waitFor(async () => Object.keys((await subA.presence()).clients ?? {}).length === 2, 'both present', 5_000);
    const presence = await b.presence(ch);
    const users = Object.values(presence.clients ?? {}).map((c) => c.user).sort();
    assert.deepEqual(users, ['ann', 'ben']);
    assert.ok(presence.clients?.[a.connection?.client ?? '']?.user === 'ann', 'keyed by client id');
    await waitFor(() => events.includes('join ben'), 'join of ben', 5_000);
    subB.unsubscribe();
    await waitFor(() => events.includes('leave ben'), 'leave of ben', 5_000);
  });

  it('a private channel with a channel token survives a reconnect (resumed session) and recovers', async () => {
    const ch = `dm:erin-${process.pid}`;
    const client = newClient({ token: sign({ sub: 'erin', exp: nowSecs() + 600 }) });
    const sub = client.newSubscription(ch, { token: sign({ sub: 'erin', channel: ch, exp: nowSecs() + 600 }) });
    const offsets: number[] = [];
    sub.on('publication', (p) => offsets.push(p.offset));
    let lost = 0;
    sub.on('stateLost', () => lost++);
    sub.subscribe();
    client.connect();
    await sub.ready(10_000);
    await cluster.publish(ch, 'one');
    await waitFor(() => offsets.length === 1, 'first publication', 5_000);
    await sleep(700); // the session service learns the channel list within half a second
    client.disconnect();
    await cluster.publish(ch, 'two');
    client.connect();
    await client.ready(10_000);
    await sub.ready(10_000);
    await cluster.publish(ch, 'three');
    await waitFor(() => offsets.length === 3, 'missed and new publications', 5_000);
    assert.deepEqual(offsets, [1, 2, 3]);
    assert.equal(lost, 0);
  });

  it('resumes the session on reconnect, recovering its subscriptions', async () => {
    const client = newClient({ token: sign({ sub: 'dave', exp: nowSecs() + 600 }) });
    const ch = `chat:resume-${process.pid}`;
    const sub = client.newSubscription(ch);
    const offsets: number[] = [];
    sub.on('publication', (p) => offsets.push(p.offset));
    sub.subscribe();
    client.connect();
    const first = await client.ready(10_000);
    await sub.ready(10_000);
    await cluster.publish(ch, 'one');
    await waitFor(() => offsets.length === 1, 'first publication', 5_000);
    client.disconnect();
    await cluster.publish(ch, 'two');
    client.connect();
    const second = await client.ready(10_000);
    assert.equal(second.session, first.session);
    assert.equal(second.resumed, true);
    await waitFor(() => offsets.length === 2, 'the missed publication', 5_000);
    assert.deepEqual(offsets, [1, 2]);
  });
});
