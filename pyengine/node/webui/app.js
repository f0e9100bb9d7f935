// The node's web page: a chat over this node's /v1/chat/completions (SSE) and a live status view
// (/v1/models, /props, /slots, /v1/node/stats). Model output only ever enters the page as text
// nodes (markdown.js builds elements, never HTML strings). No framework, no build step.
"use strict";

(function () {
  const KEY_STORE = "pyengine.apiKey";
  const STATUS_EVERY_MS = 2000;
  const $ = (id) => document.getElementById(id);

  const page = {
    key: localStorage.getItem(KEY_STORE) || "",
    history: [],        // the conversation as sent to the API
    chat: 0,            // which conversation that is ("New chat" starts the next)
    controller: null,   // AbortController of the running request
    last: null,         // the last exchange: {text, bubbles, pushed (entries it added to history)}
    statusTimer: null,
    absent: new Set(),  // optional routes this node does not have (404 once)
  };

  class NeedsKey extends Error {}

  // ---- talking to the node -------------------------------------------------------------------

  function withKey(headers) {
    const h = Object.assign({}, headers);
    if (page.key) h.Authorization = "Bearer " + page.key;
    return h;
  }

  async function call(path, options) {
    const opts = Object.assign({}, options);
    opts.headers = withKey(opts.headers);
    const r = await fetch(path, opts);
    if (r.status === 401) {
      askKey(page.key ? "The node refused this API key." : "This node needs an API key.");
      throw new NeedsKey("API key needed");
    }
    return r;
  }

  // JSON of a GET, or null for a route this node lacks (asked once) or that is not ready (503).
  async function getJSON(path, optional) {
    if (page.absent.has(path)) return null;
    const r = await call(path);
    if (r.status === 404 && optional) {
      page.absent.add(path);
      return null;
    }
    if (!r.ok) return null;
    return r.json();
  }

  async function errorText(r) {
    try {
      const body = await r.json();
      return (body.error && body.error.message) || `HTTP ${r.status}`;
    } catch (e) {
      return `HTTP ${r.status}`;
    }
  }

  // Calls onData(parsed JSON) for each `data:` event of an SSE body until [DONE] or its end.
  async function readEvents(body, onData) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r/g, "");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }

  // ---- API key -------------------------------------------------------------------------------

  function askKey(reason) {
    const dialog = $("key-dialog");
    $("key-reason").textContent = reason;
    $("key-input").value = page.key;
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
  }

  function saveKey() {
    page.key = $("key-input").value.trim();
    if (page.key) localStorage.setItem(KEY_STORE, page.key);
    else localStorage.removeItem(KEY_STORE);
    $("key-dialog").close();
    loadModelName();
    if (!$("view-status").hidden) refreshStatus();
  }

  // ---- chat ----------------------------------------------------------------------------------

  function bubble(role) {
    $("empty-hint").hidden = true;
    const div = document.createElement("div");
    div.className = "msg " + role;
    $("messages").append(div);
    return div;
  }

  function scrollDown() {
    const m = $("messages");
    m.scrollTop = m.scrollHeight;
  }

  // The page's view of one assistant reply: reasoning (folded, dimmed), tool calls, the answer.
  class Reply {
    constructor() {
      this.root = bubble("assistant");
      this.reasoning = "";
      this.content = "";
      this.calls = [];  // by index: {id, type, function: {name, arguments}}
      this.details = document.createElement("details");
      this.details.className = "reasoning";
      this.details.hidden = true;
      const summary = document.createElement("summary");
      summary.textContent = "Reasoning";
      this.reasoningText = document.createElement("div");
      this.reasoningText.className = "reasoning-text";
      this.details.append(summary, this.reasoningText);
      this.toolBox = document.createElement("div");
      this.toolBox.className = "tool-calls";
      this.answer = document.createElement("div");
      this.answer.className = "answer md";
      this.meta = document.createElement("div");
      this.meta.className = "meta";
      this.root.append(this.details, this.toolBox, this.answer, this.meta);
      this.frame = 0;  // a draw scheduled for the next animation frame, or 0
    }

    add(delta) {
      const thought = delta.reasoning_content ?? delta.reasoning;
      if (thought) this.reasoning += thought;
      if (delta.content) this.content += delta.content;
      for (const tc of delta.tool_calls || []) {
        const call = this.calls[tc.index] || (this.calls[tc.index] = { id: "", type: "function",
          function: { name: "", arguments: "" } });
        if (tc.id) call.id = tc.id;
        if (tc.function && tc.function.name) call.function.name += tc.function.name;
        if (tc.function && tc.function.arguments) call.function.arguments += tc.function.arguments;
      }
      if (!this.frame) this.frame = requestAnimationFrame(() => this.draw());
    }

    // Draws now and drops a scheduled draw: after the final draw of a finished reply nothing
    // redraws it (a leftover frame used to rebuild the tool calls once more).
    draw() {
      cancelAnimationFrame(this.frame);
      this.frame = 0;
      this.details.hidden = !this.reasoning;
      this.reasoningText.textContent = this.reasoning;
      this.toolBox.replaceChildren(...this.calls.filter(Boolean).map((c) => {
        const box = document.createElement("div");
        box.className = "tool-call";
        const name = document.createElement("div");
        name.className = "tool-name";
        name.textContent = "tool call: " + c.function.name;
        const args = document.createElement("pre");
        try {
          args.textContent = JSON.stringify(JSON.parse(c.function.arguments), null, 2);
        } catch (e) {
          args.textContent = c.function.arguments;
        }
        box.append(name, args);
        return box;
      }));
      this.answer.replaceChildren(window.renderMarkdown(this.content));
      scrollDown();
    }

    note(text, kind) {
      const span = document.createElement("span");
      span.className = kind || "";
      span.textContent = text;
      this.meta.append(span);
    }

    message() {
      const calls = this.calls.filter(Boolean);
      if (!this.content && !calls.length) return null;
      const m = { role: "assistant", content: this.content };
      if (calls.length) m.tool_calls = calls;
      return m;
    }
  }

  function settings() {
    const body = { reasoning_effort: $("effort").value };
    const temperature = parseFloat($("temperature").value);
    if (!Number.isNaN(temperature)) body.temperature = temperature;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const tools = $("tools").value.trim();
    if (tools) {
      const parsed = JSON.parse(tools);  // a SyntaxError is shown to the user
      if (!Array.isArray(parsed)) throw new SyntaxError("Tools must be a JSON list");
      body.tools = parsed;
    }
    return body;
  }

  function busy(running) {
    $("send").disabled = running;
    $("stop").disabled = !running;
    $("regenerate").disabled = running || !page.last;
  }

  async function send(text) {
    let body;
    try {
      body = settings();
    } catch (e) {
      bubble("error").textContent = "Settings: " + e.message;
      return;
    }
    const user = bubble("user");
    user.textContent = text;
    const turn = { role: "user", content: text };
    const system = $("system").value.trim();
    body.messages = [...(system ? [{ role: "system", content: system }] : []), ...page.history, turn];
    body.stream = true;
    body.stream_options = { include_usage: true };
    const reply = new Reply();
    const chat = page.chat;
    page.controller = new AbortController();
    busy(true);
    let ok = false;
    try {
      const r = await call("/v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body), signal: page.controller.signal,
      });
      if (!r.ok) {
        reply.note(await errorText(r), "error");
        return;
      }
      let finish = null;
      await readEvents(r.body, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.delta) reply.add(choice.delta);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (chunk.timings && chunk.timings.predicted_per_second) {
          reply.note(`${chunk.timings.predicted_n} tokens, ${chunk.timings.predicted_per_second.toFixed(1)} tokens/s`);
        }
      });
      if (finish && finish !== "stop") reply.note("finish: " + finish);
      ok = true;
    } catch (e) {
      if (e.name === "AbortError") {
        reply.note("stopped", "stopped");
        ok = true;
      } else {
        reply.note(e instanceof NeedsKey ? "not sent: the node needs an API key" : String(e.message || e), "error");
      }
    } finally {
      page.controller = null;
      reply.draw();
      let pushed = 0;
      if (ok && chat === page.chat) {
        page.history.push(turn);
        const m = reply.message();
        if (m) page.history.push(m);
        pushed = m ? 2 : 1;
      } else if (!ok) {
        user.classList.add("failed");
      }
      if (chat === page.chat) page.last = { text, bubbles: [user, reply.root], pushed };
      busy(false);
    }
  }

  // The last message again, in place of its reply (or of its failure): the same conversation up to
  // it, so the node takes that prompt from the slot's cache (its checkpoint at the prompt's end).
  function regenerate() {
    const last = page.last;
    if (page.controller || !last) return;
    page.last = null;
    for (const el of last.bubbles) el.remove();
    page.history.splice(page.history.length - last.pushed, last.pushed);
    send(last.text);
  }

  function stop() {
    if (page.controller) page.controller.abort();
  }

  function newChat() {
    stop();
    page.chat++;
    page.history = [];
    page.last = null;
    busy(false);
    $("messages").replaceChildren($("empty-hint"));
    $("empty-hint").hidden = false;
  }

  // ---- status --------------------------------------------------------------------------------

  function bytes(n) {
    if (n === null || n === undefined) return "n/a";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function count(n) {
    if (n === null || n === undefined) return "n/a";
    if (n >= 1e9) return (n / 1e9).toFixed(2) + " B";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
    return String(n);
  }

  function rate(x) {
    return x === null || x === undefined ? "n/a" : x.toFixed(1) + " tokens/s";
  }

  function facts(id, rows) {
    const dl = $(id);
    dl.replaceChildren(...rows.flatMap(([name, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value === null || value === undefined || value === "" ? "n/a" : String(value);
      dd.dataset.fact = name;
      return [dt, dd];
    }));
  }

  function ago(unixSeconds) {
    if (!unixSeconds) return "none yet";
    const s = Math.max(0, Math.round(Date.now() / 1000 - unixSeconds));
    return `${s} s ago`;
  }

  function showModel(models, props) {
    const entry = models && models.data && models.data[0];
    const m = (props && props.model) || {};
    $("model-name").textContent = entry ? entry.id : "n/a";
    facts("model-facts", [
      ["name", entry && entry.id],
      ["architecture", m.arch],
      ["quantization", m.quantization],
      ["size", bytes(m.size_bytes ?? (entry && entry.size))],
      ["parameters", count(m.n_params ?? (entry && entry.meta && entry.meta.n_params))],
      ["context", props ? `${props.n_ctx_slot} per slot × ${props.total_slots}` : entry && entry.context_length],
      ["device", props && props.device],
      ["threads", props && props.n_threads],
      ["KV cache type", props && props.cache_type_k && `${props.cache_type_k} / ${props.cache_type_v}`],
      ["engine", props && props.build_info && props.build_info.version],
    ]);
  }

  function showSlots(slots, stats) {
    const body = $("slots").tBodies[0];
    if (!slots) {
      const row = body.insertRow();
      body.replaceChildren(row);
      const cell = row.insertCell();
      cell.colSpan = 5;
      cell.textContent = `n/a (this node has no /slots); ${stats ? stats.kv_cache_tokens : "n/a"} tokens cached in all`;
      return;
    }
    body.replaceChildren(...slots.map((s) => {
      const row = document.createElement("tr");
      row.className = s.is_processing ? "busy" : "idle";
      row.dataset.slot = s.id;
      for (const v of [s.id, s.is_processing ? "busy" : "idle", s.n_prompt_tokens_cached, s.n_decoded, s.n_ctx]) {
        row.insertCell().textContent = v === undefined ? "n/a" : String(v);
      }
      return row;
    }));
  }

  function showRouter(r) {
    if (!r || r.status === "off") {
      facts("router-facts", [["state", "not registering (no --router-url)"]]);
      return;
    }
    facts("router-facts", [
      ["state", r.status],
      ["router", r.url],
      ["node id", r.node_id],
      ["last heartbeat", r.last_heartbeat ? `${ago(r.last_heartbeat)} (${r.last_heartbeat_result})` : "none yet"],
    ]);
  }

  // Layers x experts grid; cells carry data-layer, data-expert and data-count.
  function showExperts(counts) {
    const map = $("heatmap");
    if (!counts || !counts.length) {
      map.replaceChildren();
      $("heatmap-legend").textContent = "n/a (the model has not loaded)";
      return;
    }
    const nExpert = counts[0].length;
    if (map.dataset.shape !== `${counts.length}x${nExpert}`) {
      map.dataset.shape = `${counts.length}x${nExpert}`;
      map.style.gridTemplateColumns = `3.5em repeat(${nExpert}, minmax(4px, 1fr))`;
      const cells = [document.createElement("span")];
      for (let e = 0; e < nExpert; e++) {
        const head = document.createElement("span");
        head.className = "axis";
        head.textContent = e % 4 === 0 ? String(e) : "";
        cells.push(head);
      }
      counts.forEach((row, layer) => {
        const label = document.createElement("span");
        label.className = "axis";
        label.textContent = "L" + layer;
        cells.push(label);
        row.forEach((_, expert) => {
          const cell = document.createElement("span");
          cell.className = "cell";
          cell.dataset.layer = layer;
          cell.dataset.expert = expert;
          cells.push(cell);
        });
      });
      map.replaceChildren(...cells);
    }
    const busiest = Math.max(...counts.flat());
    const max = Math.max(1, busiest);
    for (const cell of map.querySelectorAll(".cell")) {
      const n = counts[cell.dataset.layer][cell.dataset.expert];
      cell.dataset.count = n;
      cell.title = `layer ${cell.dataset.layer}, expert ${cell.dataset.expert}: ${n}`;
      const share = n / max;
      cell.style.backgroundColor = n ? `rgba(29, 78, 216, ${(0.08 + 0.92 * share).toFixed(3)})` : "";
    }
    const total = counts.reduce((a, row) => a + row.reduce((x, y) => x + y, 0), 0);
    $("heatmap-legend").textContent = `${counts.length} layers × ${nExpert} experts; ${total} selections in all, ` +
      `busiest cell ${busiest}.`;
  }

  async function refreshStatus() {
    try {
      const [models, props, slots, stats] = await Promise.all([
        getJSON("/v1/models"), getJSON("/props", true), getJSON("/slots", true), getJSON("/v1/node/stats")]);
      showModel(models, props);
      showSlots(slots, stats);
      if (stats) {
        facts("speed-facts", [
          ["prefill", rate(stats.prefill_tokens_per_second)],
          ["decode", rate(stats.decode_tokens_per_second)],
          ["prompt tokens", stats.prompt_tokens],
          ["generated tokens", stats.generated_tokens],
        ]);
        facts("memory-facts", [
          ["process RSS", bytes(stats.rss_bytes)],
          ["KV cache", bytes(stats.kv_cache_bytes)],
          ["KV cache in use", `${stats.kv_cache_tokens} of ${stats.kv_cache_capacity_tokens} tokens`],
        ]);
        showRouter(stats.router);
        showExperts(stats.expert_counts);
      }
      $("status-updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      if (!(e instanceof NeedsKey)) $("status-updated").textContent = "could not reach the node: " + e.message;
    }
  }

  async function loadModelName() {
    try {
      const models = await getJSON("/v1/models");
      const entry = models && models.data && models.data[0];
      if (entry) {
        $("model-name").textContent = entry.id;
        document.title = entry.id + " · pyengine";
      }
    } catch (e) {
      if (!(e instanceof NeedsKey)) $("model-name").textContent = "(node unreachable)";
    }
  }

  // ---- views ---------------------------------------------------------------------------------

  function show(view) {
    for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
    $("view-chat").hidden = view !== "chat";
    $("view-status").hidden = view !== "status";
    clearInterval(page.statusTimer);
    page.statusTimer = null;
    if (view === "status") {
      refreshStatus();
      page.statusTimer = setInterval(refreshStatus, STATUS_EVERY_MS);
    }
    if (location.hash !== "#" + view) history.replaceState(null, "", "#" + view);
  }

  function start() {
    for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));
    $("composer").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = $("input").value.trim();
      if (!text || page.controller) return;
      $("input").value = "";
      send(text);
    });
    $("input").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("regenerate").addEventListener("click", regenerate);
    $("clear").addEventListener("click", newChat);
    $("key-button").addEventListener("click", () => askKey("The API key this page sends to the node."));
    $("key-save").addEventListener("click", saveKey);
    $("key-input").addEventListener("keydown", (ev) => { if (ev.key === "Enter") saveKey(); });
    $("key-cancel").addEventListener("click", () => $("key-dialog").close());
    show(location.hash === "#status" ? "status" : "chat");
    loadModelName();
  }

  start();
})();
