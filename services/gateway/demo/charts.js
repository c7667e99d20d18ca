// Live line charts on a plain <canvas>: a sliding time window, one line per
// series, gaps where a value is null, the y axis scaled to what is visible.

const PALETTE = ['#2463eb', '#e8590c', '#12b886', '#ae3ec9', '#f59f00', '#0c8599', '#e64980', '#5c940d'];

/** A "nice" upper bound for the y axis: 1, 2 or 5 times a power of ten. */
export function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function formatValue(value) {
  if (value >= 1e9) return `${+(value / 1e9).toFixed(1)}G`;
  if (value >= 1e6) return `${+(value / 1e6).toFixed(1)}M`;
  if (value >= 1e3) return `${+(value / 1e3).toFixed(1)}k`;
  if (value >= 10 || value === 0) return `${Math.round(value)}`;
  return `${+value.toPrecision(2)}`;
}

export class LineChart {
  /**
   * @param {HTMLElement} parent where the chart goes
   * @param {{title: string, windowMs?: number}} options
   */
  constructor(parent, { title, windowMs = 90_000 }) {
    this.windowMs = windowMs;
    /** @type {Map<string, {label: string, color: string, dashed: boolean, points: {t: number, v: number | null}[]}>} */
    this.series = new Map();
    this.root = document.createElement('div');
    this.root.className = 'chart';
    const heading = document.createElement('h3');
    heading.textContent = title;
    this.canvas = document.createElement('canvas');
    this.canvas.setAttribute('role', 'img');
    this.canvas.setAttribute('aria-label', title);
    this.canvas.dataset.points = '0';
    this.legend = document.createElement('div');
    this.legend.className = 'legend';
    this.root.append(heading, this.canvas, this.legend);
    parent.append(this.root);
  }

  /** Adds a point to series `key` (created on first use), keeping points in time order. */
  add(key, label, t, v, { dashed = false } = {}) {
    let series = this.series.get(key);
    if (series === undefined) {
      series = { label, color: PALETTE[this.series.size % PALETTE.length], dashed, points: [] };
      this.series.set(key, series);
      this.renderLegend();
    }
    const value = typeof v === 'number' && Number.isFinite(v) ? v : null;
    const points = series.points;
    let i = points.length;
    while (i > 0 && points[i - 1].t > t) i--;
    points.splice(i, 0, { t, v: value });
    // Keep a little more than the window.
    const horizon = t - 2 * this.windowMs;
    while (points.length > 0 && points[0].t < horizon) points.shift();
  }

  renderLegend() {
    this.legend.replaceChildren(
      ...[...this.series.values()].map((s) => {
        const item = document.createElement('span');
        const swatch = document.createElement('i');
        swatch.style.background = s.color;
        if (s.dashed) swatch.style.opacity = '0.6';
        item.append(swatch, s.label);
        return item;
      }),
    );
  }

  /** Draws the window ending at `now`. */
  draw(now = Date.now()) {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    const w = width / ratio;
    const h = height / ratio;
    ctx.clearRect(0, 0, w, h);

    const start = now - this.windowMs;
    let max = 0;
    let plotted = 0;
    for (const s of this.series.values()) {
      for (const p of s.points) if (p.t >= start && p.v !== null && p.v > max) max = p.v;
    }
    const top = niceMax(max);
    const left = 42;
    const right = 8;
    const upper = 8;
    const bottom = 18;
    const plotW = w - left - right;
    const plotH = h - upper - bottom;
    const x = (t) => left + ((t - start) / this.windowMs) * plotW;
    const y = (v) => upper + plotH - (v / top) * plotH;

    // Grid and axes.
    ctx.font = '11px system-ui, "DejaVu Sans", sans-serif';
    ctx.fillStyle = '#6b7385';
    ctx.strokeStyle = '#e6e9ef';
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    // Round steps: 1 and 5 split in five (0.2, 1), 2 in four (0.5).
    const leading = Math.round(top / 10 ** Math.floor(Math.log10(top)));
    const divisions = leading === 2 ? 4 : 5;
    for (let i = 0; i <= divisions; i++) {
      const value = (top * i) / divisions;
      const yy = Math.round(y(value)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, yy);
      ctx.lineTo(w - right, yy);
      ctx.stroke();
      ctx.fillText(formatValue(value), left - 6, yy);
    }
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    const seconds = this.windowMs / 1000;
    for (let s = 0; s <= seconds; s += 30) {
      const xx = x(start + s * 1000);
      ctx.fillText(s === seconds ? 'now' : `-${seconds - s}s`, xx, h - bottom + 4);
    }

    // Lines: consecutive non-null points joined, a lone point as a dot.
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, upper - 2, plotW, plotH + 4);
    ctx.clip();
    for (const s of this.series.values()) {
      ctx.strokeStyle = s.color;
      ctx.fillStyle = s.color;
      ctx.lineWidth = 2;
      ctx.setLineDash(s.dashed ? [5, 4] : []);
      const visible = s.points.filter((p, i, all) => p.t >= start || all[i + 1]?.t >= start);
      let run = [];
      const flush = () => {
        if (run.length === 1) {
          ctx.beginPath();
          ctx.arc(x(run[0].t), y(run[0].v), 2.5, 0, 2 * Math.PI);
          ctx.fill();
        } else if (run.length > 1) {
          ctx.beginPath();
          run.forEach((p, i) => (i === 0 ? ctx.moveTo(x(p.t), y(p.v)) : ctx.lineTo(x(p.t), y(p.v))));
          ctx.stroke();
        }
        run = [];
      };
      for (const p of visible) {
        if (p.v === null) flush();
        else {
          run.push(p);
          if (p.t >= start) plotted++;
        }
      }
      flush();
    }
    ctx.restore();
    ctx.setLineDash([]);
    canvas.dataset.points = String(plotted);
    canvas.dataset.max = String(max);
  }
}
