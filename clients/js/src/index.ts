/**
 * TypeScript client for the realtime platform (PROTOCOL.md, version 1).
 *
 * ```ts
 * import { Client } from '@realtime/client';
 * const client = new Client('wss://example.com/ws');
 * const room = client.newSubscription('chat:lobby');
 * room.on('publication', (pub) => console.log(pub.offset, pub.data));
 * room.subscribe();
 * client.connect();
 * ```
 */

export { Client, RpcStream, CloseCode, LocalCloseCode, jwtExpiry } from './client.js';
export { Subscription } from './subscription.js';
export { RealtimeError, ErrorCode } from './errors.js';
export type { ErrorCodeValue, WireError } from './errors.js';
export { Emitter } from './emitter.js';
export { backoffDelay, backoffCeiling, retryAfterDelay } from './backoff.js';
export type { BackoffOptions } from './backoff.js';
export { createCodec, JsonCodec, MsgpackCodec, SUBPROTOCOLS, base64Encode, base64Decode } from './codec.js';
export type { Codec, Encoding, WireMessage } from './codec.js';
export type { WebSocketConstructor, WebSocketLike } from './transport.js';
export type * from './types.js';
