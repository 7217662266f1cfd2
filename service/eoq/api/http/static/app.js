// eoq chat page: plain JavaScript, no dependencies. Talks to the server's OpenAI-compatible API
// (/v1/responses, /v1/conversations and eoq's branching extensions) with fetch; streams are read with a
// ReadableStream reader (server-sent events over POST, which EventSource cannot do).
//
// Safety: model and user text is untrusted. It only ever reaches the page through textContent /
// createTextNode (never innerHTML), and the page is served with a Content-Security-Policy that allows no
// inline script.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "eoq.apiKey";
  const SETTINGS = "eoq.settings";
  const TITLES = "eoq.titles";
  const MAX_TITLES = 300;
  const query = new URLSearchParams(location.search);

  const state = {
    model: null,
    conversations: [],
    convId: null, // "conv_..." or null: a new chat, not created yet
    conversation: null, // the conversation object (its system prompt)
    items: [], // the active branch, root first
    live: null, // the answer being streamed now (see stream())
  };

  // --- storage (localStorage may be unavailable: private windows, file policies) ---
  const storage = {
    get(key, fallback) {
      try {
        const v = localStorage.getItem(key);
        return v === null ? fallback : JSON.parse(v);
      } catch (_) {
        return fallback;
      }
    },
    set(key, value) {
      try {
        localStorage.setItem(key, JSON.stringify(value));
      } catch (_) {
        /* not kept: fine */
      }
    },
  };

  // --- small DOM helpers: text only ---
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function button(label, className, onClick, ariaLabel) {
    const b = el("button", className, label);
    b.type = "button";
    if (ariaLabel) b.setAttribute("aria-label", ariaLabel);
    b.addEventListener("click", onClick);
    return b;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const enc = encodeURIComponent;

  // --- errors ---
  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.name = "ApiError";
      this.status = status;
    }
  }

  const isAbort = (e) => e && e.name === "AbortError";

  function showError(e) {
    if (isAbort(e)) return;
    let message = e instanceof Error ? e.message : String(e);
    if (e && (e.status === 401 || e.status === 403)) {
      message += " — set an API key in Settings.";
      $("settings").open = true;
      openList(true);
    }
    $("error-text").textContent = message;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  // --- the API ---
  function headers(withBody) {
    const h = { Accept: "application/json, text/event-stream" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    if (withBody) h["Content-Type"] = "application/json";
    return h;
  }

  async function errorOf(resp) {
    let message = `${resp.status} ${resp.statusText}`.trim();
    try {
      const text = await resp.text();
      try {
        const body = JSON.parse(text);
        if (body && body.error && body.error.message) message = body.error.message;
        else if (text) message = text.slice(0, 300);
      } catch (_) {
        if (text) message = text.slice(0, 300);
      }
    } catch (_) {
      /* the status alone */
    }
    const retry = resp.headers.get("Retry-After");
    if (retry) message += ` (retry in ${retry} s)`;
    return new ApiError(message, resp.status);
  }

  async function request(method, path, body, signal) {
    let resp;
    try {
      resp = await fetch(path, {
        method,
        headers: headers(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: "no-store",
      });
    } catch (e) {
      if (isAbort(e)) throw e;
      throw new ApiError("Cannot reach the server: " + e.message, 0);
    }
    if (!resp.ok) throw await errorOf(resp);
    return resp;
  }

  async function json(method, path, body) {
    return (await request(method, path, body)).json();
  }

  async function ensureModel() {
    if (!state.model) {
      const list = await json("GET", "/v1/models");
      if (!list.data || !list.data.length) throw new ApiError("The server lists no model", 0);
      state.model = list.data[0].id;
      $("model").textContent = state.model;
    }
    return state.model;
  }

  // The model's id for a new request, or null once the error that prevented it is shown.
  async function modelOrNull() {
    clearError();
    try {
      return await ensureModel();
    } catch (e) {
      showError(e);
      return null;
    }
  }

  // --- settings ---
  function loadSettings() {
    $("api-key").value = storage.get(KEY, "") || "";
    const saved = storage.get(SETTINGS, {}) || {};
    $("max-tokens").value = query.get("max_output_tokens") ?? saved.maxTokens ?? "";
    $("temperature").value = query.get("temperature") ?? saved.temperature ?? "";
  }

  function saveSettings() {
    storage.set(KEY, $("api-key").value.trim());
    storage.set(SETTINGS, { maxTokens: $("max-tokens").value, temperature: $("temperature").value });
  }

  function sampling(regenerate) {
    const out = {};
    const n = parseInt($("max-tokens").value, 10);
    if (n > 0) out.max_output_tokens = n;
    const t = parseFloat($("temperature").value);
    if (!Number.isNaN(t)) out.temperature = t;
    else if (regenerate) out.temperature = 0.8; // another answer, not the same greedy one again
    return out;
  }

  // --- titles: the first question, remembered in this browser (the API has no titles) ---
  function titles() {
    return storage.get(TITLES, {}) || {};
  }

  function rememberTitle(id, text) {
    if (!id || !text) return;
    const all = titles();
    if (all[id]) return;
    all[id] = text.replace(/\s+/g, " ").trim().slice(0, 80);
    const ids = Object.keys(all);
    for (const old of ids.slice(0, Math.max(0, ids.length - MAX_TITLES))) delete all[old];
    storage.set(TITLES, all);
  }

  function titleOf(conv) {
    const t = titles()[conv.id];
    if (t) return t;
    if (conv.system_prompt) return conv.system_prompt.replace(/\s+/g, " ").slice(0, 80);
    return "Chat of " + when(conv.created_at);
  }

  function when(seconds) {
    if (!seconds) return "";
    const d = new Date(seconds * 1000);
    const today = new Date();
    return d.toDateString() === today.toDateString()
      ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : d.toLocaleDateString();
  }

  // --- the conversation list ---
  async function loadConversations() {
    const list = await json("GET", "/v1/conversations?limit=50");
    state.conversations = list.data || [];
    renderConversations();
  }

  function renderConversations() {
    const ul = $("conversations");
    ul.replaceChildren();
    for (const conv of state.conversations) {
      const li = el("li");
      li.dataset.id = conv.id;
      if (conv.id === state.convId) li.classList.add("active");
      const open = button("", "open", () => {
        openList(false);
        if (conv.id !== state.convId) openConversation(conv.id);
      });
      open.append(el("span", "conv-title", titleOf(conv)));
      const n = conv.message_count || 0;
      const count = n === 0 ? "new" : n === 1 ? "1 message" : `${n} messages`;
      open.append(el("span", "conv-meta", `${count} · ${when(conv.updated_at || conv.created_at)}`));
      const del = button("\u00d7", "delete", () => deleteConversation(conv), "Delete conversation");
      li.append(open, del);
      ul.append(li);
    }
    $("no-conversations").hidden = state.conversations.length > 0;
    fetchTitles();
  }

  let fetchingTitles = false;

  async function fetchTitles() {
    // Conversations started elsewhere (another browser, the API) have no title here: their first question,
    // asked for once each, a few at a time.
    if (fetchingTitles) return;
    fetchingTitles = true;
    try {
      const known = titles();
      const untitled = state.conversations.filter((c) => !known[c.id] && c.message_count > 0).slice(0, 20);
      for (const conv of untitled) {
        const items = await json("GET", `/v1/conversations/${enc(conv.id)}/items?order=asc&limit=1`);
        const first = (items.data || []).find((i) => i.role === "user");
        if (!first) continue;
        rememberTitle(conv.id, itemText(first));
        const li = Array.from($("conversations").children).find((node) => node.dataset.id === conv.id);
        if (li) li.querySelector(".conv-title").textContent = titleOf(conv);
        if (conv.id === state.convId) $("title").textContent = titleOf(conv);
      }
    } catch (_) {
      /* titles are a nicety */
    } finally {
      fetchingTitles = false;
    }
  }

  async function deleteConversation(conv) {
    if (!window.confirm(`Delete “${titleOf(conv)}”?`)) return;
    try {
      await request("DELETE", `/v1/conversations/${enc(conv.id)}`);
      if (conv.id === state.convId) newChat();
    } catch (e) {
      showError(e);
    }
    loadConversations().catch(showError);
  }

  function openList(open) {
    $("app").classList.toggle("list-open", open);
    $("backdrop").hidden = !open;
  }

  // --- which conversation is shown: the URL's hash ---
  function idFromHash() {
    const h = decodeURIComponent(location.hash.replace(/^#/, ""));
    return /^conv_[\w-]+$/.test(h) ? h : null;
  }

  function setHash(id) {
    const url = location.pathname + location.search + (id ? "#" + id : "");
    history.replaceState(null, "", url);
  }

  function detachLive() {
    // Stop reading the answer being streamed: it goes on on the server (background), and is picked up again
    // when its conversation is opened.
    if (state.live) {
      state.live.detached = true;
      state.live.controller.abort();
      state.live = null;
    }
  }

  // Shows conversation `id` (null: a new chat), empty until its items arrive.
  function switchTo(id) {
    detachLive();
    clearError();
    state.convId = id;
    state.conversation = null;
    state.items = [];
    setHash(id);
    render();
    renderConversations();
  }

  function newChat() {
    switchTo(null);
    $("input").focus();
  }

  async function openConversation(id) {
    switchTo(id);
    try {
      const [conv, items] = await Promise.all([
        json("GET", `/v1/conversations/${enc(id)}`),
        json("GET", `/v1/conversations/${enc(id)}/items?order=asc&limit=1000`),
      ]);
      if (state.convId !== id) return; // another one was opened meanwhile
      state.conversation = conv;
      state.items = items.data || [];
      if (!state.conversations.some((c) => c.id === id)) loadConversations().catch(() => {});
      const first = state.items.find((i) => i.role === "user");
      if (first) rememberTitle(id, itemText(first));
      render();
      renderConversations();
      resumeIfGenerating();
    } catch (e) {
      if (state.convId !== id) return;
      showError(e);
      if (e.status === 404) {
        state.convId = null;
        setHash(null);
        render();
      }
    }
  }

  async function refresh() {
    // The stored active branch (real ids, siblings, statuses) after an answer.
    const id = state.convId;
    if (!id) return;
    for (let attempt = 0; attempt < 6; attempt++) {
      const items = await json("GET", `/v1/conversations/${enc(id)}/items?order=asc&limit=1000`);
      if (state.convId !== id || state.live) return;
      state.items = items.data || [];
      const last = state.items[state.items.length - 1];
      if (!last || last.status !== "in_progress") break;
      await sleep(300); // the answer's end is being stored
    }
    render();
  }

  // --- rendering ---
  function itemText(item) {
    return (item.content || []).map((p) => (typeof p.text === "string" ? p.text : "")).join("");
  }

  function appendInline(container, text) {
    // `inline code` as <code>; everything else plain text (line breaks kept by CSS: white-space: pre-wrap).
    const re = /`([^`\n]+)`/g;
    let at = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > at) container.append(document.createTextNode(text.slice(at, m.index)));
      container.append(el("code", "", m[1]));
      at = m.index + m[0].length;
    }
    if (at < text.length) container.append(document.createTextNode(text.slice(at)));
  }

  function codeBlock(lang, code) {
    const box = el("div", "code-block");
    if (lang) box.append(el("span", "lang", lang));
    const copy = button("Copy", "copy-code", () => copyText(code, copy), "Copy code");
    const pre = el("pre");
    const c = el("code", "", code);
    if (lang) c.dataset.lang = lang;
    pre.append(c);
    box.append(copy, pre);
    return box;
  }

  function renderText(container, text) {
    // ```fenced``` blocks -> <pre><code>; an unclosed fence (an answer still streaming) runs to the end.
    container.replaceChildren();
    text = text.replace(/\s+$/, ""); // trailing blank lines only take room (copy keeps them)
    let i = 0;
    while (i < text.length) {
      const open = text.indexOf("```", i);
      if (open < 0) {
        appendInline(container, text.slice(i));
        break;
      }
      appendInline(container, text.slice(i, open).replace(/\n$/, ""));
      const nl = text.indexOf("\n", open + 3);
      const lineEnd = nl < 0 ? text.length : nl;
      const first = text.slice(open + 3, lineEnd);
      let lang = "";
      let start = open + 3;
      if (/^[\w+#.-]*\s*$/.test(first)) {
        lang = first.trim();
        start = nl < 0 ? text.length : nl + 1;
      }
      const close = text.indexOf("```", start);
      const code = text.slice(start, close < 0 ? text.length : close).replace(/\n$/, "");
      container.append(codeBlock(lang, code));
      i = close < 0 ? text.length : close + 3;
      if (text[i] === "\n") i++;
    }
  }

  function busyHere() {
    return !!state.live && state.live.convId === state.convId;
  }

  function statusText(item) {
    if (item.status === "in_progress") return "generating…";
    switch (item.finish_reason) {
      case "cancelled":
        return "stopped";
      case "length":
        return "cut at the token limit";
      default:
        return "";
    }
  }

  function messageNode(item, index) {
    const role = item.role === "user" ? "user" : "assistant";
    const node = el("div", "msg " + role);
    node.dataset.role = role;
    if (item.id) node.dataset.id = item.id;
    if (item.status) node.dataset.status = item.status;
    if (item.finish_reason) node.dataset.finish = item.finish_reason;
    const bubble = el("div", "bubble");
    const content = el("div", "content");
    renderText(content, itemText(item));
    bubble.append(content);
    node.append(bubble);

    const meta = el("div", "meta");
    const siblings = item.sibling_ids || [];
    const at = siblings.indexOf(item.id);
    if (siblings.length > 1 && at >= 0) {
      const sw = el("span", "branch-switcher");
      const prev = button("\u2039", "prev idle-only", () => switchBranch(siblings[at - 1]), "Previous version");
      const next = button("\u203a", "next idle-only", () => switchBranch(siblings[at + 1]), "Next version");
      prev.disabled = at === 0;
      next.disabled = at === siblings.length - 1;
      prev.dataset.edge = String(at === 0);
      next.dataset.edge = String(at === siblings.length - 1);
      sw.append(prev, el("span", "branch-label", `${at + 1}/${siblings.length}`), next);
      meta.append(sw);
    }
    const copy = button("Copy", "copy", () => copyText(itemText(item), copy), "Copy the text");
    meta.append(copy);
    if (item.id && role === "user") {
      meta.append(button("Edit", "edit idle-only", () => startEdit(node, item), "Edit the question"));
    }
    if (item.id && role === "assistant" && item.parent_id) {
      meta.append(button("Regenerate", "regenerate idle-only", () => regenerate(item, index),
        "Another answer to this question"));
    }
    if (role === "assistant") meta.append(el("span", "status " + (item.finish_reason || ""), statusText(item)));
    node.append(meta);
    return node;
  }

  function render() {
    const thread = $("thread");
    thread.replaceChildren();
    state.items.forEach((item, index) => thread.append(messageNode(item, index)));
    const system = state.conversation && state.conversation.system_prompt;
    $("system-shown").hidden = !system;
    $("system-text").textContent = system || "";
    $("system-box").hidden = !!state.convId;
    $("welcome").hidden = !!state.convId || state.items.length > 0;
    const conv = state.conversations.find((c) => c.id === state.convId);
    const first = state.items.find((i) => i.role === "user");
    $("title").textContent = !state.convId ? "New chat" : conv ? titleOf(conv) : first ? itemText(first) : "Chat";
    document.title = ($("title").textContent || "eoq") + " · eoq chat";
    updateControls();
  }

  function updateControls() {
    const busy = busyHere();
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("stop").disabled = busy && state.live.stopRequested;
    for (const b of document.querySelectorAll("#thread .idle-only")) {
      b.disabled = busy || b.dataset.edge === "true";
    }
  }

  function nearBottom() {
    const m = $("messages");
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function scrollToBottom() {
    const m = $("messages");
    m.scrollTop = m.scrollHeight;
  }

  // --- copy ---
  async function copyText(text, b) {
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch (_) {
      const area = el("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "offscreen";
      document.body.append(area);
      area.select();
      try {
        ok = document.execCommand("copy");
      } catch (_) {
        ok = false;
      }
      area.remove();
    }
    const label = b.textContent;
    b.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => {
      b.textContent = label === "Copied" || label === "Copy failed" ? "Copy" : label;
    }, 1500);
  }

  // --- server-sent events over fetch ---
  function parseEvent(block) {
    let type = "message";
    const data = [];
    for (const line of block.split(/\r\n|\r|\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { type, data: data.join("\n") } : null;
  }

  async function consume(resp, live) {
    // Read one event stream to its end, or until the answer's last event. A dropped connection just returns
    // (the caller resumes from the last sequence number); an abort throws.
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (e) {
          if (live.controller.signal.aborted) throw e;
          return; // the connection dropped
        }
        if (chunk.done) return;
        buffer += decoder.decode(chunk.value, { stream: true });
        let m;
        while ((m = /\r\n\r\n|\n\n|\r\r/.exec(buffer)) !== null) {
          const block = buffer.slice(0, m.index);
          buffer = buffer.slice(m.index + m[0].length);
          const event = parseEvent(block);
          if (event) onEvent(live, event);
          if (live.status) return;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function onEvent(live, { type, data }) {
    if (data === "[DONE]") return;
    let ev;
    try {
      ev = JSON.parse(data);
    } catch (_) {
      return;
    }
    if (ev && ev.error && !ev.type) {
      // an error after the stream had started: its last event
      live.status = "failed";
      live.error = ev.error.message || "The answer failed";
      return;
    }
    if (typeof ev.sequence_number === "number") {
      if (ev.sequence_number <= live.seq) return; // seen already (a resumed stream): every event once
      live.seq = ev.sequence_number;
    }
    switch (ev.type || type) {
      case "response.created":
      case "response.in_progress":
        if (ev.response && ev.response.id && !live.responseId) {
          live.responseId = ev.response.id;
          if (live.stopRequested) cancelLive(live);
        }
        break;
      case "response.output_text.delta":
        live.text += ev.delta || "";
        paint(live);
        break;
      case "response.output_text.done":
        if (typeof ev.text === "string") live.text = ev.text;
        paint(live);
        break;
      case "response.completed":
        live.status = "completed";
        break;
      case "response.incomplete":
        live.status = "incomplete";
        break;
      case "response.failed": {
        const err = (ev.response && ev.response.error) || {};
        live.status = err.code === "cancelled" ? "cancelled" : "failed";
        if (live.status === "failed") live.error = err.message || "The answer failed";
        break;
      }
      case "error":
        live.status = "failed";
        live.error = ev.message || (ev.error && ev.error.message) || "The answer failed";
        break;
      default:
        break;
    }
  }

  function paint(live) {
    if (live.painting) return;
    live.painting = true;
    setTimeout(() => {
      live.painting = false;
      if (!live.node.isConnected) return;
      const follow = nearBottom();
      renderText(live.node.querySelector(".content"), live.text);
      if (follow) scrollToBottom();
    }, 30);
  }

  async function cancelLive(live) {
    try {
      await request("POST", `/v1/responses/${enc(live.responseId)}/cancel`);
    } catch (e) {
      // Finished meanwhile: nothing to stop.
      if (e.status !== 400 && e.status !== 404 && e.status !== 409) showError(e);
      return;
    }
    // The stream ends with response.failed (cancelled); should it not come, stop reading it anyway.
    setTimeout(() => {
      if (!live.status && state.live === live) {
        live.status = "cancelled";
        live.controller.abort();
      }
    }, 15000);
  }

  function stop() {
    const live = state.live;
    if (!live || live.stopRequested) return;
    live.stopRequested = true;
    updateControls();
    if (live.responseId) cancelLive(live); // else as soon as response.created names it
  }

  async function stream(convId, start, { node = null, responseId = null, onRefused = null } = {}) {
    // Stream one answer into ``node`` (default: a new answer at the end of the thread): ``start(signal)`` is the
    // request; a dropped connection resumes with GET /v1/responses/{id}?stream=true&starting_after=N.
    const live = {
      convId,
      responseId,
      seq: -1,
      text: "",
      status: null,
      error: null,
      controller: new AbortController(),
      stopRequested: false,
      detached: false,
      node,
    };
    if (!live.node) {
      state.items.push({ id: "", role: "assistant", status: "in_progress", content: [{ type: "output_text", text: "" }] });
      render();
      live.node = $("thread").lastElementChild;
    }
    state.live = live;
    live.node.classList.add("streaming");
    const status = live.node.querySelector(".status");
    if (status) status.textContent = "generating…";
    updateControls();
    scrollToBottom();
    const signal = live.controller.signal;
    try {
      let resp;
      try {
        resp = await start(signal);
      } catch (e) {
        if (onRefused && !isAbort(e)) await onRefused();
        throw e;
      }
      await consume(resp, live);
      for (let tries = 1; !live.status && !signal.aborted; tries++) {
        if (!live.responseId) throw new ApiError("The stream ended before the answer started", 0);
        if (tries > 6) throw new ApiError("Lost the answer's stream; reload the page to see it", 0);
        await sleep(250 * tries);
        try {
          resp = await request("GET", `/v1/responses/${enc(live.responseId)}?stream=true&starting_after=${live.seq}`,
            undefined, signal);
          await consume(resp, live);
        } catch (e) {
          if (isAbort(e) || (e.status && e.status < 500 && e.status !== 429)) throw e;
        }
      }
      if (live.error) throw new ApiError(live.error, 0);
    } catch (e) {
      if (!live.detached) showError(e);
    } finally {
      live.node.classList.remove("streaming");
      if (state.live === live) state.live = null;
      if (!live.detached) {
        updateControls();
        if (state.convId === convId) await refresh().catch(showError);
        loadConversations().catch(() => {});
      }
    }
  }

  function resumeIfGenerating() {
    // An answer still being written (reopened, or the page reloaded): stream it again from its start.
    if (state.live) return;
    const last = state.items[state.items.length - 1];
    if (!last || last.role !== "assistant" || last.status !== "in_progress" || !last.response_id) return;
    const node = $("thread").lastElementChild;
    stream(state.convId, (signal) => request("GET", `/v1/responses/${enc(last.response_id)}?stream=true`, undefined, signal),
      { node, responseId: last.response_id });
  }

  // --- actions ---
  async function ask(text, edited) {
    // A question at the end of the active branch, or (``edited``: the question it replaces) a new branch.
    if (state.live && busyHere()) return;
    const model = await modelOrNull();
    if (!model) return false;
    let convId = state.convId;
    let created = false;
    if (!convId) {
      const system = $("system-prompt").value.trim();
      try {
        const conv = await json("POST", "/v1/conversations", system ? { items: [{ role: "system", content: system }] } : {});
        convId = conv.id;
        created = true;
        state.convId = convId;
        state.conversation = conv;
        setHash(convId);
        rememberTitle(convId, text);
        $("system-prompt").value = "";
        $("system-box").open = false;
        loadConversations().catch(() => {});
      } catch (e) {
        showError(e);
        return false;
      }
    }
    const body = { model, conversation: convId, input: text, stream: true, background: true, ...sampling(false) };
    if (edited) {
      body.parent_item_id = edited.parent_id || convId;
      const at = state.items.indexOf(edited);
      if (at >= 0) state.items = state.items.slice(0, at);
    }
    state.items.push({ id: "", role: "user", content: [{ type: "input_text", text }] });
    const onRefused = async () => {
      // The question was refused: it stays in the box to send again (the thread is redrawn from the server).
      if (!edited && !$("input").value) $("input").value = text;
      if (!created) return;
      // The conversation made for it would stay empty: remove it again.
      await request("DELETE", `/v1/conversations/${enc(convId)}`).catch(() => {});
      if (state.convId === convId) {
        state.convId = null;
        state.conversation = null;
        state.items = [];
        setHash(null);
        render();
      }
    };
    stream(convId, (signal) => request("POST", "/v1/responses", body, signal), { onRefused });
    return true;
  }

  async function regenerate(answer, index) {
    if (busyHere()) return;
    const model = await modelOrNull();
    if (!model) return;
    const convId = state.convId;
    state.items = state.items.slice(0, index);
    const body = { model, item_id: answer.parent_id, stream: true, background: true, ...sampling(true) };
    stream(convId, (signal) => request("POST", `/v1/conversations/${enc(convId)}/regenerate`, body, signal),
      { onRefused: () => refresh().catch(() => {}) });
  }

  async function switchBranch(itemId) {
    if (!itemId || busyHere()) return;
    clearError();
    const convId = state.convId;
    try {
      const branch = await json("POST", `/v1/conversations/${enc(convId)}/active`, { item_id: itemId });
      if (state.convId !== convId) return;
      state.items = branch.data || [];
      render();
      resumeIfGenerating();
    } catch (e) {
      showError(e);
    }
  }

  function startEdit(node, item) {
    if (busyHere()) return;
    const bubble = node.querySelector(".bubble");
    const meta = node.querySelector(".meta");
    const box = el("div", "edit-box");
    const area = el("textarea");
    area.value = itemText(item);
    area.setAttribute("aria-label", "The edited question");
    const cancel = button("Cancel", "", () => render());
    const save = button("Send", "primary", async () => {
      const text = area.value;
      if (!text.trim()) return;
      await ask(text, item);
    });
    area.addEventListener("keydown", (e) => {
      if (e.key === "Escape") render();
      else if (sends(e)) {
        e.preventDefault();
        save.click();
      }
    });
    const actions = el("div", "edit-actions");
    actions.append(cancel, save);
    box.append(area, actions);
    bubble.replaceWith(box);
    meta.hidden = true;
    area.focus();
  }

  async function submit(e) {
    if (e) e.preventDefault();
    const input = $("input");
    const text = input.value;
    if (!text.trim() || busyHere()) return;
    input.value = "";
    const ok = await ask(text, null);
    if (ok === false && !input.value) input.value = text;
  }

  // On touch screens Enter is a new line (there is no Shift key to hold): the Send button sends.
  const touch = !!(window.matchMedia && window.matchMedia("(pointer: coarse)").matches);
  const sends = (e) => e.key === "Enter" && !e.shiftKey && !e.isComposing && !touch;

  // --- start ---
  function main() {
    loadSettings();
    for (const id of ["api-key", "max-tokens", "temperature"]) $(id).addEventListener("change", saveSettings);
    $("api-key").addEventListener("change", () => {
      state.model = null;
      ensureModel().then(() => loadConversations()).then(clearError, showError);
    });
    $("composer").addEventListener("submit", submit);
    $("input").addEventListener("keydown", (e) => {
      if (sends(e)) submit(e);
    });
    if (touch) $("input").placeholder = "Ask anything";
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", () => {
      openList(false);
      newChat();
    });
    $("open-sidebar").addEventListener("click", () => openList(true));
    $("close-sidebar").addEventListener("click", () => openList(false));
    $("backdrop").addEventListener("click", () => openList(false));
    $("error-close").addEventListener("click", clearError);
    window.addEventListener("hashchange", () => {
      const id = idFromHash();
      if (id && id !== state.convId) openConversation(id);
      else if (!id && state.convId) newChat();
    });

    ensureModel().catch(showError);
    loadConversations().catch(showError);
    const id = idFromHash();
    if (id) openConversation(id);
    else newChat();
  }

  main();
})();
