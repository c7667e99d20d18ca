/**
 * A scripted WebSocket for unit tests: the test plays the server. It records
 * what the client sends (decoded), and delivers frames and closes on demand.
 */

import { decodeMulti, encode } from '@msgpack/msgpack';
import type { WireMessage } from '../../src/codec.js';
import type { WebSocketLike } from '../../src/transport.js';

type Handler = ((event: unknown) => unknown) | null;

export class FakeWebSocket implements WebSocketLike {
  static instances: FakeWebSocket[] = [];

  static reset(): void {
    FakeWebSocket.instances = [];
  }

  static get last(): FakeWebSocket | undefined {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }

  readonly url: string;
  readonly protocols: string[];
  readyState = 0;
  protocol = '';
  binaryType = 'blob';
  onopen: ((event: never) => unknown) | null = null;
  onmessage: ((event: never) => unknown) | null = null;
  onclose: ((event: never) => unknown) | null = null;
  onerror: ((event: never) => unknown) | null = null;
  /** Raw frames the client sent. */
  readonly frames: (string | Uint8Array)[] = [];
  /** Set when the client called close(). */
  closedByClient: { code: number | undefined; reason: string | undefined } | undefined;

  constructor(url: string, protocols?: string | string[]) {
    this.url = url;
    this.protocols = protocols === undefined ? [] : Array.isArray(protocols) ? protocols : [protocols];
    FakeWebSocket.instances.push(this);
  }

  get json(): boolean {
    return this.protocol === 'rt.v1.json';
  }

  send(data: string | Uint8Array): void {
    if (this.readyState !== 1) throw new Error('not open');
    this.frames.push(data);
  }

  close(code?: number, reason?: string): void {
    if (this.readyState >= 2) return;
    this.closedByClient = { code, reason };
    this.readyState = 3;
    queueMicrotask(() => this.fire(this.onclose, { code: code ?? 1005, reason: reason ?? '' }));
  }

  // --- the server's side --------------------------------------------------

  /** Accepts the handshake with the first offered subprotocol. */
  open(): void {
    this.protocol = this.protocols[0] ?? '';
    this.readyState = 1;
    this.fire(this.onopen, {});
  }

  /** Sends messages to the client, all in one frame. */
  push(...messages: WireMessage[]): void {
    this.fire(this.onmessage, { data: this.encodeFrame(messages) });
  }

  /** Sends a raw frame. */
  pushRaw(data: unknown): void {
    this.fire(this.onmessage, { data });
  }

  /** The server closes the connection. */
  serverClose(code: number, reason = ''): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.fire(this.onclose, { code, reason });
  }

  /** Every message the client sent, decoded. */
  sent(): WireMessage[] {
    const out: WireMessage[] = [];
    for (const frame of this.frames) {
      if (typeof frame === 'string') {
        for (const line of frame.split('\n')) if (line !== '') out.push(JSON.parse(line) as WireMessage);
      } else {
        for (const value of decodeMulti(frame)) out.push(value as WireMessage);
      }
    }
    return out;
  }

  /** Commands with this op the client sent. */
  sentOps(op: string): WireMessage[] {
    return this.sent().filter((m) => m['op'] === op);
  }

  /** The last command with this op. */
  lastOp(op: string): WireMessage {
    const all = this.sentOps(op);
    const last = all[all.length - 1];
    if (last === undefined) throw new Error(`no ${op} sent (sent: ${JSON.stringify(this.sent())})`);
    return last;
  }

  /** Replies ok to the last command with `op`. */
  replyOk(op: string, ok: WireMessage = {}): void {
    this.push({ id: this.lastOp(op)['id'], ok });
  }

  replyError(op: string, error: WireMessage): void {
    this.push({ id: this.lastOp(op)['id'], error });
  }

  private encodeFrame(messages: WireMessage[]): string | ArrayBuffer {
    if (this.json) return messages.map((m) => JSON.stringify(m)).join('\n');
    const parts = messages.map((m) => encode(m));
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out.buffer;
  }

  private fire(handler: ((event: never) => unknown) | null, event: unknown): void {
    (handler as Handler)?.(event);
  }
}

type Falsy = undefined | null | false;

/** Polls `check` (sync or async) until it is truthy. */
export async function waitFor<T>(
  check: () => T | Falsy | Promise<T | Falsy>,
  what = 'condition',
  timeoutMs = 2000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Waits for socket number `index` (0-based) to be created. */
export function socket(index: number): Promise<FakeWebSocket> {
  return waitFor(() => FakeWebSocket.instances[index], `socket #${index}`);
}

/** Opens socket `index` and answers its connect. */
export async function handshake(index: number, ok: WireMessage = {}): Promise<FakeWebSocket> {
  const ws = await socket(index);
  ws.open();
  await waitFor(() => ws.sentOps('connect').length > 0, 'connect command');
  ws.replyOk('connect', {
    client: `c${index}`,
    session: `s${index}`,
    user: '',
    ping_ms: 25000,
    node: 'gw-test',
    ...ok,
  });
  return ws;
}
