/**
 * Browser tests of the demo app the gateway serves at `/`, in headless
 * Chromium (Debian's `chromium`, driven by playwright-core; no browser is
 * downloaded) against a real cluster: the one the SDK's integration tests
 * start (clients/js/test/helpers/cluster.ts: nats-server, broadcast, compute,
 * session and two gateways, with config/dev.toml).
 *
 * - two pages chat with each other: presence, join/leave notices, messages
 *   both ways, and history for a page that comes later;
 * - the ops dashboard, with an operator token, draws non-empty charts (and
 *   says why when the token does not open `sys:stats`);
 * - a page survives a gateway restart and shows what was published while the
 *   gateway was down.
 *
 * Screenshots go to target/browser-artifacts/ (RT_ARTIFACTS_DIR), also of
 * every page open when a test fails. Without the binaries or the browser the
 * tests are skipped with a message, unless RT_REQUIRE_CLUSTER=1 /
 * RT_REQUIRE_BROWSER=1 (CI), which make them fail.
 */

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import {
  REPO_ROOT,
  clusterUnavailable,
  hasSessionService,
  startCluster,
} from '../../clients/js/.test-build/test/helpers/cluster.js';

const CHROMIUM = process.env.RT_CHROMIUM ?? '/usr/bin/chromium';
const ARTIFACTS = process.env.RT_ARTIFACTS_DIR ?? join(REPO_ROOT, 'target', 'browser-artifacts');
const STEP_MS = 20_000;

function browserUnavailable() {
  if (existsSync(CHROMIUM)) return undefined;
  const reason = `browser tests skipped: ${CHROMIUM} is missing (scripts/install-browser-deps installs it, or set RT_CHROMIUM)`;
  if (process.env.RT_REQUIRE_BROWSER === '1') throw new Error(`RT_REQUIRE_BROWSER=1 but ${reason}`);
  return reason;
}

const skip = clusterUnavailable() ?? browserUnavailable();
if (skip !== undefined) console.log(`# ${skip}`);

/** An HS256 JWT signed with the dev config's secret (config/dev.toml), as scripts/dev makes one. */
function devToken(claims) {
  const config = readFileSync(join(REPO_ROOT, 'config', 'dev.toml'), 'utf8');
  const secret = /^\s*jwt_hmac_secret\s*=\s*"([^"]+)"/m.exec(config)?.[1];
  assert.ok(secret, 'config/dev.toml has session.jwt_hmac_secret');
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

let cluster;
let browser;
/** Pages of the running test, for screenshots when it fails. */
let openPages = [];

before(async () => {
  if (skip !== undefined) return;
  mkdirSync(ARTIFACTS, { recursive: true });
  cluster = await startCluster();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
});

after(async () => {
  await browser?.close();
  await cluster?.stop();
});

async function screenshot(page, name) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/** A fresh browser context (its own storage) with one page on the demo. */
async function openDemo(label, hash = '') {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  page.problems = [];
  page.on('pageerror', (error) => page.problems.push(`uncaught: ${error.message}`));
  page.on('console', (message) => {
    // A refused script or socket is a CSP violation the app would not survive.
    if (message.type() === 'error' && /Content Security Policy|Failed to load module/i.test(message.text())) {
      page.problems.push(message.text());
    }
  });
  page.label = label;
  openPages.push(page);
  const response = await page.goto(`${cluster.httpUrl}/${hash}`);
  assert.equal(response?.status(), 200);
  return page;
}

/** Runs a browser test: skipped when nothing to run it with; screenshots and logs on failure. */
function browserTest(name, body, { needsSession = false } = {}) {
  const reason = skip ?? (needsSession && !hasSessionService() ? 'needs rt-session' : undefined);
  test(name, { skip: reason, timeout: 120_000 }, async () => {
    openPages = [];
    try {
      await body();
      for (const page of openPages) assert.deepEqual(page.problems, [], `${page.label}: errors in the page`);
    } catch (error) {
      const slug = name.replace(/\W+/g, '-').slice(0, 60);
      for (const page of openPages) {
        await screenshot(page, `FAILED-${slug}-${page.label}`).catch(() => {});
      }
      const problems = JSON.stringify(openPages.map((p) => p.problems));
      throw new Error(`${error.message}\n--- page problems: ${problems}\n--- cluster logs:\n${cluster.logs()}`, {
        cause: error,
      });
    } finally {
      for (const page of openPages) await page.context().close().catch(() => {});
    }
  });
}

