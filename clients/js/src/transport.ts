/**
 * The WebSocket the client runs on: the browser's (or Node 22+'s) global
 * `WebSocket`, else the `ws` package, loaded lazily so that browser bundles
 * never see it, else one the application injects (tests use a fake).
 */

/**
 * What the client needs of a WebSocket: the browser API's subset that `ws`
 * implements too. Handler parameters are typed `never` so that the DOM's and
 * `ws`'s own classes are assignable; the client reads them as the shapes below.
 */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  binaryType: string;
  onopen: ((event: never) => unknown) | null;
  onmessage: ((event: never) => unknown) | null;
  onclose: ((event: never) => unknown) | null;
  onerror: ((event: never) => unknown) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** What the client reads from a `message` event. */
export interface MessageEventLike {
  data: unknown;
}

/** What the client reads from a `close` event. */
export interface CloseEventLike {
  code: number;
  reason: string;
}

/** `readyState` values (the constants are not on every implementation). */
export const OPEN = 1;

let wsPackage: Promise<WebSocketConstructor> | undefined;

/** Finds a WebSocket implementation; rejects with an explanation when there is none. */
export function resolveWebSocket(injected?: WebSocketConstructor): Promise<WebSocketConstructor> {
  if (injected !== undefined) return Promise.resolve(injected);
  const global = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (typeof global === 'function') return Promise.resolve(global);
  wsPackage ??= loadWsPackage();
  return wsPackage;
}

async function loadWsPackage(): Promise<WebSocketConstructor> {
  // A variable specifier (and the ignore hints) keeps bundlers from trying to
  // pack `ws` into browser builds: it is only ever loaded in Node.js.
  const specifier = 'ws';
  let module: { default?: unknown; WebSocket?: unknown };
  try {
    module = (await import(/* webpackIgnore: true */ /* @vite-ignore */ specifier)) as typeof module;
  } catch (error) {
    wsPackage = undefined; // let a later attempt (after `npm install ws`) try again
    throw new Error(
      'no WebSocket implementation: this runtime has no global WebSocket; install the "ws" package or pass options.WebSocket',
      { cause: error },
    );
  }
  const ctor = module.WebSocket ?? module.default;
  if (typeof ctor !== 'function') throw new Error('the "ws" package does not export a WebSocket class');
  return ctor as WebSocketConstructor;
}
