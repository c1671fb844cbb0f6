// Chat, side by side: one prompt goes to every column at once. Each column is a model (the base model, a persona,
// or a pinned version `name@N`) with its own conversation; answers stream into their columns as they are generated.
// The sampling settings apply to every column, so "greedy" (temperature 0) makes the comparison fair.

import { ApiError, request } from "./api.js";
import { el, showError } from "./dom.js";
import { readEvents } from "./sse.js";

const MAX_COLUMNS = 4;  // the base model and up to three personas

export class Chat {
  constructor() {
    this.columnsBox = document.getElementById("columns");
    this.options = document.getElementById("model-options");
    this.prompt = document.getElementById("prompt");
    this.sendButton = document.getElementById("send");
    this.stopButton = document.getElementById("stop");
    this.addButton = document.getElementById("add-column");
    this.errorRegion = document.getElementById("chat-error");
    this.greedy = document.getElementById("greedy");
    this.temperature = document.getElementById("temperature");
    this.columns = [];
    this.controller = null;
    this.wire();
  }

  wire() {
    document.getElementById("chat-form").addEventListener("submit", (event) => { event.preventDefault(); this.send(); });
    this.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {  // Shift+Enter keeps its newline
        event.preventDefault();
        this.send();
      }
    });
    this.stopButton.addEventListener("click", () => this.controller && this.controller.abort());
    this.addButton.addEventListener("click", () => this.addColumn(""));
    document.getElementById("new-chat").addEventListener("click", () => this.clear());
    this.greedy.addEventListener("change", () => { this.temperature.disabled = this.greedy.checked; });
  }

  // The models the server offers, for each column's picker (free text still takes `name@N`).
  setModels(ids) {
    this.options.replaceChildren(...ids.map((id) => el("option", { value: id })));
  }

  // Show exactly these models, one column each, with fresh conversations.
  useModels(models) {
    for (const column of this.columns) column.node.remove();
    this.columns = [];
    for (const model of models.slice(0, MAX_COLUMNS)) this.addColumn(model);
  }

  addColumn(model) {
    if (this.columns.length >= MAX_COLUMNS) return;
    const number = this.columns.length + 1;
    const input = el("input", { list: "model-options", value: model, spellcheck: false, placeholder: "a model or name@version" });
    const messages = el("div", { class: "messages", "aria-live": "polite" });
    const column = { input, messages, history: [] };
    const remove = el("button", { type: "button", class: "quiet", "aria-label": "Remove this column",
      onclick: () => this.removeColumn(column) }, "✕");
    column.node = el("section", { class: "column", "aria-label": `Column ${number}` },
      el("header", {}, el("label", {}, "Model", input), remove), messages);
    this.columns.push(column);
    this.columnsBox.append(column.node);
    this.updateButtons();
  }

  removeColumn(column) {
    if (this.columns.length <= 1) return;
    column.node.remove();
    this.columns = this.columns.filter((c) => c !== column);
    this.updateButtons();
  }

  clear() {
    for (const column of this.columns) {
      column.history = [];
      column.messages.replaceChildren();
    }
    showError(this.errorRegion, null);
  }

  updateButtons() {
    this.addButton.disabled = this.columns.length >= MAX_COLUMNS;
  }

  settings() {
    const number = (id) => {
      const text = document.getElementById(id).value.trim();
      return text === "" ? undefined : Number(text);
    };
    return {
      temperature: this.greedy.checked ? 0 : number("temperature"),
      max_tokens: number("max-tokens"),
      seed: number("seed"),
    };
  }

  async send() {
    const text = this.prompt.value.trim();
    if (!text || this.controller) return;
    showError(this.errorRegion, null);
    this.prompt.value = "";
    this.controller = new AbortController();
    this.sendButton.disabled = true;
    this.stopButton.hidden = false;
    const settings = this.settings();
    try {
      await Promise.all(this.columns.map((column) => this.answer(column, text, settings, this.controller.signal)));
    } finally {
      this.controller = null;
      this.sendButton.disabled = false;
      this.stopButton.hidden = true;
      this.prompt.focus();
    }
  }

  // Stream one column's answer; a failure stays in its column, the other columns carry on.
  async answer(column, text, settings, signal) {
    const model = column.input.value.trim();
    column.messages.append(el("div", { class: "msg user" }, text));
    const answerText = el("span", { class: "text" });
    const bubble = el("div", { class: "msg assistant", dataset: { state: "streaming" } }, answerText);
    column.messages.append(bubble);
    if (!model) {
      this.fail(bubble, answerText, new Error("Pick a model for this column."));
      return;
    }
    const messages = [...column.history, { role: "user", content: text }];
    let content = "";
    let finish = null;
    try {
      const response = await request("POST", "/v1/chat/completions", {
        json: { model, messages, stream: true, ...settings }, signal,
      });
      for await (const event of readEvents(response)) {
        if (event.data === "[DONE]") break;
        const chunk = JSON.parse(event.data);
        if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.code);
        const choice = (chunk.choices || [])[0] || {};
        if (choice.delta && choice.delta.content) {
          content += choice.delta.content;
          answerText.textContent = content;
          column.messages.scrollTop = column.messages.scrollHeight;
        }
        finish = choice.finish_reason || finish;
      }
      bubble.dataset.state = "done";
      bubble.dataset.finish = finish || "";
      if (finish === "length") bubble.append(el("span", { class: "meta" }, "(stopped at max tokens)"));
      column.history = [...messages, { role: "assistant", content }];
    } catch (error) {
      if (error.name === "AbortError") {
        bubble.dataset.state = "stopped";
        bubble.append(el("span", { class: "meta" }, "(stopped)"));
        column.history = [...messages, { role: "assistant", content }];
      } else {
        this.fail(bubble, answerText, error);
      }
    }
  }

  fail(bubble, answerText, error) {
    bubble.dataset.state = "error";
    answerText.textContent = error.message;
  }
}
