import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it } from 'node:test';

import WsDefault, { WebSocket as WsNamed } from 'ws';

import { resolveWebSocket, type WebSocketConstructor } from '../../src/transport.js';
import { FakeWebSocket } from '../helpers/fake-websocket.js';

/** globalThis as the transport reads it. */
const globals = globalThis as { WebSocket?: unknown };

describe('resolveWebSocket', () => {
  // Node 20 has no global WebSocket, Node 22 has one: each test sets its own.
  let saved: PropertyDescriptor | undefined;

  beforeEach(() => {
    saved = Object.getOwnPropertyDescriptor(globalThis, 'WebSocket');
  });

  afterEach(() => {
    if (saved === undefined) delete globals.WebSocket;
    else Object.defineProperty(globalThis, 'WebSocket', saved);
  });

  it('without a global WebSocket, loads the ws package and returns its class', async () => {
    delete globals.WebSocket;
    assert.equal(globals.WebSocket, undefined);
    const ctor = await resolveWebSocket();
    assert.equal(ctor, WsNamed as unknown as WebSocketConstructor);
    assert.equal(ctor, WsDefault as unknown as WebSocketConstructor);
    assert.equal(await resolveWebSocket(), ctor, 'loaded once, then the same class');
  });

  it("with a global WebSocket (a browser's, Node 22's), returns it and never the ws package", async () => {
    // After the test above cached the ws package: the global still wins.
    class GlobalWebSocket extends FakeWebSocket {}
    globals.WebSocket = GlobalWebSocket;
    assert.equal(await resolveWebSocket(), GlobalWebSocket);
  });

  it('a global that is not a class does not count: falls back to ws', async () => {
    globals.WebSocket = {};
    assert.equal(await resolveWebSocket(), WsNamed as unknown as WebSocketConstructor);
  });

  it('an injected class wins over both', async () => {
    globals.WebSocket = class extends FakeWebSocket {};
    assert.equal(await resolveWebSocket(FakeWebSocket), FakeWebSocket);
    delete globals.WebSocket;
    assert.equal(await resolveWebSocket(FakeWebSocket), FakeWebSocket);
  });
});
