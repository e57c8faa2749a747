// The chat page of `minilm-edge serve`: plain JavaScript, no build step, nothing fetched from
// anywhere but this server. Answers stream from /v1/chat/completions (server-sent events read
// with fetch(), so the Stop button can abort them with an AbortController).
"use strict";

const $ = (id) => document.getElementById(id);
const messages = [];            // the conversation, as the API takes it
let modelId = null;
let controller = null;          // the answer being streamed, if any

function authHeaders() {
  const key = $("key").value || localStorage.getItem("minilm-key") || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

function bubble(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: authHeaders() });
  if (r.status === 401) {
    $("key").hidden = false;
    $("model").textContent = "enter the server's API key";
    return;
  }
  const body = await r.json();
  const m = body.data[0];
  modelId = m.id;
  $("model").textContent = m.id + " · " + m.version;
  $("model").dataset.ready = "1";
}

// Yields the parsed JSON of each `data: {...}` event until `data: [DONE]`.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.state = "streaming";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const t0 = performance.now();
  let tFirst = null, tokens = 0;
  try {
    if (!modelId) await loadModel();
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ model: modelId, messages, stream: true, stream_options: { include_usage: true } }),
      signal: controller.signal,
    });
    if (!r.ok) throw new Error((await r.json()).error.message);
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
      if (delta) {
        if (tFirst === null) tFirst = performance.now();
        out.textContent += delta;
        out.scrollIntoView({ block: "end" });
      }
    }
    messages.push({ role: "assistant", content: out.textContent });
  } catch (e) {
    if (e.name === "AbortError") {
      bubble("note", "(stopped)");
      messages.push({ role: "assistant", content: out.textContent });
    } else {
      bubble("error", String(e.message || e));
      messages.pop();
    }
  } finally {
    const secs = (performance.now() - (tFirst ?? t0)) / 1000;
    if (tokens && secs > 0) {
      $("speed").textContent = `${tokens} tokens · ${(tokens / secs).toFixed(1)} tokens/s` +
        (tFirst ? ` · first token ${((tFirst - t0) / 1000).toFixed(2)} s` : "");
    }
    out.dataset.state = "done";
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    $("input").focus();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadModel().catch((e) => { $("model").textContent = "server unreachable: " + e.message; });
  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new").addEventListener("click", () => { messages.length = 0; $("log").textContent = ""; });
  $("key").addEventListener("change", () => {
    localStorage.setItem("minilm-key", $("key").value);
    loadModel();
  });
});
