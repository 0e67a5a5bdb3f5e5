// tierkv's chat page: keeps the conversation, streams replies from POST /v1/chat/completions
// (server-sent events) and shows them as they arrive. It speaks only the standard OpenAI API, so
// the same page works against any compatible server. Model output is put on the page as text
// (textContent), never as HTML.
"use strict";

(() => {
  const KEY_STORE = "tierkv.apiKey";   // sessionStorage: the key lives as long as this tab
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), rate: $("rate"), error: $("error"), conversation: $("conversation"),
    composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    newChat: $("new-chat"), settings: $("settings"), settingsToggle: $("settings-toggle"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  };
  const state = { model: null, messages: [], controller: null };

  class ServerError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // An OpenAI-style error body ({"error": {"message": ...}}) to its message; anything else to its text.
  async function errorOf(resp) {
    const text = await resp.text();
    let message = text.trim() || resp.statusText;
    try {
      const body = JSON.parse(text);
      if (body && body.error) message = body.error.message || JSON.stringify(body.error);
    } catch (_) { /* not JSON: keep the text */ }
    return new ServerError(`${resp.status}: ${message}`, resp.status);
  }

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = !message;
  }

  function openSettings(open) {
    ui.settings.hidden = !open;
    ui.settingsToggle.setAttribute("aria-expanded", String(open));
  }

  function askForKey(err) {
    showError(`${err.message}\nThis server needs an API key: enter it under Settings.`);
    openSettings(true);
    ui.apiKey.focus();
  }

  async function loadModel() {
    ui.model.textContent = "connecting\u2026";
    try {
      const resp = await fetch("/v1/models", { headers: headers(false) });
      if (!resp.ok) throw await errorOf(resp);
      const body = await resp.json();
      if (!body.data || !body.data.length) throw new ServerError("the server lists no model", resp.status);
      state.model = body.data[0].id;
      ui.model.textContent = state.model;
      ui.model.dataset.ready = "true";
      showError("");
      return true;
    } catch (err) {
      state.model = null;
      ui.model.textContent = "no model";
      delete ui.model.dataset.ready;
      if (err.status === 401) askForKey(err);
      else showError(`Cannot list the server's models (${err.message}). Reload the page to retry.`);
      return false;
    }
  }

  function bubble(role, text) {
    const el = document.createElement("div");
    el.className = "msg " + role;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    el.appendChild(body);
    ui.conversation.appendChild(el);
    ui.conversation.scrollTop = ui.conversation.scrollHeight;
    return { el, body };
  }

  function note(el, text) {
    const n = document.createElement("span");
    n.className = "note";
    n.textContent = text;
    el.appendChild(n);
  }

  function number(input, name, integer) {
    const value = Number(input.value);
    if (input.value.trim() === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new ServerError(`${name} must be ${integer ? "a whole number" : "a number"} (Settings)`, 0);
    }
    return value;
  }

  // Server-sent events: yields the JSON payload of each `data:` event until `data: [DONE]`.
  async function* events(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    document.body.dataset.busy = String(busy);
  }

  function reportRate(usage, started, firstAt, ended) {
    const seconds = (ended - started) / 1000;
    if (!usage || !usage.completion_tokens) {       // stopped: the server sent no usage
      ui.rate.textContent = `stopped after ${seconds.toFixed(1)} s`;
      return;
    }
    const tokens = usage.completion_tokens;
    const first = firstAt ? `, first token after ${((firstAt - started) / 1000).toFixed(2)} s` : "";
    ui.rate.textContent = `${(tokens / seconds).toFixed(1)} tok/s (${tokens} tokens in ${seconds.toFixed(1)} s${first})`;
    ui.rate.dataset.tokens = String(tokens);
  }

  // One request: streams the reply into `out`, filling `reply` ({text, usage, firstAt}) as it comes,
  // so a stopped reply keeps what arrived.
  async function streamReply(request, out, signal, reply) {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(request), signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    for await (const chunk of events(resp)) {
      if (chunk.error) throw new ServerError(chunk.error.message || JSON.stringify(chunk.error), resp.status);
      if (chunk.usage) reply.usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      const piece = choice && choice.delta && choice.delta.content;
      if (piece) {
        if (!reply.firstAt) reply.firstAt = performance.now();
        reply.text += piece;
        out.body.textContent = reply.text.trimStart();   // shown without the leading blank lines; kept whole in history
        ui.conversation.scrollTop = ui.conversation.scrollHeight;
      }
    }
  }

  async function send(content) {
    showError("");
    if (!state.model && !(await loadModel())) return false;
    let request;
    try {
      request = {
        model: state.model, stream: true, stream_options: { include_usage: true },
        temperature: number(ui.temperature, "Temperature", false),
        max_tokens: number(ui.maxTokens, "Max tokens", true),
        messages: state.messages.concat([{ role: "user", content }]),
      };
    } catch (err) { showError(err.message); return false; }
    const user = bubble("user", content);
    const out = bubble("assistant", "");
    out.el.classList.add("streaming");
    state.controller = new AbortController();
    setBusy(true);
    const started = performance.now();
    const reply = { text: "", usage: null, firstAt: 0 };
    try {
      await streamReply(request, out, state.controller.signal, reply);
      state.messages.push({ role: "user", content }, { role: "assistant", content: reply.text });
      reportRate(reply.usage, started, reply.firstAt, performance.now());
      return true;
    } catch (err) {
      if (err.name === "AbortError") {            // the user pressed Stop: keep what arrived
        if (!out.el.isConnected) return true;     // "New chat" aborted it: nothing to keep
        state.messages.push({ role: "user", content }, { role: "assistant", content: reply.text });
        note(out.el, "stopped");
        out.el.classList.add("stopped");
        reportRate(null, started, reply.firstAt, performance.now());
        return true;
      }
      user.el.remove();                           // not part of the conversation: the text goes back
      out.el.remove();
      if (err.status === 401) askForKey(err);
      else showError(err instanceof ServerError ? err.message : `Cannot reach the server: ${err.message}`);
      return false;
    } finally {
      out.el.classList.remove("streaming");
      state.controller = null;
      setBusy(false);
    }
  }

  ui.composer.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const content = ui.prompt.value.trim();
    if (!content || state.controller) return;
    ui.prompt.value = "";
    if (!(await send(content))) ui.prompt.value = content;   // failed: give the text back to retry
    ui.prompt.focus();
  });
  ui.prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  ui.newChat.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    ui.conversation.replaceChildren();
    ui.rate.textContent = "";
    showError("");
  });
  ui.settingsToggle.addEventListener("click", () => openSettings(ui.settings.hidden));
  ui.settings.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = ui.apiKey.value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    loadModel();
  });

  ui.apiKey.value = sessionStorage.getItem(KEY_STORE) || "";
  setBusy(false);
  loadModel();
})();
