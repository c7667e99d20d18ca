'use strict';

// Codes and small validation rules of the public protocol (PROTOCOL.md §1, §2, §6).

const Err = Object.freeze({
  INTERNAL: 100,
  UNAUTHORIZED: 101,
  UNKNOWN_CHANNEL: 102,
  PERMISSION_DENIED: 103,
  UNKNOWN_OP: 104,
  ALREADY_SUBSCRIBED: 105,
  LIMIT_EXCEEDED: 106,
  BAD_REQUEST: 107,
  NOT_AVAILABLE: 108,
  TOKEN_EXPIRED: 109,
  TOO_MANY_REQUESTS: 111,
  UNRECOVERABLE_POSITION: 112,
  BUSY: 113,
  TIMEOUT: 114,
});

const Close = Object.freeze({
  NORMAL: 1000,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  PROTOCOL_ERROR: 4000,
  CONNECT_TIMEOUT: 4001,
  UNAUTHORIZED: 4002,
  TOKEN_EXPIRED: 4003,
  SLOW_CONSUMER: 4004,
  CONNECTION_LIMIT: 4006,
  OVERLOADED: 4007,
  STALE: 4009,
});

function isTemporary(code) {
  return code === Err.TOO_MANY_REQUESTS || code === Err.BUSY || code === Err.TIMEOUT;
}

/** The close that follows a failed first `connect` (§6). */
function closeAfterFailedConnect(code) {
  switch (code) {
    case Err.UNAUTHORIZED: return Close.UNAUTHORIZED;
    case Err.TOKEN_EXPIRED: return Close.TOKEN_EXPIRED;
    case Err.LIMIT_EXCEEDED: return Close.CONNECTION_LIMIT;
    case Err.TOO_MANY_REQUESTS: case Err.BUSY: return Close.OVERLOADED;
    case Err.INTERNAL: case Err.TIMEOUT: return Close.INTERNAL_ERROR;
    default: return Close.PROTOCOL_ERROR;
  }
}

/**
 * An error as carried in replies: `{code, message, temporary, retry_after_ms?}`.
 * Deliberately not an `Error`: these are expected outcomes (a bad argument, 111
 * when a client pipelines too much), and capturing a stack trace for each one
 * showed up in profiles.
 */
class ProtoError {
  constructor(code, message, retryAfterMs) {
    this.code = code;
    this.message = message;
    this.retryAfterMs = retryAfterMs;
  }

  toString() {
    return `ProtoError ${this.code}: ${this.message}`;
  }

  body() {
    const body = { code: this.code, message: this.message, temporary: isTemporary(this.code) };
    if (this.retryAfterMs !== undefined) body.retry_after_ms = this.retryAfterMs;
    return body;
  }
}

const bad = (message) => new ProtoError(Err.BAD_REQUEST, message);

const CHANNEL_RE = /^[A-Za-z0-9_\-:@=.]{1,200}$/;

/**
 * Null when `name` is a valid channel name (§2), else why not. A valid name is
 * also a valid run of NATS subject tokens (no whitespace, `*`, `>` or empty token).
 */
function channelProblem(name) {
  if (typeof name !== 'string') return 'channel must be a string';
  if (!CHANNEL_RE.test(name)) {
    return name.length === 0 || name.length > 200
      ? 'channel name must be 1 to 200 characters'
      : 'channel name has a character outside A-Z a-z 0-9 _ - : @ = .';
  }
  if (name.charCodeAt(0) === 46 || name.charCodeAt(name.length - 1) === 46 || name.includes('..')) {
    return 'channel name has an empty dot-separated token';
  }
  const colon = name.indexOf(':');
  if (colon === 0 || colon === name.length - 1) {
    return "channel name has an empty namespace or an empty name after ':'";
  }
  return null;
}

/**
 * A non-negative integer from a decoded value: a number, or a BigInt (MessagePack
 * uint64). Values beyond 2^53 come back as (inexact) numbers, which are still
 * "ahead of the stream" for every comparison that uses them. Undefined when not
 * an integer >= 0.
 */
function toUint(value) {
  if (typeof value === 'number') return Number.isInteger(value) && value >= 0 ? value : undefined;
  if (typeof value === 'bigint') return value >= 0n ? Number(value) : undefined;
  return undefined;
}

module.exports = { Err, Close, ProtoError, bad, isTemporary, closeAfterFailedConnect, channelProblem, toUint };
