/**
 * The real cluster for integration tests: a private nats-server (JetStream,
 * temporary store), rt-broadcast, rt-compute, rt-session (when the build has
 * it) and two rt-gateway processes, each on free ports, as scripts/dev starts
 * them. No mocks.
 *
 * Binaries come from `RT_BIN_DIR` (default: the repository's target/release,
 * found relative to this package). When they are missing the tests skip with
 * a message, unless RT_REQUIRE_CLUSTER=1 (then they fail); so do the tests
 * that need rt-session (sessionServiceUnavailable).
 */

import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect as tcpConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** clients/js, found from this file (compiled into .test-build/test/helpers). */
function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json')) || !existsSync(join(dir, 'tsconfig.json'))) {
    const parent = dirname(dir);
    if (parent === dir) throw new Error('cannot find the clients/js package root');
    dir = parent;
  }
  return dir;
}

const PACKAGE_ROOT = packageRoot();
/** The repository root: clients/js/../.. */
export const REPO_ROOT = resolve(PACKAGE_ROOT, '..', '..');
export const BIN_DIR = resolve(PACKAGE_ROOT, process.env['RT_BIN_DIR'] ?? join('..', '..', 'target', 'release'));
const CONFIG = join(REPO_ROOT, 'config', 'dev.toml');
const NATS_BIN = process.env['RT_NATS_SERVER_BIN'] ?? '/usr/sbin/nats-server';
export const API_KEY = 'test-key';

const BINARIES = ['rt-gateway', 'rt-broadcast', 'rt-compute'] as const;

/**
 * Whether this build has the session service (tokens, sessions, presence).
 * Optional: the cluster runs without it where it does not exist yet.
 */
export function hasSessionService(): boolean {
  return existsSync(join(BIN_DIR, 'rt-session'));
}

/** RT_REQUIRE_CLUSTER=1: a missing binary is a failure, not a skip (CI). */
const requireCluster = (): boolean => process.env['RT_REQUIRE_CLUSTER'] === '1';

/**
 * Why tests that need the session service (tokens, sessions) cannot run
 * here, or undefined when they can. With RT_REQUIRE_CLUSTER=1 a missing
 * rt-session throws instead, like clusterUnavailable().
 */
export function sessionServiceUnavailable(): string | undefined {
  if (hasSessionService()) return undefined;
  const reason =
    `token tests skipped: missing ${join(BIN_DIR, 'rt-session')}, so no JWT verification ` +
    '(build with `cargo build --release -p rt-session`, or set RT_BIN_DIR)';
  if (requireCluster()) throw new Error(`RT_REQUIRE_CLUSTER=1 but ${reason}`);
  return reason;
}

/**
 * Why the cluster cannot run here, or undefined when it can. With
 * RT_REQUIRE_CLUSTER=1 a missing piece throws instead (CI wants a failure).
 */
export function clusterUnavailable(): string | undefined {
  const missing = [
    ...BINARIES.map((b) => join(BIN_DIR, b)).filter((p) => !existsSync(p)),
    ...(existsSync(NATS_BIN) ? [] : [NATS_BIN]),
  ];
  if (missing.length === 0) return undefined;
  const reason =
    `integration tests skipped: missing ${missing.join(', ')} ` +
    '(build with `cargo build --release -p rt-gateway -p rt-broadcast -p rt-compute`, or set RT_BIN_DIR)';
  if (requireCluster()) throw new Error(`RT_REQUIRE_CLUSTER=1 but ${reason}`);
  return reason;
}

export function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => resolvePort(port));
    });
  });
}

function portOpen(port: number): Promise<boolean> {
  return new Promise((done) => {
    const socket = tcpConnect(port, '127.0.0.1');
    socket.on('connect', () => {
      socket.destroy();
      done(true);
    });
    socket.on('error', () => done(false));
  });
}

