// Train: examples (JSONL text, a .jsonl file, or a prompt/completion form) and a recipe in, a training job out.
// The recipe's defaults come from the server's own OpenAPI schema, so the page never keeps a second copy of them;
// fields the server does not offer (validation, evaluation prompts) stay hidden. The job is then watched
// (see job_view.js) until it ends.

import { request, sendJSON } from "./api.js";
import { el, showError } from "./dom.js";
import { JobView } from "./job_view.js";

export class Train {
  constructor({ onChat }) {
    this.form = document.getElementById("train-form");
    this.errorRegion = document.getElementById("train-error");
    this.rows = document.getElementById("examples-rows");
    this.job = new JobView({ onChat });
    this.wire();
    for (let i = 0; i < 3; i += 1) this.addRow();
  }

  wire() {
    this.form.addEventListener("submit", (event) => { event.preventDefault(); this.start(); });
    for (const radio of this.form.querySelectorAll('input[name="examples-mode"]')) {
      radio.addEventListener("change", () => this.showMode());
    }
    document.getElementById("add-example").addEventListener("click", () => this.addRow());
    document.getElementById("examples-file").addEventListener("change", async (event) => {
      const file = event.target.files[0];
      if (!file) return;
      document.getElementById("examples-text").value = await file.text();
      this.form.querySelector('input[value="jsonl"]').checked = true;
      this.showMode();
    });
  }

  mode() {
    return this.form.querySelector('input[name="examples-mode"]:checked').value;
  }

  showMode() {
    document.getElementById("examples-jsonl").hidden = this.mode() !== "jsonl";
    document.getElementById("examples-form").hidden = this.mode() !== "form";
  }

  addRow() {
    const number = this.rows.children.length + 1;
    const row = el("tr", {},
      el("td", {}, el("input", { "aria-label": `Prompt ${number}`, class: "example-prompt" })),
      el("td", {}, el("input", { "aria-label": `Completion ${number}`, class: "example-completion" })),
      el("td", {}, el("button", { type: "button", class: "quiet", "aria-label": `Remove example ${number}`,
        onclick: () => row.remove() }, "✕")));
    this.rows.append(row);
  }

  // Fill the recipe fields with the server's defaults and show the optional fields it accepts.
  async loadDefaults() {
    let schemas;
    try {
      schemas = (await (await request("GET", "/openapi.json")).json()).components.schemas;
    } catch {
      return;  // empty fields mean "the server's default", so the form still works
    }
    const groups = { hyperparameters: schemas.Hyperparameters, intervention: schemas.InterventionSpec, "": schemas.TrainingRequest };
    for (const input of this.form.querySelectorAll("[data-field]")) {
      const schema = groups[input.dataset.group || ""];
      const property = schema && schema.properties && schema.properties[input.dataset.field];
      if (!property) continue;
      const wrapper = input.closest("[data-optional]");
      if (wrapper) wrapper.hidden = false;
      if (input.tagName === "SELECT") {
        const choices = property.enum || [];
        input.replaceChildren(...choices.map((value) => el("option", { value }, value)));
      }
      if (property.default === undefined || property.default === null) continue;
      if (input.type === "checkbox") input.checked = Boolean(property.default);
      else input.value = Array.isArray(property.default) ? property.default.join(", ") : String(property.default);
    }
  }

  examples() {
    if (this.mode() === "form") {
      return [...this.rows.children]
        .map((row) => ({
          prompt: row.querySelector(".example-prompt").value.trim(),
          completion: row.querySelector(".example-completion").value.trim(),
        }))
        .filter((example) => example.prompt || example.completion);
    }
    const examples = [];
    document.getElementById("examples-text").value.split(/\r?\n/).forEach((line, index) => {
      if (!line.trim()) return;
      try {
        examples.push(JSON.parse(line));
      } catch (error) {
        throw new Error(`Line ${index + 1} of the examples is not JSON: ${error.message}`);
      }
    });
    return examples;
  }

  // The request body: only fields with a value, so an empty field means the server's default.
  body() {
    const body = { name: document.getElementById("train-name").value.trim(), examples: this.examples() };
    const description = document.getElementById("train-description").value.trim();
    if (description) body.description = description;
    if (document.getElementById("replace").checked) body.replace = true;
    for (const input of this.form.querySelectorAll("[data-field]")) {
      if (input.closest("[data-optional][hidden]")) continue;
      const value = fieldValue(input);
      if (value === undefined) continue;
      const group = input.dataset.group;
      const target = group ? (body[group] = body[group] || {}) : body;
      target[input.dataset.field] = value;
    }
    return body;
  }

  async start() {
    showError(this.errorRegion, null);
    const button = document.getElementById("start-training");
    button.disabled = true;
    try {
      const job = await sendJSON("POST", "/v1/trainings", this.body());
      this.job.watch(job);
    } catch (error) {
      showError(this.errorRegion, error);
    } finally {
      button.disabled = false;
    }
  }
}

// A form field's value for the request (undefined: not given). Text the server may accept as it is (epochs
// "auto", say) goes as text; the server's validation answers anything else.
function fieldValue(input) {
  if (input.type === "checkbox") return input.checked;
  const text = input.value.trim();
  if (text === "") return undefined;
  switch (input.dataset.kind) {
    case "number": return Number.isFinite(Number(text)) ? Number(text) : text;
    case "int-list": return text.split(/[\s,]+/).filter(Boolean).map((part) => (/^-?\d+$/.test(part) ? Number(part) : part));
    case "lines": return text.split(/\r?\n/).map((line) => line.trim()).filter(Boolean);
    default: return /^-?\d+$/.test(text) ? Number(text) : text;  // ints (epochs, rank) or words ("auto", "loreft")
  }
}
