/** Public types shared by the client and subscriptions. */

import type { Encoding } from './codec.js';
import type { RealtimeError } from './errors.js';
import type { WebSocketConstructor } from './transport.js';

/** A position in a channel's stream: recovery resumes after it. */
export interface StreamPosition {
  /** Offset of the last publication seen (0 when the channel had none). */
  offset: number;
  /** The channel's epoch: an opaque string that changes when its history was lost. */
  epoch: string;
}

/** Who published: `user` and `client`, plus the token's `info` claim (or an HTTP publish's `info`). */
export interface PublicationInfo {
  user: string;
  client: string;
  info?: Record<string, unknown>;
}

/** One publication of a channel. */
export interface Publication<T = unknown> {
  channel: string;
  /** Consecutive within an epoch, starting at 1. */
  offset: number;
  data: T;
  info?: PublicationInfo;
  /** When it was sequenced, ms since the Unix epoch. */
  ts: number;
}

/** A client in presence, join and leave. */
export interface ClientInfo {
  user: string;
  client: string;
  info?: Record<string, unknown>;
}

export type ClientState = 'disconnected' | 'connecting' | 'connected' | 'closed';

export interface ClientOptions {
  /** Connection JWT. Leave out for anonymous connections (where the namespace allows them). */
  token?: string;
  /**
   * Returns a fresh connection JWT. Called when there is no token yet, before
   * the current one expires (then sent with `refresh`), and after close 4003
   * (token expired). Return an empty string to stop: the client closes.
   */
  getToken?: () => Promise<string>;
  /** Wire encoding; default `msgpack` (subprotocol `rt.v1.msgpack`), or `json` (`rt.v1.json`). */
  encoding?: Encoding;
  /** Client name and version, reported to the server on `connect`. */
  name?: string;
  version?: string;
  /** How long a command waits for its reply; default 10 000 ms. Also bounds the connect handshake. */
  timeoutMs?: number;
  /** Reconnect backoff: full jitter over [0, min(max, min * 2^attempt)]; defaults 500 and 20 000 ms. */
  minReconnectDelayMs?: number;
  maxReconnectDelayMs?: number;
  /**
   * Sends an application `ping` when nothing arrived for this long and
   * reconnects when it gets no reply within `timeoutMs`. 0 (default) turns it
   * off: the server's WebSocket pings already keep the connection checked.
   */
  pingIntervalMs?: number;
  /** A WebSocket class to use instead of the global one or `ws` (tests inject a fake). */
  WebSocket?: WebSocketConstructor;
  /** `true` logs to the console; a function receives the log lines instead. */
  debug?: boolean | ((message: string, ...details: unknown[]) => void);
}

/** The `connect` result. */
export interface ConnectedContext {
  client: string;
  session: string;
  user: string;
  node: string;
  /** The server's WebSocket ping interval. */
  pingMs: number;
  /** True when the server resumed the previous session (an extension; false when absent). */
  resumed: boolean;
  encoding: Encoding;
}

export interface DisconnectedContext {
  /** The close code (server's, or the client's own 1000 / 3xxx, see README). */
  code: number;
  reason: string;
  /** True when the client will reconnect by itself. */
  willReconnect: boolean;
  /** The wait before the next attempt, when it will reconnect. */
  delayMs?: number;
}

export interface StateContext<S> {
  oldState: S;
  newState: S;
}

export interface ErrorContext {
  /** What failed: the transport, the connect handshake, getToken, a refresh, a frame that did not decode. */
  type: 'transport' | 'connect' | 'token' | 'refresh' | 'decode' | 'subscribe';
  error: RealtimeError | Error;
  channel?: string;
}

export interface ClientEvents {
  state: StateContext<ClientState>;
  connected: ConnectedContext;
  disconnected: DisconnectedContext;
  error: ErrorContext;
  /** Every publication of every subscription, after the subscription's own event. */
  publication: Publication;
}

export type SubscriptionState = 'unsubscribed' | 'subscribing' | 'subscribed';

export interface SubscriptionOptions {
  /** Channel token, for private channels. */
  token?: string;
  /** Start from this position: the first subscribe recovers what came after it. */
  since?: StreamPosition;
  /**
   * What to do when publications' offsets skip (a missed publication): true
   * (default) resubscribes with `since` to fetch what was missed; false
   * delivers anyway (for namespaces that conflate on purpose).
   */
  recoverGaps?: boolean;
}

export interface SubscribedContext {
  channel: string;
  /** The channel's latest offset and epoch, as the server reported them. */
  offset: number;
  epoch: string;
  /** True when this subscribe asked for recovery (`since`), after a reconnect, gap or 112. */
  wasRecovering: boolean;
  /** True when every missed publication is being delivered. False after a recovery attempt means state was lost. */
  recovered: boolean;
}

export interface UnsubscribedContext {
  channel: string;
  /** 0 when the app called `unsubscribe()`, else the server's code (or an error code). */
  code: number;
  reason: string;
}

export interface StateLostContext {
  channel: string;
  /** Why: the position was outside the history window or the epoch changed. */
  reason: string;
  /** The position that could not be recovered. */
  since: StreamPosition;
  /** The new position the stream continues from. */
  offset: number;
  epoch: string;
}

export interface JoinLeaveContext {
  channel: string;
  info: ClientInfo;
}

export interface SubscriptionEvents {
  state: StateContext<SubscriptionState>;
  subscribed: SubscribedContext;
  unsubscribed: UnsubscribedContext;
  publication: Publication;
  join: JoinLeaveContext;
  leave: JoinLeaveContext;
  /** Recovery failed: publications were missed for good. Refetch the state this channel feeds. */
  stateLost: StateLostContext;
  error: ErrorContext;
}

export interface PublishOptions {
  /** Makes retries safe: a repeat within the server's window (5 min) returns the first result. */
  idempotencyKey?: string;
  timeoutMs?: number;
}

export interface PublishResult {
  offset: number;
  epoch: string;
}

export interface HistoryOptions {
  /** How many; default 100 (server default), capped by the server; 0 returns only the position. */
  limit?: number;
  /** Only publications after this position (112 when it cannot be served). */
  since?: StreamPosition;
  /** Newest first (not with `since`). */
  reverse?: boolean;
  timeoutMs?: number;
}

export interface HistoryResult<T = unknown> {
  publications: Publication<T>[];
  offset: number;
  epoch: string;
}

export interface PresenceResult {
  /** The clients present, by client id; absent for channels over the server's size limit. */
  clients?: Record<string, ClientInfo>;
  /** How many are present, for channels over the size limit. */
  count?: number;
}

export interface RpcOptions {
  /**
   * Deadline for the final result. Defaults to the client's `timeoutMs`; when
   * given, it is also sent to the server (`timeout_ms`) so it stops the work.
   */
  timeoutMs?: number;
}

/** One item of `rpcStream`: partial results, then the final one. */
export type RpcChunk<P = unknown, R = unknown> = { final: false; data: P } | { final: true; data: R };
