'use strict';
// Rendering a line from the context, secrets masked (docs/clients.md, step 2).

const { PLACEHOLDER } = require('./flowfile');

const MASK = '***';
const SCRUB_MIN = 4; // shorter secret values are left alone: they would mangle words

function asText(value) {
  if (typeof value === 'string') return value;
  if (typeof value === 'number' || typeof value === 'bigint') return String(value);
  return JSON.stringify(value);
}

// The texts of the flow's secret values, longest first, to scrub from what is shown.
function secretTexts(flow, context) {
  const texts = [];
  const collect = (value) => {
    if (value === null || value === undefined) return;
    if (Array.isArray(value)) value.forEach(collect);
    else if (typeof value === 'object') Object.entries(value).forEach(([k, v]) => (collect(k), collect(v)));
    else texts.push(asText(value));
  };
  for (const name of flow.secrets) collect(context[name]);
  return texts.filter((t) => t.length >= SCRUB_MIN).sort((a, b) => b.length - a.length);
}

function scrub(text, texts) {
  for (const secret of texts) text = text.split(secret).join(MASK);
  return text;
}

function render(flow, index, context) {
  const rendered = flow.lines[index].text.replace(PLACEHOLDER, (written, _sigil, name) => {
    if (!Object.hasOwn(context, name)) return written;
    return flow.secrets.includes(name) ? MASK : asText(context[name]);
  });
  return scrub(rendered, secretTexts(flow, context));
}

// The context as it may be shown: secret keys as ***, their values scrubbed elsewhere.
function maskedContext(flow, context) {
  const texts = secretTexts(flow, context);
  const clean = (value) => {
    if (typeof value === 'string') return scrub(value, texts);
    if (Array.isArray(value)) return value.map(clean);
    if (value && typeof value === 'object') {
      return Object.fromEntries(Object.entries(value).map(([k, v]) => [scrub(k, texts), clean(v)]));
    }
    return value;
  };
  return Object.fromEntries(
    Object.entries(context).map(([k, v]) => [k, flow.secrets.includes(k) ? MASK : clean(v)]),
  );
}

module.exports = { MASK, maskedContext, render, scrub, secretTexts };
