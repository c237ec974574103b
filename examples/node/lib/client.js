'use strict';
// The originator's algorithm of "Writing a client in another language" (docs/clients.md):
// start a flow from outside the mesh, or play an address-less machine of it, calling the
// other machines with the unary Continue of "The wire protocol" (docs/wire-protocol.md).

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const { maskedContext, render, scrub, secretTexts } = require('./render');

const DEFAULT_PROTO = path.join(__dirname, '..', '..', '..', 'protos', 'mesh', 'v1', 'mesh.proto');
const RETRIES = 4; // resends of the same bytes after UNAVAILABLE, within the deadline

// A flow that did not finish: `kind` is a Failure kind (STEP, UNAVAILABLE, REFUSED,
// TIMEOUT); the other fields name where, as the Failure message does.
class FlowFailed extends Error {
  constructor(message, fields) {
    super(message);
    Object.assign(this, fields);
  }
}

function loadMesh(protoPath = DEFAULT_PROTO) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true, // field names as in the proto: line_index, flow_id, hand_off
    longs: Number,
    enums: String, // Failure.kind as "STEP", "UNAVAILABLE", ...
    bytes: Buffer,
    defaults: true,
    oneofs: true, // reply.outcome is "done", "hand_off" or "failed"
  });
  return grpc.loadPackageDefinition(definition).mesh.v1;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class MeshClient {
  // flows: from loadFlows(); machine: the machine played, or a name of your own outside
  // the mesh (null: name none); machines: { name: address }; timeout: seconds;
  // token: the shared token; tls: { ca, cert, key } (PEM contents or file paths);
  // handlers: { request: { lineText: async (context) => updates } } for your own lines.
  constructor({ flows, machine = null, machines, timeout = 30, token = null, tls = null,
    handlers = {}, protoPath }) {
    this.flows = flows;
    this.machine = machine;
    this.machines = machines;
    this.timeout = timeout;
    this.token = token;
    this.tls = tls;
    this.handlers = handlers;
    this.mesh = loadMesh(protoPath);
    this.stubs = new Map();
  }

  stub(machine) {
    if (!this.stubs.has(machine)) {
      const address = this.machines[machine];
      if (!address) throw new Error(`${machine} has no address`);
      let credentials = grpc.credentials.createInsecure();
      const options = {};
      if (this.tls) {
        const pem = (v) => (v ? (v.includes('-----BEGIN') ? Buffer.from(v) : fs.readFileSync(v)) : null);
        credentials = grpc.credentials.createSsl(pem(this.tls.ca), pem(this.tls.key), pem(this.tls.cert));
        options['grpc.ssl_target_name_override'] = machine; // the certificate names the machine
      }
      this.stubs.set(machine, new this.mesh.Mesh(address, credentials, options));
    }
    return this.stubs.get(machine);
  }

  close() {
    for (const stub of this.stubs.values()) stub.close();
    this.stubs.clear();
  }

  // Run flow `request` from line 0 with `context`; resolves { flowId, context, steps }.
  async start(request, context = {}) {
    const flow = this.flows.get(request);
    if (!flow) throw new Error(`no request ${request} in the flow files`);
    const me = this.machine;
    const flowId = crypto.randomBytes(16).toString('hex');
    const deadline = Date.now() + this.timeout * 1000;
    const steps = [];
    let ctx = { ...context };
    let index = 0;
    const fail = (message, fields) => {
      const masked = scrub(message, secretTexts(flow, ctx));
      return new FlowFailed(masked, { request, flowId, steps, ...fields });
    };
    while (index < flow.lines.length) {
      const line = flow.lines[index];
      if (Date.now() >= deadline) {
        throw fail(`${request} passed its deadline before line ${index} '${line.text}'`, {
          kind: 'TIMEOUT', machine: me, line_index: index, error_type: 'FlowTimeout' });
      }
      if (line.machine === me) {
        ctx = await this.runHere(flow, index, ctx, steps, fail);
        index += 1;
        continue;
      }
      const call = {
        request,
        line_index: index,
        context: Buffer.from(JSON.stringify(ctx), 'utf8'),
        flow_id: flowId,
        digest: flow.digest,
        via: me ? [me] : [],
      };
      const reply = await this.call(line.machine, call, deadline, fail);
      const problem = misrouted(flow, me, index, reply);
      if (problem) {
        throw fail(`${line.machine} at ${this.machines[line.machine]} ${problem}`, {
          kind: 'REFUSED', machine: line.machine, line_index: index, error_type: 'PeerRefused' });
      }
      for (const s of reply.steps) {
        steps.push({ index: s.line_index, line: s.line, machine: s.machine, start: s.start,
          duration: s.duration });
      }
      if (reply.outcome === 'failed') {
        const f = reply.failed;
        throw fail(f.message, { kind: f.kind, machine: f.machine, line_index: f.line_index,
          error_type: f.error_type, address: f.address });
      }
      const outcome = reply[reply.outcome];
      ctx = JSON.parse(outcome.context.toString('utf8') || '{}');
      if (reply.outcome === 'done') break;
      index = outcome.line_index; // a hand-off back to us
    }
    return { flowId, request, context: ctx, masked: maskedContext(flow, ctx), steps };
  }

  // A line of ours: render it (secrets masked), run its handler if any, time it.
  async runHere(flow, index, ctx, steps, fail) {
    const line = flow.lines[index];
    const start = Date.now() / 1000;
    const t0 = process.hrtime.bigint();
    const rendered = render(flow, index, ctx);
    console.error(`[${this.machine}] ${flow.name} ${index}: ${rendered}`);
    const handler = (this.handlers[flow.name] || {})[line.text];
    if (handler) {
      try {
        ctx = { ...ctx, ...((await handler(ctx)) || {}) };
      } catch (err) {
        const name = err && err.constructor ? err.constructor.name : 'Error';
        throw fail(`${flow.name} line ${index} "${line.text}" failed on ${this.machine}: ${name}: ${err.message}`,
          { kind: 'STEP', machine: this.machine, line_index: index, error_type: name });
      }
    }
    const duration = Number(process.hrtime.bigint() - t0) / 1e9;
    steps.push({ index, line: rendered, machine: this.machine, start, duration });
    return ctx;
  }

  // One Continue, resent as it is after UNAVAILABLE (the peer runs a step once).
  async call(machine, request, deadline, fail) {
    const address = this.machines[machine];
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    const where = `${request.request} line ${request.line_index}`;
    for (let attempt = 0; ; attempt++) {
      let stub;
      try {
        stub = this.stub(machine);
      } catch (err) {
        throw fail(`${machine} is unavailable (for ${where}): ${err.message}`, {
          kind: 'UNAVAILABLE', machine, address: '', line_index: request.line_index,
          error_type: 'PeerUnavailable' });
      }
      try {
        return await new Promise((resolve, reject) => {
          stub.Continue(request, metadata, { deadline: new Date(deadline) }, (err, reply) =>
            (err ? reject(err) : resolve(reply)));
        });
      } catch (err) {
        const code = err.code;
        const fields = { machine, address, line_index: request.line_index, code };
        const details = err.details || grpc.status[code];
        if (code === grpc.status.UNAVAILABLE && attempt < RETRIES && Date.now() + 50 < deadline) {
          await sleep(Math.min(50 * 2 ** attempt, 1000, Math.max(deadline - Date.now() - 50, 0)));
          continue;
        }
        if (code === grpc.status.DEADLINE_EXCEEDED) {
          throw fail(`${request.request} timed out waiting for ${machine} (${address}) at line ${request.line_index}`,
            { ...fields, kind: 'TIMEOUT', error_type: 'FlowTimeout' });
        }
        if (code === grpc.status.UNAVAILABLE) {
          throw fail(`${machine} is unavailable at ${address} (for ${where}): ${details}`,
            { ...fields, kind: 'UNAVAILABLE', error_type: 'PeerUnavailable' });
        }
        const denied = code === grpc.status.UNAUTHENTICATED || code === grpc.status.PERMISSION_DENIED;
        throw fail(`${machine} at ${address} refused ${where}: ${details} (${statusName(code)})`,
          { ...fields, kind: 'REFUSED', error_type: denied ? 'AccessDenied' : 'PeerRefused' });
      }
    }
  }
}

function statusName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
}

// Why a done or hand-off reply to the call for line `index` is one no honest peer sends,
// or null (docs/clients.md, step 5): the flow must come back exactly at our next line.
function misrouted(flow, me, index, reply) {
  if (reply.outcome === 'failed') return null;
  if (!reply.outcome) return 'sent a reply with no outcome';
  const lines = flow.lines;
  let back = index + 1;
  while (back < lines.length && lines[back].machine !== me) back++;
  if (reply.outcome === 'hand_off') {
    const { machine, line_index: line } = reply.hand_off;
    if (machine !== me || line !== back) {
      return `handed ${flow.name} line ${line} back to ${machine}, but line ${back} is ours next`;
    }
  } else if (back < lines.length) {
    return `said ${flow.name} is done, but line ${back} '${lines[back].text}' is ours next`;
  }
  const steps = reply.steps;
  if (!steps.length || steps[0].line_index !== index || steps[steps.length - 1].line_index !== back - 1) {
    return `replied for ${flow.name} lines ${index} to ${back - 1} with other steps`;
  }
  return null;
}

module.exports = { FlowFailed, MeshClient, loadMesh, misrouted };
