#!/usr/bin/env node
/**
 * Checks the SDK examples of the READMEs against the built package (dist/),
 * so that an example naming something the SDK does not have fails CI:
 *
 * - every ```ts block of clients/js/README.md and of the repository README's
 *   "JavaScript/TypeScript client" section is type-checked with
 *   `tsc --noEmit`, importing `@realtime/client` as an app would (the
 *   package's own name, resolved through its package.json "exports" to
 *   dist/index.d.ts). A block whose first line or section heading mentions
 *   Node.js is checked with @types/node and no DOM library; the others as
 *   browser code (DOM library, no Node.js types). The functions of the app
 *   the examples call (PLACEHOLDERS) are declared, nothing else is.
 * - the import map of clients/js/README.md (```html, `<script
 *   type="importmap">`) is applied the way a browser would: dist/*.js are
 *   loaded with their bare imports pointed at the mapped files, and the
 *   MessagePack codec round-trips a message through the mapped
 *   @msgpack/msgpack. Map URLs are read as `/node_modules/<package>/<file>`.
 *
 * Usage (after `npm run build`): node scripts/check-readme.mjs
 * (`npm run check:readme` builds first; `npm test` runs it too.)
 * Scratch files go to .test-build/readme/.
 */

import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { isDeepStrictEqual } from 'node:util';

const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const REPO_ROOT = resolve(PACKAGE_ROOT, '..', '..');
const DIST = join(PACKAGE_ROOT, 'dist');
const OUT = join(PACKAGE_ROOT, '.test-build', 'readme');
const TSC = join(PACKAGE_ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
const PACKAGE_NAME = JSON.parse(readFileSync(join(PACKAGE_ROOT, 'package.json'), 'utf8')).name;

/** What to read: each README, the section holding its examples, and the blocks it must have. */
const SOURCES = [
  { file: join(REPO_ROOT, 'README.md'), section: 'JavaScript/TypeScript client', expect: ['browser', 'node'] },
  { file: join(PACKAGE_ROOT, 'README.md'), section: undefined, expect: ['browser', 'node'], importMap: true },
];

/** The application's own functions the examples call: declared so that only SDK names are checked. */
const PLACEHOLDERS = ['declare function render(data: unknown): void;', 'declare function reloadMessages(): void;'];

const problems = [];
const fail = (message) => {
  console.error(`check-readme: ${message}`);
  process.exit(1);
};

if (!existsSync(join(DIST, 'index.d.ts'))) fail('dist/ is missing: run `npm run build` first');
if (!existsSync(TSC)) fail('node_modules/typescript is missing: run `npm ci` first');

/** The fenced blocks of a markdown file: {lang, heading, line (1-based, of the first content line), text}. */
function fencedBlocks(file) {
  const lines = readFileSync(file, 'utf8').split('\n');
  const blocks = [];
  let heading = '';
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const title = /^(#{1,6})\s+(.*)$/.exec(line);
    if (title !== null) {
      heading = title[2].trim();
      blocks.push({ heading, level: title[1].length }); // a section marker
      continue;
    }
    const open = /^```(\w*)\s*$/.exec(line);
    if (open === null) continue;
    const start = i + 1;
    let end = start;
    while (end < lines.length && !/^```\s*$/.test(lines[end])) end++;
    blocks.push({ lang: open[1], heading, line: start + 1, text: lines.slice(start, end).join('\n') });
    i = end;
  }
  return blocks;
}

/** The blocks under `section` (up to the next heading of the same or a higher level), or all. */
function inSection(blocks, section) {
  if (section === undefined) return blocks.filter((b) => b.lang !== undefined);
  const at = blocks.findIndex((b) => b.lang === undefined && b.heading === section);
  if (at < 0) return [];
  const level = blocks[at].level;
  const out = [];
  for (const b of blocks.slice(at + 1)) {
    if (b.lang === undefined && b.level <= level) break;
    if (b.lang !== undefined) out.push(b);
  }
  return out;
}

const environmentOf = (block) => {
  const first = block.text.split('\n')[0] ?? '';
  const hint = first.startsWith('//') ? first : block.heading;
  return /node/i.test(hint) ? 'node' : 'browser';
};

// ---------------------------------------------------------------------------
// The TypeScript examples
// ---------------------------------------------------------------------------

rmSync(OUT, { recursive: true, force: true });
/** generated file → where its code comes from */
const origins = new Map();
const counts = { browser: 0, node: 0 };
const importMaps = [];

