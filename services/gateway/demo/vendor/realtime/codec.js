// Generated from clients/js/src/codec.ts by `npm run build:demo` (clients/js); do not edit.
/**
 * The two wire encodings of PROTOCOL.md §1, behind one interface.
 *
 * Both accept frames carrying several messages: the server batches pushes
 * under load (MessagePack maps back to back; JSON objects one per line).
 * JSON clients see `data` converted (§6): a top-level binary arrives as
 * `data_b64`, data without a JSON form as `data_mp64`. The JSON codec turns
 * both back into `data` so the application sees the same values whatever the
 * encoding (a Uint8Array, or the decoded MessagePack value).
 */
import { Decoder, Encoder } from '../msgpack.js';
export const SUBPROTOCOLS = {
    msgpack: 'rt.v1.msgpack',
    json: 'rt.v1.json',
};
export function createCodec(encoding) {
    return encoding === 'json' ? new JsonCodec() : new MsgpackCodec();
}
// ---------------------------------------------------------------------------
// MessagePack
// ---------------------------------------------------------------------------
export class MsgpackCodec {
    encoding = 'msgpack';
    subprotocol = SUBPROTOCOLS.msgpack;
    // `undefined` fields are left out instead of being sent as nil, as in JSON.
    encoder = new Encoder({ ignoreUndefined: true });
    decoder = new Decoder();
    encode(messages) {
        if (messages.length === 1)
            return this.encoder.encode(messages[0]);
        const parts = messages.map((m) => this.encoder.encode(m));
        const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
        let at = 0;
        for (const part of parts) {
            out.set(part, at);
            at += part.length;
        }
        return out;
    }
    decode(frame) {
        const bytes = toBytes(frame);
        if (bytes === undefined) {
            throw new TypeError('text frame on a MessagePack connection');
        }
        const out = [];
        // Concatenated maps: decodeMulti walks them one after another.
        for (const value of this.decoder.decodeMulti(bytes)) {
            out.push(asMessage(value));
        }
        return out;
    }
}
// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------
export class JsonCodec {
    encoding = 'json';
    subprotocol = SUBPROTOCOLS.json;
    mpDecoder = new Decoder();
    encode(messages) {
        return messages.map((m) => JSON.stringify(m)).join('\n');
    }
    decode(frame) {
        if (typeof frame !== 'string') {
            throw new TypeError('binary frame on a JSON connection');
        }
        const out = [];
        for (const line of frame.split('\n')) {
            if (line.trim() === '')
                continue;
            const message = asMessage(JSON.parse(line));
            restoreData(message, this.mpDecoder);
            out.push(message);
        }
        return out;
    }
}
/**
 * Puts `data` back where the server wrote `data_b64` / `data_mp64`, only in
 * the places where the protocol carries data (the message itself for `pub`,
 * `rpc_part` and rpc replies; publications in `pubs` lists), never inside the
 * application's own data (which could hold a field of that name).
 */
function restoreData(message, mp) {
    restoreField(message, mp);
    const ok = message['ok'];
    if (isRecord(ok)) {
        restoreField(ok, mp);
        restorePubs(ok['pubs'], mp);
        const subs = ok['subs'];
        if (isRecord(subs)) {
            for (const result of Object.values(subs)) {
                if (isRecord(result))
                    restorePubs(result['pubs'], mp);
            }
        }
    }
}
function restorePubs(pubs, mp) {
    if (!Array.isArray(pubs))
        return;
    for (const pub of pubs)
        if (isRecord(pub))
            restoreField(pub, mp);
}
function restoreField(target, mp) {
    const b64 = target['data_b64'];
    if (typeof b64 === 'string') {
        target['data'] = base64Decode(b64);
        delete target['data_b64'];
    }
    const mp64 = target['data_mp64'];
    if (typeof mp64 === 'string') {
        target['data'] = mp.decode(base64Decode(mp64));
        delete target['data_mp64'];
    }
}
/**
 * Prepares a command's `data` for JSON: a Uint8Array at the top goes as
 * `data_b64` (nested binaries have no JSON form and are the caller's to encode).
 */
export function putData(command, data, encoding) {
    if (encoding === 'json' && data instanceof Uint8Array) {
        command['data_b64'] = base64Encode(data);
    }
    else {
        command['data'] = data === undefined ? null : data;
    }
}
// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------
export function isRecord(value) {
    return typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof Uint8Array);
}
function asMessage(value) {
    if (!isRecord(value))
        throw new TypeError('a message is not a map');
    return value;
}
/** Frames from browsers' WebSocket (binaryType "arraybuffer") or `ws`. */
function toBytes(frame) {
    if (frame instanceof Uint8Array)
        return frame; // includes Node's Buffer
    if (frame instanceof ArrayBuffer)
        return new Uint8Array(frame);
    if (ArrayBuffer.isView(frame))
        return new Uint8Array(frame.buffer, frame.byteOffset, frame.byteLength);
    if (Array.isArray(frame) && frame.every((f) => f instanceof Uint8Array)) {
        // `ws` with binaryType "fragments".
        const parts = frame;
        const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
        let at = 0;
        for (const part of parts) {
            out.set(part, at);
            at += part.length;
        }
        return out;
    }
    return undefined;
}
/** Standard base64 with padding (RFC 4648), as the protocol uses; browser and Node. */
export function base64Encode(bytes) {
    let binary = '';
    const CHUNK = 0x8000; // keeps String.fromCharCode's argument list short
    for (let i = 0; i < bytes.length; i += CHUNK) {
        binary += String.fromCharCode(...bytes.subarray(i, i + CHUNK));
    }
    return btoa(binary);
}
export function base64Decode(text) {
    const binary = atob(text);
    const out = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++)
        out[i] = binary.charCodeAt(i);
    return out;
}
