// Server-sent events read from a fetch() response. EventSource cannot send an Authorization header, so the page
// parses streams itself; chat completions and training job events share this parser. Lines end in LF or CRLF
// (what servers send); `id` is remembered so a dropped stream can resume with Last-Event-ID.

export class SSEParser {
  constructor() {
    this.buffer = "";
    this.data = [];
    this.event = null;
    this.lastId = null;
  }

  // Feed a chunk of text; returns the events it completed, as {id, event, data}.
  push(text) {
    this.buffer += text;
    const events = [];
    let start = 0;
    for (let end = this.buffer.indexOf("\n"); end >= 0; end = this.buffer.indexOf("\n", start)) {
      const line = this.buffer.slice(start, end).replace(/\r$/, "");
      start = end + 1;
      const event = this.line(line);
      if (event) events.push(event);
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  line(line) {
    if (line === "") {  // a blank line ends an event
      const event = this.data.length ? { id: this.lastId, event: this.event || "message", data: this.data.join("\n") } : null;
      this.data = [];
      this.event = null;
      return event;
    }
    if (line.startsWith(":")) return null;  // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") this.data.push(value);
    else if (field === "id") this.lastId = value;
    else if (field === "event") this.event = value;
    return null;
  }
}

// The events of a streamed response, in order; leaving the loop early closes the connection.
export async function* readEvents(response, parser = new SSEParser()) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      yield* parser.push(value);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
