// The demo app: a chat room and a live ops dashboard, both plain subscribers
// of the cluster through the TypeScript SDK (clients/js, served from
// /demo/vendor/realtime/). No framework, no build step.

import { Client, ErrorCode } from './vendor/realtime/index.js';
import { LineChart } from './charts.js';

const $ = (id) => document.getElementById(id);
const WS_URL = `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws`;

function setState(element, state) {
  element.textContent = state;
  element.className = `state ${state}`;
}

function clockTime(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
}

// ---------------------------------------------------------------------------
// Chat: `chat:<room>`, anonymous. Messages are {kind: 'msg', name, text};
// on each connection a page publishes {kind: 'hello', name} so the others can
// put a name on its client id (anonymous clients have no user or token info).
// ---------------------------------------------------------------------------

const chat = {
  client: undefined,
  sub: undefined,
  name: '',
  room: '',
  selfId: '',
  /** this page's earlier client ids (their presence lingers after a gateway crash until it is reaped) */
  pastIds: new Set(),
  /** a lost connection was announced and has not come back yet */
  lost: false,
  /** client id → display name, learned from hello messages */
  names: new Map(),
  /** client id → presence info */
  present: new Map(),
  /** joins and leaves heard while presence queries are in flight, one list per query */
  presenceQueries: new Set(),
  /** offsets already shown (dedupes history against live publications) */
  shown: new Set(),
  historyLoaded: false,
  /** live publications that arrived while the history was loading */
  pending: [],
  announcedFor: '',
};

function nameOf(clientId) {
  if (clientId === chat.selfId) return chat.name;
  return chat.names.get(clientId) ?? `guest-${clientId.slice(0, 4)}`;
}

function scrollMessages(stick) {
  const list = $('messages');
  if (stick) list.scrollTop = list.scrollHeight;
}

function appendItem(className, ts, ...content) {
  const list = $('messages');
  const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 20;
  const item = document.createElement('li');
  item.className = className;
  if (ts !== undefined) {
    const time = document.createElement('span');
    time.className = 'time';
    time.textContent = clockTime(ts);
    item.append(time);
  }
  item.append(...content);
  list.append(item);
  scrollMessages(stick);
  return item;
}

function notice(text, ts = Date.now()) {
  return appendItem('notice', ts, text);
}

/** A join or leave: applied now, and remembered by the presence queries in flight. */
function presenceChange(kind, info) {
  if (kind === 'join') chat.present.set(info.client, info);
  else chat.present.delete(info.client);
  for (const changes of chat.presenceQueries) changes.push([kind, info]);
}

function renderPublication(pub, live) {
  if (chat.shown.has(pub.offset)) return;
  chat.shown.add(pub.offset);
  const data = typeof pub.data === 'object' && pub.data !== null ? pub.data : { text: String(pub.data) };
  const name = typeof data.name === 'string' && data.name !== '' ? data.name : pub.info?.user || 'someone';
  if (data.kind === 'hello') {
    if (pub.info?.client) {
      chat.names.set(pub.info.client, name);
      // A live hello: its sender is here now (presence may not list it yet).
      if (live) presenceChange('join', { user: pub.info.user, client: pub.info.client });
    }
    renderPresence();
    if (!data.again) notice(`${name} joined`, pub.ts).dataset.offset = String(pub.offset);
    return;
  }
  const who = document.createElement('span');
  who.className = 'name';
  who.textContent = name;
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = typeof data.text === 'string' ? data.text : JSON.stringify(data);
  appendItem('msg', pub.ts, who, text).dataset.offset = String(pub.offset);
}

function renderPresence() {
  const ids = [...chat.present.keys()].filter((id) => !chat.pastIds.has(id));
  const items = ids
    .map((id) => ({ id, name: nameOf(id) }))
    .sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id))
    .map(({ id, name }) => {
      const item = document.createElement('li');
      item.textContent = name;
      item.dataset.client = id;
      if (id === chat.selfId) item.classList.add('self');
      return item;
    });
  $('presence').replaceChildren(...items);
  $('presence-count').textContent = String(ids.length);
}

/**
 * Asks who is here. The answer is a snapshot that can be a little older than
 * the join and leave pushes (presence is eventually consistent), so the
 * pushes heard meanwhile are applied on top of it.
 */
