// The Proxi console: plain JS, no dependencies. State comes from the server
// through three Server-Sent Event streams (policy status, audit records, pending
// approvals); the writes (the mode form, approve and deny) carry the session's
// CSRF token.
'use strict';

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);
const MAX_ROWS = 200;
let current = null;
let auditSource = null;
let statusSource = null;
let approvalsSource = null;
let lastSeq = 0;
const MAX_REASON = 500;

function show(element, value) {
  element.textContent = value === null || value === undefined || value === '' ? '—' : String(value);
}

// Set once the page is going away (logout submitted, or the session ended), so
// the streams' errors during that navigation do not start another one.
let leaving = false;

function closeStreams() {
  for (const source of [auditSource, statusSource, approvalsSource]) {
    if (source) source.close();
  }
}

function loggedOut() {
  if (leaving) return;
  leaving = true;
  closeStreams();
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
  tickApprovals();
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
    const name = document.createElement('strong');
    name.textContent = upstream.name;
    const state = document.createElement('span');
    state.className = upstream.up ? 'health-healthy' : 'health-critical';
    state.textContent = upstream.up ? 'up' : 'down';
    const facts = [upstream.transport];
    if (upstream.tools !== null && upstream.tools !== undefined) facts.push(upstream.tools + ' tools');
    if (upstream.required) facts.push('required');
    const detail = document.createElement('span');
    detail.className = 'muted';
    detail.textContent = ' (' + facts.join(', ') + ')' + (!upstream.up && upstream.last_error ? ': ' + upstream.last_error : '');
    item.append(name, ': ', state, detail);
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

// Runs `fetchAndRender` at most once at a time; a call while one is in flight
// asks for one more run after it (that run may read state the first one missed),
// so a burst of events costs at most two fetches and none is lost.
function coalesced(fetchAndRender) {
  let running = false;
  let again = false;
  return async function run() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      do {
        again = false;
        try {
          await fetchAndRender();
        } catch (error) {
          // Shown by the live indicator; the next event retries.
        }
      } while (again);
    } finally {
      running = false;
    }
  };
}

const refreshOverview = coalesced(async () => {
  const response = await request('/console/api/overview');
  if (response.ok) {
    const overview = await response.json();
    renderStatus(overview.status);
    renderCloud(overview);
  }
});

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
    const record = JSON.parse(event.data);
    addRecord(record, true);
    refreshOverview();
    // Approvals decided on another instance sharing the store reach this page as
    // records only; the approvals stream covers this server's own changes.
    if (record.kind === 'approval' || String(record.reason_code || '').startsWith('approval_')) {
      refreshApprovals();
    }
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
  // An upstream started, crashed or came back: its health, with no call needed.
  statusSource.addEventListener('upstreams', () => refreshOverview());
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
    // Offer the way back next (NORMAL after an elevation).
    const other = Array.from($('mode-select').options).find((option) => option.value !== answer.mode);
    if (other) $('mode-select').value = other.value;
  } catch (failure) {
    error.textContent = String(failure.message || failure);
  }
}

// Pending approvals: one list item per approval, keyed by id, so a list that
// arrives while an operator types a reason keeps what was typed.

function argumentSummary(approval) {
  const args = approval.arguments;
  if (approval.kind === 'mode_change') {
    const ttl = args && args.ttl_seconds ? ' for ' + args.ttl_seconds + ' s' : '';
    return 'switch to ' + approval.target + ttl;
  }
  if (args && typeof args === 'object' && typeof args.sha256 === 'string' && 'prefix' in args) {
    return String(args.prefix) + '… (' + args.bytes + ' bytes, sha256 ' + args.sha256.slice(0, 12) + '…)';
  }
  if (args && typeof args === 'object' && !Array.isArray(args)) {
    const pairs = Object.entries(args).map(([name, value]) => name + '=' + JSON.stringify(value));
    return pairs.length ? pairs.join(', ') : '(no arguments)';
  }
  return args === null || args === undefined ? '(no arguments)' : JSON.stringify(args);
}

function fact(list, label, value, className) {
  const term = document.createElement('dt');
  term.textContent = label;
  const detail = document.createElement('dd');
  show(detail, value);
  if (className) detail.className = className;
  list.append(term, detail);
  return detail;
}

