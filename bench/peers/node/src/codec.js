'use strict';

// Wire encodings: MessagePack (msgpackr) and JSON, client frame decoding, the
// JSON form of `data` (PROTOCOL.md §1 "data", §6) and pre-built WebSocket frames.

const { Packr, Unpackr, C1 } = require('msgpackr');
const { isUtf8 } = require('node:buffer');

// Plain MessagePack: no records/structures extension, maps as string-keyed
// objects, fixmaps for small maps. 64-bit integers decode as BigInt so that
// they are re-encoded as integers (msgpackr writes a *number* above 2^32 as a
// float64).
const packr = new Packr({ useRecords: false, variableMapSize: true });
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: 'bigint' });

const pack = (value) => packr.pack(value);
const unpack = (buf) => unpackr.unpack(buf);

/** An unsigned integer as msgpackr should write it: BigInt above 32 bits, so it stays an integer. */
const u64 = (n) => (n > 0xffffffff ? BigInt(n) : n);

// ---------------------------------------------------------------- JSON data

const NO_JSON_FORM = Symbol('no JSON form');

function isPlainObject(v) {
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

/** True when JSON.stringify(v) is already the protocol's JSON form of v. */
function jsonReady(v) {
  switch (typeof v) {
    case 'string':
    case 'boolean':
    case 'number': // NaN and infinities become null, as the protocol wants
      return true;
    case 'object': {
      if (v === null) return true;
      if (Array.isArray(v)) {
        for (let i = 0; i < v.length; i++) if (!jsonReady(v[i])) return false;
        return true;
      }
      if (!isPlainObject(v)) return false;
      for (const k in v) if (!jsonReady(v[k])) return false;
      return true;
    }
    default:
      return false;
  }
}

/** The slow path: binaries as base64 strings, big integers written exactly. */
function slowJson(v) {
  switch (typeof v) {
    case 'string':
    case 'boolean':
      return JSON.stringify(v);
    case 'number':
      return Number.isFinite(v) ? String(v) : 'null';
    case 'bigint':
      return v.toString();
    case 'undefined':
      return 'null';
    case 'object': {
      if (v === null) return 'null';
      if (v instanceof Uint8Array) return '"' + Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('base64') + '"';
      if (Array.isArray(v)) {
        let out = '[';
        for (let i = 0; i < v.length; i++) out += (i ? ',' : '') + slowJson(v[i]);
        return out + ']';
      }
      if (!isPlainObject(v)) throw NO_JSON_FORM; // Date (timestamp ext), 0xc1, ...
      let out = '{';
      let first = true;
      for (const k in v) {
        out += (first ? '' : ',') + JSON.stringify(k) + ':' + slowJson(v[k]);
        first = false;
      }
      return out + '}';
    }
    default:
      throw NO_JSON_FORM;
  }
}

/** JSON text of any decoded value, or undefined when it has no JSON form. */
function toJson(v) {
  if (jsonReady(v)) return JSON.stringify(v);
  try {
    return slowJson(v);
  } catch (e) {
    if (e === NO_JSON_FORM) return undefined;
    throw e;
  }
}

/** `"data":…`, `"data_b64":"…"` (top-level binary) or `"data_mp64":"…"` (no JSON form). */
function jsonDataField(data) {
  if (data instanceof Uint8Array) {
    return '"data_b64":"' + Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString('base64') + '"';
  }
  const json = toJson(data);
  if (json !== undefined) return '"data":' + json;
  return '"data_mp64":"' + pack(data).toString('base64') + '"';
}

/**
 * JSON.parse loses the integer/float distinction; MessagePack subscribers must
 * still get integers as integers. Integers outside the 32-bit range (which
 * msgpackr would write as float64) become BigInt. In place; returns the value.
 */
function jsonToData(v) {
  if (typeof v === 'number') {
    return Number.isInteger(v) && (v > 0xffffffff || v < -0x80000000) ? BigInt(v) : v;
  }
  if (typeof v === 'object' && v !== null) {
    if (Array.isArray(v)) {
      for (let i = 0; i < v.length; i++) v[i] = jsonToData(v[i]);
    } else {
      for (const k in v) v[k] = jsonToData(v[k]);
    }
  }
  return v;
}

const B64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** RFC 4648 standard base64 with padding, or undefined. */
function decodeBase64(s) {
  return B64_RE.test(s) ? Buffer.from(s, 'base64') : undefined;
}

// ------------------------------------------------------- publications (Pub)

/** JSON of a Pub's fields, as in `history` and SubResult `pubs`. */
function pubJson(p, push) {
  let out = push ? '{"push":"pub","channel":' : '{"channel":';
  out += JSON.stringify(p.channel) + ',"offset":' + p.offset + ',' + jsonDataField(p.data);
  if (p.info !== undefined && p.info !== null) out += ',"info":' + (toJson(p.info) ?? 'null');
  return out + ',"ts":' + p.ts + '}';
}

function pubsJson(pubs) {
  let out = '[';
  for (let i = 0; i < pubs.length; i++) out += (i ? ',' : '') + pubJson(pubs[i], false);
  return out + ']';
}

// ------------------------------------------------------------ client frames

function hasC1(v) {
  if (typeof v !== 'object' || v === null || v instanceof Uint8Array) return false;
  if (v === C1) return true;
  if (Array.isArray(v)) return v.some(hasC1);
  for (const k in v) if (hasC1(v[k])) return true;
  return false;
}

/**
 * Splits a client's WebSocket message into its commands (each a plain object),
 * or returns null when the frame breaks the protocol (close 4000): wrong frame
 * type, undecodable, empty, or a message that is not a map.
 */
function decodeFrame(json, data, isBinary) {
  let messages;
  if (json) {
    if (isBinary || !isUtf8(data)) return null;
    const text = data.toString('utf8');
    messages = [];
    try {
      if (text.indexOf('\n') === -1) {
        messages.push(JSON.parse(text));
      } else {
        for (const line of text.split('\n')) {
          if (line.trim() !== '') messages.push(JSON.parse(line));
        }
      }
    } catch {
      return null;
    }
  } else {
    if (!isBinary) return null;
    try {
      messages = unpackr.unpackMultiple(data);
    } catch {
      return null;
    }
    // msgpackr decodes the never-used marker 0xc1 to a placeholder instead of
    // failing; only a frame that has the byte at all needs the walk.
    if (data.indexOf(0xc1) !== -1 && messages.some(hasC1)) return null;
  }
  if (!messages || messages.length === 0) return null;
  for (let i = 0; i < messages.length; i++) {
    const m = messages[i];
    if (typeof m !== 'object' || m === null || Array.isArray(m) || !isPlainObject(m)) return null;
  }
  return messages;
}

// ------------------------------------------------------------ server frames

/**
 * A complete unmasked WebSocket frame (FIN set) around `payload`: built once
 * and written as is to every socket that gets the same message.
 */
function wsFrame(payload, binary) {
  const len = payload.length;
  const hl = len < 126 ? 2 : len < 65536 ? 4 : 10;
  const frame = Buffer.allocUnsafe(hl + len);
  writeHeader(frame, len, binary);
  frame.set(payload, hl);
  return frame;
}

function writeHeader(frame, len, binary) {
  frame[0] = binary ? 0x82 : 0x81;
  if (len < 126) {
    frame[1] = len;
    return 2;
  }
  if (len < 65536) {
    frame[1] = 126;
    frame.writeUInt16BE(len, 2);
    return 4;
  }
  frame[1] = 127;
  frame.writeUInt32BE(Math.floor(len / 0x100000000), 2);
  frame.writeUInt32BE(len >>> 0, 6);
  return 10;
}

/**
 * One frame carrying payloads[from..to) back to back: MessagePack maps
 * concatenated, or JSON objects separated by '\n'.
 */
function wsBatchFrame(payloads, from, to, bytes, binary) {
  const len = binary ? bytes : bytes + (to - from - 1);
  const hl = len < 126 ? 2 : len < 65536 ? 4 : 10;
  const frame = Buffer.allocUnsafe(hl + len);
  let pos = writeHeader(frame, len, binary);
  for (let i = from; i < to; i++) {
    if (!binary && i > from) frame[pos++] = 0x0a;
    const p = payloads[i];
    frame.set(p, pos);
    pos += p.length;
  }
  return frame;
}

module.exports = {
  pack,
  unpack,
  u64,
  toJson,
  jsonDataField,
  jsonToData,
  decodeBase64,
  pubJson,
  pubsJson,
  decodeFrame,
  wsFrame,
  wsBatchFrame,
};
