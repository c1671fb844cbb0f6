// One training job on the page: its event stream folded into state (training_state.js), drawn as a progress bar,
// a live loss plot with a table of the same numbers (the plot's text alternative), and, when it is done, the
// evaluation samples and a button to chat with the new persona. A dropped stream is resumed (with Last-Event-ID
// when the server gave ids); the final record is read once at the end, since it holds the evaluation either way.

import { getJSON, request } from "./api.js";
import { el, formatLoss, formatSeconds, showError } from "./dom.js";
import { drawLossPlot } from "./plot.js";
import { SSEParser, readEvents } from "./sse.js";
import { TERMINAL, applyEvent, initialState, plotSeries } from "./training_state.js";

const RECONNECTS = 5;

export class JobView {
  constructor({ onChat }) {
    this.box = document.getElementById("job");
    this.canvas = document.getElementById("loss-plot");
    this.errorRegion = document.getElementById("job-error");
    this.chatButton = document.getElementById("chat-with-it");
    this.state = null;
    this.controller = null;
    document.getElementById("cancel-training").addEventListener("click", () => this.cancel());
    this.chatButton.addEventListener("click", () => onChat(this.state.name));
    new ResizeObserver(() => this.state && this.draw()).observe(this.canvas);
  }

  async watch(job) {
    if (this.controller) this.controller.abort();  // a page watches one job at a time
    const controller = (this.controller = new AbortController());
    this.state = applyEvent(initialState(job.id), job);
    showError(this.errorRegion, null);
    this.box.hidden = false;
    this.render();
    let lastId = null;
    for (let attempt = 0; attempt <= RECONNECTS && !TERMINAL.includes(this.state.status); attempt += 1) {
      try {
        const headers = lastId ? { "Last-Event-ID": lastId } : {};
        const response = await request("GET", `/v1/trainings/${job.id}/events`, { headers, signal: controller.signal });
        const parser = new SSEParser();
        for await (const event of readEvents(response, parser)) {
          if (parser.lastId) lastId = parser.lastId;
          if (event.data === "[DONE]") break;
          const data = JSON.parse(event.data);
          // a server may name the type in the SSE `event:` field instead of the data
          if (event.event !== "message" && data && data.type === undefined) data.type = event.event;
          this.update(data);
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        showError(this.errorRegion, error);
        if (error.status >= 400 && error.status < 500) break;  // the job is gone or not ours: retrying will not help
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    }
    if (controller.signal.aborted) return;
    try {
      this.update(await getJSON(`/v1/trainings/${job.id}`));
    } catch (error) {
      showError(this.errorRegion, error);
    }
  }

  update(event) {
    this.state = applyEvent(this.state, event);
    this.render();
  }

  async cancel() {
    if (!this.state) return;
    try {
      this.update(await (await request("DELETE", `/v1/trainings/${this.state.id}`)).json());
    } catch (error) {
      showError(this.errorRegion, error);
    }
  }

  render() {
    const state = this.state;
    const done = TERMINAL.includes(state.status);
    document.getElementById("job-title").textContent = `Training ${state.name || ""}`;
    const badge = document.getElementById("job-status");
    badge.textContent = state.status;
    badge.dataset.status = state.status;
    this.box.dataset.status = state.status;
    document.getElementById("cancel-training").hidden = done;
    this.chatButton.hidden = state.status !== "succeeded";
    const { step = 0, total_steps: total, epoch, remaining_s: remaining } = state.progress;
    const bar = document.getElementById("job-progress");
    bar.max = total || 1;
    bar.value = state.status === "succeeded" ? bar.max : Math.min(step, bar.max);
    const parts = [total ? `step ${step} of ${total}` : "waiting to start"];
    if (epoch) parts.push(`epoch ${epoch}${Number.isInteger(state.epochs) ? ` of ${state.epochs}` : ""}`);
    if (!done && Number.isFinite(remaining)) parts.push(`about ${formatSeconds(remaining)} left`);
    if (state.status === "succeeded" && state.resultVersion) parts.push(`stored as ${state.name}@${state.resultVersion}`);
    document.getElementById("job-progress-text").textContent = parts.join(" · ");
    if (state.error) showError(this.errorRegion, new Error(state.error));
    this.renderNumbers();
    this.renderEvaluation();
    this.draw();
  }

  draw() {
    const series = plotSeries(this.state);
    const last = series.train.length ? series.train[series.train.length - 1][1] : null;
    this.canvas.setAttribute("aria-label", last === null ? "Loss plot: no steps yet"
      : `Loss plot: ${series.train.length} steps, latest training loss ${formatLoss(last)}`);
    this.canvas.dataset.points = String(series.train.length);
    document.getElementById("legend-validation").hidden = !series.validation.length;
    drawLossPlot(this.canvas, series);
  }

  renderNumbers() {
    const rows = [];
    this.state.losses.forEach((loss, index) => {
      if (Number.isFinite(loss)) rows.push(el("tr", {}, el("td", {}, String(index + 1)), el("td", {}, formatLoss(loss))));
    });
    document.getElementById("loss-rows").replaceChildren(...rows);
    document.getElementById("validation-rows").replaceChildren(...this.state.validation.map((point) =>
      el("tr", {}, el("td", {}, String(point.epoch)), el("td", {}, formatLoss(point.loss)))));
  }

  renderEvaluation() {
    const samples = (this.state.evaluation && this.state.evaluation.samples) || [];
    document.getElementById("evaluation").hidden = !samples.length;
    document.getElementById("sample-rows").replaceChildren(...samples.map((sample) =>
      el("tr", {}, el("td", {}, sample.prompt ?? ""), el("td", {}, sample.persona ?? ""), el("td", {}, sample.base ?? ""))));
  }
}