for (const source of SOURCES) {
  const shown = relative(REPO_ROOT, source.file);
  const blocks = inSection(fencedBlocks(source.file), source.section);
  const examples = blocks.filter((b) => b.lang === 'ts' || b.lang === 'typescript');
  const found = new Set(examples.map(environmentOf));
  for (const env of source.expect) {
    if (!found.has(env)) {
      problems.push(
        `${shown}${source.section === undefined ? '' : ` ("${source.section}")`} has no ${env} example in a \`\`\`ts block: ` +
          'was it moved? (update scripts/check-readme.mjs)',
      );
    }
  }
  for (const block of examples) {
    const env = environmentOf(block);
    counts[env]++;
    const name = `${shown.replace(/[^\w.-]+/g, '_')}-${block.line}.mts`;
    const path = join(OUT, env, name);
    mkdirSync(dirname(path), { recursive: true });
    // One header line: README line = block.line + (generated line - 2).
    writeFileSync(path, `// ${shown}:${block.line} (copied by scripts/check-readme.mjs)\n${block.text}\n`);
    origins.set(path, { shown, line: block.line });
  }
  if (source.importMap) {
    for (const block of blocks.filter((b) => b.lang === 'html')) {
      const map = /<script\s+type="importmap">([\s\S]*?)<\/script>/.exec(block.text);
      if (map !== null) importMaps.push({ shown, line: block.line, json: map[1] });
    }
    if (importMaps.length === 0) problems.push(`${shown} has no <script type="importmap"> in an \`\`\`html block`);
  }
}

for (const env of ['browser', 'node']) {
  if (counts[env] === 0) continue;
  const dir = join(OUT, env);
  writeFileSync(join(dir, 'placeholders.d.ts'), `${PLACEHOLDERS.join('\n')}\n`);
  writeFileSync(
    join(dir, 'tsconfig.json'),
    `${JSON.stringify(
      {
        compilerOptions: {
          target: 'ES2022',
          module: 'NodeNext',
          moduleResolution: 'NodeNext',
          lib: env === 'browser' ? ['ES2022', 'DOM', 'DOM.Iterable'] : ['ES2022'],
          types: env === 'browser' ? [] : ['node'],
          strict: true,
          noEmit: true,
          skipLibCheck: true,
        },
        include: ['*.mts', 'placeholders.d.ts'],
      },
      null,
      2,
    )}\n`,
  );
  const result = spawnSync(process.execPath, [TSC, '-p', join(dir, 'tsconfig.json'), '--pretty', 'false'], {
    cwd: PACKAGE_ROOT,
    encoding: 'utf8',
  });
  if (result.status === 0) continue;
  // Point the errors at the README lines.
  const output = `${result.stdout}${result.stderr}`.replace(
    /^(.+?\.mts)\((\d+),(\d+)\): /gm,
    (whole, file, line, column) => {
      const origin = origins.get(resolve(PACKAGE_ROOT, file));
      return origin === undefined ? whole : `${origin.shown}:${origin.line + Number(line) - 2}:${column}: `;
    },
  );
  problems.push(`the ${env} examples do not type-check against dist/:\n${output.trimEnd()}`);
}

// ---------------------------------------------------------------------------
// The import map
// ---------------------------------------------------------------------------

/** The file a map URL stands for: /node_modules/<package>/<path>. */
function mappedFile(url) {
  const match = /^\/node_modules\/((?:@[^/]+\/)?[^/]+)\/(.+)$/.exec(url);
  if (match === null) return undefined;
  const [, pkg, path] = match;
  return pkg === PACKAGE_NAME ? join(PACKAGE_ROOT, path) : join(PACKAGE_ROOT, 'node_modules', pkg, path);
}

