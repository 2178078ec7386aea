// The crr console: a page per hash route, drawn from the JSON API of `crr console`.
// No framework: `el()` builds DOM nodes (text is always set as text, never as HTML).
'use strict';
(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const app = document.getElementById('app');
  const STATUS_EVERY_MS = 2000;
  const SERIES_EVERY_MS = 10000;
  let timers = [];
  let charts = [];
  let verifySource = null;

  // ---- small helpers ------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  async function api(method, path, body) {
    const init = { method, headers: { 'x-crr-csrf': csrf } };
    if (body !== undefined) {
      init.headers['content-type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      return { ok: false, status: 0, data: { error: `the console server did not answer (${e.message})` } };
    }
    let data = null;
    try { data = await res.json(); } catch (_) { data = { error: `${res.status} ${res.statusText}` }; }
    return { ok: res.ok, status: res.status, data };
  }

  function toast(text, kind) {
    const t = el('div', { class: `toast ${kind || ''}`, role: kind === 'error' ? 'alert' : 'status' }, text);
    document.getElementById('toasts').append(t);
    setTimeout(() => t.remove(), kind === 'error' ? 9000 : 4500);
  }

  const fmt = {
    count(n) {
      if (n === null || n === undefined) return '–';
      if (n < 1000) return String(n);
      const units = [['B', 1e9], ['M', 1e6], ['k', 1e3]];
      for (const [u, v] of units) if (n >= v) return `${(n / v).toFixed(n >= 10 * v ? 0 : 1)}${u}`;
      return String(n);
    },
    bytes(n) {
      if (n === null || n === undefined) return '–';
      const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
      let i = 0;
      let v = n;
      while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
      return `${v.toFixed(i === 0 || v >= 100 ? 0 : 1)} ${units[i]}`;
    },
    duration(s) {
      if (s === null || s === undefined) return '–';
      if (s < 60) return `${Math.round(s)} s`;
      if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
      if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
      return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
    },
    time(iso) {
      if (!iso) return '–';
      const d = new Date(iso);
      const today = new Date().toDateString() === d.toDateString();
      return today ? d.toLocaleTimeString() : d.toLocaleString();
    },
    percent(p) {
      if (p === null || p === undefined) return '–';
      return `${p >= 99.95 && p < 100 ? '99.9' : p.toFixed(p >= 10 ? 0 : 1)}%`;
    },
  };

  function badge(text, kind) {
    return el('span', { class: `badge ${kind || ''}`, 'data-badge': text }, text);
  }

  const REALTIME_LABEL = {
    caught_up: ['Caught up', 'ok'],
    catching_up: ['Catching up', 'warn'],
    paused: ['Paused', 'muted'],
    unknown: ['Queue not watched', 'muted'],
    not_receiving_events: ['Not receiving events', 'bad'],
    refused: ['Refused', 'bad'],
  };
  const HISTORICAL_LABEL = {
    not_requested: ['Not requested', 'muted'],
    pending: ['Pending', 'muted'],
    running: ['Running', 'info'],
    completed: ['Completed', 'ok'],
    completed_with_failures: ['Completed with failures', 'warn'],
    failed: ['Failed', 'bad'],
    paused: ['Paused', 'muted'],
  };

  function stateBadge(map, state) {
    const [label, kind] = map[state] || [state, 'muted'];
    return badge(label, kind);
  }

  function bar(kind, percent, label) {
    const fill = el('div', { class: 'bar-fill' });
    fill.style.width = `${Math.max(0, Math.min(100, percent || 0))}%`;
    return el('div', { class: 'bar-row' },
      el('span', { class: 'bar-label' }, kind === 'objects' ? 'Objects' : 'Bytes'),
      el('div', {
        class: 'bar', role: 'progressbar', 'data-bar': kind,
        'data-percent': percent === null || percent === undefined ? '' : percent.toFixed(2),
        'aria-valuemin': 0, 'aria-valuemax': 100,
        'aria-valuenow': percent === null || percent === undefined ? null : Math.round(percent),
        'aria-label': `${kind} migrated`,
      }, fill),
      el('span', { class: 'bar-text' }, label));
  }

  function where(b) {
    return el('span', { class: 'bucket' }, el('strong', {}, b.bucket), el('span', { class: 'region' }, b.region));
  }

  function prefixes(list) {
    if (!list || list.length === 0) return el('span', { class: 'muted' }, 'All objects');
    return el('span', { class: 'prefixes' }, list.map((p) => el('code', {}, p)));
  }

  function clearPage() {
    timers.forEach(clearInterval);
    timers = [];
    charts.forEach((c) => c.destroy && c.destroy());
    charts = [];
    if (verifySource) { verifySource.close(); verifySource = null; }
    app.replaceChildren();
  }

  function every(ms, fn) {
    fn();
    timers.push(setInterval(fn, ms));
  }

  function live(ok) {
    const l = document.getElementById('live');
    l.classList.toggle('stale', !ok);
    l.textContent = ok ? 'live' : 'reconnecting';
  }

  // ---- rules overview ---------------------------------------------------------------
  function realtimeCell(rt) {
    return el('div', { class: 'cell-realtime' },
      el('div', {}, stateBadge(REALTIME_LABEL, rt.state)),
      el('div', { class: 'kv' }, 'Synced up to ', el('strong', { 'data-field': 'synced_up_to' }, fmt.time(rt.synced_up_to))),
      el('div', { class: 'kv' }, 'Lag ', el('strong', { 'data-field': 'lag' }, rt.lag_seconds === null ? '–' : fmt.duration(rt.lag_seconds)),
        ' · pending ', el('strong', { 'data-field': 'pending' }, fmt.count(rt.pending))),
      el('div', { class: 'counts' },
        el('span', { 'data-field': 'replicated' }, `${fmt.count(rt.replicated_objects)} replicated`), ' · ',
        el('span', { 'data-field': 'deletes' }, `${fmt.count(rt.deletes)} deletes`), ' · ',
        el('span', { 'data-field': 'suppressed' }, `${fmt.count(rt.suppressed_deletes)} suppressed`), ' · ',
        el('span', { 'data-field': 'failed', class: rt.failed > 0 ? 'bad-text' : '' }, `${fmt.count(rt.failed)} failed`)),
      rt.reason ? el('div', { class: 'reason bad-text' }, rt.reason) : null);
  }

  function historicalCell(h) {
    if (h.state === 'not_requested') {
      return el('div', { class: 'cell-historical' }, stateBadge(HISTORICAL_LABEL, h.state));
    }
    const objectsLabel = h.total_final || h.objects_total > 0
      ? `${fmt.percent(h.percent_objects)} · ${fmt.count(h.objects_done)} / ${fmt.count(h.objects_total)}${h.total_final ? '' : '+'}`
      : `${fmt.count(h.objects_done)} (counting)`;
    const bytesLabel = h.total_final || h.bytes_total > 0
      ? `${fmt.percent(h.percent_bytes)} · ${fmt.bytes(h.bytes_done)} / ${fmt.bytes(h.bytes_total)}`
      : fmt.bytes(h.bytes_done);
    return el('div', { class: 'cell-historical' },
      el('div', {}, stateBadge(HISTORICAL_LABEL, h.state), h.phase && h.phase !== 'done' ? el('span', { class: 'muted small' }, ` ${h.phase}`) : null),
      bar('objects', h.percent_objects, objectsLabel),
      bar('bytes', h.percent_bytes, bytesLabel),
      el('div', { class: 'kv small' },
        h.eta_seconds !== null && h.eta_seconds !== undefined && h.state === 'running' ? `ETA ${fmt.duration(h.eta_seconds)} · ` : '',
        el('span', { 'data-field': 'failed_objects', class: h.failed_objects > 0 ? 'bad-text' : '' }, `${fmt.count(h.failed_objects)} failed objects`)),
      h.error ? el('div', { class: 'reason bad-text' }, h.error) : null);
  }

  function queueSummary(report) {
    const q = report.queue;
    const cards = [
      ['Rules', fmt.count(report.rules.length), 'rules'],
      ['Events waiting', q ? fmt.count(q.waiting + q.delayed) : 'not watched', 'waiting'],
      ['In flight', q ? fmt.count(q.in_flight) : '–', 'in_flight'],
      ['Dead-lettered', q && q.dead_letters !== null && q.dead_letters !== undefined ? fmt.count(q.dead_letters) : (report.dlq_watched ? '–' : 'not watched'), 'dead_letters'],
    ];
    return el('div', { class: 'summary' }, cards.map(([label, value, key]) => el('div', { class: 'card stat' },
      el('div', { class: 'stat-label' }, label),
      el('div', { class: 'stat-value', 'data-stat': key }, value))));
  }

  function overview() {
    const summary = el('div');
    const table = el('table', { class: 'rules' },
      el('thead', {}, el('tr', {},
        el('th', {}, 'Rule'), el('th', {}, 'Source → target'), el('th', {}, 'Real-time sync'), el('th', {}, 'Historical migration'))),
      el('tbody', { id: 'rules-body' }));
    const empty = el('div', { class: 'empty', hidden: true },
      el('h2', {}, 'No replication rules yet'),
      el('p', {}, 'A rule keeps a bucket in another region a copy of a source bucket (or of up to 5 prefixes of it).'),
      el('a', { href: '#/new', class: 'button primary' }, 'Create rule'));
    const alert = el('div', { class: 'alert', hidden: true });
    app.append(el('div', { class: 'page-head' }, el('h1', {}, 'Cross-region replication rules')), alert, summary, empty, el('div', { class: 'card flush' }, table));
    every(STATUS_EVERY_MS, async () => {
      const res = await api('GET', '/api/status');
      live(res.ok);
      if (!res.ok) { alert.hidden = false; alert.textContent = res.data.error; return; }
      alert.hidden = true;
      const report = res.data;
      summary.replaceChildren(queueSummary(report));
      empty.hidden = report.rules.length > 0;
      table.hidden = report.rules.length === 0;
      const rows = report.rules.map((r) => el('tr', { 'data-rule': r.rule_id },
        el('td', {},
          el('a', { href: `#/rule/${encodeURIComponent(r.rule_id)}`, class: 'rule-link' }, r.rule_id),
          el('div', { class: 'small' }, badge(r.policy === 'full' ? 'Add/Change/Delete' : 'Add/Change', 'muted'), r.paused ? badge('Paused', 'warn') : null)),
        el('td', {}, el('div', { class: 'pair stack' }, where(r.source), el('div', {}, el('span', { class: 'arrow' }, '→ '), where(r.target))), prefixes(r.prefixes)),
        el('td', {}, realtimeCell(r.realtime)),
        el('td', {}, historicalCell(r.historical))));
      document.getElementById('rules-body').replaceChildren(...rows);
    });
  }

  // ---- create rule --------------------------------------------------------------------
  const REGIONS = ['us-east-1', 'us-east-2', 'us-west-1', 'us-west-2', 'ca-central-1', 'eu-west-1', 'eu-west-2',
    'eu-west-3', 'eu-central-1', 'eu-north-1', 'eu-south-1', 'ap-northeast-1', 'ap-northeast-2', 'ap-southeast-1',
    'ap-southeast-2', 'ap-south-1', 'sa-east-1', 'me-south-1', 'af-south-1', 'cn-north-1', 'cn-northwest-1'];

  function field(name, label, input, help) {
    input.id = `f-${name.replace(/\./g, '-')}`;
    input.name = name;
    return el('div', { class: 'field', 'data-field-name': name },
      el('label', { for: input.id }, label), input,
      help ? el('div', { class: 'help' }, help) : null,
      el('div', { class: 'field-error', 'data-for': name, role: 'alert', hidden: true }));
  }

  function radios(name, options, checked) {
    return el('div', { class: 'radios', role: 'radiogroup' }, options.map(([value, label, help]) => el('label', { class: 'radio' },
      el('input', { type: 'radio', name, value, checked: value === checked }),
      el('span', {}, el('strong', {}, label), help ? el('span', { class: 'help' }, help) : null))));
  }

  function createPage() {
    const regionList = el('datalist', { id: 'regions' }, REGIONS.map((r) => el('option', { value: r })));
    const text = (attrs) => el('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', ...attrs });
    const prefixList = el('div', { class: 'prefix-list', id: 'prefix-list' });
    const addPrefix = el('button', { type: 'button', class: 'button small', id: 'add-prefix' }, 'Add prefix');
    function prefixRow(value) {
      const input = text({ class: 'prefix-input', name: 'prefix', placeholder: 'e.g. photos/2024/', value: value || '' });
      const row = el('div', { class: 'prefix-row' }, input,
        el('button', { type: 'button', class: 'button small ghost', 'aria-label': 'Remove prefix', onclick: () => { row.remove(); syncPrefixes(); } }, 'Remove'));
      return row;
    }
    function syncPrefixes() {
      addPrefix.disabled = prefixList.children.length >= 5;
      addPrefix.textContent = prefixList.children.length >= 5 ? 'At most 5 prefixes' : 'Add prefix';
    }
    addPrefix.addEventListener('click', () => { prefixList.append(prefixRow()); syncPrefixes(); prefixList.lastChild.querySelector('input').focus(); });
    prefixList.append(prefixRow());

    const prefixBox = el('div', { class: 'sub', id: 'prefix-box', hidden: true }, prefixList, addPrefix,
      el('div', { class: 'help' }, 'Up to 5 prefixes, none empty, none repeated. Objects whose keys start with one of them are replicated.'),
      el('div', { class: 'field-error', 'data-for': 'prefixes', role: 'alert', hidden: true }));
    const scope = radios('scope', [['all', 'All objects'], ['prefixes', 'By prefix']], 'all');
    scope.addEventListener('change', () => { prefixBox.hidden = form.scope.value !== 'prefixes'; });

    const policy = radios('policy', [
      ['full', 'Add/Change/Delete', 'Creates, overwrites and deletes in the source reach the target (policy full).'],
      ['write', 'Add/Change', 'Creates and overwrites reach the target; deletes are not replicated and are listed as suppressed (policy write).'],
    ], 'full');
    const historical = radios('historical', [['yes', 'Yes'], ['no', 'No']], 'no');
    const planBody = el('div', { id: 'plan-result' });
    const planButton = el('button', { type: 'button', class: 'button', id: 'show-plan' }, 'Show what would be overwritten');
    const historyBox = el('div', { class: 'sub', id: 'historical-box', hidden: true },
      el('div', { class: 'warning', id: 'overwrite-warning', role: 'note' },
        el('strong', {}, 'Historical data may overwrite objects in the target bucket. '),
        'Objects that exist in the source before the rule is created are copied too; a target object with the same name is overwritten unless you choose otherwise below. Check what would be overwritten before you create the rule.'),
      field('on_conflict', 'Same-named objects in the target', el('select', {},
        el('option', { value: 'overwrite' }, 'Overwrite them (default)'),
        el('option', { value: 'skip' }, 'Keep them (skip)'),
        el('option', { value: 'newer' }, 'Overwrite only if the source is newer'))),
      planButton, planBody);
    historical.addEventListener('change', () => { historyBox.hidden = form.historical.value !== 'yes'; });

    const advanced = el('details', { class: 'advanced' }, el('summary', {}, 'Advanced: endpoints, notifications, copy mode, storage class, migration limits'),
      el('div', { class: 'grid2' },
        field('source.endpoint_url', 'Source endpoint URL', text({ placeholder: 'AWS S3 when empty' }), 'For S3-compatible sources (OSS, MinIO) and local servers.'),
        field('target.endpoint_url', 'Target endpoint URL', text({ placeholder: 'AWS S3 when empty' })),
        el('label', { class: 'check' }, el('input', { type: 'checkbox', name: 'source.path_style' }), 'Source uses path-style addressing'),
        el('label', { class: 'check' }, el('input', { type: 'checkbox', name: 'target.path_style' }), 'Target uses path-style addressing'),
        field('copy_mode', 'Copy mode', el('select', {},
          el('option', { value: 'auto' }, 'Automatic (server-side when possible)'),
          el('option', { value: 'server-side' }, 'Server-side copy'),
          el('option', { value: 'stream' }, 'Stream (read, then write)'))),
        field('storage_class', 'Storage class of replicas', el('select', {},
          el('option', { value: '' }, 'Same as the source object'),
          ['STANDARD', 'STANDARD_IA', 'ONEZONE_IA', 'INTELLIGENT_TIERING', 'GLACIER_IR', 'GLACIER', 'DEEP_ARCHIVE', 'REDUCED_REDUNDANCY'].map((c) => el('option', { value: c }, c)))),
        field('notify.type', 'Source events reach crr', el('select', {},
          el('option', { value: 'event-bridge' }, 'Through EventBridge (default)'),
          el('option', { value: 'queue' }, 'Straight to an SQS queue'),
          el('option', { value: 'external' }, 'By the provider\'s own mechanism'))),
        field('notify.arn', 'SQS queue ARN (straight to a queue)', text({ placeholder: 'arn:aws:sqs:us-east-1:123456789012:crr-events' })),
        field('max_objects_per_second', 'Historical migration: most objects per second', text({ placeholder: 'No limit', inputmode: 'numeric' }), 'Over every backfill invocation together; real-time replication is not limited.'),
        field('max_bandwidth', 'Historical migration: most bandwidth', text({ placeholder: 'No limit, or like 200MiB/s' }), 'KiB/s, MiB/s, GiB/s (powers of 1024) or KB/s, MB/s, GB/s (powers of 1000).')));

    const formError = el('div', { class: 'alert', id: 'form-error', role: 'alert', hidden: true });
    const submit = el('button', { type: 'submit', class: 'button primary', id: 'create-submit' }, 'OK');
    const form = el('form', { class: 'card form', id: 'create-form', novalidate: true },
      regionList,
      el('h2', {}, 'Source'),
      el('div', { class: 'grid2' },
        field('source.bucket', 'Source bucket', text({ required: true, placeholder: 'my-bucket' })),
        field('source.region', 'Source region', text({ required: true, list: 'regions', placeholder: 'us-east-1' }))),
      el('h2', {}, 'Target'),
      el('div', { class: 'grid2' },
        field('target.region', 'Target region', text({ required: true, list: 'regions', placeholder: 'eu-west-1' }), 'Must differ from the source region.'),
        field('target.bucket', 'Target bucket', text({ required: true, placeholder: 'my-bucket-replica' }), 'A bucket is in at most one sync pair, as source or as target.')),
      el('h2', {}, 'Rule'),
      field('id', 'Rule ID', text({ required: true, placeholder: 'photos' }), 'Letters, digits, "-" and "_".'),
      el('div', { class: 'field' }, el('span', { class: 'label' }, 'Objects to sync'), scope, prefixBox),
      el('div', { class: 'field' }, el('span', { class: 'label' }, 'Sync policy'), policy),
      el('div', { class: 'field' }, el('span', { class: 'label' }, 'Sync historical data'), historical, historyBox),
      advanced, formError,
      el('div', { class: 'actions' }, submit, el('a', { href: '#/', class: 'button ghost' }, 'Cancel')));

    function draft() {
      const v = (name) => { const i = form.elements.namedItem(name); return i ? i.value.trim() : ''; };
      const endpoint = (name) => v(name) || undefined;
      const rule = {
        id: v('id'),
        source: { bucket: v('source.bucket'), region: v('source.region'), endpoint_url: endpoint('source.endpoint_url'), path_style: form.elements.namedItem('source.path_style').checked },
        target: { bucket: v('target.bucket'), region: v('target.region'), endpoint_url: endpoint('target.endpoint_url'), path_style: form.elements.namedItem('target.path_style').checked },
        prefixes: form.scope.value === 'prefixes' ? [...form.querySelectorAll('.prefix-input')].map((i) => i.value) : [],
        policy: form.policy.value,
        historical: form.historical.value === 'yes',
        on_conflict: v('on_conflict'),
        copy_mode: v('copy_mode'),
      };
      if (v('storage_class')) rule.storage_class = v('storage_class');
      // Numbers as numbers; anything else is sent as typed, for the server to name what is wrong.
      const objects = v('max_objects_per_second');
      if (objects) rule.max_objects_per_second = /^[0-9]+$/.test(objects) ? Number(objects) : objects;
      if (v('max_bandwidth')) rule.max_bandwidth = v('max_bandwidth');
      rule.notify = v('notify.type') === 'queue' ? { type: 'queue', arn: v('notify.arn') } : { type: v('notify.type') };
      return rule;
    }

    function clearErrors() {
      form.querySelectorAll('.field-error').forEach((e) => { e.hidden = true; e.textContent = ''; });
      form.querySelectorAll('.invalid').forEach((e) => e.classList.remove('invalid'));
      formError.hidden = true;
    }

    function showError(data) {
      const name = data.field && data.field.startsWith('prefixes') ? 'prefixes' : data.field;
      const slot = name ? form.querySelector(`.field-error[data-for="${CSS.escape(name)}"]`) : null;
      if (slot) {
        slot.textContent = data.error;
        slot.hidden = false;
        const input = form.elements.namedItem(name);
        if (input && input.classList) { input.classList.add('invalid'); input.focus(); }
        if (advanced.contains(slot)) advanced.open = true;
        slot.scrollIntoView({ block: 'center' });
      } else {
        formError.textContent = data.error;
        formError.hidden = false;
      }
    }

    planButton.addEventListener('click', async () => {
      clearErrors();
      planButton.disabled = true;
      planBody.replaceChildren(el('div', { class: 'muted' }, 'Listing the source and the target…'));
      const res = await api('POST', '/api/plan', draft());
      planButton.disabled = false;
      if (!res.ok) { planBody.replaceChildren(); showError(res.data); return; }
      const p = res.data;
      const rows = p.overwrites.map((c) => el('tr', { 'data-overwrite': c.key },
        el('td', {}, el('code', {}, c.key)), el('td', {}, c.reason), el('td', { class: 'num' }, fmt.bytes(c.source_size)),
        el('td', { class: 'num' }, fmt.bytes(c.target_size)), el('td', {}, fmt.time(c.target_last_modified)), el('td', { class: 'small' }, c.detail)));
      planBody.replaceChildren(
        el('p', { class: 'plan-summary', id: 'plan-summary' },
          `${fmt.count(p.objects)} objects (${fmt.bytes(p.bytes)}) in scope: ${fmt.count(p.to_copy)} to copy, ${fmt.count(p.to_fix)} to fix, ${fmt.count(p.in_place)} already in place. `,
          el('strong', {}, p.overwrites.length === 0 ? 'No target object would be overwritten.' : `${p.overwrites.length} target object(s) would be overwritten${p.kept ? `; ${p.kept} kept by your choice` : ''}:`)),
        p.overwrites.length ? el('table', { class: 'list', id: 'plan-table' },
          el('thead', {}, el('tr', {}, el('th', {}, 'Key'), el('th', {}, 'Differs in'), el('th', {}, 'Source size'), el('th', {}, 'Target size'), el('th', {}, 'Target modified'), el('th', {}, 'First difference'))),
          el('tbody', {}, rows)) : null);
    });

    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      clearErrors();
      submit.disabled = true;
      const res = await api('POST', '/api/rules', draft());
      submit.disabled = false;
      if (!res.ok) { showError(res.data); return; }
      (res.data.warnings || []).forEach((w) => toast(w, 'warn'));
      toast(`Rule ${res.data.rule.id} created`, 'ok');
      location.hash = `#/rule/${encodeURIComponent(res.data.rule.id)}`;
    });

    app.append(el('div', { class: 'page-head' }, el('a', { href: '#/', class: 'back' }, '← Rules'), el('h1', {}, 'Create a cross-region replication rule')), form);
    form.elements.namedItem('source.bucket').focus();
  }

  // ---- rule detail ---------------------------------------------------------------------
  function modal(title, body, actions) {
    const root = document.getElementById('modal-root');
    const close = () => root.replaceChildren();
    const dialog = el('div', { class: 'modal', role: 'dialog', 'aria-modal': 'true', 'aria-label': title },
      el('h2', {}, title), body, el('div', { class: 'actions' }, actions(close)));
    root.replaceChildren(el('div', { class: 'backdrop', onclick: (e) => { if (e.target.classList.contains('backdrop')) close(); } }, dialog));
    const first = dialog.querySelector('input, button');
    if (first) first.focus();
    return close;
  }

  function confirmDelete(id) {
    const input = el('input', { type: 'text', id: 'confirm-id', autocomplete: 'off', spellcheck: 'false' });
    const err = el('div', { class: 'field-error', 'data-for': 'confirm', hidden: true });
    let go;
    modal(`Delete rule ${id}?`, el('div', {},
      el('p', {}, 'Replication stops: the source bucket\'s notifications for this rule are turned off and both buckets are released. Objects already in the target stay.'),
      el('label', { for: 'confirm-id' }, 'Type the rule ID ', el('code', {}, id), ' to confirm'), input, err), (close) => {
      go = el('button', { class: 'button danger', id: 'confirm-delete', disabled: true, onclick: async () => {
        go.disabled = true;
        const res = await api('DELETE', `/api/rules/${encodeURIComponent(id)}`, { confirm: input.value });
        if (!res.ok) { err.textContent = res.data.error; err.hidden = false; go.disabled = false; return; }
        close();
        toast(`Rule ${id} deleted`, 'ok');
        location.hash = '#/';
      } }, 'Delete');
      return [el('button', { class: 'button ghost', onclick: close }, 'Cancel'), go];
    });
    input.addEventListener('input', () => { go.disabled = input.value !== id; });
  }

  function seriesOf(points, key) {
    return points.map((p) => [Date.parse(p.t), p[key] === undefined ? null : p[key]]);
  }

  function chartSpecs(series, historicalOn) {
    const pts = series ? series.points : [];
    const range = series ? { from: Date.parse(series.from), to: Date.parse(series.to) } : {};
    const specs = [
      { title: 'Replication latency', unit: 'ms', kind: 'line', series: [{ name: 'p50', points: seriesOf(pts, 'latency_p50_ms') }, { name: 'max', points: seriesOf(pts, 'latency_max_ms') }], emptyText: 'No events replicated in this window' },
      { title: 'Objects replicated', unit: 'count', kind: 'bar', series: [{ name: 'objects / min', points: seriesOf(pts, 'replicated_objects') }], emptyText: 'No objects replicated in this window' },
      { title: 'Bytes replicated', unit: 'bytes', kind: 'bar', series: [{ name: 'bytes / min', points: seriesOf(pts, 'replicated_bytes') }], emptyText: 'No bytes replicated in this window' },
      { title: 'Deletes and failures', unit: 'count', kind: 'bar', stacked: true, series: [{ name: 'deletes', points: seriesOf(pts, 'deletes') }, { name: 'suppressed deletes', points: seriesOf(pts, 'suppressed_deletes') }, { name: 'failed', color: 'var(--crr-chart-bad)', points: seriesOf(pts, 'failed') }], emptyText: 'No deletes or failures in this window' },
      { title: 'Pending events', unit: 'count', kind: 'area', series: [{ name: 'pending', points: seriesOf(pts, 'pending') }], emptyText: 'Nothing pending in this window (sampled while the status is read)' },
    ];
    if (historicalOn) {
      specs.push(
        { title: 'Migration throughput', unit: 'count', kind: 'bar', series: [{ name: 'objects / min', points: seriesOf(pts, 'backfill_objects') }], emptyText: 'No objects migrated in this window' },
        { title: 'Migration progress', unit: 'percent', kind: 'line', yMax: 100, series: [{ name: 'objects %', points: seriesOf(pts, 'backfill_percent_objects') }], emptyText: 'No migration progress in this window' });
    }
    return specs.map((spec) => ({ ...range, ...spec }));
  }

  function listSection(title, id, note) {
    const body = el('div', { class: 'list-body', id: `${id}-body` }, el('div', { class: 'muted' }, 'Loading…'));
    return { node: el('section', { class: 'card', id }, el('div', { class: 'section-head' }, el('h2', {}, title), note || null), body), body };
  }

  function detailPage(id) {
    const enc = encodeURIComponent(id);
    const head = el('div', { class: 'page-head' });
    const overviewCards = el('div', { class: 'detail-grid' });
    const chartGrid = el('div', { class: 'charts', id: 'charts' });
    const chartNote = el('p', { class: 'muted small', id: 'charts-note' }, 'Last 24 hours, one point per minute.');
    let windowSel = '24h';
    const WINDOW_NAMES = { '1h': 'hour', '6h': '6 hours', '24h': '24 hours' };
    const windowPicker = el('div', { class: 'segmented', role: 'group', 'aria-label': 'Chart window' },
      ['1h', '6h', '24h'].map((w) => el('button', { class: w === windowSel ? 'current' : '', 'data-window': w, onclick: (e) => {
        windowSel = w;
        windowPicker.querySelectorAll('button').forEach((b) => b.classList.toggle('current', b === e.currentTarget));
        refreshSeries();
      } }, w)));
    const verifyPanel = el('section', { class: 'card', id: 'verify-panel', hidden: true });
    const dlq = listSection('Failed events', 'dead-letters');
    const redriveButton = el('button', { class: 'button', id: 'redrive', disabled: true }, 'Redrive');
    dlq.node.querySelector('.section-head').append(redriveButton);
    const failedObjects = listSection('Objects the migration could not copy', 'backfill-failures');
    const suppressed = listSection('Suppressed deletes', 'suppressed-deletes', el('span', { class: 'muted small' }, 'Deletes policy Add/Change kept from the target'));
    app.append(head, overviewCards, verifyPanel, dlq.node, el('section', { class: 'card' }, el('div', { class: 'section-head' }, el('h2', {}, 'Replication health'), el('div', { class: 'head-tools' }, chartNote, windowPicker)), chartGrid), failedObjects.node, suppressed.node);

    let rule = null;
    let historicalOn = false;
    let lastSeries = null;

    async function act(path, done) {
      const res = await api('POST', `/api/rules/${enc}/${path}`);
      if (!res.ok) { toast(res.data.error, 'error'); return; }
      toast(done(res.data), 'ok');
      refresh();
    }

    function actions(status) {
      const paused = status.paused;
      const h = status.historical.state;
      const backfillRunning = ['pending', 'running'].includes(h);
      return el('div', { class: 'actions' },
        paused
          ? el('button', { class: 'button', id: 'resume', onclick: () => act('resume', () => `Rule ${id} resumed`) }, 'Resume')
          : el('button', { class: 'button', id: 'pause', onclick: () => act('pause', () => `Rule ${id} paused`) }, 'Pause'),
        backfillRunning
          ? el('button', { class: 'button', id: 'backfill-pause', onclick: () => act('backfill/pause', () => 'Migration paused') }, 'Pause migration')
          : el('button', { class: 'button', id: 'backfill-start', onclick: () => act('backfill/start', (d) => `Migration ${d.state}`) }, h === 'not_requested' ? 'Start migration' : (h === 'paused' || h === 'failed' ? 'Resume migration' : 'Migrate again')),
        el('button', { class: 'button', id: 'verify', onclick: runVerify }, 'Verify'),
        el('button', { class: 'button danger ghost', id: 'delete', onclick: () => confirmDelete(id) }, 'Delete'));
    }

    let headKey = '';
    let listsKey = '';

    function drawStatus(report) {
      const s = report.rules[0];
      historicalOn = s.historical.state !== 'not_requested';
      // The title and the action buttons are drawn again only when what they show
      // changed: a button redrawn under the pointer would lose its click.
      const key = JSON.stringify([s.paused, s.policy, s.historical.state, s.source, s.target, s.prefixes]);
      if (key !== headKey) {
        headKey = key;
        head.replaceChildren(
          el('a', { href: '#/', class: 'back' }, '← Rules'),
          el('div', { class: 'title-row' },
            el('h1', {}, `Rule ${s.rule_id}`),
            s.paused ? badge('Paused', 'warn') : badge('Enabled', 'ok'),
            badge(s.policy === 'full' ? 'Add/Change/Delete' : 'Add/Change', 'muted')),
          el('div', { class: 'pair big' }, where(s.source), el('span', { class: 'arrow' }, '→'), where(s.target), prefixes(s.prefixes)),
          actions(s));
      }
      overviewCards.replaceChildren(
        el('section', { class: 'card', 'data-rule': s.rule_id }, el('h2', {}, 'Real-time sync'), realtimeCell(s.realtime),
          el('div', { class: 'kv small muted' }, `Skipped: ${fmt.count(s.realtime.skipped_stale)} stale or duplicate, ${fmt.count(s.realtime.skipped_other)} outside the rule · last event ${fmt.time(s.realtime.last_event_at)}`)),
        el('section', { class: 'card' }, el('h2', {}, 'Historical migration'), historicalCell(s.historical),
          s.historical.started_at ? el('div', { class: 'kv small muted' }, `Started ${fmt.time(s.historical.started_at)} · updated ${fmt.time(s.historical.updated_at)}${s.historical.completed_at ? ` · completed ${fmt.time(s.historical.completed_at)}` : ''}`) : null,
          s.historical.state !== 'not_requested' ? el('div', { class: 'kv small muted' }, `${fmt.count(s.historical.copied)} copied · ${fmt.count(s.historical.fixed)} fixed · ${fmt.count(s.historical.in_place)} in place · ${fmt.count(s.historical.skipped)} skipped · segments ${s.historical.segments_done}/${s.historical.segments}`) : null));
    }

    function drawCharts(series) {
      const specs = chartSpecs(series, historicalOn);
      if (!window.CrrCharts) { chartGrid.replaceChildren(el('div', { class: 'muted' }, 'Charts are unavailable.')); return; }
      if (!series) chartNote.textContent = 'No per-minute data recorded for this rule yet.';
      else chartNote.textContent = `Last ${WINDOW_NAMES[windowSel]} to ${fmt.time(series.to)}, one point per minute.`;
      if (charts.length !== specs.length) {
        charts.forEach((c) => c.destroy && c.destroy());
        charts = [];
        chartGrid.replaceChildren();
        for (const spec of specs) {
          const box = el('div', { class: 'chart-box' });
          chartGrid.append(box);
          charts.push(window.CrrCharts.timeSeries(box, spec));
        }
      } else {
        specs.forEach((spec, i) => charts[i].update(spec));
      }
    }

    async function refresh() {
      const res = await api('GET', `/api/status?rule=${enc}`);
      live(res.ok);
      if (!res.ok) {
        if (res.status === 404) { clearPage(); app.append(el('div', { class: 'empty' }, el('h2', {}, `No rule ${id}`), el('a', { href: '#/', class: 'button' }, 'Back to the rules'))); }
        else toast(res.data.error, 'error');
        return;
      }
      drawStatus(res.data);
      // The lists are read again only when their counts move: reading the dead-letter
      // queue receives its messages (and raises their receive counts).
      const s = res.data.rules[0];
      const key = JSON.stringify([res.data.queue && res.data.queue.dead_letters, s.realtime.failed, s.historical.failed_objects, s.realtime.suppressed_deletes]);
      if (key !== listsKey) {
        listsKey = key;
        refreshLists();
      }
    }

    async function refreshSeries() {
      const res = await api('GET', `/api/status?rule=${enc}&series=${windowSel}`);
      if (!res.ok) return;
      lastSeries = res.data.rules[0].series || null;
      drawCharts(lastSeries);
    }

    async function refreshLists() {
      const letters = await api('GET', `/api/rules/${enc}/dead-letters`);
      if (letters.ok) {
        const list = letters.data.letters;
        redriveButton.disabled = list.length === 0;
        redriveButton.textContent = list.length ? `Redrive ${list.length} event${list.length === 1 ? '' : 's'}` : 'Redrive';
        dlq.body.replaceChildren(!letters.data.watched
          ? el('div', { class: 'muted' }, 'The dead-letter queue is not watched: start the console with --dlq-url (and --queue-url to redrive).')
          : list.length === 0 ? el('div', { class: 'muted', 'data-empty': 'dead-letters' }, 'No failed events in the dead-letter queue.')
            : el('table', { class: 'list' }, el('thead', {}, el('tr', {}, el('th', {}, 'Keys'), el('th', {}, 'Reason'), el('th', {}, 'Kind'), el('th', {}, 'Receives'))),
              el('tbody', {}, list.map((l) => el('tr', { 'data-letter': l.message_id },
                el('td', {}, l.keys.length ? l.keys.map((k) => el('code', {}, k)) : el('span', { class: 'muted' }, '(not an S3 event)')),
                el('td', {}, l.reason || '(no reason recorded)'), el('td', {}, l.kind || '–'), el('td', { class: 'num' }, l.receive_count))))));
      } else dlq.body.replaceChildren(el('div', { class: 'bad-text' }, letters.data.error));

      const failed = await api('GET', `/api/rules/${enc}/failures`);
      if (failed.ok) {
        failedObjects.body.replaceChildren(failed.data.length === 0 ? el('div', { class: 'muted' }, 'None.')
          : el('table', { class: 'list' }, el('thead', {}, el('tr', {}, el('th', {}, 'Key'), el('th', {}, 'Size'), el('th', {}, 'Reason'), el('th', {}, 'Attempts'), el('th', {}, 'Message'))),
            el('tbody', {}, failed.data.map((f) => el('tr', {}, el('td', {}, el('code', {}, f.key)), el('td', { class: 'num' }, fmt.bytes(f.size)), el('td', {}, f.reason), el('td', { class: 'num' }, f.attempts), el('td', { class: 'small' }, f.message))))));
      }
      const sup = await api('GET', `/api/rules/${enc}/suppressed`);
      if (sup.ok) {
        suppressed.body.replaceChildren(sup.data.length === 0 ? el('div', { class: 'muted' }, 'None.')
          : el('table', { class: 'list' }, el('thead', {}, el('tr', {}, el('th', {}, 'Key'), el('th', {}, 'Deleted at'), el('th', {}, 'Delete marker'))),
            el('tbody', {}, sup.data.map((d) => el('tr', {}, el('td', {}, el('code', {}, d.key)), el('td', {}, fmt.time(d.event_time || d.recorded_at)), el('td', {}, d.delete_marker ? 'yes' : 'no'))))));
      }
    }

    redriveButton.addEventListener('click', async () => {
      redriveButton.disabled = true;
      const res = await api('POST', `/api/rules/${enc}/redrive`);
      if (!res.ok) { toast(res.data.error, 'error'); redriveButton.disabled = false; return; }
      toast(`Moved ${res.data.moved} event(s) back to the event queue`, 'ok');
      refreshLists();
    });

    function runVerify() {
      if (verifySource) verifySource.close();
      verifyPanel.hidden = false;
      const progress = el('span', { class: 'muted', id: 'verify-progress' }, 'Listing the source and the target…');
      const rows = el('tbody', { id: 'verify-rows' });
      const result = el('div', { id: 'verify-result' });
      verifyPanel.replaceChildren(el('div', { class: 'section-head' }, el('h2', {}, 'Verify: source against target'), progress),
        el('table', { class: 'list' }, el('thead', {}, el('tr', {}, el('th', {}, 'Difference'), el('th', {}, 'Key'), el('th', {}, 'Detail'))), rows), result);
      verifyPanel.scrollIntoView({ block: 'nearest' });
      const src = new EventSource(`/api/rules/${enc}/verify?csrf=${encodeURIComponent(csrf)}`);
      verifySource = src;
      src.addEventListener('drift', (e) => {
        const d = JSON.parse(e.data);
        rows.append(el('tr', { 'data-drift': d.kind }, el('td', {}, badge(d.kind, d.kind === 'missing' ? 'bad' : 'warn')), el('td', {}, el('code', {}, d.key)), el('td', { class: 'small' }, d.reason)));
      });
      src.addEventListener('progress', (e) => {
        const p = JSON.parse(e.data);
        progress.textContent = `Listed ${fmt.count(p.listed_source)} source and ${fmt.count(p.listed_target)} target objects, compared ${fmt.count(p.compared)}`;
      });
      src.addEventListener('summary', (e) => {
        const s = JSON.parse(e.data);
        src.close();
        verifySource = null;
        const drift = rows.children.length;
        progress.textContent = 'Done';
        result.replaceChildren(el('p', { class: drift ? 'bad-text' : 'ok-text', 'data-verify': drift ? 'drift' : 'clean' },
          drift ? `${drift} difference(s) between source and target.` : `No drift: the target holds every object of the source (${fmt.count(s.source_objects)} objects, ${fmt.bytes(s.source_bytes)}).`));
      });
      src.addEventListener('failed', (e) => {
        src.close();
        verifySource = null;
        progress.textContent = 'Failed';
        result.replaceChildren(el('p', { class: 'bad-text', 'data-verify': 'failed' }, JSON.parse(e.data).error));
      });
      src.onerror = () => {
        if (verifySource === src) { src.close(); verifySource = null; progress.textContent = 'The verify stream was interrupted.'; }
      };
    }

    every(STATUS_EVERY_MS, refresh);
    every(SERIES_EVERY_MS, refreshSeries);
  }

  // ---- routing -------------------------------------------------------------------------
  function route() {
    clearPage();
    document.getElementById('modal-root').replaceChildren();
    const hash = location.hash || '#/';
    document.querySelectorAll('[data-nav]').forEach((a) => a.classList.remove('current'));
    if (hash === '#/new') {
      document.querySelector('[data-nav="new"]').classList.add('current');
      createPage();
    } else if (hash.startsWith('#/rule/')) {
      detailPage(decodeURIComponent(hash.slice('#/rule/'.length)));
    } else {
      document.querySelector('[data-nav="rules"]').classList.add('current');
      overview();
    }
  }
  window.addEventListener('hashchange', route);
  document.addEventListener('keydown', (e) => { if (e.key === 'Escape') document.getElementById('modal-root').replaceChildren(); });
  route();
})();
