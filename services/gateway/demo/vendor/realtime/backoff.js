// Generated from clients/js/src/backoff.ts by `npm run build:demo` (clients/js); do not edit.
/**
 * Reconnect delays.
 *
 * "Full jitter" (the AWS architecture blog's name): the delay is uniform in
 * [0, min(max, min * 2^attempt)]. When a gateway dies, thousands of clients
 * lose their socket in the same millisecond; full jitter spreads their
 * returns over the whole window instead of bunching them at its edge, which
 * is what lets the next gateway survive the reconnect wave.
 */
/** Ceiling of the delay for `attempt` (0-based): min(max, min * 2^attempt). */
export function backoffCeiling(attempt, options) {
    const { minDelayMs, maxDelayMs } = options;
    // 2^attempt overflows to Infinity for large attempts; Math.min handles it.
    return Math.min(maxDelayMs, minDelayMs * 2 ** Math.max(0, attempt));
}
/** A full-jitter delay for `attempt`; `random` is injectable for tests. */
export function backoffDelay(attempt, options, random = Math.random) {
    return Math.floor(random() * backoffCeiling(attempt, options));
}
/**
 * The wait the server asked for (`retry_after_ms` of a 4005 drain or a 4007
 * overload), plus up to half of it again at random: the server already
 * spreads its own hint, this spreads clients that got the same one.
 */
export function retryAfterDelay(retryAfterMs, random = Math.random) {
    return Math.floor(retryAfterMs + random() * retryAfterMs * 0.5);
}