async function refreshPresence() {
  const sub = chat.sub;
  if (sub === undefined) return;
  const changes = [];
  chat.presenceQueries.add(changes);
  try {
    const result = await sub.presence();
    if (sub !== chat.sub) return;
    if (result.clients !== undefined) {
      const present = new Map(Object.entries(result.clients));
      for (const [kind, info] of changes) {
        if (kind === 'join') present.set(info.client, info);
        else present.delete(info.client);
      }
      chat.present = present;
    }
  } catch (error) {
    notice(`presence unavailable: ${error.message}`);
  } finally {
    chat.presenceQueries.delete(changes);
  }
  // This page is here: it is subscribed.
  if (chat.selfId !== '' && !chat.present.has(chat.selfId)) {
    chat.present.set(chat.selfId, { user: '', client: chat.selfId });
  }
  renderPresence();
}

/** Shows the newest messages, then what arrived meanwhile. */
async function loadHistory(reason) {
  chat.historyLoaded = false;
  if (reason !== undefined) {
    $('messages').replaceChildren();
    chat.shown.clear();
    notice(reason);
  }
  try {
    const result = await chat.sub.history({ limit: 100 });
    for (const pub of result.publications) renderPublication(pub, false);
    if (result.publications.length > 0) appendItem('divider', undefined, 'history above, live below');
  } catch (error) {
    notice(`history unavailable: ${error.message}`);
  }
  chat.historyLoaded = true;
  for (const pub of chat.pending.splice(0)) renderPublication(pub, true);
}

async function onSubscribed() {
  if (!chat.historyLoaded && chat.announcedFor === '') await loadHistory();
  // After a reconnect joins and leaves may have been missed: ask again, and
  // once more a little later, when the cluster's view has settled.
  await refreshPresence();
  const sub = chat.sub;
  setTimeout(() => {
    if (chat.sub === sub) refreshPresence();
  }, 1500);
  // Each connection has a new client id: tell the room whose it is.
  if (chat.announcedFor !== chat.selfId) {
    const again = chat.announcedFor !== '';
    chat.announcedFor = chat.selfId;
    chat.sub.publish({ kind: 'hello', name: chat.name, again }).catch(() => {});
  }
}

function joinRoom(name, room) {
  leaveRoom();
  Object.assign(chat, {
    name,
    room,
    selfId: '',
    pastIds: new Set(),
    lost: false,
    names: new Map(),
    present: new Map(),
    presenceQueries: new Set(),
    shown: new Set(),
    historyLoaded: false,
    pending: [],
    announcedFor: '',
  });
  $('messages').replaceChildren();
  $('room-name').textContent = room;
  $('room-self').textContent = name;
  $('join-form').hidden = true;
  $('room').hidden = false;
  renderPresence();

  const client = new Client(WS_URL, { name: 'demo-chat', maxReconnectDelayMs: 3000 });
  chat.client = client;
  client.on('state', ({ newState }) => setState($('chat-state'), newState));
  client.on('connected', (ctx) => {
    if (chat.selfId !== '' && chat.selfId !== ctx.client) chat.pastIds.add(chat.selfId);
    chat.selfId = ctx.client;
    chat.lost = false;
  });
  client.on('disconnected', ({ code, reason, willReconnect }) => {
    if (code === 1000 && !willReconnect) return; // we left
    if (!willReconnect) notice(`disconnected: ${reason} (${code})`);
    else if (!chat.lost) notice(`connection lost (${code}), reconnecting…`);
    chat.lost = true;
  });
  const sub = client.newSubscription(`chat:${room}`);
  chat.sub = sub;
  sub.on('subscribed', (ctx) => {
    if (ctx.wasRecovering && ctx.recovered) notice('reconnected: missed messages recovered');
    onSubscribed();
  });
  sub.on('publication', (pub) => {
    if (chat.historyLoaded) renderPublication(pub, true);
    else chat.pending.push(pub);
  });
  sub.on('join', ({ info }) => {
    presenceChange('join', info);
    renderPresence();
  });
  sub.on('leave', ({ info }) => {
    const name = nameOf(info.client);
    presenceChange('leave', info);
    // The same person back on a new connection has not left.
    const stillHere = [...chat.present.keys()].some((id) => nameOf(id) === name);
    if (info.client !== chat.selfId && !stillHere) notice(`${name} left`);
    renderPresence();
  });
  sub.on('stateLost', () => loadHistory('some messages could not be recovered: history reloaded'));
  sub.on('unsubscribed', ({ code, reason }) => {
    if (code !== 0) notice(`unsubscribed: ${reason} (${code})`);
  });
  sub.subscribe();
  client.connect();
}

function leaveRoom() {
  chat.client?.disconnect();
  chat.client = undefined;
  chat.sub = undefined;
  setState($('chat-state'), 'disconnected');
}

