'use strict';
// Flow files, as "Writing a client in another language" (docs/clients.md, step 1) reads
// them, and each request's digest as "The wire protocol" (docs/wire-protocol.md) defines it.

const crypto = require('node:crypto');
const fs = require('node:fs');

class FlowFileError extends Error {}

// Python's str.strip() whitespace (docs/clients.md, step 5); JavaScript's trim() differs.
const WHITESPACE = new Set([
  0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680,
  0x2000, 0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a,
  0x2028, 0x2029, 0x202f, 0x205f, 0x3000,
]);

const isSpace = (ch) => WHITESPACE.has(ch.charCodeAt(0));

function strip(text) {
  let start = 0;
  let end = text.length;
  while (start < end && WHITESPACE.has(text.charCodeAt(start))) start++;
  while (end > start && WHITESPACE.has(text.charCodeAt(end - 1))) end--;
  return text.slice(start, end);
}

const MACHINE = /^[A-Za-z0-9_][A-Za-z0-9_.-]*$/;
const PLACEHOLDER = /([:#])([A-Za-z_][A-Za-z0-9_]*)/g;

// Step 1: UTF-8, a leading byte order mark dropped; a NUL is an error.
function decode(bytes, path) {
  let text;
  try {
    // TextDecoder drops one leading BOM itself (ignoreBOM is false).
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw new FlowFileError(`${path}: not UTF-8 text; save the file as UTF-8`);
  }
  if (text.startsWith('\ufeff')) text = text.slice(1);
  return text;
}

// Step 3: tab if the first line with content has a tab outside quoted cells, else comma.
function delimiter(text) {
  let quoted = false;
  let cellStart = true;
  let tab = false;
  let content = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"') {
        if (text[i + 1] === '"') i++;
        else quoted = false;
      }
    } else if (c === '\n') {
      if (content) break;
      tab = false;
      cellStart = true;
    } else if (c === '\t') {
      tab = true;
      cellStart = true;
    } else if (c === ',') {
      content = true;
      cellStart = true;
    } else if (c === '"' && cellStart) {
      quoted = true;
      content = true;
    } else if (!isSpace(c)) {
      content = true;
      cellStart = false;
    }
  }
  return tab && content ? '\t' : ',';
}

// Step 4: CSV records with that delimiter; each with the 1-based line it starts on.
function records(text, delim, path) {
  const out = [];
  let cells = [];
  let cell = '';
  let state = 'record'; // record | field | unquoted | quoted | closing
  let line = 1;
  let startLine = 1;
  const endCell = () => {
    cells.push(cell);
    cell = '';
  };
  const endRecord = () => {
    out.push({ row: startLine, cells });
    cells = [];
    state = 'record';
  };
  for (const c of text) {
    if (state === 'record') {
      startLine = line;
      state = 'field';
      if (c === '\n') {
        endRecord();
        line++;
        continue;
      }
    }
    if (state === 'field') {
      if (c === ' ') {
        // skipped at the start of a cell
      } else if (c === '"') {
        state = 'quoted';
      } else if (c === delim) {
        endCell();
      } else if (c === '\n') {
        endCell();
        endRecord();
      } else {
        cell = c;
        state = 'unquoted';
      }
    } else if (state === 'unquoted') {
      if (c === delim) {
        endCell();
        state = 'field';
      } else if (c === '\n') {
        endCell();
        endRecord();
      } else {
        cell += c;
      }
    } else if (state === 'quoted') {
      if (c === '"') state = 'closing';
      else cell += c;
    } else if (state === 'closing') {
      if (c === '"') {
        cell += '"';
        state = 'quoted';
      } else if (c === delim) {
        endCell();
        state = 'field';
      } else if (c === '\n') {
        endCell();
        endRecord();
      } else {
        throw new FlowFileError(
          `${path}:${line}: text after the closing " of a quoted cell (expected the delimiter)`,
        );
      }
    }
    if (c === '\n') line++;
  }
  if (state === 'quoted') {
    throw new FlowFileError(`${path}:${startLine}: unterminated quoted cell`);
  }
  if (state !== 'record') {
    endCell();
    endRecord();
  }
  return out;
}

// Steps 5 to 9: the requests of one file, in order of first appearance.
function parseFlowFile(data, path = '<string>') {
  let text = typeof data === 'string' ? data.replace(/^\ufeff/, '') : decode(data, path);
  if (text.includes('\0')) throw new FlowFileError(`${path}: contains a NUL character`);
  text = text.replace(/\r\n/g, '\n').replace(/\r/g, '\n');
  const requests = new Map();
  let first = true;
  let extra = []; // the optional columns (when, each) the header names, in its order
  for (const { row, cells: raw } of records(text, delimiter(text), path)) {
    const cells = raw.map(strip);
    if (!cells.some((c) => c)) continue;
    while (cells.length > 3 && !cells[cells.length - 1]) cells.pop();
    if (cells.slice(0, 3).map((c) => c.toLowerCase()).join('\n') === 'request\nlog\nmachine') {
      if (first) {
        first = false;
        extra = cells.slice(3).map((c) => c.toLowerCase());
        if (extra.some((c, i) => !['when', 'each'].includes(c) || extra.indexOf(c) !== i)) {
          throw new FlowFileError(`${path}:${row}: the optional columns are When and Each, once each`);
        }
        continue;
      }
      throw new FlowFileError(`${path}:${row}: a header row may only be the first row`);
    }
    first = false;
    if (cells.length < 3 || cells.length > 3 + extra.length) {
      throw new FlowFileError(
        `${path}:${row}: expected ${extra.length ? `3 to ${3 + extra.length}` : 3} columns, found ${cells.length}`,
      );
    }
    const [request, log, machine] = cells;
    const optional = Object.fromEntries(extra.map((c, i) => [c, cells[3 + i] || '']));
    const when = optional.when ? canonicalCondition(optional.when, `${path}:${row}`) : '';
    const each = optional.each ? canonicalEach(optional.each, `${path}:${row}`) : '';
    ['Request', 'Log', 'Machine'].forEach((column, i) => {
      if (!cells[i]) throw new FlowFileError(`${path}:${row}: the ${column} cell is empty`);
    });
    if (log === 'next') throw new FlowFileError(`${path}:${row}: log text 'next' is reserved`);
    if (!MACHINE.test(machine)) {
      throw new FlowFileError(`${path}:${row}: machine name '${machine}' is not valid`);
    }
    if (!requests.has(request)) requests.set(request, []);
    const lines = requests.get(request);
    // A sub-flow row (@REQUEST) is no line code logs: it may repeat.
    if (!log.startsWith('@') && lines.some((l) => l.text === log)) {
      throw new FlowFileError(`${path}:${row}: log text '${log}' is already a line of ${request}`);
    }
    lines.push({ index: lines.length, text: log, machine, when, each });
  }
  if (requests.size === 0) throw new FlowFileError(`${path}: flow file has no lines`);
  const flows = new Map();
  for (const [name, lines] of requests) flows.set(name, makeFlow(name, lines));
  return flows;
}

