#!/usr/bin/env node
'use strict';
// Start a mesh flow from Node.js and print its result as one JSON object:
//
//   node cli.js REQUEST [key=value | key:=json ...] --flow FILE --machine NAME=ADDRESS ...
//       [--as MACHINE] [--timeout SECONDS] [--token-file FILE] [--ca F --cert F --key F]
//
// --as plays an address-less machine of the flow (its lines run here); without it the
// client stands outside the mesh. $MESH_TOKEN is the token when --token-file is not given.

const fs = require('node:fs');
const { FlowFailed, MeshClient, loadFlows } = require('./mesh');

function parse(argv) {
  const opts = { flows: [], machines: {}, context: {}, tls: {} };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === '--flow') opts.flows.push(value());
    else if (arg === '--machine') {
      const [name, ...address] = value().split('=');
      opts.machines[name] = address.join('=');
    } else if (arg === '--as') opts.as = value();
    else if (arg === '--timeout') opts.timeout = Number(value());
    else if (arg === '--token-file') opts.token = fs.readFileSync(value(), 'utf8').trim();
    else if (arg === '--ca' || arg === '--cert' || arg === '--key') opts.tls[arg.slice(2)] = value();
    else rest.push(arg);
  }
  [opts.request, ...opts.params] = rest;
  if (!opts.request) throw new Error('usage: node cli.js REQUEST [key=value ...] --flow FILE --machine NAME=ADDRESS');
  for (const param of opts.params) {
    const json = param.match(/^([^=:]+):=(.*)$/s);
    const plain = param.match(/^([^=]+)=(.*)$/s);
    if (json) opts.context[json[1]] = JSON.parse(json[2]);
    else if (plain) opts.context[plain[1]] = plain[2];
    else throw new Error(`argument ${param}: expected key=value or key:=json`);
  }
  return opts;
}

async function main() {
  const opts = parse(process.argv.slice(2));
  const flows = loadFlows(opts.flows);
  const client = new MeshClient({
    flows,
    machine: opts.as || null,
    machines: opts.machines,
    timeout: opts.timeout || 30,
    token: opts.token || process.env.MESH_TOKEN || null,
    tls: Object.keys(opts.tls).length ? opts.tls : null,
  });
  try {
    const result = await client.start(opts.request, opts.context);
    console.log(JSON.stringify({
      request: result.request,
      flow_id: result.flowId,
      digest: flows.get(opts.request).digest,
      context: result.masked,
      steps: result.steps,
    }));
    return 0;
  } catch (err) {
    if (!(err instanceof FlowFailed)) throw err;
    const { kind, machine, line_index, error_type, address, code, flowId, steps } = err;
    console.log(JSON.stringify({ request: opts.request, flow_id: flowId, error: {
      kind, machine, line_index, error_type, address, code, message: err.message }, steps }));
    console.error(`error: ${err.message}`);
    return 1;
  } finally {
    client.close();
  }
}

main().then((code) => process.exit(code), (err) => {
  console.error(`error: ${err.message}`);
  process.exit(2);
});
