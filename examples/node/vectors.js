#!/usr/bin/env node
'use strict';
// Check this client's flow-file reading and digests against the mesh's test vectors:
//   node vectors.js [../../protos/mesh/v1/testdata/digests.json]
// Needs no gRPC: only lib/flowfile.js.

const fs = require('node:fs');
const path = require('node:path');
const { hashedRow, parseFlowFile } = require('./lib/flowfile');

const file = process.argv[2] || path.join(__dirname, '..', '..', 'protos', 'mesh', 'v1', 'testdata', 'digests.json');
const { cases } = JSON.parse(fs.readFileSync(file, 'utf8'));
const problems = [];
let requests = 0;
for (const c of cases) {
  let flows;
  try {
    flows = parseFlowFile(c.file, 'vector');
  } catch (err) {
    problems.push(`${c.name}: ${err.message}`);
    continue;
  }
  const names = [...flows.keys()];
  const wanted = c.requests.map((r) => r.request);
  if (JSON.stringify(names) !== JSON.stringify(wanted)) {
    problems.push(`${c.name}: requests ${JSON.stringify(names)}, expected ${JSON.stringify(wanted)}`);
  }
  for (const want of c.requests) {
    requests++;
    const flow = flows.get(want.request);
    if (!flow) continue;
    const lines = flow.lines.map(hashedRow);
    const checks = [
      ['lines', JSON.stringify(lines), JSON.stringify(want.lines)],
      ['secrets', JSON.stringify(flow.secrets), JSON.stringify(want.secrets)],
      ['hashed', flow.hashed, want.hashed],
      ['digest', flow.digest, want.digest],
    ];
    for (const [what, got, expected] of checks) {
      if (got !== expected) problems.push(`${c.name}: ${want.request} ${what}: ${got}, expected ${expected}`);
    }
  }
}
for (const p of problems) console.log(`MISMATCH ${p}`);
console.log(`${cases.length} cases, ${requests} requests: ${problems.length ? `${problems.length} mismatches` : 'every digest agrees'}`);
process.exit(problems.length ? 1 : 0);
