// The page's entry point: the API key form, the tabs, and the model list every section shares. With auth off the
// key stays empty and no Authorization header is sent; with auth on, a missing or wrong key shows the server's 401
// message until a key is given.

import { apiKey, getJSON, setApiKey } from "./api.js";
import { Chat } from "./chat.js";
import { showError } from "./dom.js";
import { Manage } from "./manage.js";
import { Train } from "./train.js";

const globalError = document.getElementById("global-error");
const keyInput = document.getElementById("api-key");
let baseModel = null;

const chat = new Chat();
const manage = new Manage({ onChanged: () => loadModels(), onChat: (model) => chatWith(model) });
const train = new Train({ onChat: (model) => { loadModels(); chatWith(model); } });

function chatWith(model) {
  chat.useModels(baseModel && baseModel !== model ? [baseModel, model] : [model]);
  selectTab("tab-chat");
  document.getElementById("prompt").focus();
}

async function loadModels() {
  try {
    const { data } = await getJSON("/v1/models");
    const base = data.find((card) => !card.parent);
    baseModel = base ? base.id : null;
    document.getElementById("base-model").textContent = baseModel ? `base model: ${baseModel}` : "";
    chat.setModels(data.map((card) => card.id));
    showError(globalError, null);
    return data;
  } catch (error) {
    const hint = error.status === 401 ? " Enter an API key above." : "";
    showError(globalError, new Error(error.message + hint));
    return null;
  }
}

async function reload() {
  const models = await loadModels();
  if (!models) return;
  if (!chat.columns.length) {  // first load: the base model beside the first persona, if there is one
    const persona = models.find((card) => card.parent);
    chat.useModels(persona ? [baseModel, persona.id] : [baseModel, ""]);
  }
  await manage.refresh();
}

// Tabs: click or arrow keys; the open tab is kept in the URL's fragment (#chat, #train, #manage).
const tabs = [...document.querySelectorAll('[role="tab"]')];

function selectTab(id) {
  for (const tab of tabs) {
    const selected = tab.id === id;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    document.getElementById(tab.getAttribute("aria-controls")).hidden = !selected;
  }
  history.replaceState(null, "", `#${id.replace("tab-", "")}`);
}

for (const [index, tab] of tabs.entries()) {
  tab.addEventListener("click", () => selectTab(tab.id));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = tabs[(index + step + tabs.length) % tabs.length];
    selectTab(next.id);
    next.focus();
  });
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey(keyInput.value.trim());
  reload();
});
document.getElementById("forget-key").addEventListener("click", () => {
  setApiKey("");
  keyInput.value = "";
  reload();
});

keyInput.value = apiKey();
const opened = `tab-${location.hash.slice(1)}`;
selectTab(tabs.some((tab) => tab.id === opened) ? opened : "tab-chat");
train.loadDefaults();
reload();