function approvalItem(approval) {
  const item = document.createElement('li');
  item.className = 'approval';
  item.dataset.approvalId = approval.id;
  item.dataset.expiresAt = approval.expires_at;
  item.dataset.principal = approval.principal;

  const head = document.createElement('p');
  head.className = 'approval-head';
  const kind = document.createElement('span');
  kind.className = 'kind';
  kind.textContent = approval.kind === 'mode_change' ? 'mode change' : 'tool call';
  const target = document.createElement('strong');
  target.className = 'approval-target';
  target.textContent = approval.target;
  const countdown = document.createElement('span');
  countdown.className = 'approval-countdown';
  head.append(kind, target, countdown);

  const facts = document.createElement('dl');
  facts.className = 'facts';
  fact(facts, 'Id', approval.id, 'approval-id');
  fact(facts, 'Requested by', approval.principal + ' (' + approval.role + ')', 'approval-principal');
  fact(facts, 'Arguments', argumentSummary(approval), 'approval-arguments');
  if (approval.reason) fact(facts, 'Their reason', approval.reason);
  fact(facts, 'In mode', approval.mode);
  fact(facts, 'Created', approval.created_at);
  fact(facts, 'Expires', approval.expires_at);

  const form = document.createElement('form');
  form.className = 'decide';
  form.noValidate = true; // the page says what is missing, in words
  const label = document.createElement('label');
  const reasonId = 'reason-' + approval.id;
  label.htmlFor = reasonId;
  label.textContent = 'Reason (required)';
  const reason = document.createElement('input');
  reason.id = reasonId;
  reason.className = 'approval-reason';
  reason.type = 'text';
  reason.maxLength = MAX_REASON;
  reason.required = true;
  reason.placeholder = 'why you approve or deny';
  const buttons = document.createElement('div');
  buttons.className = 'buttons';
  const approve = document.createElement('button');
  approve.type = 'submit';
  approve.className = 'approve';
  approve.value = 'approve';
  approve.textContent = 'Approve';
  const deny = document.createElement('button');
  deny.type = 'submit';
  deny.className = 'deny';
  deny.value = 'deny';
  deny.textContent = 'Deny';
  buttons.append(approve, deny);
  const error = document.createElement('p');
  error.className = 'error approval-error';
  error.setAttribute('role', 'alert');
  form.append(label, reason, buttons, error);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const verdict = event.submitter && event.submitter.value === 'deny' ? 'deny' : 'approve';
    decideApproval(approval.id, verdict, item);
  });

  item.append(head, facts, form);
  return item;
}

function renderApprovals(list) {
  const approvals = (list && list.approvals) || [];
  const container = $('approvals');
  const existing = new Map();
  for (const item of container.children) existing.set(item.dataset.approvalId, item);
  const items = approvals.map((approval) => existing.get(approval.id) || approvalItem(approval));
  container.replaceChildren(...items);
  show($('approvals-count'), String(approvals.length));
  $('approvals-count').classList.toggle('waiting', approvals.length > 0);
  $('approvals-empty').hidden = approvals.length > 0;
  $('approvals-error').textContent = '';
  tickApprovals();
}

function tickApprovals() {
  const now = Date.now();
  for (const item of $('approvals').children) {
    const left = Date.parse(item.dataset.expiresAt) - now;
    const countdown = item.querySelector('.approval-countdown');
    const expired = !(left > 0);
    countdown.textContent = expired ? 'expired' : 'expires in ' + formatLeft(left);
    item.classList.toggle('expired', expired);
    for (const button of item.querySelectorAll('button')) {
      if (expired) button.disabled = true;
    }
  }
}

const refreshApprovals = coalesced(async () => {
  const response = await request('/console/api/approvals');
  if (response.ok) renderApprovals(await response.json());
});

async function decideApproval(id, verdict, item) {
  const error = item.querySelector('.approval-error');
  const input = item.querySelector('.approval-reason');
  const reason = input.value.trim();
  error.textContent = '';
  if (!reason) {
    error.textContent = 'A reason is required.';
    return;
  }
  if (reason.length > MAX_REASON) {
    error.textContent = 'A reason is at most ' + MAX_REASON + ' characters.';
    return;
  }
  const buttons = item.querySelectorAll('button');
  for (const button of buttons) button.disabled = true;
  try {
    const response = await request('/console/api/approvals/' + encodeURIComponent(id) + '/' + verdict, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf },
      body: JSON.stringify({ reason }),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      error.textContent = answer.error || ('HTTP ' + response.status);
      return;
    }
    item.remove();
    refreshApprovals();
  } catch (failure) {
    error.textContent = String(failure.message || failure);
  } finally {
    for (const button of buttons) button.disabled = false;
    tickApprovals();
  }
}

function watchApprovals() {
  approvalsSource = new EventSource('/console/api/approvals/stream');
  approvalsSource.addEventListener('approvals', (event) => renderApprovals(JSON.parse(event.data)));
  approvalsSource.addEventListener('approvals_unavailable', (event) => {
    $('approvals-error').textContent = event.data;
  });
  approvalsSource.onopen = () => {
    if (auditSource && auditSource.readyState === EventSource.OPEN) setLive(true);
  };
  approvalsSource.onerror = () => {
    setLive(false);
    if (approvalsSource.readyState === EventSource.CLOSED) refreshApprovals();
  };
}

document.addEventListener('DOMContentLoaded', () => {
  $('mode-form').addEventListener('submit', changeMode);
  $('logout').addEventListener('submit', () => {
    leaving = true;
    closeStreams();
  });
  $('audit-filters').addEventListener('submit', (event) => {
    event.preventDefault();
    loadAudit();
  });
  setInterval(tick, 1000);
  refreshOverview();
  watchStatus();
  watchApprovals();
  loadAudit();
});
