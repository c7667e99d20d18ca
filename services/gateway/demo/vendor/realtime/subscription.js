// Generated from clients/js/src/subscription.ts by `npm run build:demo` (clients/js); do not edit.
/**
 * A subscription to one channel: its state, its position in the channel's
 * stream, and the recovery that keeps that stream gap-free across reconnects.
 *
 * The position (`offset` of the last publication delivered, and the
 * channel's `epoch`) is what makes recovery work: every (re)subscribe after
 * the first sends it as `since`, and the server answers with what was missed,
 * oldest first, then live publications after them. Offsets are consecutive
 * within an epoch, so a publication that does not follow the last one shows
 * a miss; the subscription then resubscribes from its position to fill it.
 */
import { backoffDelay } from './backoff.js';
import { isRecord } from './codec.js';
import { Emitter } from './emitter.js';
import { ErrorCode, RealtimeError } from './errors.js';
export class Subscription extends Emitter {
    channel;
    host;
    token;
    recoverGaps;
    _state = 'unsubscribed';
    /** Last delivered offset and the epoch it belongs to; undefined before the first subscribe reply. */
    position;
    /** Bumped whenever outstanding replies must be ignored (unsubscribe, connection lost, new attempt). */
    generation = 0;
    /** A subscribe for this channel is awaiting its reply on the current connection. */
    inflight = false;
    /**
     * The server may hold a subscription for us on the current connection. A
     * resubscribe then sends `unsubscribe` first, or the server would answer
     * 105 (already subscribed).
     */
    serverMayHave = false;
    /** Failed temporary subscribe attempts in a row (for the retry backoff). */
    attempt = 0;
    retryTimer;
    lastSubscribed;
    waiters = new Set();
    /** @internal Created by `Client.newSubscription`. */
    constructor(host, channel, options = {}) {
        super();
        this.host = host;
        this.channel = channel;
        this.token = options.token;
        this.recoverGaps = options.recoverGaps ?? true;
        if (options.since !== undefined)
            this.position = { ...options.since };
    }
    get state() {
        return this._state;
    }
    /**
     * The position of the last publication delivered (or the server's position
     * at subscribe time): persist it to recover after a page reload, with
     * `newSubscription(channel, {since})`.
     */
    get streamPosition() {
        return this.position === undefined ? undefined : { ...this.position };
    }
    /**
     * Subscribes, now if connected, else as part of the next `connect`. It
     * returns at once; listen to `subscribed` or await `ready()`.
     */
    subscribe() {
        if (this._state !== 'unsubscribed')
            return;
        this.attempt = 0;
        this.setState('subscribing');
        this.host.subscriptionWanted(this);
    }
    /** Unsubscribes; nothing of the channel is delivered after this call. */
    unsubscribe() {
        if (this._state === 'unsubscribed')
            return;
        this.generation++;
        this.inflight = false;
        this.clearRetry();
        if (this.serverMayHave && this.host.isConnected()) {
            this.host.sendNoReply({ op: 'unsubscribe', channel: this.channel });
        }
        this.serverMayHave = false;
        // A later subscribe() starts fresh: what happened meanwhile is not "missed".
        this.position = undefined;
        this.lastSubscribed = undefined;
        this.setState('unsubscribed');
        this.emit('unsubscribed', { channel: this.channel, code: 0, reason: 'unsubscribe called' });
        this.rejectWaiters(new RealtimeError(ErrorCode.UNSUBSCRIBED, 'unsubscribed', { local: true }));
    }
    /**
     * Resolves once subscribed (at once if already); rejects when the
     * subscription ends unsubscribed, or after `timeoutMs` (local 114).
     */
    ready(timeoutMs) {
        if (this._state === 'subscribed' && this.lastSubscribed !== undefined) {
            return Promise.resolve(this.lastSubscribed);
        }
        if (this._state === 'unsubscribed') {
            return Promise.reject(new RealtimeError(ErrorCode.UNSUBSCRIBED, 'not subscribing', { local: true }));
        }
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
                    this.waiters.delete(waiter);
                    reject(RealtimeError.timeout(`subscribe ${this.channel}`, timeoutMs));
                }, timeoutMs);
            }
            this.waiters.add(waiter);
        });
    }
    publish(data, options) {
        return this.host.publish(this.channel, data, options);
    }
    history(options) {
        return this.host.history(this.channel, options);
    }
    presence() {
        return this.host.presence(this.channel);
    }
    // -------------------------------------------------------------------------
    // Driven by the client. Underscored: public for the client, not for apps.
    // -------------------------------------------------------------------------
    /** @internal Whether this subscription can ride in `connect`'s `subs` (a channel token cannot). */
    _fitsInConnect() {
        return this.token === undefined;
    }
    /** @internal Wants a subscribe on the current connection and has none in flight. */
    _needsSubscribe() {
        return this._state === 'subscribing' && !this.inflight && this.retryTimer === undefined;
    }
    /**
     * @internal Marks a subscribe as sent (alone or in `connect`'s `subs`) and
     * returns what to send.
     */
    _beginSubscribe() {
        this.generation++;
        this.inflight = true;
        this.serverMayHave = true;
        return { since: this.position === undefined ? undefined : { ...this.position }, generation: this.generation };
    }
    /** @internal Sends a `subscribe` on the current (connected) connection. */
    _subscribeNow() {
        if (!this._needsSubscribe())
            return;
        if (this.serverMayHave) {
            // Commands start in order, so this unsubscribe lands before the subscribe.
            this.host.sendNoReply({ op: 'unsubscribe', channel: this.channel });
        }
        const request = this._beginSubscribe();
        const command = { op: 'subscribe', channel: this.channel };
        if (request.since !== undefined)
            command['since'] = request.since;
        if (this.token !== undefined)
            command['token'] = this.token;
        this.host.log('subscribe', this.channel, request.since);
        this.host.request(command, this.host.timeoutMs, {
            resolve: (ok) => this._onSubscribeResult(request, ok),
            reject: (error) => this._onSubscribeError(request, error),
        });
    }
    /** @internal A SubResult (from `subscribe` or from `connect`'s `subs`). */
    _onSubscribeResult(request, result) {
        if (request.generation !== this.generation) {
            // Stale. If the app unsubscribed while this was in flight (possibly
            // before the unsubscribe could be sent), make sure the server forgets it.
            if (this._state === 'unsubscribed' && !isRecord(result['error']) && this.host.isConnected()) {
                this.host.sendNoReply({ op: 'unsubscribe', channel: this.channel });
            }
            return;
        }
        this.inflight = false;
        if (isRecord(result['error'])) {
            // A failed entry of connect's `subs`.
            this._onSubscribeError(request, RealtimeError.fromWire(result['error']));
            return;
        }
        this.attempt = 0;
        const offset = Number(result['offset'] ?? 0);
        const epoch = String(result['epoch'] ?? '');
        const recovered = result['recovered'] === true;
        const wasRecovering = request.since !== undefined;
        const pubs = Array.isArray(result['pubs']) ? result['pubs'] : [];
        if (!recovered || request.since === undefined) {
            this.position = { offset, epoch };
        }
        else {
            this.position = { offset: request.since.offset, epoch };
        }
        const ctx = { channel: this.channel, offset, epoch, wasRecovering, recovered };
        this.lastSubscribed = ctx;
        this.setState('subscribed');
        this.emit('subscribed', ctx);
        if (wasRecovering && !recovered && request.since !== undefined) {
            this.host.log('recovery failed', this.channel, request.since, { offset, epoch });
            this.emit('stateLost', {
                channel: this.channel,
                reason: request.since.epoch !== epoch
                    ? 'the channel epoch changed (its history was lost)'
                    : 'the position is outside the history window',
                since: request.since,
                offset,
                epoch,
            });
        }
        const generation = this.generation;
        for (const pub of pubs) {
            // A listener may have unsubscribed (or a new attempt begun) meanwhile.
            if (generation !== this.generation || this._state !== 'subscribed')
                return;
            const p = toPublication(pub, this.channel);
            // Recovered publications come in order; only drop what was already seen.
            if (p !== undefined && this.position !== undefined && p.offset > this.position.offset) {
                this.position.offset = p.offset;
                this.deliver(p);
            }
        }
        if (this.position !== undefined && this.position.offset < offset)
            this.position.offset = offset;
        for (const waiter of [...this.waiters])
            waiter.resolve(ctx);
        this.waiters.clear();
    }
    /** @internal A subscribe that failed (error reply, timeout, connection lost). */
    _onSubscribeError(request, error) {
        if (request.generation !== this.generation)
            return; // stale
        this.inflight = false;
        if (error.code === ErrorCode.CONNECTION_LOST || error.code === ErrorCode.CLIENT_CLOSED) {
            return; // not a failure of the subscription: the next connection resubscribes
        }
        this.emit('error', { type: 'subscribe', error, channel: this.channel });
        if (error.temporary) {
            // 111/113 say when to come back; a timeout or anything else backs off.
            const delay = error.retryAfterMs ?? backoffDelay(this.attempt, this.host.backoff);
            this.attempt++;
            this.host.log('subscribe failed, retrying', this.channel, error.code, delay);
            this.retryTimer = setTimeout(() => {
                this.retryTimer = undefined;
                if (this.host.isConnected())
                    this._subscribeNow();
            }, delay);
            return;
        }
        this.serverMayHave = false;
        this.setState('unsubscribed');
        this.emit('unsubscribed', { channel: this.channel, code: error.code, reason: error.message });
        this.rejectWaiters(error);
    }
    /** @internal The connection closed: replies in flight are lost; resubscribe on the next one. */
    _onTransportClosed() {
        this.generation++;
        this.inflight = false;
        this.serverMayHave = false;
        this.clearRetry();
        if (this._state === 'subscribed')
            this.setState('subscribing');
    }
    /** @internal The server holds a subscription for us (a resumed session): resubscribing must unsubscribe first. */
    _heldByServer() {
        this.serverMayHave = true;
    }
    /** @internal A `pub` push for this channel. */
    _onPublication(message) {
        // While (re)subscribing, live publications belong to the subscription
        // being replaced: the new one's reply covers them (the server holds
        // publications for a subscribe until right after its reply).
        if (this._state !== 'subscribed' || this.position === undefined)
            return;
        const pub = toPublication(message, this.channel);
        if (pub === undefined)
            return;
        const last = this.position.offset;
        if (pub.offset === last + 1 || (!this.recoverGaps && pub.offset > last)) {
            this.position.offset = pub.offset;
            this.deliver(pub);
            return;
        }
        // Offsets are consecutive within an epoch: a jump means missed
        // publications; a step back means the epoch changed under us (history
        // lost, offsets restarted). Either way, recover from the last position.
        this.host.log('offset discontinuity, recovering', this.channel, { last, got: pub.offset });
        this.recover();
    }
    /** @internal `unsubscribed` push: the server dropped this subscription. */
    _onServerUnsubscribed(code, reason) {
        if (this._state === 'unsubscribed')
            return;
        this.serverMayHave = false;
        if (code === ErrorCode.UNRECOVERABLE_POSITION) {
            // 112: the server could not deliver something; resubscribe with since.
            this.host.log('server unsubscribed with 112, recovering', this.channel);
            this.recover();
            return;
        }
        this.generation++;
        this.inflight = false;
        this.clearRetry();
        this.setState('unsubscribed');
        this.emit('unsubscribed', { channel: this.channel, code, reason });
        this.rejectWaiters(new RealtimeError(code, reason));
    }
    /** @internal `join` / `leave` pushes. */
    _onPresenceEvent(kind, message) {
        if (this._state !== 'subscribed')
            return;
        const info = isRecord(message['info']) ? message['info'] : {};
        this.emit(kind, {
            channel: this.channel,
            info: {
                user: String(info['user'] ?? ''),
                client: String(info['client'] ?? ''),
                ...(isRecord(info['info']) ? { info: info['info'] } : {}),
            },
        });
    }
    /** @internal Detaches from the client (Client.removeSubscription). */
    _dispose() {
        this.unsubscribe();
        this.clearRetry();
    }
    // -------------------------------------------------------------------------
    /** Resubscribes from the current position, on this connection. */
    recover() {
        this.generation++; // replies to an in-flight subscribe no longer count
        this.inflight = false;
        this.clearRetry();
        this.setState('subscribing');
        if (this.host.isConnected())
            this._subscribeNow();
    }
    deliver(pub) {
        this.emit('publication', pub);
        this.host.publicationDelivered(pub);
    }
    setState(next) {
        if (next === this._state)
            return;
        const oldState = this._state;
        this._state = next;
        this.emit('state', { oldState, newState: next });
    }
    clearRetry() {
        if (this.retryTimer !== undefined) {
            clearTimeout(this.retryTimer);
            this.retryTimer = undefined;
        }
    }
    rejectWaiters(error) {
        for (const waiter of [...this.waiters])
            waiter.reject(error);
        this.waiters.clear();
    }
}
/** Reads a publication (a `pub` push, or an entry of `pubs`). */
export function toPublication(value, channel) {
    if (!isRecord(value))
        return undefined;
    const offset = Number(value['offset']);
    if (!Number.isFinite(offset))
        return undefined;
    const pub = {
        channel: typeof value['channel'] === 'string' ? value['channel'] : (channel ?? ''),
        offset,
        data: value['data'] ?? null,
        ts: Number(value['ts'] ?? 0),
    };
    const info = value['info'];
    if (isRecord(info)) {
        pub.info = {
            user: String(info['user'] ?? ''),
            client: String(info['client'] ?? ''),
            ...(isRecord(info['info']) ? { info: info['info'] } : {}),
        };
    }
    return pub;
}
