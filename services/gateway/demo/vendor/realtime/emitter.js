// Generated from clients/js/src/emitter.ts by `npm run build:demo` (clients/js); do not edit.
/**
 * A tiny typed event emitter that runs the same in browsers and Node.js
 * (Node's EventEmitter is not in browsers, and EventTarget loses the types).
 *
 * Every event carries exactly one argument, a context object, so adding a
 * field later never breaks a listener.
 */
export class Emitter {
    listeners = new Map();
    /** Adds a listener; returns a function that removes it. */
    on(event, listener) {
        let set = this.listeners.get(event);
        if (set === undefined) {
            set = new Set();
            this.listeners.set(event, set);
        }
        set.add(listener);
        return () => this.off(event, listener);
    }
    /** Adds a listener that runs at most once. */
    once(event, listener) {
        const off = this.on(event, (arg) => {
            off();
            listener(arg);
        });
        return off;
    }
    off(event, listener) {
        this.listeners.get(event)?.delete(listener);
    }
    /** Removes every listener of `event`, or of all events. */
    removeAllListeners(event) {
        if (event === undefined)
            this.listeners.clear();
        else
            this.listeners.delete(event);
    }
    listenerCount(event) {
        return this.listeners.get(event)?.size ?? 0;
    }
    /**
     * Calls the listeners of `event`. A listener that throws must not leave the
     * client half way through a state change, so the exception is re-thrown
     * asynchronously (it still reaches the usual uncaught-error reporting).
     */
    emit(event, arg) {
        const set = this.listeners.get(event);
        if (set === undefined || set.size === 0)
            return;
        for (const listener of [...set]) {
            try {
                listener(arg);
            }
            catch (error) {
                setTimeout(() => {
                    throw error;
                }, 0);
            }
        }
    }
}
