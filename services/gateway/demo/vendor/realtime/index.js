// Generated from clients/js/src/index.ts by `npm run build:demo` (clients/js); do not edit.
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
export { Emitter } from './emitter.js';
export { backoffDelay, backoffCeiling, retryAfterDelay } from './backoff.js';
export { createCodec, JsonCodec, MsgpackCodec, SUBPROTOCOLS, base64Encode, base64Decode } from './codec.js';
