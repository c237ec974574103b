'use strict';
// A mesh client for Node.js, written from the mesh's docs alone: "The wire protocol" and
// "Writing a client in another language" (docs/wire-protocol.md, docs/clients.md).

const { FlowFileError, loadFlows, parseFlowFile, pyJson } = require('./lib/flowfile');
const { maskedContext, render } = require('./lib/render');
const { FlowFailed, MeshClient, misrouted } = require('./lib/client');

module.exports = {
  FlowFailed,
  FlowFileError,
  MeshClient,
  loadFlows,
  maskedContext,
  misrouted,
  parseFlowFile,
  pyJson,
  render,
};
