'use strict';

// Test harness: a nats-server on a free port, the server (cluster of workers)
// on another, and a small protocol client over the `ws` package.

const { spawn } = require('node:child_process');
const net = require('node:net');
const path = require('node:path');
const WebSocket = require('ws');
const { Packr, Unpackr } = require('msgpackr');

const packr = new Packr({ useRecords: false, variableMapSize: true });
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: 'bigint' });

const NATS_BIN = process.env.RT_NATS_SERVER_BIN || '/usr/sbin/nats-server';
const ENTRY = path.join(__dirname, '..', 'src', 'index.js');

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function waitFor(check, what, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (await check()) return;
    } catch {
      // not yet
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function portOpen(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.on('connect', () => { s.destroy(); resolve(true); });
    s.on('error', () => resolve(false));
  });
}

/** Starts nats-server and the server with `workers` workers; returns their addresses and a stop(). */
async function startStack({ workers = 2, env = {} } = {}) {
  const natsPort = await freePort();
  const nats = spawn(NATS_BIN, ['-a', '127.0.0.1', '-p', String(natsPort)], { stdio: 'ignore' });
  await waitFor(() => portOpen(natsPort), 'nats-server');
  const port = await freePort();
  let log = '';
  const server = spawn(process.execPath, [ENTRY], {
    env: {
      ...process.env,
      NATS_URL: `nats://127.0.0.1:${natsPort}`,
      PORT: String(port),
      HOST: '127.0.0.1',
      WORKERS: String(workers),
      API_KEY: 'test-key',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  server.stdout.on('data', (d) => { log += d; });
  server.stderr.on('data', (d) => { log += d; });
  const exited = new Promise((resolve) => server.on('exit', resolve));
  await waitFor(() => log.includes('listening on'), `the server (log: ${log})`);
  return {
    port,
    natsPort,
    url: `ws://127.0.0.1:${port}/ws`,
    http: `http://127.0.0.1:${port}`,
    apiKey: 'test-key',
    log: () => log,
    async stop() {
      server.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
      server.kill('SIGKILL');
      nats.kill('SIGKILL');
    },
  };
}

/** A protocol client: replies matched by id, pushes queued, frames split into messages. */
class Client {
  static open(url, protocols, options) {
    const client = new Client(url, protocols, options);
    return client.opened.then(() => client);
  }

  constructor(url, protocols = ['rt.v1.json'], options = {}) {
    this.ws = new WebSocket(url, protocols, { perMessageDeflate: false, maxPayload: 0, ...options });
    this.nextId = 1;
    this.waiting = new Map();
    this.pushes = [];
    this.pushWaiters = [];
    this.closeInfo = null;
    this.opened = new Promise((resolve, reject) => {
      this.ws.once('open', resolve);
      this.ws.once('error', reject);
    });
    this.closed = new Promise((resolve) => {
      this.ws.on('close', (code, reason) => {
        this.closeInfo = { code, reason: reason.toString() };
        for (const w of this.waiting.values()) w.reject(new Error(`closed with ${code}`));
        this.waiting.clear();
        resolve(this.closeInfo);
      });
    });
    this.ws.on('error', () => {});
    this.ws.on('message', (data, isBinary) => {
      for (const m of this.decode(data, isBinary)) this.onMessage(m);
    });
  }

  get json() {
    return this.ws.protocol !== 'rt.v1.msgpack';
  }

  decode(data, isBinary) {
    if (this.json) {
      if (isBinary) throw new Error('binary frame on a JSON connection');
      return data.toString().split('\n').filter((l) => l.trim() !== '').map((l) => JSON.parse(l));
    }
    if (!isBinary) throw new Error('text frame on a MessagePack connection');
    return unpackr.unpackMultiple(data);
  }

  encode(message) {
    return this.json ? JSON.stringify(message) : packr.pack(message);
  }

  onMessage(m) {
    if (m.push !== undefined) {
      const w = this.pushWaiters.shift();
      if (w) w(m);
      else this.pushes.push(m);
      return;
    }
    const w = this.waiting.get(Number(m.id));
    if (w) {
      this.waiting.delete(Number(m.id));
      w.resolve(m);
    }
  }

  sendRaw(data) {
    this.ws.send(data);
  }

  /** Sends a command and resolves with the whole reply ({id, ok} or {id, error}). */
  send(op, args = {}) {
    const id = this.nextId++;
    const reply = new Promise((resolve, reject) => this.waiting.set(id, { resolve, reject }));
    this.ws.send(this.encode({ id, op, ...args }));
    return reply;
  }

  /** Sends a command and resolves with its `ok`, rejecting on an error reply. */
  async call(op, args) {
    const reply = await this.send(op, args);
    if (reply.error) {
      const e = new Error(`${op}: ${reply.error.code} ${reply.error.message}`);
      e.code = reply.error.code;
      throw e;
    }
    return reply.ok;
  }

  nextPush(timeoutMs = 5000) {
    if (this.pushes.length) return Promise.resolve(this.pushes.shift());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const i = this.pushWaiters.indexOf(done);
        if (i >= 0) this.pushWaiters.splice(i, 1);
        reject(new Error('no push in time'));
      }, timeoutMs);
      const done = (m) => { clearTimeout(timer); resolve(m); };
      this.pushWaiters.push(done);
    });
  }

  /** Collects `n` pushes. */
  async takePushes(n, timeoutMs = 10_000) {
    const out = [];
    const deadline = Date.now() + timeoutMs;
    while (out.length < n) out.push(await this.nextPush(Math.max(1, deadline - Date.now())));
    return out;
  }

  close() {
    this.ws.close();
    return this.closed;
  }
}

async function connected(url, protocols) {
  const client = await Client.open(url, protocols);
  client.info = await client.call('connect');
  return client;
}

/** Opens connected clients until one lands on a worker other than `node`'s. */
async function connectedOnOtherWorker(url, protocols, node) {
  const spare = [];
  try {
    for (let i = 0; i < 20; i++) {
      const c = await connected(url, protocols);
      if (c.info.node !== node) return c;
      spare.push(c);
    }
    throw new Error('could not reach a second worker');
  } finally {
    for (const c of spare) c.ws.terminate();
  }
}

async function httpPublish(stack, body, key = stack.apiKey) {
  const headers = { 'content-type': 'application/json' };
  if (key !== null) headers.authorization = `apikey ${key}`;
  const res = await fetch(`${stack.http}/api/publish`, { method: 'POST', headers, body: JSON.stringify(body) });
  return { status: res.status, body: await res.json() };
}

module.exports = { startStack, Client, connected, connectedOnOtherWorker, httpPublish, packr, unpackr, waitFor };
