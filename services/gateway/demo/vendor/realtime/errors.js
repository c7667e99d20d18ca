// Generated from clients/js/src/errors.ts by `npm run build:demo` (clients/js); do not edit.
/**
 * Errors as the application sees them.
 *
 * Every failure a command can end with is a {@link RealtimeError}: the server's
 * error replies (codes 100–114 of the protocol) and the few failures that only
 * the client can observe (a reply that never came, a connection that dropped
 * before the reply). Local failures reuse the protocol's code when one fits
 * (a timeout is 114, like the server's) and otherwise use codes below 100,
 * which the server never sends. `local` tells them apart when it matters.
 */
/** Error codes of the protocol (reply `error.code`), plus the client's own. */
export const ErrorCode = {
    // Client-side only (never sent by the server).
    /** The connection closed before the reply arrived; the outcome is unknown. */
    CONNECTION_LOST: 1,
    /** The client is disconnected or closed: the command was not sent. */
    CLIENT_CLOSED: 2,
    /** The subscription was unsubscribed while the call waited. */
    UNSUBSCRIBED: 3,
    // Protocol codes.
    INTERNAL: 100,
    UNAUTHORIZED: 101,
    UNKNOWN_CHANNEL: 102,
    PERMISSION_DENIED: 103,
    UNKNOWN_METHOD: 104,
    ALREADY_SUBSCRIBED: 105,
    LIMIT_EXCEEDED: 106,
    BAD_REQUEST: 107,
    NOT_AVAILABLE: 108,
    TOKEN_EXPIRED: 109,
    TOO_MANY_REQUESTS: 111,
    UNRECOVERABLE_POSITION: 112,
    BUSY: 113,
    /** The server's deadline passed, or (with `local: true`) no reply within `timeoutMs`. */
    TIMEOUT: 114,
};
/** Codes the protocol marks temporary: retrying later may succeed. */
const TEMPORARY_CODES = new Set([
    ErrorCode.CONNECTION_LOST,
    ErrorCode.TOO_MANY_REQUESTS,
    ErrorCode.BUSY,
    ErrorCode.TIMEOUT,
]);
export class RealtimeError extends Error {
    name = 'RealtimeError';
    /** Protocol error code (100–114), or a client-side code below 100. */
    code;
    /** Retrying later may succeed (111, 113, 114, a lost connection). */
    temporary;
    /** How long the server asked to wait before retrying, when it said. */
    retryAfterMs;
    /** True when the client produced this error itself (timeout, lost connection). */
    local;
    constructor(code, message, options = {}) {
        super(message);
        this.code = code;
        this.temporary = options.temporary ?? TEMPORARY_CODES.has(code);
        this.retryAfterMs = options.retryAfterMs;
        this.local = options.local ?? false;
    }
    /** Builds the error from a reply's `error` map. */
    static fromWire(error) {
        const retryAfterMs = typeof error.retry_after_ms === 'number' ? error.retry_after_ms : undefined;
        return new RealtimeError(Number(error.code), String(error.message ?? ''), {
            temporary: typeof error.temporary === 'boolean' ? error.temporary : undefined,
            retryAfterMs,
        });
    }
    /** A command got no reply within its timeout (code 114, `local: true`). */
    static timeout(what, ms) {
        return new RealtimeError(ErrorCode.TIMEOUT, `${what}: no reply within ${ms} ms`, {
            temporary: true,
            local: true,
        });
    }
    static connectionLost() {
        return new RealtimeError(ErrorCode.CONNECTION_LOST, 'connection closed before the reply', {
            temporary: true,
            local: true,
        });
    }
    static clientClosed(state) {
        return new RealtimeError(ErrorCode.CLIENT_CLOSED, `client is ${state}`, {
            temporary: false,
            local: true,
        });
    }
}