async function waitUntil(check: () => Promise<boolean>, what: string, timeoutMs: number, alive?: () => string | undefined): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const dead = alive?.();
    if (dead !== undefined) throw new Error(`${what}: ${dead}`);
    if (await check().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A child process with its recent output kept for failure reports. */
class Service {
  readonly name: string;
  private readonly child: ChildProcess;
  private output: string[] = [];
  exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private readonly exitPromise: Promise<void>;

  constructor(name: string, bin: string, args: string[], env: Record<string, string>) {
    this.name = name;
    this.child = spawn(bin, args, {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const keep = (chunk: Buffer) => {
      this.output.push(...chunk.toString().split('\n').filter((l) => l !== ''));
      if (this.output.length > 300) this.output = this.output.slice(-200);
    };
    this.child.stdout?.on('data', keep);
    this.child.stderr?.on('data', keep);
    this.exitPromise = new Promise((done) => {
      this.child.on('exit', (code, signal) => {
        this.exited = { code, signal };
        done();
      });
      this.child.on('error', (error) => {
        this.output.push(`spawn error: ${error.message}`);
        this.exited = { code: -1, signal: null };
        done();
      });
    });
  }

  deadReason(): string | undefined {
    return this.exited === undefined
      ? undefined
      : `${this.name} exited (code ${this.exited.code}, signal ${this.exited.signal})\n${this.tail()}`;
  }

  tail(lines = 30): string {
    return this.output.slice(-lines).map((l) => `  [${this.name}] ${l}`).join('\n');
  }

  /** Signals the process and waits for it to exit (SIGKILL after `graceMs`). */
  async stop(signal: NodeJS.Signals = 'SIGTERM', graceMs = 10_000): Promise<void> {
    if (this.exited !== undefined) return;
    this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await this.exitPromise;
    clearTimeout(timer);
  }
}

export interface Cluster {
  /** ws://…/ws of the main gateway (the one tests restart). */
  readonly wsUrl: string;
  /** http://… of the main gateway. */
  readonly httpUrl: string;
  /** http://… of a second gateway that stays up (publishing while the main one is down). */
  readonly publisherHttpUrl: string;
  /** POST /api/publish with the API key; returns `{offset, epoch}`. */
  publish(channel: string, data: unknown, via?: 'main' | 'publisher'): Promise<{ offset: number; epoch: string }>;
  /** Stops the main gateway: SIGKILL (a crash) or SIGTERM (a drain: clients get 4005). */
  stopGateway(signal: 'SIGKILL' | 'SIGTERM'): Promise<void>;
  /** Starts the main gateway again, on the same address, and waits until it is ready. */
  startGateway(): Promise<void>;
  /** Recent logs of every service, for assertion messages. */
  logs(): string;
  stop(): Promise<void>;
}

/** Starts nats-server, rt-broadcast, rt-compute and two gateways. */
export async function startCluster(extraEnv: Record<string, string> = {}): Promise<Cluster> {
  const storeDir = mkdtempSync(join(tmpdir(), 'rt-js-nats-'));
  const [natsPort, gatewayPort, publisherPort, broadcastPort, computePort, sessionPort] = await Promise.all([
    freePort(),
    freePort(),
    freePort(),
    freePort(),
    freePort(),
    freePort(),
  ]);
  const withSession = hasSessionService();
  const services: Service[] = [];
  const nats = new Service('nats', NATS_BIN, ['-a', '127.0.0.1', '-p', String(natsPort), '-js', '-sd', storeDir], {});
  services.push(nats);

  const common: Record<string, string> = {
    RT_NATS_URL: `nats://127.0.0.1:${natsPort}`,
    RT_BROADCAST__HTTP_ADDR: `127.0.0.1:${broadcastPort}`,
    RT_COMPUTE__HTTP_ADDR: `127.0.0.1:${computePort}`,
    RT_API_KEY: API_KEY,
    RT_CONFIG: CONFIG,
    RT_LOG_FORMAT: 'json',
    // Drains announce a short retry_after_ms so restart tests stay quick.
    RT_GATEWAY__DRAIN_RETRY_AFTER_MS: '200',
    RT_GATEWAY__DRAIN_TIMEOUT_MS: '2000',
    // Only a build with the session service knows its settings (unknown keys are errors).
    ...(withSession
      ? {
          RT_SESSION__HTTP_ADDR: `127.0.0.1:${sessionPort}`,
          RT_SESSION__DATABASE_URL: `sqlite://${join(storeDir, 'session.db')}`,
        }
      : {}),
    ...extraEnv,
  };

  const stopAll = async () => {
    // Gateways first, then the services behind them, then NATS.
    for (const service of [...services].reverse()) await service.stop('SIGTERM', 5000);
    rmSync(storeDir, { recursive: true, force: true });
  };

  let gateway: Service | undefined;
  const startGateway = async (): Promise<void> => {
    gateway = new Service('gateway', join(BIN_DIR, 'rt-gateway'), [], {
      ...common,
      RT_HTTP_ADDR: `127.0.0.1:${gatewayPort}`,
    });
    services.push(gateway);
    const g = gateway;
    await waitUntil(
      async () => (await fetch(`http://127.0.0.1:${gatewayPort}/readyz`)).status === 200,
      'the gateway to be ready',
      30_000,
      () => g.deadReason(),
    );
  };

  try {
    await waitUntil(() => portOpen(natsPort), 'nats-server to listen', 10_000, () => nats.deadReason());
    services.push(new Service('broadcast', join(BIN_DIR, 'rt-broadcast'), [], common));
    services.push(new Service('compute', join(BIN_DIR, 'rt-compute'), [], common));
    if (withSession) {
      const session = new Service('session', join(BIN_DIR, 'rt-session'), [], common);
      services.push(session);
      await waitUntil(
        async () => (await fetch(`http://127.0.0.1:${sessionPort}/readyz`)).status === 200,
        'the session service to be ready',
        30_000,
        () => session.deadReason(),
      );
    }
    const publisher = new Service('publisher-gateway', join(BIN_DIR, 'rt-gateway'), [], {
      ...common,
      RT_HTTP_ADDR: `127.0.0.1:${publisherPort}`,
    });
    services.push(publisher);
    await startGateway();
    await waitUntil(
      async () => (await fetch(`http://127.0.0.1:${publisherPort}/readyz`)).status === 200,
      'the publisher gateway to be ready',
      30_000,
      () => publisher.deadReason(),
    );
  } catch (error) {
    const logs = services.map((s) => s.tail()).join('\n');
    await stopAll();
    throw new Error(`${(error as Error).message}\n${logs}`);
  }

  const httpUrl = `http://127.0.0.1:${gatewayPort}`;
  const publisherHttpUrl = `http://127.0.0.1:${publisherPort}`;
  return {
    wsUrl: `ws://127.0.0.1:${gatewayPort}/ws`,
    httpUrl,
    publisherHttpUrl,
    async publish(channel, data, via = 'publisher') {
      const response = await fetch(`${via === 'main' ? httpUrl : publisherHttpUrl}/api/publish`, {
        method: 'POST',
        headers: { authorization: `apikey ${API_KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify({ channel, data }),
      });
      const body = (await response.json()) as { offset: number; epoch: string; error?: unknown };
      if (response.status !== 200) throw new Error(`publish: HTTP ${response.status} ${JSON.stringify(body)}`);
      return body;
    },
    async stopGateway(signal) {
      await gateway?.stop(signal);
    },
    startGateway,
    logs: () => services.map((s) => s.tail(15)).join('\n'),
    stop: stopAll,
  };
}