/** Static import and re-export specifiers of a module (not those in comments, not dynamic ones). */
function staticSpecifiers(code) {
  const bare = code.replace(/\/\*[\s\S]*?\*\//g, '').replace(/^\s*\/\/.*$/gm, '');
  return [...bare.matchAll(/(?:^|[\s;}])(?:from|import)\s*(['"])([^'"\n]+)\1/g)].map((m) => m[2]);
}

/** Whether a browser (and Node.js) reads this file as an ES module: .mjs, or .js under "type": "module". */
function isEsModuleFile(file) {
  if (file.endsWith('.mjs')) return true;
  if (!file.endsWith('.js')) return false;
  for (let dir = dirname(file); ; dir = dirname(dir)) {
    const manifest = join(dir, 'package.json');
    if (existsSync(manifest)) return JSON.parse(readFileSync(manifest, 'utf8')).type === 'module';
    if (dirname(dir) === dir) return false;
  }
}

/** Bare specifiers anywhere in the static module graph from `entry` (relative imports followed). */
function bareImportsOf(entry) {
  const seen = new Set();
  const bare = [];
  const visit = (file) => {
    if (seen.has(file)) return;
    seen.add(file);
    for (const specifier of staticSpecifiers(readFileSync(file, 'utf8'))) {
      if (specifier.startsWith('./') || specifier.startsWith('../')) visit(resolve(dirname(file), specifier));
      else bare.push(`${relative(PACKAGE_ROOT, file)} imports '${specifier}'`);
    }
  };
  visit(entry);
  return bare;
}

async function checkImportMap({ shown, line, json }) {
  const where = `${shown}:${line} (import map)`;
  let imports;
  try {
    imports = JSON.parse(json).imports;
  } catch (error) {
    problems.push(`${where}: not JSON: ${error.message}`);
    return;
  }
  const files = new Map();
  for (const [name, url] of Object.entries(imports ?? {})) {
    const file = mappedFile(url);
    if (file === undefined) problems.push(`${where}: ${name} → ${url}: expected /node_modules/<package>/<file>`);
    else if (!existsSync(file)) problems.push(`${where}: ${name} → ${url}: ${relative(PACKAGE_ROOT, file)} does not exist`);
    else if (!isEsModuleFile(file)) problems.push(`${where}: ${name} → ${url}: not an ES module (a browser cannot import it)`);
    else files.set(name, file);
  }
  // The mapped packages' own imports must resolve in a browser too: relative, or in the map.
  for (const [name, file] of files) {
    if (name === PACKAGE_NAME) continue; // dist/ is checked below
    for (const found of bareImportsOf(file)) {
      if (!files.has(found.replace(/^.* imports '(.*)'$/, '$1'))) problems.push(`${where}: ${found}, which the map does not resolve`);
    }
  }
  if (files.get(PACKAGE_NAME) !== join(DIST, 'index.js')) {
    problems.push(`${where}: ${PACKAGE_NAME} must map to /node_modules/${PACKAGE_NAME}/dist/index.js`);
    return;
  }
  // Load dist/ as a browser would with this map: bare specifiers → the mapped files.
  const dir = join(OUT, 'importmap');
  mkdirSync(dir, { recursive: true });
  let missing = false;
  for (const name of readdirSync(DIST).filter((n) => n.endsWith('.js'))) {
    let code = readFileSync(join(DIST, name), 'utf8');
    for (const specifier of staticSpecifiers(code)) {
      if (specifier.startsWith('./') || specifier.startsWith('../')) continue;
      if (!files.has(specifier)) {
        problems.push(`${where}: dist/${name} imports '${specifier}', which the map does not resolve`);
        missing = true;
      }
    }
    for (const [specifier, file] of files) {
      code = code.split(`'${specifier}'`).join(`'${pathToFileURL(file).href}'`);
    }
    writeFileSync(join(dir, name), code);
  }
  copyFileSync(join(PACKAGE_ROOT, 'package.json'), join(dir, 'package.json')); // "type": "module"
  if (missing) return;
  try {
    const sdk = await import(pathToFileURL(join(dir, 'index.js')).href);
    if (typeof sdk.Client !== 'function') throw new Error('no Client export');
    const codec = sdk.createCodec('msgpack');
    const message = { id: 7, op: 'publish', channel: 'chat:a', data: { text: 'hi', n: [1, 2.5] } };
    const decoded = codec.decode(codec.encode([message]));
    if (!isDeepStrictEqual(decoded, [message])) throw new Error(`msgpack round trip gave ${JSON.stringify(decoded)}`);
  } catch (error) {
    problems.push(`${where}: dist/ does not load with this map: ${error.stack ?? error}`);
  }
}

for (const map of importMaps) await checkImportMap(map);

if (problems.length > 0) fail(problems.join('\n\n'));
console.log(
  `check-readme: ${counts.browser} browser and ${counts.node} Node.js examples type-check against dist/; ` +
    `${importMaps.length} import map${importMaps.length === 1 ? '' : 's'} load${importMaps.length === 1 ? 's' : ''} dist/`,
);
