// The loss plot, drawn on a <canvas> with no plot library: training loss per step as a line, validation loss per
// epoch as dots on a dashed line. Colours are CSS custom properties, so the plot follows light and dark mode.
// The canvas is sized to its box times devicePixelRatio, so lines stay sharp on high-density screens.

const PAD = { left: 52, right: 14, top: 12, bottom: 30 };

export function drawLossPlot(canvas, { train, validation, xMax }) {
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;  // hidden (another tab): drawn again when shown
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(canvas);
  const colour = (name) => style.getPropertyValue(name).trim() || "#888";
  ctx.font = `12px ${style.fontFamily}`;
  ctx.fillStyle = colour("--muted");

  const values = [...train, ...validation].map(([, y]) => y);
  if (!values.length) {
    ctx.fillText("The loss appears here once the first step is done.", PAD.left, height / 2);
    return;
  }
  let [low, high] = [Math.min(...values), Math.max(...values)];
  if (high - low < 1e-9) [low, high] = [low - 0.5, high + 0.5];
  const margin = (high - low) * 0.06;
  [low, high] = [Math.max(0, low - margin), high + margin];
  const xHigh = Math.max(xMax, 1);
  const x = (step) => PAD.left + (step / xHigh) * (width - PAD.left - PAD.right);
  const y = (loss) => PAD.top + (1 - (loss - low) / (high - low)) * (height - PAD.top - PAD.bottom);

  drawAxes(ctx, { low, high, xHigh, x, y, width, height, grid: colour("--grid"), text: colour("--muted") });
  drawLine(ctx, train.map(([s, l]) => [x(s), y(l)]), colour("--plot-train"), []);
  drawLine(ctx, validation.map(([s, l]) => [x(s), y(l)]), colour("--plot-validation"), [5, 4], true);
}

function drawAxes(ctx, { low, high, xHigh, x, y, width, height, grid, text }) {
  ctx.strokeStyle = grid;
  ctx.fillStyle = text;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const yTicks = ticks(low, high, 4);
  const decimals = Math.max(0, -Math.floor(Math.log10((yTicks[1] - yTicks[0]) || 1)));
  for (const value of yTicks) {
    ctx.beginPath();
    ctx.moveTo(PAD.left, y(value));
    ctx.lineTo(width - PAD.right, y(value));
    ctx.stroke();
    ctx.fillText(value.toFixed(decimals), PAD.left - 6, y(value));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const value of ticks(0, xHigh, 6).filter(Number.isInteger)) {
    ctx.fillText(String(value), x(value), height - PAD.bottom + 6);
  }
  ctx.textAlign = "left";
  ctx.fillText("step", 4, height - PAD.bottom + 6);
}

function drawLine(ctx, points, colour, dash, dots = false) {
  if (!points.length) return;
  ctx.strokeStyle = colour;
  ctx.fillStyle = colour;
  ctx.lineWidth = 2;
  ctx.setLineDash(dash);
  ctx.beginPath();
  points.forEach(([px, py], index) => (index ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
  ctx.stroke();
  ctx.setLineDash([]);
  if (dots || points.length === 1) {
    for (const [px, py] of points) {
      ctx.beginPath();
      ctx.arc(px, py, 3.5, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
}

// Round tick values (1, 2 or 5 times a power of ten) covering [low, high] in about `count` steps.
export function ticks(low, high, count) {
  const raw = (high - low) / count;
  if (!(raw > 0)) return [low];
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const values = [];
  for (let value = Math.ceil(low / step) * step; value <= high + step * 1e-9; value += step) {
    values.push(Number(value.toPrecision(12)));
  }
  return values;
}
