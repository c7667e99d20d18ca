'use strict';

// Entry point. The primary process runs the sequencer (see sequencer.js) and
// forks one worker per core; the workers share the listening port (cluster's
// round-robin accept) and talk to the sequencer and to each other over NATS.

const cluster = require('node:cluster');
const { connect } = require('nats');
const { load } = require('./config');

function log(...args) {
  const role = cluster.isPrimary ? 'primary' : `worker ${cluster.worker.id}`;
  console.error(new Date().toISOString(), `[${role} ${process.pid}]`, ...args);
}

async function primary(config) {
  const { Sequencer } = require('./sequencer');
  const nc = await connect({ servers: config.natsUrl, name: `rt-node-sequencer-${process.pid}`, maxReconnectAttempts: -1, noAsyncTraces: true });
  const sequencer = new Sequencer(nc, config, log);
  await sequencer.start();

  let stopping = false;
  const fork = () => cluster.fork();
  cluster.on('exit', (worker, code, signal) => {
    if (stopping) return;
    log(`worker ${worker.id} exited (${signal || code}); starting another`);
    setTimeout(fork, 500);
  });
  let online = 0;
  cluster.on('listening', () => {
    if (++online === config.workers) {
      log(`listening on http://${config.host}:${config.port} (ws /ws), ${config.workers} workers, NATS ${config.natsUrl}`);
    }
  });
  for (let i = 0; i < config.workers; i++) fork();

  const shutdown = async () => {
    if (stopping) return;
    stopping = true;
    for (const worker of Object.values(cluster.workers)) worker.process.kill('SIGTERM');
    await Promise.race([
      new Promise((resolve) => {
        const check = () => (Object.keys(cluster.workers).length === 0 ? resolve() : setTimeout(check, 20));
        check();
      }),
      new Promise((resolve) => setTimeout(resolve, 3000)),
    ]);
    sequencer.stop();
    await nc.drain().catch(() => {});
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

async function worker(config) {
  const { startWorker } = require('./worker');
  const { stop } = await startWorker(config, log);
  let stopping = false;
  const shutdown = async () => {
    if (stopping) return;
    stopping = true;
    await stop();
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', () => {}); // the primary decides
  process.on('disconnect', shutdown); // the primary is gone
}

let config;
try {
  config = load();
} catch (e) {
  console.error(e.message);
  process.exit(2);
}
(cluster.isPrimary ? primary(config) : worker(config)).catch((e) => {
  log('fatal:', e && e.stack ? e.stack : e);
  process.exit(1);
});