function makeFlow(name, lines) {
  const secrets = [];
  for (const line of lines) {
    for (const [, sigil, key] of line.text.matchAll(PLACEHOLDER)) {
      if (sigil === '#' && !secrets.includes(key)) secrets.push(key);
    }
  }
  const hashed = pyJson([name, lines.map(hashedRow)]);
  return { name, lines, secrets, hashed, digest: digestOf(hashed) };
}

// A row as the digest hashes it: [log, machine], or [log, machine, when, each] when it has
// a When or an Each cell (docs/control-flow.md), each in its canonical spelling.
function hashedRow(line) {
  return line.when || line.each ? [line.text, line.machine, line.when, line.each] : [line.text, line.machine];
}

// A When cell's canonical spelling (docs/wire-protocol.md#digest): its tokens as written,
// one space apart, none inside brackets or before a comma; a string literal unchanged. The
// peers check the grammar itself; this only reads the tokens.
const TOKEN = new RegExp(
  [
    '\\s*(?:("(?:[^"\\\\\\x00-\\x1f]|\\\\(?:["\\\\/bfnrt]|u[0-9a-fA-F]{4}))*")',
    '(-?(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?![A-Za-z0-9_.]))',
    '(==|!=|<=|>=|<|>)',
    '([\\[\\],])',
    '([A-Za-z_][A-Za-z0-9_]*))',
  ].join('|'),
  'y',
);

function canonicalCondition(cell, where) {
  const tokens = [];
  const end = cell.trimEnd().length;
  TOKEN.lastIndex = 0;
  while (TOKEN.lastIndex < end) {
    const at = TOKEN.lastIndex;
    const m = TOKEN.exec(cell);
    if (!m || TOKEN.lastIndex === at) {
      throw new FlowFileError(`${where}: cannot read the condition ${JSON.stringify(cell)}`);
    }
    const value = m.slice(1).find((g) => g !== undefined);
    tokens.push({ punct: m[4] !== undefined, value });
  }
  let out = '';
  for (const { punct, value } of tokens) {
    if (out && !(out.endsWith('[') || (punct && (value === ',' || value === ']')))) out += ' ';
    out += value;
  }
  return out;
}

// An Each cell's canonical spelling: KEY, or KEY as NAME unless NAME is KEY_results.
function canonicalEach(cell, where) {
  const words = cell.split(/\s+/).filter((w) => w);
  if (words.length === 1) return words[0];
  if (words.length === 3 && words[1] === 'as') {
    return words[2] === `${words[0]}_results` ? words[0] : words.join(' ');
  }
  throw new FlowFileError(`${where}: Each ${JSON.stringify(cell)} is not KEY or KEY as NAME`);
}

// Several files: a request may be defined in one of them only.
function loadFlows(paths) {
  const flows = new Map();
  for (const path of paths) {
    for (const [name, flow] of parseFlowFile(fs.readFileSync(path), path)) {
      if (flows.has(name)) {
        throw new FlowFileError(`${path}: request '${name}' is already defined in another file`);
      }
      flows.set(name, flow);
    }
  }
  return flows;
}

// The JSON text the digest hashes: Python's json.dumps with its defaults.
function pyJson(value) {
  if (Array.isArray(value)) return `[${value.map(pyJson).join(', ')}]`;
  if (typeof value !== 'string') throw new TypeError('only strings and arrays are hashed');
  const short = { '"': '\\"', '\\': '\\\\', '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r', '\t': '\\t' };
  let out = '"';
  // UTF-16 code units: a character beyond U+FFFF comes out as its surrogate pair.
  for (let i = 0; i < value.length; i++) {
    const c = value[i];
    const code = value.charCodeAt(i);
    if (short[c]) out += short[c];
    else if (code >= 0x20 && code <= 0x7e) out += c;
    else out += `\\u${code.toString(16).padStart(4, '0')}`;
  }
  return `${out}"`;
}

function digestOf(hashed) {
  return crypto.createHash('sha256').update(hashed, 'utf8').digest('hex').slice(0, 16);
}

module.exports = { FlowFileError, hashedRow, loadFlows, parseFlowFile, pyJson, PLACEHOLDER };