$('join-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const name = $('join-name').value.trim();
  const room = $('join-room').value.trim();
  if (name === '' || room === '') return;
  sessionStorage.setItem('demo.name', name);
  joinRoom(name, room);
  $('send-text').focus();
});

$('leave').addEventListener('click', () => {
  leaveRoom();
  $('room').hidden = true;
  $('join-form').hidden = false;
});

$('send-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const input = $('send-text');
  const text = input.value.trim();
  if (text === '' || chat.sub === undefined) return;
  input.value = '';
  try {
    await chat.sub.publish({ kind: 'msg', name: chat.name, text });
  } catch (error) {
    notice(`not sent (${error.code ?? '?'}): ${error.message}`);
    input.value = text;
  }
});

$('join-name').value = sessionStorage.getItem('demo.name') ?? '';

// ---------------------------------------------------------------------------
// Ops dashboard: a subscriber of `sys:stats`, where every service publishes
// its key figures once a second ({service, node, interval_ms, figures}).
// ---------------------------------------------------------------------------

const STATS_CHANNEL = 'sys:stats';

/** [figure, label suffix, dashed] per line; `service: null` takes every service. */
const CHARTS = [
  { id: 'connections', title: 'Connections', service: 'gateway', lines: [['connections', '']] },
  {
    id: 'deliveries',
    title: 'Deliveries / s (frames written to sockets)',
    service: 'gateway',
    lines: [['messages_out_per_sec', '']],
  },
  {
    id: 'latency',
    title: 'Publish → deliver, ms (p50 solid, p99 dashed)',
    service: 'gateway',
    lines: [
      ['publish_to_deliver_p50_ms', ' p50', false],
      ['publish_to_deliver_p99_ms', ' p99', true],
    ],
  },
  { id: 'lag', title: 'Runtime lag p99, ms', service: null, lines: [['runtime_lag_p99_ms', '']] },
  { id: 'queue', title: 'Compute queue depth', service: 'compute', lines: [['queue_depth', '']] },
  {
    id: 'publications',
    title: 'Publications / s (broadcast)',
    service: 'broadcast',
    lines: [['publications_per_sec', '']],
  },
];

const dashboard = {
  client: undefined,
  sub: undefined,
  /** chart id → LineChart */
  charts: new Map(),
  /** "service/node" → latest {service, node, ts, figures} */
  instances: new Map(),
  seen: new Set(),
  historyLoaded: false,
  pending: [],
  /** server clock − browser clock, from live publications */
  skew: 0,
  timer: undefined,
  drawQueued: false,
};

function showDashboardError(text) {
  const element = $('dash-error');
  element.textContent = text;
  element.hidden = text === '';
}

function ensureCharts() {
  if (dashboard.charts.size > 0) return;
  for (const chart of CHARTS) {
    dashboard.charts.set(chart.id, new LineChart($('charts'), { title: chart.title }));
  }
  for (const [id, chart] of dashboard.charts) chart.canvas.id = `chart-${id}`;
}

function ingestStats(pub, live) {
  if (dashboard.seen.has(pub.offset)) return;
  if (dashboard.seen.size > 5000) dashboard.seen.clear();
  dashboard.seen.add(pub.offset);
  const stats = pub.data;
  if (typeof stats !== 'object' || stats === null || typeof stats.figures !== 'object') return;
  if (live) dashboard.skew = pub.ts - Date.now();
  for (const chart of CHARTS) {
    if (chart.service !== null && chart.service !== stats.service) continue;
    for (const [figure, suffix, dashed] of chart.lines) {
      if (!(figure in stats.figures)) continue;
      const label = chart.service === null ? `${stats.service} ${stats.node}` : `${stats.node}${suffix}`;
      dashboard.charts
        .get(chart.id)
        .add(`${stats.service}/${stats.node}/${figure}`, label, pub.ts, stats.figures[figure], { dashed });
    }
  }
  const key = `${stats.service}/${stats.node}`;
  const known = dashboard.instances.get(key);
  if (known === undefined || known.ts <= pub.ts) {
    dashboard.instances.set(key, { service: stats.service, node: stats.node, ts: pub.ts, figures: stats.figures });
  }
  queueDraw();
}

function queueDraw() {
  if (dashboard.drawQueued) return;
  dashboard.drawQueued = true;
  requestAnimationFrame(() => {
    dashboard.drawQueued = false;
    drawDashboard();
  });
}

function formatFigure(value) {
  if (value === null || value === undefined) return '–';
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
}

