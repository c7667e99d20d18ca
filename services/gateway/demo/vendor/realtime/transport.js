// Generated from clients/js/src/transport.ts by `npm run build:demo` (clients/js); do not edit.
/**
 * The WebSocket the client runs on: the browser's (or Node 22+'s) global
 * `WebSocket`, else the `ws` package, loaded lazily so that browser bundles
 * never see it, else one the application injects (tests use a fake).
 */
/** `readyState` values (the constants are not on every implementation). */
export const OPEN = 1;
let wsPackage;
/** Finds a WebSocket implementation; rejects with an explanation when there is none. */
export function resolveWebSocket(injected) {
    if (injected !== undefined)
        return Promise.resolve(injected);
    const global = globalThis.WebSocket;
    if (typeof global === 'function')
        return Promise.resolve(global);
    wsPackage ??= loadWsPackage();
    return wsPackage;
}
async function loadWsPackage() {
    // A variable specifier (and the ignore hints) keeps bundlers from trying to
    // pack `ws` into browser builds: it is only ever loaded in Node.js.
    const specifier = 'ws';
    let module;
    try {
        module = (await import(/* webpackIgnore: true */ /* @vite-ignore */ specifier));
    }
    catch (error) {
        wsPackage = undefined; // let a later attempt (after `npm install ws`) try again
        throw new Error('no WebSocket implementation: this runtime has no global WebSocket; install the "ws" package or pass options.WebSocket', { cause: error });
    }
    const ctor = module.WebSocket ?? module.default;
    if (typeof ctor !== 'function')
        throw new Error('the "ws" package does not export a WebSocket class');
    return ctor;
}
