'use strict';

// Configuration from the environment. Only PORT, HOST, NATS_URL, API_KEY and
// WORKERS are part of the brief; the rest are knobs for tests and experiments,
// with defaults equal to the Rust implementation's.

const os = require('node:os');

function int(name, fallback, min = 0) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min) {
    throw new Error(`${name} must be an integer >= ${min}, got ${JSON.stringify(raw)}`);
  }
  return value;
}

function load() {
  const natsUrl = process.env.NATS_URL;
  if (!natsUrl) throw new Error('NATS_URL is required (e.g. nats://127.0.0.1:4222)');
  return Object.freeze({
    port: int('PORT', 8100),
    host: process.env.HOST || '127.0.0.1',
    natsUrl,
    apiKey: process.env.API_KEY ?? 'dev-api-key',
    workers: int('WORKERS', os.availableParallelism(), 1),
    // Subject prefix of this server's internal NATS traffic; two deployments
    // sharing one NATS need different prefixes.
    natsPrefix: process.env.NATS_PREFIX || 'rtnode',
    pingMs: int('PING_MS', 25_000, 1),
    connectTimeoutMs: int('CONNECT_TIMEOUT_MS', 10_000, 1),
    requestTimeoutMs: int('REQUEST_TIMEOUT_MS', 5_000, 1),
    maxMessageSize: 64 * 1024,
    outboundLimit: int('OUTBOUND_BUFFER_BYTES', 1024 * 1024, 4096),
    maxBatchBytes: 16 * 1024,
    maxPendingWhileSubscribing: 1_000,
    maxInflightPerConnection: 256,
    maxSubscriptionsPerConnection: 512,
    historySize: int('HISTORY_SIZE', 100),
    historyTtlMs: int('HISTORY_TTL_SECS', 300) * 1000,
    historyMaxLimit: 1_000,
    idempotencyWindowMs: 300_000,
    channelIdleMs: 3_600_000,
  });
}

module.exports = { load };
