// Generated from clients/js/src/client.ts by `npm run build:demo` (clients/js); do not edit.
/**
 * The client: one WebSocket to a gateway, kept alive across failures.
 *
 * Life cycle: `disconnected` → connect() → `connecting` (socket opening,
 * `connect` handshake, or waiting to retry) → `connected`. A lost connection
 * goes back to `connecting` and the client reconnects by itself, with a delay
 * chosen by the close code (PROTOCOL.md "Close codes"); codes that say "do
 * not come back" (4000, 4002, 4008) end in `closed`. `disconnect()` ends in
 * `disconnected`. Both allow connect() again.
 *
 * Reconnecting restores every subscription in the same round trip: `connect`
 * carries `subs` with each channel's last position, and the reply's results
 * (missed publications included) feed the subscriptions.
 */
import { backoffDelay, retryAfterDelay } from './backoff.js';
import { createCodec, isRecord, putData, base64Decode } from './codec.js';
import { Emitter } from './emitter.js';
import { ErrorCode, RealtimeError } from './errors.js';
import { Subscription, toPublication } from './subscription.js';
import { resolveWebSocket, } from './transport.js';
/** Close codes of the protocol. */
export const CloseCode = {
    NORMAL: 1000,
    GOING_AWAY: 1001,
    ABNORMAL: 1006,
    MESSAGE_TOO_BIG: 1009,
    INTERNAL: 1011,
    PROTOCOL_ERROR: 4000,
    CONNECT_TIMEOUT: 4001,
    UNAUTHORIZED: 4002,
    TOKEN_EXPIRED: 4003,
    SLOW_CONSUMER: 4004,
    DRAINING: 4005,
    CONNECTION_LIMIT: 4006,
    OVERLOADED: 4007,
    KICKED: 4008,
    STALE: 4009,
};
/**
 * Codes the client reports in `disconnected` for closes it decided itself
 * (never sent by the server). 1000 is `disconnect()`.
 */
export const LocalCloseCode = {
    DISCONNECT_CALLED: 1000,
    /** No `connect` reply within `timeoutMs`: reconnect with backoff. */
    CONNECT_TIMEOUT: 3001,
    /** No reply to the heartbeat ping (`pingIntervalMs`): reconnect with backoff. */
    NO_PONG: 3002,
    /** A frame from the server did not decode: reconnect with backoff. */
    BAD_FRAME: 3003,
    /** `getToken` returned an empty token: closed. */
    NO_TOKEN: 3004,
    /** No WebSocket implementation, or the URL was refused: closed. */
    TRANSPORT_UNAVAILABLE: 3005,
    /** `getToken` threw: reconnect with backoff. */
    TOKEN_FAILED: 3006,
};
/** Closes after which the client stays closed. */
const PERMANENT_CLOSES = new Set([
    CloseCode.PROTOCOL_ERROR,
    CloseCode.UNAUTHORIZED,
    CloseCode.KICKED,
    LocalCloseCode.NO_TOKEN,
    LocalCloseCode.TRANSPORT_UNAVAILABLE,
]);
/**
 * The close that follows a failed first `connect` (PROTOCOL.md §6). The
 * client acts on it at once instead of waiting for the server's close frame.
 */