async function joinRoom(page, name, room) {
  await page.fill('#join-name', name);
  await page.fill('#join-room', room);
  await page.click('#join-form button[type=submit]');
  await page.waitForSelector('#chat-state.connected', { timeout: STEP_MS });
}

function presenceIs(page, names) {
  return page.waitForFunction(
    (expected) =>
      [...document.querySelectorAll('#presence li')].map((li) => li.textContent).sort().join(',') === expected,
    [...names].sort().join(','),
    { timeout: STEP_MS },
  );
}

function messageShown(page, text) {
  return page.waitForFunction(
    (expected) => [...document.querySelectorAll('#messages li')].some((li) => li.textContent.includes(expected)),
    text,
    { timeout: STEP_MS },
  );
}

async function sendMessage(page, text) {
  await page.fill('#send-text', text);
  await page.press('#send-text', 'Enter');
}

/** The texts of the chat messages (not notices) a page shows, in order. */
function messageTexts(page) {
  return page.$$eval('#messages li.msg .text', (items) => items.map((item) => item.textContent));
}

browserTest('two pages chat with each other through the cluster', async () => {
  const room = `browser-${Date.now().toString(36)}`;
  const alice = await openDemo('alice');
  await joinRoom(alice, 'Alice', room);
  await presenceIs(alice, ['Alice']);

  const bob = await openDemo('bob');
  await joinRoom(bob, 'Bob', room);
  // Both see both: presence on load for Bob, the join push (and Bob's hello) for Alice.
  await presenceIs(bob, ['Alice', 'Bob']);
  await presenceIs(alice, ['Alice', 'Bob']);
  await messageShown(alice, 'Bob joined');

  await sendMessage(alice, 'hello from Alice');
  await messageShown(bob, 'hello from Alice');
  await sendMessage(bob, 'hi Alice, Bob here');
  await messageShown(alice, 'hi Alice, Bob here');
  assert.deepEqual(await messageTexts(alice), ['hello from Alice', 'hi Alice, Bob here']);
  assert.deepEqual(await messageTexts(bob), ['hello from Alice', 'hi Alice, Bob here']);
  await screenshot(alice, 'chat-alice');
  await screenshot(bob, 'chat-bob');

  // A page that comes later gets the history on load.
  const carol = await openDemo('carol');
  await joinRoom(carol, 'Carol', room);
  await messageShown(carol, 'hi Alice, Bob here');
  assert.deepEqual(await messageTexts(carol), ['hello from Alice', 'hi Alice, Bob here']);
  await presenceIs(carol, ['Alice', 'Bob', 'Carol']);

  // Bob leaves: the others get the leave push.
  await bob.click('#leave');
  await messageShown(alice, 'Bob left');
  await presenceIs(alice, ['Alice', 'Carol']);
  await presenceIs(carol, ['Alice', 'Carol']);
  await screenshot(alice, 'chat-after-leave');
});

