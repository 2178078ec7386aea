// CrrCharts: the time-series charts of `crr console` (rule detail page).
//
// Plain modern JavaScript, no dependencies, no build step: the CLI embeds this file
// with include_str! and serves it next to charts.css. Everything lives in this one
// closure; the only global is window.CrrCharts.
//
//   const chart = CrrCharts.timeSeries(div, {
//     title, unit: 'ms'|'bytes'|'count'|'percent'|'bytes/s'|'objects/min',
//     kind: 'line'|'area'|'bar', stacked, yMax,
//     series: [{name, color, points: [[epochMillis, valueOrNull], ...]}],
//     markers: [{t, label}], emptyText,
//     // optional extras:
//     from, to,                        // fixed time window (epoch ms), else the data's extent
//     thresholds: [{value, label}],    // horizontal reference lines (drawn when on scale)
//   });
//   chart.update({...same options...});   // re-renders in place, no flicker; legend and
//                                         // hover state survive
//   chart.destroy();
//   chart.element                         // the root div (data-chart, data-points)
//   CrrCharts.format(value, unit)         // the tooltip formatter, for tables next to charts
//
// A series colour may be any CSS colour or a palette variable such as
// 'var(--crr-chart-bad)' (see charts.css); by default series take --crr-chart-c1..c8.
// null values are gaps; so are holes in time longer than 2.5 sampling steps.
//
// Rendering is one SVG per chart, one <path> per series (bars included), so 3 series
// of 1440 points cost a few string concatenations and one DOM write per path.
(function () {
  'use strict';

  const SVGNS = 'http://www.w3.org/2000/svg';
  const HEIGHT = 180; // the plot's SVG height in px; title, summary and legend are HTML around it
  const PALETTE_SIZE = 8; // --crr-chart-c1 .. --crr-chart-c8 in charts.css
  const MINUTE = 60000;
  const HOUR = 60 * MINUTE;
  const DAY = 24 * HOUR;
  const FONT_PX = 11;

  let nextId = 0;

  // ---------------------------------------------------------------- units and formatting

  const BIN = [1, 1024, 1048576, 1073741824, 1099511627776, 1125899906842624];
  const SCALES = {
    ms: [[1, ' ms'], [1000, ' s'], [MINUTE, ' min'], [HOUR, ' h']],
    bytes: BIN.map((d, i) => [d, [' B', ' KiB', ' MiB', ' GiB', ' TiB', ' PiB'][i]]),
    'bytes/s': BIN.map((d, i) => [d, [' B/s', ' KiB/s', ' MiB/s', ' GiB/s', ' TiB/s', ' PiB/s'][i]]),
    count: [[1, ''], [1e3, 'k'], [1e6, 'M'], [1e9, 'G'], [1e12, 'T']],
    'objects/min': [[1, '/min'], [1e3, 'k/min'], [1e6, 'M/min'], [1e9, 'G/min']],
    percent: [[1, '%']],
  };

  function scalesFor(unit) {
    return SCALES[unit] || SCALES.count;
  }

  // The largest scale whose divisor fits |v| (850 -> ms, 2300 -> s, 90000 -> min).
  function pickScale(unit, v) {
    const scales = scalesFor(unit);
    const a = Math.abs(v);
    let s = scales[0];
    for (const sc of scales) if (a >= sc[0]) s = sc;
    return s;
  }

  function trimNumber(x, decimals) {
    let s = x.toFixed(decimals);
    if (s.indexOf('.') >= 0) s = s.replace(/\.?0+$/, '');
    return s === '-0' ? '0' : s;
  }

  // Human value for tooltips and summaries: two significant digits below 10, integers above
  // ('850 ms', '2.3 s', '1.5 min', '1.2 MiB', '3.4M', '99.5%').
  function formatValue(v, unit) {
    if (v === null || v === undefined || Number.isNaN(v)) return '\u2014';
    const sc = pickScale(unit, v);
    const x = v / sc[0];
    const a = Math.abs(x);
    if (unit === 'percent') {
      // one decimal, and never a rounded-up 100% before the end (99.96 reads 99.9%)
      let text = trimNumber(x, a === 0 || a >= 100 ? 0 : a < 1 ? 2 : 1);
      if (x < 100 && +text >= 100) text = '99.9';
      return text + '%';
    }
    const decimals = a === 0 ? 0 : a < 1 ? 2 : a < 10 ? 1 : 0;
    return trimNumber(x, decimals) + sc[1];
  }

  // ------------------------------------------------------------------- nice y scales

  // Candidate tick steps for a unit: 1-2-5 decades, binary multiples for bytes, clock
  // steps (15 s, 30 s, 1 min, 5 min ...) for durations.
  function stepCandidates(unit, hi) {
    const out = [];
    if (unit === 'bytes' || unit === 'bytes/s') {
      // steps round in the unit the axis will be labelled in: 0.5 GiB, not 500 MiB
      const div = pickScale(unit, hi)[0];
      for (const m of [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 250, 500, 1000]) {
        if (div > 1 || m >= 1) out.push(m * div);
      }
      return out;
    }
    for (let e = -3; e <= 15; e++) for (const m of [1, 2, 5]) out.push(m * Math.pow(10, e));
    if (unit === 'ms') {
      const clock = [15000, 30000, MINUTE, 2 * MINUTE, 5 * MINUTE, 10 * MINUTE, 15 * MINUTE,
        30 * MINUTE, HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY];
      return out.filter((s) => s < 10000).concat([10000], clock).concat(out.filter((s) => s > DAY));
    }
    if (unit === 'percent') out.push(25, 2.5);
    return out.sort((a, b) => a - b);
  }

  // The smallest candidate step giving at most maxTicks intervals over [lo, hi].
  function niceScale(lo, hi, unit, maxTicks, fixedMax) {
    const integral = unit === 'count' || unit === 'objects/min';
    let step = 1;
    for (const s of stepCandidates(unit, Math.max(Math.abs(lo), Math.abs(hi), fixedMax || 0))) {
      if (integral && s < 1 && hi >= 1) continue;
      const top = fixedMax !== undefined ? fixedMax : Math.ceil(hi / s - 1e-9) * s;
      const bottom = Math.floor(lo / s + 1e-9) * s;
      if ((top - bottom) / s <= maxTicks + 1e-9) {
        step = s;
        break;
      }
    }
    const y0 = Math.floor(lo / step + 1e-9) * step;
    const y1 = fixedMax !== undefined ? fixedMax : Math.max(step, Math.ceil(hi / step - 1e-9) * step);
    const ticks = [];
    for (let v = y0, k = 0; v <= y1 + step * 1e-6 && k < 50; k++, v = y0 + k * step) ticks.push(v);
    return { y0, y1, step, ticks };
  }

  // Tick labels share one scale across the axis ('0.5 s', '1 s', '1.5 s'), dropping to a
  // smaller scale when a step would need more than one decimal.
  function tickFormatter(unit, step, top) {
    const scales = scalesFor(unit);
    let idx = scales.indexOf(pickScale(unit, top));
    const decimalsFor = (div) => {
      const q = step / div;
      for (let d = 0; d <= 3; d++) if (Math.abs(q * Math.pow(10, d) - Math.round(q * Math.pow(10, d))) < 1e-6) return d;
      return 3;
    };
    while (idx > 0 && decimalsFor(scales[idx][0]) > 1) idx--;
    if ((unit === 'count' || unit === 'objects/min') && idx > 0 && step < scales[idx][0]) {
      // counts read better each in its own scale: 200, 400 ... 1k rather than 0.2k ... 1k
      return (v) => {
        if (v === 0) return '0';
        const own = pickScale(unit, v);
        return trimNumber(v / own[0], decimalsFor(own[0])) + own[1];
      };
    }
    const sc = scales[idx];
    const decimals = decimalsFor(sc[0]);
    return (v) => (v === 0 && unit !== 'percent' ? '0' : trimNumber(v / sc[0], decimals) + sc[1]);
  }

  // ------------------------------------------------------------------------ time axis

  function pad2(n) {
    return n < 10 ? '0' + n : '' + n;
  }
  function hhmm(t) {
    const d = new Date(t);
    return pad2(d.getHours()) + ':' + pad2(d.getMinutes());
  }
  const dateFmt = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });
  function dayLabel(t) {
    return dateFmt.format(new Date(t));
  }
  function dayKey(t) {
    const d = new Date(t);
    return d.getFullYear() * 10000 + d.getMonth() * 100 + d.getDate();
  }
  function isMidnight(t) {
    const d = new Date(t);
    return d.getHours() === 0 && d.getMinutes() === 0;
  }

  // Ticks on local clock boundaries (every 2 h at 02:00, 04:00 ...) with the interval
  // chosen so labels keep at least ~64 px apart.
  function timeTicks(x0, x1, plotWidth) {
    const maxTicks = Math.max(2, Math.floor(plotWidth / 64));
    const span = x1 - x0;
    const minutes = [1, 2, 5, 10, 15, 30, 60, 120, 180, 240, 360, 720, 1440, 2880, 10080];
    let every = minutes[minutes.length - 1];
    for (const m of minutes) {
      if (span / (m * MINUTE) <= maxTicks) {
        every = m;
        break;
      }
    }
    const ticks = [];
    const start = new Date(x0);
    start.setMinutes(0, 0, 0);
    if (every <= 60) {
      for (let t = start.getTime(); t <= x1 && ticks.length < 500; t += every * MINUTE) if (t >= x0) ticks.push(t);
    } else {
      const hours = every / 60;
      const d = new Date(start.getTime());
      for (let guard = 0; d.getTime() <= x1 && guard < 24 * 400; guard++) {
        const t = d.getTime();
        const keep = hours < 24 ? d.getHours() % hours === 0 : d.getHours() === 0 && Math.floor(t / DAY) % (hours / 24) === 0;
        if (t >= x0 && keep) ticks.push(t);
        d.setHours(d.getHours() + 1);
      }
    }
    return ticks;
  }

  function durationText(ms) {
    if (ms >= DAY - HOUR && ms <= DAY + HOUR) return 'the last 24 hours';
    if (ms >= 2 * DAY) return 'the last ' + Math.round(ms / DAY) + ' days';
    if (ms >= 2 * HOUR) return 'the last ' + Math.round(ms / HOUR) + ' hours';
    return 'the last ' + Math.max(1, Math.round(ms / MINUTE)) + ' minutes';
  }

  // ------------------------------------------------------------------------- helpers

  function slug(s) {
    return String(s || 'chart').toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-+|-+$/g, '') || 'chart';
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
  }
  function el(tag, cls, parent) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (parent) parent.appendChild(e);
    return e;
  }
  function svgEl(tag, attrs, parent) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function r1(x) {
    return Math.round(x * 10) / 10;
  }

  let measureCtx = null;
  function textWidth(text, font) {
    if (!measureCtx) measureCtx = document.createElement('canvas').getContext('2d');
    if (!measureCtx) return text.length * FONT_PX * 0.6;
    measureCtx.font = font;
    return measureCtx.measureText(text).width;
  }

  // The median spacing of a series' timestamps: its sampling step (60000 for per-minute data).
  function medianStep(t) {
    const n = t.length;
    if (n < 2) return MINUTE;
    const stride = Math.max(1, Math.floor(n / 256));
    const d = [];
    for (let i = stride; i < n; i += stride) {
      const delta = (t[i] - t[i - stride]) / stride;
      if (delta > 0) d.push(delta);
    }
    if (!d.length) return MINUTE;
    d.sort((a, b) => a - b);
    return d[d.length >> 1];
  }

  // One series from the options: typed arrays of times and values (NaN for null), stats.
  function prepSeries(s, i) {
    const raw = s && Array.isArray(s.points) ? s.points : [];
    let sorted = true;
    for (let k = 1; k < raw.length; k++) {
      if (raw[k][0] < raw[k - 1][0]) {
        sorted = false;
        break;
      }
    }
    const pts = sorted ? raw : raw.slice().sort((a, b) => a[0] - b[0]);
    const n = pts.length;
    const t = new Float64Array(n);
    const v = new Float64Array(n);
    let count = 0, max = -Infinity, min = Infinity, maxT = NaN, last = NaN, lastT = NaN, sum = 0, nonZero = false;
    for (let k = 0; k < n; k++) {
      const p = pts[k];
      t[k] = +p[0];
      const val = p[1] === null || p[1] === undefined ? NaN : +p[1];
      v[k] = Number.isFinite(val) ? val : NaN;
      if (!Number.isNaN(v[k])) {
        count++;
        sum += val;
        if (val > max) {
          max = val;
          maxT = t[k];
        }
        if (val < min) min = val;
        if (val !== 0) nonZero = true;
        last = val;
        lastT = t[k];
      }
    }
    const colorIndex = (i % PALETTE_SIZE) + 1;
    return {
      name: s && s.name !== undefined ? String(s.name) : 'series ' + (i + 1),
      color: s && s.color ? String(s.color) : 'var(--crr-chart-c' + colorIndex + ')',
      t, v, count, max, min, maxT, last, lastT, sum, nonZero,
      step: medianStep(t),
    };
  }

  // The sorted union of all series' timestamps and each series' values on it, so stacking
  // and the hover lookup work on one index (the common case, identical timestamps, is a copy).
  function alignSeries(series) {
    let same = series.length > 0;
    const t0 = series.length ? series[0].t : new Float64Array(0);
    for (const s of series) {
      if (s.t.length !== t0.length) {
        same = false;
        break;
      }
      for (let k = 0; k < t0.length; k++) {
        if (s.t[k] !== t0[k]) {
          same = false;
          break;
        }
      }
      if (!same) break;
    }
    if (same) return { ts: t0, values: series.map((s) => s.v) };
    const all = [];
    for (const s of series) for (let k = 0; k < s.t.length; k++) all.push(s.t[k]);
    all.sort((a, b) => a - b);
    const uniq = [];
    for (let k = 0; k < all.length; k++) if (k === 0 || all[k] !== all[k - 1]) uniq.push(all[k]);
    const ts = Float64Array.from(uniq);
    const values = series.map((s) => {
      const out = new Float64Array(ts.length).fill(NaN);
      let j = 0;
      for (let k = 0; k < s.t.length; k++) {
        while (ts[j] < s.t[k]) j++;
        out[j] = s.v[k];
      }
      return out;
    });
    return { ts, values };
  }

  function nearestIndex(ts, t) {
    let lo = 0, hi = ts.length - 1;
    if (hi < 0) return -1;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (ts[mid] < t) lo = mid;
      else hi = mid;
    }
    return Math.abs(ts[lo] - t) <= Math.abs(ts[hi] - t) ? lo : hi;
  }

  // -------------------------------------------------------------------------- a chart

  function timeSeries(container, options) {
    if (!container || !container.appendChild) throw new TypeError('CrrCharts.timeSeries: container must be an element');
    const id = 'crr-chart-' + ++nextId;
    const hidden = new Set(); // series names switched off in the legend; kept across update()
    let opts = {};
    let model = null;
    let layout = null;
    let hoverIndex = -1; // index into model.ts under the crosshair, -1 when none
    // What drives the crosshair: the pointer (re-resolved from its x after an update, so the
    // data under a resting mouse follows a live page) or the keyboard (stays on its minute).
    let hoverSource = '';
    let hoverClientX = 0;
    let hoverT = NaN;
    let lastWidth = 0;
    let stale = false; // an update arrived while the chart was hidden
    let retryFrame = 0;
    let destroyed = false;
    let fontCache = ''; // the canvas font matching the axis labels, read once from the CSS

    // Skeleton, built once; update() only rewrites attributes and the axis group.
    const root = el('div', 'crr-chart', null);
    const head = el('div', 'crr-chart-head', root);
    const titleEl = el('div', 'crr-chart-title', head);
    titleEl.id = id + '-title';
    const summaryEl = el('div', 'crr-chart-summary', head);
    const plot = el('div', 'crr-chart-plot', root);
    const svg = svgEl('svg', { class: 'crr-chart-svg', height: HEIGHT, role: 'img', tabindex: '0' }, plot);
    const defs = svgEl('defs', {}, svg);
    const clip = svgEl('clipPath', { id: id + '-clip' }, defs);
    const clipRect = svgEl('rect', {}, clip);
    const gGrid = svgEl('g', { class: 'crr-chart-grid', 'aria-hidden': 'true' }, svg);
    const gData = svgEl('g', { class: 'crr-chart-data', 'clip-path': 'url(#' + id + '-clip)' }, svg);
    const gMarkers = svgEl('g', { class: 'crr-chart-markers', 'aria-hidden': 'true' }, svg);
    const gAxes = svgEl('g', { class: 'crr-chart-axes', 'aria-hidden': 'true' }, svg);
    const gHover = svgEl('g', { class: 'crr-chart-hover', 'aria-hidden': 'true' }, svg);
    const crosshair = svgEl('line', { class: 'crr-chart-crosshair' }, gHover);
    const tooltip = el('div', 'crr-chart-tooltip', plot);
    tooltip.setAttribute('aria-hidden', 'true');
    const live = el('div', 'crr-chart-sr', plot); // announces the keyboard-selected minute
    live.setAttribute('aria-live', 'polite');
    const empty = el('div', 'crr-chart-empty', plot);
    const legend = el('div', 'crr-chart-legend', root);
    legend.setAttribute('role', 'group');
    legend.setAttribute('aria-label', 'Series');
    let seriesPaths = []; // per series: {fill, line} SVG paths
    let dots = [];
    container.appendChild(root);

    function setOptions(o) {
      opts = Object.assign({ kind: 'line', unit: 'count', stacked: false, emptyText: 'No data' }, o || {});
      const series = (Array.isArray(opts.series) ? opts.series : []).map(prepSeries);
      const aligned = alignSeries(series);
      let step = series.length ? series[0].step : MINUTE;
      if (series.length && !series[0].t.length) step = medianStep(aligned.ts);
      let tMin = Infinity, tMax = -Infinity;
      if (aligned.ts.length) {
        tMin = aligned.ts[0];
        tMax = aligned.ts[aligned.ts.length - 1];
      }
      let x0 = opts.from !== undefined ? +opts.from : tMin;
      let x1 = opts.to !== undefined ? +opts.to : tMax;
      if (!Number.isFinite(x0) || !Number.isFinite(x1)) {
        x1 = Number.isFinite(x1) ? x1 : Date.now();
        x0 = Number.isFinite(x0) ? x0 : x1 - DAY;
      }
      if (x1 <= x0) {
        x0 -= 30 * MINUTE;
        x1 += 30 * MINUTE;
      }
      const span = x1 - x0;
      if (opts.kind === 'bar') {
        // Bars are centred on their minute; half a step each side keeps the end bars whole.
        x0 -= step / 2;
        x1 += step / 2;
      }
      model = {
        series, ts: aligned.ts, values: aligned.values, step, x0, x1, span,
        // where "now" is: the window's end when given, else the newest point of any series
        tEnd: opts.to !== undefined && Number.isFinite(+opts.to) ? +opts.to : Number.isFinite(tMax) ? tMax : x1,
        empty: !series.some((s) => s.nonZero),
        markers: (Array.isArray(opts.markers) ? opts.markers : []).filter((m) => m && Number.isFinite(+m.t)),
        crossesMidnight: dayKey(x0) !== dayKey(x1),
      };
      // Drop legend state for series that no longer exist.
      for (const name of Array.from(hidden)) if (!series.some((s) => s.name === name)) hidden.delete(name);

      root.setAttribute('data-chart', slug(opts.title));
      root.setAttribute('data-points', String(series.length ? series[0].count : 0));
      root.classList.toggle('crr-chart-is-empty', model.empty);
      titleEl.textContent = opts.title || '';
      summaryEl.textContent = summaryText();
      empty.textContent = opts.emptyText || 'No data';
      buildSeriesNodes();
      buildLegend();
    }

    function timeLabel(t) {
      return model.crossesMidnight ? dayLabel(t) + ' ' + hhmm(t) : hhmm(t);
    }

    function summaryText() {
      const s = model.series[0];
      if (!s || !s.count) return opts.emptyText || 'No data';
      const stale = s.lastT < model.tEnd - Math.max(5 * model.step, 5 * MINUTE);
      const parts = [];
      parts.push(stale ? 'last ' + formatValue(s.last, opts.unit) + ' at ' + timeLabel(s.lastT) : 'now ' + formatValue(s.last, opts.unit));
      parts.push('max ' + formatValue(s.max, opts.unit));
      if (opts.kind === 'bar' && opts.unit !== 'percent' && opts.unit !== 'ms') parts.push('total ' + formatValue(s.sum, opts.unit === 'objects/min' ? 'count' : opts.unit));
      return parts.join(' \u00b7 ');
    }

    function thresholds() {
      return (Array.isArray(opts.thresholds) ? opts.thresholds : []).filter((th) => th && Number.isFinite(+th.value)).map((th) => ({ value: +th.value, label: th.label ? String(th.label) : '' }));
    }

    function ariaLabel() {
      const m = model;
      let text = (opts.title || 'Chart') + ', ' + durationText(m.span) + '. ';
      if (m.empty) return text + (opts.emptyText || 'No data') + '.';
      text += m.series
        .map((s) => (s.count ? s.name + ': now ' + formatValue(s.last, opts.unit) + ', max ' + formatValue(s.max, opts.unit) + ' at ' + hhmm(s.maxT) : s.name + ': no data'))
        .join('; ') + '.';
      if (m.markers.length) text += ' Markers: ' + m.markers.map((mk) => (mk.label || 'marker') + ' at ' + hhmm(+mk.t)).join(', ') + '.';
      return text;
    }

    function buildSeriesNodes() {
      const n = model.series.length;
      while (seriesPaths.length > n) {
        const p = seriesPaths.pop();
        p.fill.remove();
        p.line.remove();
        p.lone.remove();
        dots.pop().remove();
      }
      while (seriesPaths.length < n) {
        seriesPaths.push({
          fill: svgEl('path', { class: 'crr-chart-fill' }, gData),
          line: svgEl('path', { class: 'crr-chart-line' }, gData),
          lone: svgEl('path', { class: 'crr-chart-lone' }, gData),
        });
        dots.push(svgEl('circle', { class: 'crr-chart-dot', r: '3.5' }, gHover));
      }
      // Keep paint order = series order (fills under lines), whatever was appended when.
      for (const p of seriesPaths) gData.appendChild(p.fill);
      for (const p of seriesPaths) gData.appendChild(p.line);
      for (const p of seriesPaths) gData.appendChild(p.lone);
      model.series.forEach((s, i) => {
        seriesPaths[i].fill.setAttribute('style', 'fill:' + s.color);
        seriesPaths[i].line.setAttribute('style', 'stroke:' + s.color);
        seriesPaths[i].lone.setAttribute('style', 'stroke:' + s.color);
        dots[i].setAttribute('style', 'stroke:' + s.color);
      });
    }

    function buildLegend() {
      const want = opts.kind + '\u0002' + model.series.map((s) => s.name + '\u0000' + s.color).join('\u0001');
      if (legend.dataset.key !== want) {
        legend.dataset.key = want;
        legend.textContent = '';
        model.series.forEach((s, i) => {
          const b = el('button', 'crr-chart-legend-item', legend);
          b.type = 'button';
          b.dataset.index = String(i);
          const sw = el('span', 'crr-chart-swatch', b);
          sw.style.background = s.color;
          if (opts.kind === 'line') sw.classList.add('crr-chart-swatch-line');
          el('span', 'crr-chart-legend-name', b).textContent = s.name;
        });
      }
      Array.from(legend.children).forEach((b, i) => {
        const s = model.series[i];
        const off = hidden.has(s.name);
        b.setAttribute('aria-pressed', off ? 'false' : 'true');
        b.title = (off ? 'Show ' : 'Hide ') + s.name;
        b.classList.toggle('crr-chart-legend-off', off);
      });
    }

    // ------------------------------------------------------------------- rendering

    function render(isRetry) {
      if (destroyed || !model) return;
      const width = Math.floor(plot.clientWidth || container.clientWidth || 0);
      if (width <= 0) {
        // Hidden (display:none): the ResizeObserver renders when it is shown. A page that
        // hides, updates and shows again within one task never looks hidden to the observer,
        // so look once more on the next frame.
        stale = true;
        if (!isRetry && !retryFrame) {
          retryFrame = requestAnimationFrame(() => {
            retryFrame = 0;
            if (stale) render(true);
          });
        }
        return;
      }
      stale = false;
      lastWidth = width;
      const m = model;
      const unit = opts.unit;
      const kind = opts.kind === 'bar' || opts.kind === 'area' ? opts.kind : 'line';
      const stacked = !!opts.stacked && kind !== 'line';
      const visible = m.series.map((s) => !hidden.has(s.name));

      // y domain over the visible series (stack sums when stacked)
      let hi = 0, lo = 0;
      if (stacked) {
        for (let k = 0; k < m.ts.length; k++) {
          let sum = 0;
          for (let i = 0; i < m.series.length; i++) {
            const v = m.values[i][k];
            if (visible[i] && v > 0) sum += v;
          }
          if (sum > hi) hi = sum;
        }
      } else {
        m.series.forEach((s, i) => {
          if (!visible[i] || !s.count) return;
          if (s.max > hi) hi = s.max;
          if (s.min < lo) lo = s.min;
        });
      }
      const fixed = Number.isFinite(+opts.yMax) && opts.yMax !== null && opts.yMax !== undefined && +opts.yMax > lo ? +opts.yMax : undefined;
      if (hi <= lo && fixed === undefined) hi = lo + (unit === 'percent' ? 100 : unit === 'ms' ? 1000 : unit === 'bytes' || unit === 'bytes/s' ? 1024 : 1);
      const plotH0 = HEIGHT - 8 - 22;
      const y = niceScale(lo, hi, unit, Math.max(2, Math.min(6, Math.floor(plotH0 / 30))), fixed);
      const fmtTick = tickFormatter(unit, y.step, Math.max(Math.abs(y.y0), Math.abs(y.y1)));
      const tickLabels = y.ticks.map(fmtTick);

      // margins: the y labels' measured width on the left, room for the last time label on the right
      if (!fontCache) fontCache = FONT_PX + 'px ' + (getComputedStyle(root).fontFamily || 'sans-serif');
      const font = fontCache;
      let labelW = 0;
      for (const l of tickLabels) labelW = Math.max(labelW, textWidth(l, font));
      const ml = Math.ceil(labelW) + 10;
      const mr = 14;
      const mt = m.markers.length ? 20 : 8;
      const mb = 22;
      const pw = Math.max(10, width - ml - mr);
      const ph = HEIGHT - mt - mb;
      const xs = pw / (m.x1 - m.x0);
      const X = (t) => ml + (t - m.x0) * xs;
      const ys = ph / (y.y1 - y.y0);
      const Y = (v) => mt + ph - (v - y.y0) * ys;
      layout = { width, ml, mr, mt, mb, pw, ph, X, Y, y, kind, stacked, visible };

      svg.setAttribute('width', String(width));
      svg.setAttribute('viewBox', '0 0 ' + width + ' ' + HEIGHT);
      clipRect.setAttribute('x', String(ml));
      clipRect.setAttribute('y', String(mt - 3));
      clipRect.setAttribute('width', String(pw + 1));
      clipRect.setAttribute('height', String(ph + 3.5));

      // grid and axes: a few dozen nodes at most, rebuilt as one string
      let grid = '';
      let axes = '';
      const right = ml + pw;
      y.ticks.forEach((v, k) => {
        const py = Math.round(Y(v)) + 0.5;
        grid += '<line class="' + (v === 0 ? 'crr-chart-zero' : 'crr-chart-gridline') + '" x1="' + ml + '" x2="' + right + '" y1="' + py + '" y2="' + py + '"/>';
        axes += '<text class="crr-chart-ylabel" x="' + (ml - 8) + '" y="' + py + '" dy="0.32em" text-anchor="end">' + esc(tickLabels[k]) + '</text>';
      });
      // The interval follows the chart's width with a nominal y-label margin, not the exact
      // plot width, so charts of one width on a page share their time ticks.
      const tt = timeTicks(m.x0, m.x1, Math.min(pw, width - 60));
      for (const t of tt) {
        const px = Math.round(X(t)) + 0.5;
        const day = m.crossesMidnight && isMidnight(t);
        const label = day ? dayLabel(t) : hhmm(t);
        const w = textWidth(label, font);
        grid += '<line class="' + (day ? 'crr-chart-daygrid' : 'crr-chart-gridline') + '" x1="' + px + '" x2="' + px + '" y1="' + mt + '" y2="' + (mt + ph) + '"/>';
        if (px - w / 2 < ml - 6 || px + w / 2 > width - 1) continue; // would collide with the y labels or overflow
        axes += '<text class="crr-chart-xlabel' + (day ? ' crr-chart-xlabel-day' : '') + '" x="' + px + '" y="' + (mt + ph + 15) + '" text-anchor="middle">' + esc(label) + '</text>';
      }
      for (const th of thresholds()) {
        if (th.value < y.y0 || th.value > y.y1) continue; // off scale: the lines never stretch the axis
        const py = Math.round(Y(th.value)) + 0.5;
        grid += '<line class="crr-chart-threshold" x1="' + ml + '" x2="' + right + '" y1="' + py + '" y2="' + py + '"/>';
        if (th.label) axes += '<text class="crr-chart-threshold-label" x="' + (right - 2) + '" y="' + (py - 4) + '" text-anchor="end">' + esc(th.label) + '</text>';
      }
      gGrid.innerHTML = grid;
      gAxes.innerHTML = axes;

      // markers: a dashed line and a label row at the top, staggered when labels would overlap
      // markers: a dashed line each and one label row at the top; markers closer than their
      // labels share one label ('paused · resumed')
      let mk = '';
      const groups = [];
      for (const marker of m.markers.slice().sort((a, b) => a.t - b.t)) {
        const t = +marker.t;
        if (t < m.x0 || t > m.x1) continue;
        const px = Math.round(X(t)) + 0.5;
        mk += '<line class="crr-chart-marker" x1="' + px + '" x2="' + px + '" y1="' + (mt - 4) + '" y2="' + (mt + ph) + '"/>';
        if (!marker.label) continue;
        const g = groups[groups.length - 1];
        const label = String(marker.label);
        if (g && px < g.px + textWidth(g.label, font) + 12) {
          if (g.label.split(' \u00b7 ').indexOf(label) < 0) g.label += ' \u00b7 ' + label;
        } else groups.push({ px, label });
      }
      for (const g of groups) {
        const w = textWidth(g.label, font);
        const start = g.px + w + 6 <= width;
        mk += '<text class="crr-chart-marker-label" x="' + (start ? g.px + 4 : g.px - 4) + '" y="' + (mt - 7) + '" text-anchor="' + (start ? 'start' : 'end') + '">' + esc(g.label) + '</text>';
      }
      gMarkers.innerHTML = mk;

      // data paths
      const gapLimit = Math.max(m.step * 2.5, MINUTE * 1.5);
      const base = Y(Math.max(0, y.y0));
      const cum = stacked ? new Float64Array(m.ts.length) : null;
      m.series.forEach((s, i) => {
        const p = seriesPaths[i];
        const show = visible[i];
        p.line.style.display = show ? '' : 'none';
        p.fill.style.display = show ? '' : 'none';
        p.lone.style.display = show ? '' : 'none';
        p.line.setAttribute('class', 'crr-chart-line crr-chart-kind-' + kind);
        p.fill.setAttribute('class', 'crr-chart-fill crr-chart-kind-' + kind + (stacked ? ' crr-chart-stacked' : ''));
        if (!show) return;
        if (kind === 'bar') {
          p.line.setAttribute('d', '');
          p.lone.setAttribute('d', '');
          p.fill.setAttribute('d', stacked ? barPath(m.ts, m.values[i], cum) : barPath(s.t, s.v, null));
        } else if (stacked) {
          const d = stackedAreaPaths(m.ts, m.values[i], cum, gapLimit);
          p.fill.setAttribute('d', d.fill);
          p.line.setAttribute('d', d.line);
          p.lone.setAttribute('d', d.lone);
        } else {
          const d = linePaths(s.t, s.v, gapLimit, kind === 'area' ? base : null);
          p.line.setAttribute('d', d.line);
          p.fill.setAttribute('d', d.fill);
          p.lone.setAttribute('d', d.lone);
        }
      });

      function linePaths(t, v, gap, baseY) {
        let line = '';
        let fill = '';
        let lone = ''; // points with a gap on both sides, drawn as dots (a line would not show them)
        let seg = '';
        let segStartX = 0, segLastX = 0, segN = 0, prevT = -Infinity;
        const flush = () => {
          if (!segN) return;
          if (segN === 1) lone += seg + 'h0.01';
          else line += seg;
          if (baseY !== null) fill += seg + 'L' + segLastX + ',' + r1(baseY) + 'L' + segStartX + ',' + r1(baseY) + 'Z';
          seg = '';
          segN = 0;
        };
        for (let k = 0; k < t.length; k++) {
          const val = v[k];
          if (Number.isNaN(val)) {
            flush();
            continue;
          }
          if (t[k] - prevT > gap) flush();
          prevT = t[k];
          const px = r1(X(t[k]));
          const py = r1(Y(val));
          if (!segN) {
            seg = 'M' + px + ',' + py;
            segStartX = px;
          } else seg += 'L' + px + ',' + py;
          segLastX = px;
          segN++;
        }
        flush();
        return { line, fill, lone };
      }

      function stackedAreaPaths(t, v, acc, gap) {
        let line = '';
        let fill = '';
        let lone = '';
        let top = [];
        let bottom = [];
        let prevT = -Infinity;
        const flush = () => {
          if (top.length) {
            if (top.length === 1) lone += 'M' + top[0] + 'h0.01';
            else line += 'M' + top.join('L');
            fill += 'M' + top.join('L') + 'L' + bottom.reverse().join('L') + 'Z';
          }
          top = [];
          bottom = [];
        };
        for (let k = 0; k < t.length; k++) {
          const val = v[k];
          if (Number.isNaN(val) || t[k] - prevT > gap) flush();
          prevT = t[k];
          if (Number.isNaN(val)) continue;
          const px = r1(X(t[k]));
          const b = acc[k];
          const tp = b + Math.max(0, val);
          top.push(px + ',' + r1(Y(tp)));
          bottom.push(px + ',' + r1(Y(b)));
          acc[k] = tp;
        }
        flush();
        return { line, fill, lone };
      }

      function barPath(t, v, acc) {
        const slot = m.step * xs; // px per sample
        const bw = slot >= 6 ? slot * 0.75 : slot >= 3 ? slot - 1 : Math.max(slot, 1);
        const half = bw / 2;
        let d = '';
        for (let k = 0; k < t.length; k++) {
          const val = v[k];
          if (!(val > 0)) continue; // null, zero: nothing to draw
          const b = acc ? acc[k] : 0;
          const tp = b + val;
          if (acc) acc[k] = tp;
          const yb = r1(Y(b));
          let yt = r1(Y(tp));
          if (yb - yt < 1) yt = yb - 1; // one event still shows a 1 px bar
          d += 'M' + r1(X(t[k]) - half) + ',' + yb + 'V' + yt + 'h' + r1(bw) + 'V' + yb + 'Z';
        }
        return d;
      }

      empty.style.left = ml + 'px';
      empty.style.width = pw + 'px';
      empty.style.top = mt + 'px';
      empty.style.height = ph + 'px';
      empty.hidden = !m.empty;
      svg.setAttribute('aria-label', ariaLabel());

      if (hoverIndex >= 0) {
        const i = hoverSource === 'pointer' ? indexAtClientX(hoverClientX) : nearestIndex(m.ts, hoverT);
        if (i >= 0) showHover(i, false);
        else hideHover();
      }
    }

    // --------------------------------------------------------------------- hover

    function showHover(index, announce) {
      const m = model;
      const L = layout;
      if (!L || index < 0 || index >= m.ts.length) return hideHover();
      hoverIndex = index;
      const t = m.ts[index];
      hoverT = t;
      const px = Math.round(L.X(t)) + 0.5;
      crosshair.setAttribute('x1', String(px));
      crosshair.setAttribute('x2', String(px));
      crosshair.setAttribute('y1', String(L.mt));
      crosshair.setAttribute('y2', String(L.mt + L.ph));
      gHover.style.display = 'block';

      let rows = '';
      let plain = timeLabel(t);
      let total = 0;
      let shown = 0;
      let acc = 0;
      m.series.forEach((s, i) => {
        const v = m.values[i][index];
        const vis = L.visible[i];
        if (vis && L.kind !== 'bar' && !Number.isNaN(v)) {
          const yv = L.stacked ? (acc += Math.max(0, v)) : v;
          dots[i].setAttribute('cx', String(px));
          dots[i].setAttribute('cy', String(r1(L.Y(yv))));
          dots[i].style.display = '';
        } else dots[i].style.display = 'none';
        if (!vis) return;
        shown++;
        if (!Number.isNaN(v)) total += v;
        const fv = formatValue(Number.isNaN(v) ? null : v, opts.unit);
        rows += '<div class="crr-chart-tip-row"><span class="crr-chart-swatch" style="background:' + esc(s.color) + '"></span><span class="crr-chart-tip-name">' + esc(s.name) + '</span><span class="crr-chart-tip-value">' + esc(fv) + '</span></div>';
        plain += ', ' + s.name + ' ' + fv;
      });
      if (L.stacked && shown > 1) {
        rows += '<div class="crr-chart-tip-row crr-chart-tip-total"><span class="crr-chart-swatch"></span><span class="crr-chart-tip-name">Total</span><span class="crr-chart-tip-value">' + esc(formatValue(total, opts.unit)) + '</span></div>';
      }
      const near = m.markers.filter((mk) => Math.abs(+mk.t - t) <= m.step / 2 + 1 && mk.label);
      for (const mk of near) {
        rows += '<div class="crr-chart-tip-marker">' + esc(mk.label) + ' at ' + esc(hhmm(+mk.t)) + '</div>';
        plain += ', ' + mk.label;
      }
      tooltip.innerHTML = '<div class="crr-chart-tip-time">' + esc(timeLabel(t)) + '</div>' + rows;
      tooltip.style.display = 'block';
      const tw = tooltip.offsetWidth;
      let left = px + 12;
      if (left + tw > L.width - 2) left = px - 12 - tw;
      if (left < 0) left = Math.max(0, L.width - tw);
      tooltip.style.left = left + 'px';
      tooltip.style.top = L.mt + 'px';
      if (announce) live.textContent = plain;
    }

    function hideHover() {
      hoverIndex = -1;
      gHover.style.display = 'none';
      tooltip.style.display = 'none';
    }

    function indexAtClientX(clientX) {
      if (!layout || !model.ts.length) return -1;
      const rect = svg.getBoundingClientRect();
      const x = clientX - rect.left;
      const L = layout;
      if (x < L.ml - 4 || x > L.ml + L.pw + 4) return -1;
      const t = model.x0 + (x - L.ml) / (L.pw / (model.x1 - model.x0));
      const i = nearestIndex(model.ts, t);
      const ti = model.ts[i];
      return ti >= model.x0 && ti <= model.x1 ? i : -1;
    }

    function onPointerMove(e) {
      hoverSource = 'pointer';
      hoverClientX = e.clientX;
      const i = indexAtClientX(e.clientX);
      if (i < 0) hideHover();
      else if (i !== hoverIndex || tooltip.style.display !== 'block') showHover(i, false);
    }
    function onPointerLeave() {
      if (hoverSource === 'pointer') hideHover();
    }
    function onKeyDown(e) {
      const n = model ? model.ts.length : 0;
      if (!n) return;
      let i = hoverIndex < 0 ? n - 1 : hoverIndex;
      const big = Math.max(1, Math.round(HOUR / model.step));
      switch (e.key) {
        case 'ArrowLeft': i -= e.shiftKey ? big : 1; break;
        case 'ArrowRight': i += e.shiftKey ? big : 1; break;
        case 'PageUp': i -= big; break;
        case 'PageDown': i += big; break;
        case 'Home': i = 0; break;
        case 'End': i = n - 1; break;
        case 'Escape': hideHover(); return;
        default: return;
      }
      e.preventDefault();
      hoverSource = 'key';
      showHover(Math.max(0, Math.min(n - 1, i)), true);
    }
    function onFocus() {
      if (hoverIndex < 0 && model && model.ts.length) {
        hoverSource = 'key';
        showHover(model.ts.length - 1, true);
      }
    }
    function onBlur() {
      hideHover();
    }
    function onLegendClick(e) {
      const b = e.target.closest('.crr-chart-legend-item');
      if (!b || !legend.contains(b)) return;
      const s = model.series[+b.dataset.index];
      if (!s) return;
      if (hidden.has(s.name)) hidden.delete(s.name);
      else hidden.add(s.name);
      buildLegend();
      render();
    }

    svg.addEventListener('pointermove', onPointerMove);
    svg.addEventListener('pointerdown', onPointerMove);
    svg.addEventListener('pointerleave', onPointerLeave);
    svg.addEventListener('keydown', onKeyDown);
    svg.addEventListener('focus', onFocus);
    svg.addEventListener('blur', onBlur);
    legend.addEventListener('click', onLegendClick);

    let rafPending = 0;
    const ro = typeof ResizeObserver === 'function'
      ? new ResizeObserver(() => {
        if (rafPending) return;
        rafPending = requestAnimationFrame(() => {
          rafPending = 0;
          const w = Math.floor(plot.clientWidth || 0);
          if (w && (w !== lastWidth || stale)) render();
        });
      })
      : null;
    if (ro) ro.observe(plot);

    hideHover();
    setOptions(options);
    render();

    return {
      update(newOptions) {
        if (destroyed) return;
        setOptions(newOptions);
        render();
      },
      destroy() {
        if (destroyed) return;
        destroyed = true;
        if (ro) ro.disconnect();
        if (rafPending) cancelAnimationFrame(rafPending);
        if (retryFrame) cancelAnimationFrame(retryFrame);
        svg.removeEventListener('pointermove', onPointerMove);
        svg.removeEventListener('pointerdown', onPointerMove);
        svg.removeEventListener('pointerleave', onPointerLeave);
        svg.removeEventListener('keydown', onKeyDown);
        svg.removeEventListener('focus', onFocus);
        svg.removeEventListener('blur', onBlur);
        legend.removeEventListener('click', onLegendClick);
        root.remove();
      },
      get element() {
        return root;
      },
    };
  }

  window.CrrCharts = Object.freeze({ timeSeries, format: formatValue });
})();