function closeCodeForConnectError(code) {
    switch (code) {
        case ErrorCode.UNAUTHORIZED:
            return CloseCode.UNAUTHORIZED;
        case ErrorCode.TOKEN_EXPIRED:
            return CloseCode.TOKEN_EXPIRED;
        case ErrorCode.BAD_REQUEST:
            return CloseCode.PROTOCOL_ERROR;
        case ErrorCode.LIMIT_EXCEEDED:
            return CloseCode.CONNECTION_LIMIT;
        case ErrorCode.TOO_MANY_REQUESTS:
        case ErrorCode.BUSY:
            return CloseCode.OVERLOADED;
        default:
            return CloseCode.INTERNAL;
    }
}
const DEFAULTS = {
    timeoutMs: 10_000,
    minReconnectDelayMs: 500,
    maxReconnectDelayMs: 20_000,
    pingIntervalMs: 0,
};
/** setTimeout's ceiling (2^31 - 1 ms); longer delays fire at once. */
const MAX_TIMER_MS = 2_147_483_647;
class NoTokenError extends Error {
}
export class Client extends Emitter {
    url;
    encoding;
    /** Default timeout of commands, ms. */
    timeoutMs;
    options;
    codec;
    backoff;
    pingIntervalMs;
    logger;
    _state = 'disconnected';
    ws = null;
    /** Bumped by every close: an `openTransport` that awaited across one gives up. */
    transportGeneration = 0;
    lastId = 0;
    pending = new Map();
    /** Commands issued while connecting, sent once connected (each under its own timeout). */
    queue = [];
    connectRequest;
    subs = new Map();
    readyWaiters = new Set();
    token;
    /** The server said the token expired (4003): get a new one before reconnecting. */
    tokenStale = false;
    session;
    connected;
    /** Reconnect attempts since the last successful connect (the backoff exponent). */
    attempt = 0;
    refreshAttempt = 0;
    /** The `disconnect` push that announced the coming close, if any. */
    disconnectPush;
    /** The error of a failed `connect`, if that is why the socket closes. */
    lastConnectError;
    lastDisconnected;
    lastReceivedAt = 0;
    pingInFlight = false;
    reconnectTimer;
    connectTimer;
    refreshTimer;
    pingTimer;
    /** The subscriptions' view of this client (keeps those methods off the public API). */
    host;
    constructor(url, options = {}) {
        super();
        this.url = url;
        this.options = options;
        this.encoding = options.encoding ?? 'msgpack';
        this.codec = createCodec(this.encoding);
        this.timeoutMs = options.timeoutMs ?? DEFAULTS.timeoutMs;
        this.backoff = {
            minDelayMs: options.minReconnectDelayMs ?? DEFAULTS.minReconnectDelayMs,
            maxDelayMs: options.maxReconnectDelayMs ?? DEFAULTS.maxReconnectDelayMs,
        };
        this.pingIntervalMs = options.pingIntervalMs ?? DEFAULTS.pingIntervalMs;
        this.token = options.token;
        const debug = options.debug;
        this.logger =
            typeof debug === 'function'
                ? debug
                : debug === true
                    ? (message, ...details) => console.debug('[realtime]', message, ...details)
                    : undefined;
        this.host = {
            encoding: this.encoding,
            timeoutMs: this.timeoutMs,
            backoff: this.backoff,
            isConnected: () => this._state === 'connected',
            request: (command, timeoutMs, handlers) => this.request(command, timeoutMs, handlers),
            sendNoReply: (command) => this.sendNoReply(command),
            publicationDelivered: (pub) => this.emit('publication', pub),
            subscriptionWanted: (sub) => {
                if (this._state === 'connected')
                    sub._subscribeNow();
            },
            publish: (channel, data, opts) => this.publish(channel, data, opts),
            history: (channel, opts) => this.history(channel, opts),
            presence: (channel) => this.presence(channel),
            log: (message, ...details) => this.log(message, ...details),
        };
    }
    get state() {
        return this._state;
    }
    /**
     * Why the last connection ended (the last `disconnected` event's context):
     * after `closed`, the server's code and reason.
     */
    get lastDisconnect() {
        return this.lastDisconnected;
    }
    /** The last `connect` result, while connected. */
    get connection() {
        return this._state === 'connected' ? this.connected : undefined;
    }
    // -------------------------------------------------------------------------
    // Connection
    // -------------------------------------------------------------------------
    /** Starts connecting (no-op when connecting or connected). Returns at once; see `ready()`. */
    connect() {
        if (this._state === 'connecting' || this._state === 'connected')
            return;
        this.attempt = 0;
        this.setState('connecting');
        void this.openTransport();
    }
    /**
     * Closes the connection and stops reconnecting (state `disconnected`).
     * Subscriptions stay: the next connect() restores them.
     */
    disconnect() {
        if (this._state === 'disconnected')
            return;
        if (this._state === 'closed') {
            this.setState('disconnected'); // nothing is open: just acknowledge the app's choice
            return;
        }
        this.closeTransport(LocalCloseCode.DISCONNECT_CALLED, 'disconnect called', 'disconnected');
    }
    /**
     * Resolves once connected (at once if already); rejects when the client
     * ends `closed` or `disconnected` first, or after `timeoutMs` (local 114).
     */
    ready(timeoutMs) {
        if (this._state === 'connected' && this.connected !== undefined)
            return Promise.resolve(this.connected);
        if (this._state !== 'connecting')
            return Promise.reject(RealtimeError.clientClosed(this._state));
        return new Promise((resolve, reject) => {
            let timer;
            const waiter = {
                resolve: (ctx) => {
                    clearTimeout(timer);
                    resolve(ctx);
                },
                reject: (error) => {
                    clearTimeout(timer);
                    reject(error);
                },
            };
            if (timeoutMs !== undefined) {
                timer = setTimeout(() => {
                    this.readyWaiters.delete(waiter);
                    reject(RealtimeError.timeout('connect', timeoutMs));
                }, timeoutMs);
            }
            this.readyWaiters.add(waiter);
        });
    }
    // -------------------------------------------------------------------------
    // Subscriptions
    // -------------------------------------------------------------------------
    /** Creates the subscription object of a channel (one per channel; call subscribe() on it). */
    newSubscription(channel, options) {
        if (this.subs.has(channel)) {
            throw new Error(`a subscription to ${channel} already exists; use getSubscription()`);
        }
        const sub = new Subscription(this.host, channel, options);
        this.subs.set(channel, sub);
        return sub;
    }
    getSubscription(channel) {
        return this.subs.get(channel);
    }
    /** Unsubscribes and forgets the subscription (a new one may then be created). */
    removeSubscription(sub) {
        if (this.subs.get(sub.channel) !== sub)
            return;
        sub._dispose();
        this.subs.delete(sub.channel);
    }
    subscriptions() {
        return [...this.subs.values()];
    }
    // -------------------------------------------------------------------------
    // Commands
    // -------------------------------------------------------------------------
    /** Publishes to a channel. Uint8Array data is sent as binary (as `data_b64` over JSON). */
    async publish(channel, data, options = {}) {
        const command = { op: 'publish', channel };
        putData(command, data, this.encoding);
        if (options.idempotencyKey !== undefined)
            command['idempotency_key'] = options.idempotencyKey;
        const ok = await this.call(command, options.timeoutMs ?? this.timeoutMs);
        return { offset: Number(ok['offset']), epoch: String(ok['epoch']) };
    }
    /** A channel's history: the newest `limit` publications, oldest first (or after `since`). */
    async history(channel, options = {}) {
        const command = { op: 'history', channel };
        if (options.limit !== undefined)
            command['limit'] = options.limit;
        if (options.since !== undefined)
            command['since'] = { offset: options.since.offset, epoch: options.since.epoch };
        if (options.reverse !== undefined)
            command['reverse'] = options.reverse;
        const ok = await this.call(command, options.timeoutMs ?? this.timeoutMs);
        const pubs = Array.isArray(ok['pubs']) ? ok['pubs'] : [];
        return {
            publications: pubs
                .map((p) => toPublication(p, channel))
                .filter((p) => p !== undefined),
            offset: Number(ok['offset'] ?? 0),
            epoch: String(ok['epoch'] ?? ''),
        };
    }
    /** Who is in a channel (or how many, for big channels). */
    async presence(channel, options = {}) {
        const ok = await this.call({ op: 'presence', channel }, options.timeoutMs ?? this.timeoutMs);
        const result = {};
        if (isRecord(ok['clients'])) {
            const clients = {};
            for (const [id, value] of Object.entries(ok['clients'])) {
                const v = isRecord(value) ? value : {};
                clients[id] = {
                    client: id,
                    user: String(v['user'] ?? ''),
                    ...(isRecord(v['info']) ? { info: v['info'] } : {}),
                };
            }
            result.clients = clients;
        }
        if (typeof ok['count'] === 'number')
            result.count = ok['count'];
        return result;
    }
    /** Calls an RPC method; resolves with its final result (partial results are skipped; see rpcStream). */
    async rpc(method, data, options = {}) {
        const ok = await this.call(this.rpcCommand(method, data, options), options.timeoutMs ?? this.timeoutMs);
        return ok['data'];
    }
    /**
     * Calls an RPC method that streams: iterate to get each partial result
     * (`final: false`) and then the final one (`final: true`). An error of the
     * call is thrown by the iteration. Leaving the loop early stops listening.
     */
    rpcStream(method, data, options = {}) {
        const stream = new RpcStream();
        this.call(this.rpcCommand(method, data, options), options.timeoutMs ?? this.timeoutMs, (part) => stream._push({ final: false, data: part })).then((ok) => stream._finish({ final: true, data: ok['data'] }), (error) => stream._fail(error));
        return stream;
    }
    /** An application-level round trip; resolves with the latency in ms. */
    async ping(options = {}) {
        const start = now();
        await this.call({ op: 'ping' }, options.timeoutMs ?? this.timeoutMs);
        return now() - start;
    }
    rpcCommand(method, data, options) {
        const command = { op: 'rpc', method };
        putData(command, data, this.encoding);
        // Tell the server the deadline too, so it stops work nobody waits for.
        if (options.timeoutMs !== undefined)
            command['timeout_ms'] = options.timeoutMs;
        return command;
    }
    // -------------------------------------------------------------------------
    // Sending
    // -------------------------------------------------------------------------
    /**
     * Sends a command expecting a reply. While connecting it waits in a queue;
     * while disconnected or closed it fails at once (CLIENT_CLOSED). The timeout
     * runs from this call, queue time included.
     */
    call(command, timeoutMs, onPart) {
        return new Promise((resolve, reject) => {
            this.request(command, timeoutMs, onPart === undefined ? { resolve, reject } : { resolve, reject, onPart });
        });
    }
    /** `call` with synchronous callbacks instead of a promise. */
    request(command, timeoutMs, handlers) {
        if (this._state === 'disconnected' || this._state === 'closed') {
            handlers.reject(RealtimeError.clientClosed(this._state));
            return;
        }
        const call = { ...handlers, timer: undefined };
        call.timer = setTimeout(() => {
            if (call.id !== undefined)
                this.pending.delete(call.id);
            else
                this.queue = this.queue.filter((q) => q.call !== call);
            call.reject(RealtimeError.timeout(String(command['op']), timeoutMs));
        }, Math.min(timeoutMs, MAX_TIMER_MS));
        if (this._state === 'connected')
            this.sendCall(command, call);
        else
            this.queue.push({ command, call });
    }
    sendCall(command, call) {
        const id = this.nextId();
        call.id = id;
        this.pending.set(id, call);
        this.send({ id, ...command });
    }
    sendNoReply(command) {
        if (this._state === 'connected')
            this.send(command);
    }
    send(message) {
        const ws = this.ws;
        if (ws === null)
            return;
        try {
            ws.send(this.codec.encode([message]));
        }
        catch (error) {
            // The socket is going away; its close event drives what happens next.
            this.log('send failed', error);
        }
    }
    /** Command ids: u32, increasing, never 0 (0 means "no reply"), wrapping past in-flight ones. */
    nextId() {
        do {
            this.lastId = this.lastId >= 0xffff_ffff ? 1 : this.lastId + 1;
        } while (this.pending.has(this.lastId) || this.connectRequest?.id === this.lastId);
        return this.lastId;
    }
    // -------------------------------------------------------------------------
    // Transport
    // -------------------------------------------------------------------------
    async openTransport() {
        const generation = ++this.transportGeneration;
        const stale = () => generation !== this.transportGeneration || this._state !== 'connecting';
        let token;
        try {
            token = await this.tokenForConnect();
        }
        catch (error) {
            if (stale())
                return;
            if (error instanceof NoTokenError) {
                this.handleClose(LocalCloseCode.NO_TOKEN, 'getToken returned no token');
            }
            else {
                this.emit('error', { type: 'token', error: asError(error) });
                this.handleClose(LocalCloseCode.TOKEN_FAILED, `getToken failed: ${asError(error).message}`);
            }
            return;
        }
        let ws;
        try {
            const WebSocketClass = await resolveWebSocket(this.options.WebSocket);
            if (stale())
                return;
            ws = new WebSocketClass(this.url, [this.codec.subprotocol]);
        }
        catch (error) {
            if (stale())
                return;
            this.emit('error', { type: 'transport', error: asError(error) });
            this.handleClose(LocalCloseCode.TRANSPORT_UNAVAILABLE, asError(error).message);
            return;
        }
        this.log('opening', this.url, this.codec.subprotocol);
        this.ws = ws;
        ws.binaryType = 'arraybuffer';
        ws.onopen = () => {
            if (this.ws === ws)
                this.sendConnect(token);
        };
        ws.onmessage = (event) => {
            if (this.ws === ws)
                this.onFrame(event.data);
        };
        ws.onerror = () => {
            // Always followed by a close event, which carries the code to act on.
            if (this.ws === ws)
                this.log('socket error');
        };
        ws.onclose = (event) => {
            if (this.ws === ws)
                this.handleClose(event.code, event.reason);
        };
        // Bounds the socket opening and the handshake together.
        this.connectTimer = setTimeout(() => {
            if (this.ws === ws)
                this.closeTransport(LocalCloseCode.CONNECT_TIMEOUT, 'connect timeout');
        }, this.timeoutMs);
    }
    sendConnect(token) {
        const command = { op: 'connect' };
        if (token !== undefined && token !== '')
            command['token'] = token;
        if (this.session !== undefined)
            command['session'] = this.session;
        if (this.options.name !== undefined)
            command['name'] = this.options.name;
        if (this.options.version !== undefined)
            command['version'] = this.options.version;
        // Every subscription that can rides along with its position: one round
        // trip restores (and recovers) them all.
        const subs = new Map();
        const entries = {};
        for (const sub of this.subs.values()) {
            if (sub._needsSubscribe() && sub._fitsInConnect()) {
                const request = sub._beginSubscribe();
                subs.set(sub, request);
                entries[sub.channel] = request.since ?? {};
            }
        }
        if (subs.size > 0)
            command['subs'] = entries;
        const id = this.nextId();
        this.connectRequest = { id, subs };
        this.log('connect', { subs: entries });
        this.send({ id, ...command });
    }
    onFrame(frame) {
        const ws = this.ws;
        this.lastReceivedAt = now();
        let messages;
        try {
            messages = this.codec.decode(frame);
        }
        catch (error) {
            this.emit('error', { type: 'decode', error: asError(error) });
            this.closeTransport(LocalCloseCode.BAD_FRAME, 'bad frame from the server');
            return;
        }
        for (const message of messages) {
            if (this.ws !== ws)
                return; // a listener closed or disconnected meanwhile
            this.onMessage(message);
        }
    }
    onMessage(message) {
        if (typeof message['push'] === 'string') {
            this.onPush(message['push'], message);
            return;
        }
        const id = Number(message['id']);
        const connect = this.connectRequest;
        if (connect !== undefined && connect.id === id) {
            this.connectRequest = undefined;
            if (isRecord(message['error']))
                this.onConnectError(RealtimeError.fromWire(message['error']));
            else
                this.onConnected(isRecord(message['ok']) ? message['ok'] : {}, connect);
            return;
        }
        const call = this.pending.get(id);
        if (call === undefined)
            return; // timed out already
        this.pending.delete(id);
        clearTimeout(call.timer);
        if (isRecord(message['error']))
            call.reject(RealtimeError.fromWire(message['error']));
        else
            call.resolve(isRecord(message['ok']) ? message['ok'] : {});
    }
    onPush(kind, message) {
        const channel = typeof message['channel'] === 'string' ? message['channel'] : '';
        switch (kind) {
            case 'pub':
                this.subs.get(channel)?._onPublication(message);
                break;
            case 'join':
            case 'leave':
                this.subs.get(channel)?._onPresenceEvent(kind, message);
                break;
            case 'unsubscribed':
                this.subs.get(channel)?._onServerUnsubscribed(Number(message['code'] ?? 0), String(message['reason'] ?? ''));
                break;
            case 'rpc_part':
                this.pending.get(Number(message['id']))?.onPart?.(message['data']);
                break;
            case 'disconnect': {
                // Informational: the close frame that follows is what counts, but its
                // retry_after_ms is only here.
                const retry = message['retry_after_ms'];
                this.disconnectPush = {
                    code: Number(message['code'] ?? 0),
                    reason: String(message['reason'] ?? ''),
                    reconnect: message['reconnect'] !== false,
                    retryAfterMs: typeof retry === 'number' ? retry : undefined,
                };
                this.log('disconnect push', this.disconnectPush);
                break;
            }
            default:
                break; // a newer server's push: ignore
        }
    }
    onConnected(ok, request) {
        const ws = this.ws;
        clearTimeout(this.connectTimer);
        this.connectTimer = undefined;
        this.attempt = 0;
        this.session = typeof ok['session'] === 'string' ? ok['session'] : undefined;
        const ctx = {
            client: String(ok['client'] ?? ''),
            session: String(ok['session'] ?? ''),
            user: String(ok['user'] ?? ''),
            node: String(ok['node'] ?? ''),
            pingMs: Number(ok['ping_ms'] ?? 0),
            resumed: ok['resumed'] === true,
            encoding: this.encoding,
        };
        this.connected = ctx;
        this.log('connected', ctx);
        this.setState('connected');
        this.emit('connected', ctx);
        if (this.ws !== ws)
            return; // a listener disconnected
        const results = isRecord(ok['subs']) ? ok['subs'] : {};
        for (const [sub, subRequest] of request.subs) {
            const result = results[sub.channel];
            if (isRecord(result)) {
                sub._onSubscribeResult(subRequest, result);
            }
            else {
                // Not answered (should not happen): subscribe on its own, after a backoff.
                sub._onSubscribeError(subRequest, new RealtimeError(ErrorCode.INTERNAL, 'no result in the connect reply', { temporary: true, local: true }));
            }
            if (this.ws !== ws)
                return;
        }
        // A resumed session may bring back channels this connect did not list:
        // ones opened with a channel token (resubscribed below with `since`, so
        // they recover too) and ones the app dropped while offline (let go).
        for (const channel of Object.keys(results)) {
            const sub = this.subs.get(channel);
            if (sub !== undefined && request.subs.has(sub))
                continue;
            if (sub !== undefined && sub.state === 'subscribing')
                sub._heldByServer();
            else
                this.sendNoReply({ op: 'unsubscribe', channel });
        }
        // Subscriptions created since `connect` was sent, and those with a channel token.
        for (const sub of this.subs.values())
            sub._subscribeNow();
        const queued = this.queue;
        this.queue = [];
        for (const { command, call } of queued)
            this.sendCall(command, call);
        this.scheduleRefresh(undefined);
        this.startHeartbeat();
    }
    onConnectError(error) {
        this.log('connect refused', error.code, error.message);
        this.lastConnectError = error;
        this.emit('error', { type: 'connect', error });
        if (this.ws === null)
            return;
        // The server closes next with the matching code; act on it now.
        this.closeTransport(closeCodeForConnectError(error.code), error.message);
    }
    /** Closes the socket from this side and handles it as a close with `code`. */
    closeTransport(code, reason, finalState) {
        const ws = this.ws;
        if (ws !== null) {
            try {
                ws.close(1000, reason.slice(0, 120));
            }
            catch {
                // already closing
            }
        }
        this.handleClose(code, reason, finalState);
    }
    /**
     * The connection is gone (or an attempt failed): fail what waited on it,
     * then reconnect or stop as the close code says.
     */
    handleClose(code, reason, finalState) {
        const ws = this.ws;
        if (ws !== null) {
            ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
            this.ws = null;
        }
        this.transportGeneration++;
        this.connectRequest = undefined;
        this.stopTimers();
        for (const sub of this.subs.values())
            sub._onTransportClosed();
        const lost = [...this.pending.values()];
        this.pending.clear();
        for (const call of lost) {
            clearTimeout(call.timer);
            call.reject(RealtimeError.connectionLost());
        }
        const decision = finalState !== undefined ? { reconnect: false, state: finalState } : this.decide(code);
        this.disconnectPush = undefined;
        this.lastConnectError = undefined;
        this.log('closed', { code, reason, decision });
        if (!decision.reconnect) {
            this.setState(decision.state);
            const queued = this.queue;
            this.queue = [];
            for (const { call } of queued) {
                clearTimeout(call.timer);
                call.reject(RealtimeError.clientClosed(decision.state));
            }
            this.lastDisconnected = { code, reason, willReconnect: false };
            this.emit('disconnected', this.lastDisconnected);
            return;
        }
        this.setState('connecting');
        this.lastDisconnected = { code, reason, willReconnect: true, delayMs: decision.delayMs };
        this.emit('disconnected', this.lastDisconnected);
        if (this._state !== 'connecting')
            return; // a listener called disconnect()
        this.reconnectTimer = setTimeout(() => {
            this.reconnectTimer = undefined;
            if (this._state === 'connecting' && this.ws === null)
                void this.openTransport();
        }, decision.delayMs);
    }
    /** What a close code means for reconnecting (PROTOCOL.md, "Close codes"). */
    decide(code) {
        const backoff = () => ({
            reconnect: true,
            delayMs: backoffDelay(this.attempt++, this.backoff),
        });
        if (PERMANENT_CLOSES.has(code))
            return { reconnect: false, state: 'closed' };
        switch (code) {
            case CloseCode.TOKEN_EXPIRED:
                // Reconnecting with the same token would fail the same way.
                if (this.options.getToken === undefined)
                    return { reconnect: false, state: 'closed' };
                this.tokenStale = true;
                return backoff();
            case CloseCode.DRAINING:
            case CloseCode.OVERLOADED: {
                const retry = this.disconnectPush?.retryAfterMs ?? this.lastConnectError?.retryAfterMs;
                return retry === undefined ? backoff() : { reconnect: true, delayMs: retryAfterDelay(retry) };
            }
            case CloseCode.CONNECT_TIMEOUT:
            case CloseCode.SLOW_CONSUMER:
            case CloseCode.CONNECTION_LIMIT:
            case CloseCode.STALE:
            case CloseCode.INTERNAL:
            case CloseCode.ABNORMAL:
                return backoff();
            default:
                // Unknown codes: trust the `disconnect` push when there was one.
                if (this.disconnectPush?.reconnect === false)
                    return { reconnect: false, state: 'closed' };
                return backoff();
        }
    }
    setState(next) {
        if (next === this._state)
            return;
        const oldState = this._state;
        this._state = next;
        if (next !== 'connecting' && next !== 'connected') {
            clearTimeout(this.reconnectTimer);
            this.reconnectTimer = undefined;
        }
        this.emit('state', { oldState, newState: next });
        if (next === 'connected' && this.connected !== undefined) {
            const ctx = this.connected;
            for (const waiter of [...this.readyWaiters])
                waiter.resolve(ctx);
            this.readyWaiters.clear();
        }
        else if (next === 'closed' || next === 'disconnected') {
            for (const waiter of [...this.readyWaiters])
                waiter.reject(RealtimeError.clientClosed(next));
            this.readyWaiters.clear();
        }
    }
    stopTimers() {
        clearTimeout(this.connectTimer);
        clearTimeout(this.refreshTimer);
        clearTimeout(this.reconnectTimer);
        clearInterval(this.pingTimer);
        this.connectTimer = this.refreshTimer = this.reconnectTimer = this.pingTimer = undefined;
        this.pingInFlight = false;
    }
    // -------------------------------------------------------------------------
    // Tokens
    // -------------------------------------------------------------------------
    async tokenForConnect() {
        const getToken = this.options.getToken;
        if (getToken !== undefined && (this.token === undefined || this.tokenStale || tokenExpiresWithin(this.token, 1_000))) {
            const token = await getToken();
            if (!token)
                throw new NoTokenError();
            this.token = token;
            this.tokenStale = false;
        }
        return this.token;
    }
    /**
     * Plans the next `refresh`: a little before the token expires (10 % of its
     * remaining life, 1 s to 60 s ahead). `expiresAt` is the server's answer
     * to the last refresh, else the token's own `exp` claim.
     */
    scheduleRefresh(expiresAt) {
        clearTimeout(this.refreshTimer);
        this.refreshTimer = undefined;
        if (this.options.getToken === undefined || this.token === undefined)
            return;
        const exp = expiresAt ?? jwtExpiry(this.token);
        if (exp === undefined || exp === 0)
            return; // never expires
        const remaining = exp * 1000 - Date.now();
        const lead = Math.min(60_000, Math.max(1_000, remaining * 0.1));
        this.scheduleRefreshIn(Math.max(0, remaining - lead));
    }
    scheduleRefreshIn(delayMs) {
        clearTimeout(this.refreshTimer);
        this.refreshTimer = setTimeout(() => void this.refresh(), Math.min(delayMs, MAX_TIMER_MS));
    }
    async refresh() {
        const ws = this.ws;
        const getToken = this.options.getToken;
        if (getToken === undefined || this._state !== 'connected')
            return;
        let token;
        try {
            token = await getToken();
        }
        catch (error) {
            if (this.ws !== ws)
                return;
            this.emit('error', { type: 'token', error: asError(error) });
            this.scheduleRefreshIn(backoffDelay(this.refreshAttempt++, this.backoff) + this.backoff.minDelayMs);
            return;
        }
        if (this.ws !== ws || this._state !== 'connected')
            return;
        if (!token) {
            this.closeTransport(LocalCloseCode.NO_TOKEN, 'getToken returned no token');
            return;
        }
        this.token = token;
        try {
            const ok = await this.call({ op: 'refresh', token }, this.timeoutMs);
            if (this.ws !== ws)
                return;
            this.refreshAttempt = 0;
            this.scheduleRefresh(Number(ok['expires_at'] ?? 0));
        }
        catch (error) {
            if (this.ws !== ws)
                return;
            const e = asError(error);
            this.emit('error', { type: 'refresh', error: e });
            // A temporary failure is retried; otherwise the server closes with 4003
            // when the token expires and the reconnect fetches a new one.
            if (e instanceof RealtimeError && e.temporary) {
                this.scheduleRefreshIn(e.retryAfterMs ?? backoffDelay(this.refreshAttempt++, this.backoff));
            }
        }
    }
    // -------------------------------------------------------------------------
    // Heartbeat (optional: the server's WebSocket pings already check liveness)
    // -------------------------------------------------------------------------
    startHeartbeat() {
        if (this.pingIntervalMs <= 0)
            return;
        const ws = this.ws;
        this.lastReceivedAt = now();
        this.pingTimer = setInterval(() => {
            if (this.ws !== ws || this._state !== 'connected' || this.pingInFlight)
                return;
            if (now() - this.lastReceivedAt < this.pingIntervalMs)
                return;
            this.pingInFlight = true;
            this.ping().then(() => {
                this.pingInFlight = false;
            }, (error) => {
                this.pingInFlight = false;
                if (this.ws === ws && error.code === ErrorCode.TIMEOUT && error.local) {
                    this.closeTransport(LocalCloseCode.NO_PONG, 'no reply to ping');
                }
            });
        }, this.pingIntervalMs);
    }
    log(message, ...details) {
        this.logger?.(message, ...details);
    }
}
/** The async iterator `rpcStream` returns. */
export class RpcStream {
    buffered = [];
    error;
    /** Nothing more will be added. */
    ended = false;
    /** The consumer left (return()). */
    abandoned = false;
    wake;
    /** @internal */
    _push(chunk) {
        if (this.ended || this.abandoned)
            return;
        this.buffered.push(chunk);
        this.notify();
    }
    /** @internal */
    _finish(chunk) {
        this._push(chunk);
        this.ended = true;
        this.notify();
    }
    /** @internal */
    _fail(error) {
        if (this.ended)
            return;
        this.error = error;
        this.ended = true;
        this.notify();
    }
    async next() {
        for (;;) {
            const chunk = this.buffered.shift();
            if (chunk !== undefined)
                return { value: chunk, done: false };
            if (this.error !== undefined) {
                const error = this.error;
                this.error = undefined;
                this.abandoned = true;
                throw error;
            }
            if (this.ended || this.abandoned)
                return { value: undefined, done: true };
            await new Promise((resolve) => {
                this.wake = resolve;
            });
        }
    }
    async return() {
        this.abandoned = true;
        this.buffered = [];
        this.error = undefined;
        this.notify();
        return { value: undefined, done: true };
    }
    [Symbol.asyncIterator]() {
        return this;
    }
    notify() {
        const wake = this.wake;
        this.wake = undefined;
        wake?.();
    }
}
/** The `exp` claim of a JWT (seconds), read without verifying it (the server does that). */
export function jwtExpiry(token) {
    const payload = token.split('.')[1];
    if (payload === undefined)
        return undefined;
    try {
        const base64 = payload.replace(/-/g, '+').replace(/_/g, '/');
        const padded = base64 + '='.repeat((4 - (base64.length % 4)) % 4);
        const claims = JSON.parse(new TextDecoder().decode(base64Decode(padded)));
        return isRecord(claims) && typeof claims['exp'] === 'number' ? claims['exp'] : undefined;
    }
    catch {
        return undefined;
    }
}
function tokenExpiresWithin(token, ms) {
    const exp = jwtExpiry(token);
    return exp !== undefined && exp !== 0 && exp * 1000 <= Date.now() + ms;
}
function asError(error) {
    return error instanceof Error ? error : new Error(String(error));
}
function now() {
    return typeof performance !== 'undefined' ? performance.now() : Date.now();
}