function drawDashboard() {
  if ($('dashboard').hidden) return;
  const now = Date.now() + dashboard.skew;
  for (const chart of dashboard.charts.values()) chart.draw(now);
  const rows = [...dashboard.instances.values()]
    .sort((a, b) => a.service.localeCompare(b.service) || a.node.localeCompare(b.node))
    .map((instance) => {
      const row = document.createElement('tr');
      const age = Math.max(0, Math.round((now - instance.ts) / 1000));
      const figures = Object.entries(instance.figures)
        .map(([name, value]) => `${name}=${formatFigure(value)}`)
        .join('  ');
      for (const [text, className] of [
        [instance.service, ''],
        [instance.node, ''],
        [`${age} s ago`, ''],
        [figures, 'figures'],
      ]) {
        const cell = document.createElement('td');
        cell.textContent = text;
        if (className) cell.className = className;
        row.append(cell);
      }
      return row;
    });
  $('instances').tBodies[0].replaceChildren(...rows);
}

function connectDashboard(token) {
  dashboard.client?.disconnect();
  showDashboardError('');
  ensureCharts();
  dashboard.historyLoaded = false;
  dashboard.pending = [];
  const client = new Client(WS_URL, { token, name: 'demo-dashboard', maxReconnectDelayMs: 3000 });
  dashboard.client = client;
  client.on('state', ({ newState }) => setState($('dash-state'), newState));
  client.on('error', ({ type, error }) => {
    if (type === 'connect' && !error.temporary) {
      const why =
        error.code === ErrorCode.UNAUTHORIZED
          ? 'the token was refused'
          : error.code === ErrorCode.TOKEN_EXPIRED
            ? 'the token has expired'
            : error.message;
      showDashboardError(`${why} (${error.code})`);
    }
  });
  client.on('connected', () => showDashboardError(''));
  const sub = client.newSubscription(STATS_CHANNEL);
  dashboard.sub = sub;
  sub.on('publication', (pub) => {
    if (dashboard.historyLoaded) ingestStats(pub, true);
    else dashboard.pending.push(pub);
  });
  sub.on('subscribed', async () => {
    if (dashboard.historyLoaded) return;
    try {
      // The last minutes of figures, so the charts start full.
      const result = await sub.history({ limit: 300 });
      for (const pub of result.publications) ingestStats(pub, false);
    } catch {
      // Live figures still come.
    }
    dashboard.historyLoaded = true;
    for (const pub of dashboard.pending.splice(0)) ingestStats(pub, true);
  });
  sub.on('unsubscribed', ({ code, reason }) => {
    if (code === 0) return;
    const why =
      code === ErrorCode.PERMISSION_DENIED
        ? `permission denied: the token's channels claim must list ${STATS_CHANNEL}`
        : code === ErrorCode.UNKNOWN_CHANNEL
          ? 'the cluster has no sys namespace configured'
          : reason;
    showDashboardError(`${why} (${code})`);
  });
  sub.subscribe();
  client.connect();
}

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const token = $('token').value.trim();
  if (token === '') {
    showDashboardError('paste an operator token first');
    return;
  }
  sessionStorage.setItem('demo.token', token);
  connectDashboard(token);
});

// ---------------------------------------------------------------------------
// Tabs: #chat (default) and #dashboard; #dashboard?token=<jwt> connects with
// that token and takes it out of the address bar.
// ---------------------------------------------------------------------------

function route() {
  const [tab, query] = location.hash.slice(1).split('?');
  const current = tab === 'dashboard' ? 'dashboard' : 'chat';
  for (const name of ['chat', 'dashboard']) {
    $(name).hidden = name !== current;
    $(`tab-${name}`).classList.toggle('active', name === current);
  }
  if (current !== 'dashboard') {
    clearInterval(dashboard.timer);
    dashboard.timer = undefined;
    return;
  }
  ensureCharts();
  const fromUrl = new URLSearchParams(query ?? '').get('token');
  if (fromUrl) {
    history.replaceState(null, '', '#dashboard');
    $('token').value = fromUrl;
    sessionStorage.setItem('demo.token', fromUrl);
    connectDashboard(fromUrl);
  } else if (dashboard.client === undefined) {
    const saved = sessionStorage.getItem('demo.token');
    if (saved) {
      $('token').value = saved;
      connectDashboard(saved);
    }
  }
  dashboard.timer ??= setInterval(drawDashboard, 1000);
  drawDashboard();
}

window.addEventListener('hashchange', route);
route();
