// The Proxi console: plain JS, no dependencies. State comes from the server
// through two Server-Sent Event streams (policy status, audit records); the
// only write is the mode form, which carries the session's CSRF token.
'use strict';

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);
const MAX_ROWS = 200;
let current = null;
let auditSource = null;
let statusSource = null;
let lastSeq = 0;

function show(element, value) {
  element.textContent = value === null || value === undefined || value === '' ? '—' : String(value);
}

function loggedOut() {
  if (auditSource) auditSource.close();
  if (statusSource) statusSource.close();
  window.location.assign('/console');
}

async function request(path, options) {
  const response = await fetch(path, Object.assign({ credentials: 'same-origin' }, options || {}));
  if (response.status === 401) {
    loggedOut();
    throw new Error('logged out');
  }
  return response;
}

function formatLeft(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const two = (n) => String(n).padStart(2, '0');
  return (h > 0 ? h + ':' + two(m) : String(m)) + ':' + two(s);
}

function tick() {
  const countdown = $('countdown');
  if (!current || !current.emergency_expires_at) {
    countdown.textContent = '';
    return;
  }
  const left = Date.parse(current.emergency_expires_at) - Date.now();
  countdown.textContent = left > 0 ? 'expires in ' + formatLeft(left) : 'expiring…';
}

function renderStatus(status) {
  current = status;
  const mode = $('mode');
  show(mode, status.mode);
  mode.classList.toggle('elevated', status.mode !== status.default_mode);
  show($('changed-by'), status.changed_by);
  show($('changed-at'), status.changed_at);
  show($('reason'), status.reason);
  show($('expires-at'), status.emergency_expires_at);
  const select = $('mode-select');
  const modes = status.available_modes || [];
  if (select.options.length !== modes.length) {
    select.replaceChildren(...modes.map((name) => new Option(name, name)));
    const other = modes.find((name) => name !== status.mode);
    if (other) select.value = other;
  }
  tick();
}

function renderCloud(overview) {
  const services = overview.infrastructure.services || {};
  $('services').replaceChildren(...Object.entries(services).map(([name, health]) => {
    const row = document.createElement('tr');
    const cell = document.createElement('td');
    cell.textContent = name;
    const state = document.createElement('td');
    state.textContent = String(health);
    state.className = 'health-' + String(health).toLowerCase();
    row.append(cell, state);
    return row;
  }));
  show($('fleet'), overview.infrastructure.fleet_size);
  const upstreams = overview.upstreams || [];
  const items = upstreams.map((upstream) => {
    const item = document.createElement('li');
    item.textContent = upstream.name + ': ' + (upstream.up ? 'up' : 'down');
    return item;
  });
  if (items.length === 0) {
    const none = document.createElement('li');
    none.className = 'muted';
    none.textContent = 'No upstream MCP servers configured.';
    items.push(none);
  }
  $('upstreams').replaceChildren(...items);
}

let overviewPending = false;
async function refreshOverview() {
  if (overviewPending) return;
  overviewPending = true;
  try {
    const response = await request('/console/api/overview');
    if (response.ok) {
      const overview = await response.json();
      renderStatus(overview.status);
      renderCloud(overview);
    }
  } catch (error) {
    // Shown by the live indicator; the next event retries.
  } finally {
    overviewPending = false;
  }
}

function filterQuery() {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData($('audit-filters'))) {
    if (String(value).trim() !== '') params.set(name, String(value).trim());
  }
  return params;
}

function auditRow(record) {
  const row = document.createElement('tr');
  row.dataset.seq = String(record.seq);
  const cells = [record.seq, record.time, record.principal, record.kind, record.tool,
    record.mode, record.decision, record.reason_code, record.outcome];
  for (const [index, value] of cells.entries()) {
    const cell = document.createElement('td');
    show(cell, value);
    if (index === 6) cell.className = String(record.decision);
    row.append(cell);
  }
  return row;
}

function addRecord(record, fresh) {
  if (record.seq <= lastSeq) return;
  lastSeq = record.seq;
  const row = auditRow(record);
  if (fresh) row.classList.add('fresh');
  const rows = $('audit-rows');
  rows.prepend(row);
  while (rows.children.length > MAX_ROWS) rows.lastElementChild.remove();
}

function setLive(on) {
  const live = $('live');
  live.classList.toggle('on', on);
  live.classList.toggle('off', !on);
  live.textContent = on ? 'live' : 'reconnecting…';
}

async function loadAudit() {
  if (auditSource) auditSource.close();
  lastSeq = 0;
  $('audit-rows').replaceChildren();
  const params = filterQuery();
  params.set('limit', '50');
  const response = await request('/console/api/audit?' + params);
  if (!response.ok) return;
  const page = await response.json();
  for (const record of page.records) addRecord(record, false);
  const streamParams = filterQuery();
  streamParams.set('after_seq', String(lastSeq));
  // EventSource reconnects by itself and sends Last-Event-ID, so nothing is missed.
  auditSource = new EventSource('/console/api/audit/stream?' + streamParams);
  auditSource.addEventListener('record', (event) => {
    addRecord(JSON.parse(event.data), true);
    refreshOverview();
  });
  auditSource.onopen = () => setLive(true);
  auditSource.onerror = () => setLive(false);
}

function watchStatus() {
  statusSource = new EventSource('/console/api/status/stream');
  statusSource.addEventListener('status', (event) => {
    renderStatus(JSON.parse(event.data));
    refreshOverview();
  });
  statusSource.onerror = () => {
    setLive(false);
    // A closed stream (not a reconnect in progress) may mean the session ended.
    if (statusSource.readyState === EventSource.CLOSED) refreshOverview();
  };
}

async function changeMode(event) {
  event.preventDefault();
  const error = $('mode-error');
  error.textContent = '';
  const body = { mode: $('mode-select').value };
  const reason = $('mode-reason').value.trim();
  if (reason) body.reason = reason;
  const ttl = $('mode-ttl').value.trim();
  if (ttl) body.ttl_seconds = Number(ttl);
  try {
    const response = await request('/console/api/mode', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf },
      body: JSON.stringify(body),
    });
    const answer = await response.json();
    if (!response.ok) {
      error.textContent = answer.error || ('HTTP ' + response.status);
      return;
    }
    renderStatus(answer);
    $('mode-reason').value = '';
  } catch (failure) {
    error.textContent = String(failure.message || failure);
  }
}

document.addEventListener('DOMContentLoaded', () => {
  $('mode-form').addEventListener('submit', changeMode);
  $('audit-filters').addEventListener('submit', (event) => {
    event.preventDefault();
    loadAudit();
  });
  setInterval(tick, 1000);
  refreshOverview();
  watchStatus();
  loadAudit();
});