browserTest(
  'the ops dashboard draws live charts of every service for an operator token',
  async () => {
    const page = await openDemo('dashboard', '#dashboard');

    // A valid token that does not open sys:stats: told why, no figures.
    await page.fill('#token', devToken({ sub: 'someone', exp: Math.floor(Date.now() / 1000) + 600 }));
    await page.click('#token-form button[type=submit]');
    await page.waitForFunction(() => /permission denied/.test(document.getElementById('dash-error').textContent), null, {
      timeout: STEP_MS,
    });
    await screenshot(page, 'dashboard-without-permission');

    const token = devToken({ sub: 'operator', exp: Math.floor(Date.now() / 1000) + 600, channels: ['sys:stats'] });
    await page.fill('#token', token);
    await page.click('#token-form button[type=submit]');
    await page.waitForSelector('#dash-state.connected', { timeout: STEP_MS });
    assert.equal(await page.isHidden('#dash-error'), true);

    // Every chart gets several points (history on load, then one a second)
    // and the lines are really drawn: coloured pixels on every canvas (the
    // grid and labels are grey). A flat line grows some 3 pixels a second on
    // a ninety-second axis, so a chart whose series started late needs a few
    // seconds before it passes; waiting for it keeps the check meaningful
    // without depending on when each service's first figures arrived.
    const measure = (check) => {
      const charts = [...document.querySelectorAll('.chart canvas')].map((canvas) => {
        const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
        let coloured = 0;
        for (let i = 0; i < data.length; i += 4) {
          const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
          if (a > 128 && Math.max(r, g, b) - Math.min(r, g, b) > 80) coloured++;
        }
        return { id: canvas.id, points: Number(canvas.dataset.points), coloured };
      });
      const enough = charts.length === 6 && charts.every((c) => c.points >= 3 && c.coloured >= 40);
      return check ? enough : charts;
    };
    await page.waitForFunction(measure, true, { timeout: 30_000 }).catch(() => {});
    const drawn = await page.evaluate(measure, false);
    const enough = drawn.length === 6 && drawn.every((c) => c.points >= 3 && c.coloured >= 40);
    assert.ok(enough, `a chart has no line: ${JSON.stringify(drawn)}`);

    // Each gateway, broadcast, compute and session report in.
    const instances = await page.$$eval('#instances tbody tr', (rows) =>
      rows.map((row) => row.cells[0].textContent),
    );
    assert.deepEqual([...new Set(instances)].sort(), ['broadcast', 'compute', 'gateway', 'session']);
    assert.equal(instances.filter((s) => s === 'gateway').length, 2, JSON.stringify(instances));
    const legend = await page.textContent('#charts');
    assert.match(legend, /p99/);
    await screenshot(page, 'dashboard');
  },
  { needsSession: true },
);

// Last: it restarts the cluster's main gateway.
browserTest('a page survives a gateway restart and shows what it missed', async () => {
  const room = `restart-${Date.now().toString(36)}`;
  const channel = `chat:${room}`;
  const page = await openDemo('restart');
  await joinRoom(page, 'Dora', room);
  await presenceIs(page, ['Dora']);
  await sendMessage(page, 'before the restart');
  await messageShown(page, 'before the restart');

  // The gateway the page talks to crashes; a backend keeps publishing
  // through the other one.
  await cluster.stopGateway('SIGKILL');
  await page.waitForFunction(() => document.getElementById('chat-state').textContent !== 'connected', null, {
    timeout: STEP_MS,
  });
  for (let i = 1; i <= 3; i++) {
    await cluster.publish(channel, { kind: 'msg', name: 'backend', text: `missed ${i}` });
  }
  await screenshot(page, 'restart-while-down');

  await cluster.startGateway();
  await page.waitForSelector('#chat-state.connected', { timeout: 30_000 });
  await messageShown(page, 'missed 3');
  // Its earlier connection lingers in presence until the dead gateway is
  // reaped; the page knows it for its own and does not list it.
  await presenceIs(page, ['Dora']);
  // Live again, and the page still publishes.
  await cluster.publish(channel, { kind: 'msg', name: 'backend', text: 'after the restart' }, 'main');
  await messageShown(page, 'after the restart');
  await sendMessage(page, 'Dora is back');
  await messageShown(page, 'Dora is back');
  assert.deepEqual(await messageTexts(page), [
    'before the restart',
    'missed 1',
    'missed 2',
    'missed 3',
    'after the restart',
    'Dora is back',
  ]);
  await screenshot(page, 'restart-recovered');
});
