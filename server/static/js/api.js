// The page's one way to call the server: the API key (kept in this tab's sessionStorage, sent as a Bearer
// header, never put in a URL), JSON and multipart calls, and the server's OpenAI-style error bodies turned into
// errors whose message is the API's own.

const KEY_NAME = "reft-serve.api-key";

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// fetch() with the key; a non-2xx answer throws an ApiError carrying the body's error.message.
export async function request(method, path, { json, form, headers = {}, signal } = {}) {
  const init = { method, headers: new Headers(headers), signal };
  const key = apiKey();
  if (key) init.headers.set("Authorization", `Bearer ${key}`);
  if (json !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;  // the browser sets the multipart boundary
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `cannot reach the server (${error.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path, options) {
  return (await request("GET", path, options)).json();
}

export async function sendJSON(method, path, json) {
  return (await request(method, path, { json })).json();
}

export async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page, say): fall back to the status line
  }
  const error = body && body.error;
  const message = (error && error.message) || `${response.status} ${response.statusText}`.trim();
  return new ApiError(response.status, message, error ? error.code : null);
}
