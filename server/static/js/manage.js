// Manage: the tenant's interventions and other tenants' public ones (as `owner/name`, read-only here), with their
// description, config, size and versions (validation loss, promote, delete one), an upload form for an artifact or a
// zipped pyreft save, and delete with a confirmation. Every failure shows the API's own message.

import { request, getJSON } from "./api.js";
import { el, formatBytes, formatLoss, showError } from "./dom.js";

export class Manage {
  constructor({ onChanged, onChat }) {
    this.onChanged = onChanged;
    this.onChat = onChat;
    this.rows = document.getElementById("intervention-rows");
    this.errorRegion = document.getElementById("manage-error");
    this.uploadStatus = document.getElementById("upload-status");
    document.getElementById("upload-form").addEventListener("submit", (event) => { event.preventDefault(); this.upload(); });
    document.getElementById("refresh-list").addEventListener("click", () => this.refresh());
  }

  async refresh() {
    try {
      const { data } = await getJSON("/v1/interventions");
      this.rows.replaceChildren(...data.map((record) => this.row(record)));
      document.getElementById("no-interventions").hidden = data.length > 0;
      showError(this.errorRegion, null);
    } catch (error) {
      showError(this.errorRegion, error);
    }
  }

  row(record) {
    const own = !record.id.includes("/");  // another tenant's public one is listed as owner/name
    const actions = el("div", { class: "actions" },
      el("button", { type: "button", onclick: () => this.onChat(record.id) }, "Chat"),
      el("button", { type: "button", "aria-expanded": "false", onclick: (event) => this.toggleVersions(record, event.target) },
        "Versions"),
      own && el("button", { type: "button", onclick: () => this.remove(record.id) }, "Delete"));
    const name = el("td", {}, el("strong", {}, record.id),
      record.public ? el("span", { class: "muted" }, own ? " (public)" : ` (public, by ${record.owner})`) : null);
    return el("tr", { dataset: { id: record.id } }, name, el("td", {}, record.description || ""),
      el("td", {}, describeConfig(record.config)), el("td", {}, `v${record.version}`),
      el("td", {}, formatBytes(record.size_bytes)), el("td", {}, actions));
  }

  async toggleVersions(record, button) {
    const row = button.closest("tr");
    if (row.nextElementSibling && row.nextElementSibling.classList.contains("versions")) {
      row.nextElementSibling.remove();
      button.setAttribute("aria-expanded", "false");
      return;
    }
    const [owner, name] = record.id.includes("/") ? record.id.split("/") : [null, record.id];
    const query = owner ? `?owner=${encodeURIComponent(owner)}` : "";
    try {
      const { data } = await getJSON(`/v1/interventions/${encodeURIComponent(name)}/versions${query}`);
      const table = el("table", { class: "list" },
        el("thead", {}, el("tr", {}, ...["Version", "Created", "Size", "Source", "Validation loss", ""].map((h) =>
          el("th", { scope: "col" }, h)))),
        el("tbody", {}, ...data.map((version) => this.versionRow(version, name, !owner))));
      row.after(el("tr", { class: "versions" }, el("td", { colSpan: 6 }, table)));
      button.setAttribute("aria-expanded", "true");
    } catch (error) {
      showError(this.errorRegion, error);
    }
  }

  versionRow(version, name, own) {
    const path = `/v1/interventions/${encodeURIComponent(name)}/versions/${version.version}`;
    const actions = el("div", { class: "actions" },
      el("button", { type: "button", onclick: () => this.onChat(version.id) }, "Chat"),
      own && !version.current && el("button", { type: "button",
        onclick: () => this.act("POST", `${path}/promote`, `${version.id} is now current`) }, "Promote"),
      own && !version.current && el("button", { type: "button", onclick: () => this.confirmAct(
        `Delete version ${version.id}? This cannot be undone.`, "DELETE", path, `deleted ${version.id}`) }, "Delete"));
    return el("tr", { dataset: { version: version.id } },
      el("td", {}, el("code", {}, version.id), version.current ? el("span", { class: "muted" }, " (current)") : null),
      el("td", {}, new Date(version.created * 1000).toLocaleString()), el("td", {}, formatBytes(version.size_bytes)),
      el("td", {}, version.source || ""), el("td", {}, formatLoss(version.validation_loss)), el("td", {}, actions));
  }

  remove(name) {
    return this.confirmAct(`Delete ${name} and all its versions? This cannot be undone.`, "DELETE",
      `/v1/interventions/${encodeURIComponent(name)}`, `deleted ${name}`);
  }

  confirmAct(question, method, path, done) {
    if (window.confirm(question)) return this.act(method, path, done);
    return Promise.resolve();
  }

  async act(method, path, done) {
    try {
      await request(method, path);
      this.uploadStatus.textContent = done;
      showError(this.errorRegion, null);
      await this.refresh();
      this.onChanged();
    } catch (error) {
      showError(this.errorRegion, error);
    }
  }

  async upload() {
    const file = document.getElementById("upload-file").files[0];
    const form = new FormData();
    form.set("name", document.getElementById("upload-name").value.trim());
    for (const [field, id] of [["description", "upload-description"], ["positions", "upload-positions"]]) {
      const value = document.getElementById(id).value.trim();
      if (value) form.set(field, value);
    }
    if (document.getElementById("upload-replace").checked) form.set("replace", "true");
    if (file) form.set("file", file, file.name);  // without one the server says what is missing
    this.uploadStatus.textContent = "uploading…";
    try {
      const record = await (await request("POST", "/v1/interventions", { form })).json();
      this.uploadStatus.textContent = `uploaded ${record.id} (version ${record.version})`;
      showError(this.errorRegion, null);
      await this.refresh();
      this.onChanged();
    } catch (error) {
      this.uploadStatus.textContent = "";
      showError(this.errorRegion, error);
    }
  }
}

function describeConfig(config) {
  if (!config) return "";
  const parts = [config.type, `rank ${config.rank}`];
  if (Array.isArray(config.layers)) parts.push(`layers ${config.layers.join(", ")}`);
  if (config.positions) parts.push(config.positions);
  return parts.filter(Boolean).join(" · ");
}
