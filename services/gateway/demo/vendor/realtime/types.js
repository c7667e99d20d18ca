// Generated from clients/js/src/types.ts by `npm run build:demo` (clients/js); do not edit.
/** Public types shared by the client and subscriptions. */
export {};
