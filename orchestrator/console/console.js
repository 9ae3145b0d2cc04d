/* The orchestrator's web console: plain browser JavaScript, no build step, no library.
 *
 * The page itself holds no data. Everything shown comes from the orchestrator's
 * API, fetched with the API key the user pasted (sent as "Authorization: Bearer",
 * kept in sessionStorage: this tab only). With no keys configured the
 * orchestrator serves loopback only and needs no key: the console says so.
 *
 * One loop polls every `refresh` ms (1 s; the header's menu, or ?refresh=<ms> in the
 * URL, changes it): /v1/stats (the charts), and what the open
 * view shows (/v1/sessions and the open session's /turns, /v1/templates,
 * /v1/cluster). Tables are updated in place, row by row, keyed by id.
 * Data is only ever written with textContent: nothing from the API becomes HTML.
 */
"use strict";

(() => {
  const KEY_STORAGE = "ppio.console.key";
  const HISTORY = 120; // chart points kept (two minutes at the default refresh)
  const WINDOW = 5; // seconds: turns/s and latency quantiles are over the last WINDOW seconds
  const TURNS_SHOWN = 50;
  const ENDED = new Set(["closing", "closed", "failed"]);
  const NOT_OK = ["error", "timeout", "cancelled", "crashed", "rejected"];

  const $ = (id) => document.getElementById(id);

  const state = {
    key: null, // the Bearer secret, or null (not signed in, or authentication off)
    authOff: false,
    generation: 0, // bumped on sign-out: answers to older requests are dropped
    view: "sessions",
    interval: 1000,
    timer: null,
    ticking: false,
    again: false,
    skew: 0, // server clock minus ours, in seconds
    sessions: new Map(), // id -> the API's session view
    sessionRows: new Map(), // id -> row parts
    templates: new Map(), // id -> the API's template view
    templatesAt: 0,
    templateRows: new Map(),
    memberRows: new Map(),
    openId: null,
    openWake: false, // the user asked to load a dormant session's turns
    turnRows: new Map(),
    turnsLoaded: false,
    prevStats: null,
    lastStats: null,
    window: [], // recent stats, oldest first: the base of the windowed rates
  };

  // -- small helpers --------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function setBadge(node, text, kind) {
    setText(node, text);
    const cls = "state " + (kind || text);
    if (node.className !== cls) node.className = cls;
  }

  function serverNow() {
    return Date.now() / 1000 + state.skew;
  }

  function fmtDuration(seconds) {
    let s = Math.max(0, Math.round(seconds));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    s %= 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
  }

  function fmtClock(epoch) {
    return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
  }

  function fmtWhen(epoch) {
    return new Date(epoch * 1000).toLocaleString([], { hour12: false });
  }

  function fmtSeconds(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 1) return `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1)} ms`;
    return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  }

  function fmtNumber(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    if (value === 0) return "0";
    if (Math.abs(value) >= 100) return String(Math.round(value));
    return String(Number(value.toPrecision(2)));
  }

  function sum(object) {
    return Object.values(object || {}).reduce((a, b) => a + b, 0);
  }

  function shortId(id) {
    return id.length > 16 ? id.slice(0, 14) + "…" : id;
  }

  // -- the API --------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, type, message) {
      super(message);
      this.status = status;
      this.type = type;
    }
  }

  async function api(method, path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    const key = options.key !== undefined ? options.key : state.key;
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (options.body !== undefined) {
      if (options.body instanceof Blob) {
        init.body = options.body;
      } else {
        headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(options.body);
      }
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (exc) {
      throw new ApiError(0, "NetworkError", `cannot reach the orchestrator (${exc.message})`);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (exc) {
      data = null;
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(
        response.status,
        error.type || "HTTPError",
        error.message || `${response.status} ${response.statusText}`,
      );
    }
    return data;
  }

  const sessionPath = (id) => `/v1/sessions/${encodeURIComponent(id)}`;

  // -- signing in and out ---------------------------------------------------

  async function boot() {
    wire();
    // ?refresh=<ms> picks the polling period (at least 100 ms), e.g. /ui?refresh=250.
    const asked = Math.round(Number(new URLSearchParams(location.search).get("refresh")));
    if (asked >= 100) {
      const select = $("refresh");
      if (![...select.options].some((o) => o.value === String(asked))) {
        select.append(el("option", { value: asked, text: `${asked / 1000} s` }));
      }
      select.value = String(asked);
      state.interval = asked;
    }
    let stats;
    try {
      // Without a key first: a 200 means no keys are configured (loopback only).
      stats = await api("GET", "/v1/stats", { key: null });
      state.authOff = true;
      sessionStorage.removeItem(KEY_STORAGE);
    } catch (exc) {
      if (exc.status !== 401) {
        setText($("loading"), `Cannot load the console: ${exc.message}`);
        $("loading").className = "error";
        return;
      }
    }
    if (state.authOff) {
      enter(stats);
      return;
    }
    const saved = sessionStorage.getItem(KEY_STORAGE);
    if (!saved) {
      showLogin("");
      return;
    }
    try {
      stats = await api("GET", "/v1/stats", { key: saved });
    } catch (exc) {
      sessionStorage.removeItem(KEY_STORAGE);
      showLogin(exc.status === 401 ? `Your saved key is no longer accepted: ${exc.message}` : exc.message);
      return;
    }
    state.key = saved;
    enter(stats);
  }

  function showLogin(message) {
    $("loading").hidden = true;
    $("console").hidden = true;
    $("nav").hidden = true;
    $("refresh-label").hidden = true;
    $("logout").hidden = true;
    setText($("who"), "");
    $("login").hidden = false;
    showLoginError(message);
    $("key").focus();
  }

  function showLoginError(message) {
    setText($("login-error"), message);
    $("login-error").hidden = !message;
  }

  async function onLogin(event) {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) {
      showLoginError("Paste an API key secret first.");
      return;
    }
    $("login-submit").disabled = true;
    try {
      const stats = await api("GET", "/v1/stats", { key });
      state.key = key;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("key").value = "";
      enter(stats);
    } catch (exc) {
      showLoginError(
        exc.status === 401
          ? `That key was not accepted (${exc.type}: ${exc.message}).`
          : `Cannot sign in: ${exc.message}`,
      );
    } finally {
      $("login-submit").disabled = false;
    }
  }

  function enter(stats) {
    state.generation += 1;
    $("loading").hidden = true;
    $("login").hidden = true;
    showLoginError("");
    $("console").hidden = false;
    $("nav").hidden = false;
    $("refresh-label").hidden = false;
    $("logout").hidden = state.authOff;
    const who = $("who");
    who.replaceChildren();
    if (state.authOff) {
      who.append("authentication off");
      setText(
        $("notice"),
        "Authentication is off: no API keys are configured, so this orchestrator listens on " +
          "loopback only and its console needs no sign-in.",
      );
      $("notice").hidden = false;
    } else {
      who.append("tenant ", el("b", { text: stats.tenant }));
      $("notice").hidden = true;
    }
    state.prevStats = null;
    state.window = [];
    ingestStats(stats);
    showView(state.view);
  }

  function signOut(message) {
    state.generation += 1;
    clearTimeout(state.timer);
    state.key = null;
    sessionStorage.removeItem(KEY_STORAGE);
    closeDetail();
    for (const id of ["sessions", "templates", "members", "turns"]) $(id).tBodies[0].replaceChildren();
    for (const map of [state.sessions, state.sessionRows, state.templates, state.templateRows, state.memberRows]) {
      map.clear();
    }
    state.templatesAt = 0;
    state.prevStats = state.lastStats = null;
    state.window = [];
    for (const chart of Object.values(charts)) chart.reset();
    $("error").hidden = true;
    showLogin(message || "");
  }

  // -- the polling loop -----------------------------------------------------

  function schedule(delay) {
    clearTimeout(state.timer);
    state.timer = null;
    if (delay === null) return;
    state.timer = setTimeout(tick, delay);
  }

  function refreshSoon() {
    if (state.ticking) state.again = true;
    else schedule(0);
  }

  async function tick() {
    if (state.ticking) return;
    state.ticking = true;
    state.again = false;
    const generation = state.generation;
    const jobs = [api("GET", "/v1/stats").then((stats) => generation === state.generation && ingestStats(stats))];
    if (state.view === "sessions") {
      jobs.push(refreshSessions(generation));
      if (state.openId) jobs.push(refreshTurns(generation));
    }
    if (state.view === "templates" || Date.now() - state.templatesAt > 10000) {
      jobs.push(refreshTemplates(generation));
    }
    if (state.view === "cluster") jobs.push(refreshCluster(generation));
    const results = await Promise.allSettled(jobs);
    state.ticking = false;
    if (generation !== state.generation) return;
    const failures = results.filter((r) => r.status === "rejected").map((r) => r.reason);
    if (failures.some((f) => f.status === 401)) {
      signOut("Your key is no longer accepted; sign in again.");
      return;
    }
    if (failures.length) showError(failures[0].message || String(failures[0]));
    else $("error").hidden = true;
    if (state.again) schedule(0);
    else schedule(state.interval > 0 ? state.interval : null);
  }

  function showError(message) {
    setText($("error"), message);
    $("error").hidden = false;
  }

  function showView(view) {
    state.view = view;
    for (const tab of document.querySelectorAll("#nav .tab")) {
      if (tab.dataset.view === view) tab.setAttribute("aria-current", "page");
      else tab.removeAttribute("aria-current");
    }
    for (const name of ["sessions", "templates", "cluster"]) $(`view-${name}`).hidden = name !== view;
    if (view === "templates") renderTemplates();
    refreshSoon();
  }

  /** Keep `tbody`'s rows in `items`' order: one row per key, made once, updated in place. */
  function syncRows(tbody, rows, items, keyOf, make, update) {
    const seen = new Set();
    items.forEach((item, index) => {
      const key = keyOf(item);
      seen.add(key);
      let row = rows.get(key);
      if (!row) {
        row = make(key, item);
        rows.set(key, row);
      }
      update(row, item);
      if (tbody.children[index] !== row.tr) tbody.insertBefore(row.tr, tbody.children[index] || null);
    });
    for (const [key, row] of rows) {
      if (!seen.has(key)) {
        row.tr.remove();
        rows.delete(key);
      }
    }
  }

  // -- sessions -------------------------------------------------------------

  async function refreshSessions(generation) {
    const data = await api("GET", "/v1/sessions");
    if (generation !== state.generation) return;
    const list = data.sessions || [];
    list.sort((a, b) => b.created_at - a.created_at || a.session_id.localeCompare(b.session_id));
    state.sessions = new Map(list.map((s) => [s.session_id, s]));
    renderSessions(list);
    if (list.some((s) => !state.templates.has(s.template_id)) && Date.now() - state.templatesAt > 3000) {
      await refreshTemplates(generation);
      renderSessions(list);
    }
  }

  function renderSessions(list) {
    if (list === undefined) list = [...state.sessions.values()];
    syncRows($("sessions").tBodies[0], state.sessionRows, list, (s) => s.session_id, makeSessionRow, updateSessionRow);
    applyFilter();
    if (state.openId) renderDetailHead();
  }

  function statusOf(session) {
    return session.resident === false ? "dormant" : session.status;
  }

  /** The idle deadline as shown; a session running or holding turns is not idle (its
   * expires_at is then the end of its maximum lifetime). */
  function deadlineText(s, now) {
    if (ENDED.has(s.status)) return "—";
    if (s.status !== "paused" && (s.status === "busy" || s.turns.queued > 0)) return "not idle";
    const left = s.expires_at - now;
    return left > 0 ? `in ${fmtDuration(left)}` : "due";
  }

  function actionButtons(id, where) {
    const make = (action, label, cls) => {
      const button = el("button", {
        type: "button",
        class: cls,
        "data-action": action,
        "aria-label": `${label} session ${id}`,
        text: label,
      });
      button.addEventListener("click", (event) => {
        event.stopPropagation();
        act(id, button.dataset.action);
      });
      return button;
    };
    const parts = {
      pause: make("pause", "Pause"),
      timeout: make("timeout", "Timeout…"),
      close: make("close", "Close", "danger"),
    };
    where.append(parts.pause, parts.timeout, parts.close);
    return parts;
  }

  function updateActionButtons(parts, session) {
    const ended = ENDED.has(session.status);
    const paused = session.status === "paused";
    parts.pause.dataset.action = paused ? "resume" : "pause";
    setText(parts.pause, paused ? "Resume" : "Pause");
    parts.pause.setAttribute("aria-label", `${paused ? "Resume" : "Pause"} session ${session.session_id}`);
    for (const button of [parts.pause, parts.timeout, parts.close]) button.disabled = ended;
  }

  function makeSessionRow(id) {
    const cells = {};
    const tr = el("tr", { "data-session-id": id });
    for (const name of ["id", "state", "template", "age", "deadline", "turns", "mailbox", "sandbox", "actions"]) {
      cells[name] = el("td", name === "turns" || name === "mailbox" ? { class: "num" } : {});
      tr.append(cells[name]);
    }
    const row = {
      tr,
      cells,
      idText: el("code", { text: id }),
      meta: el("span", { class: "meta" }),
      badge: el("span", { class: "state" }),
      templateName: el("span"),
      templateId: el("span", { class: "meta mono" }),
    };
    cells.id.append(row.idText, row.meta);
    cells.state.append(row.badge);
    cells.template.append(row.templateName, row.templateId);
    const actions = el("span", { class: "actions" });
    cells.actions.append(actions);
    row.buttons = actionButtons(id, actions);
    tr.addEventListener("click", () => openDetail(id));
    return row;
  }

  function metadataText(metadata) {
    const pairs = Object.entries(metadata || {}).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
    const text = pairs.join(" · ");
    return text.length > 80 ? text.slice(0, 79) + "…" : text;
  }

  function updateSessionRow(row, s) {
    const now = serverNow();
    const status = statusOf(s);
    setText(row.meta, metadataText(s.metadata));
    setBadge(row.badge, status);
    row.badge.title =
      status === "dormant"
        ? `checkpointed, not in memory (${s.status} when it comes back on its next call)`
        : s.reason || "";
    const template = state.templates.get(s.template_id);
    setText(row.templateName, template ? `${template.name} ${template.version}` : s.template_id);
    setText(row.templateId, template ? shortId(s.template_id) : "");
    setText(row.cells.age, fmtDuration(now - s.created_at));
    row.cells.age.title = `created ${fmtWhen(s.created_at)}`;
    const deadline = deadlineText(s, now);
    setText(row.cells.deadline, deadline);
    row.cells.deadline.title =
      deadline === "not idle"
        ? `working; its maximum lifetime ends ${fmtWhen(s.expires_at)}`
        : `${fmtWhen(s.expires_at)} (idle timeout ${s.timeout_seconds} s)`;
    setText(row.cells.turns, `${s.turns.ok} / ${s.turns.failed}`);
    setText(row.cells.mailbox, s.turns.queued);
    const sandbox = s.sandbox;
    setText(row.cells.sandbox, sandbox ? sandbox.kind + (sandbox.pid ? ` · pid ${sandbox.pid}` : "") : "—");
    updateActionButtons(row.buttons, s);
    row.tr.classList.toggle("selected", s.session_id === state.openId);
  }

  function matches(session) {
    const filter = $("state-filter").value;
    if (filter === "active" && ENDED.has(session.status)) return false;
    if (filter === "dormant" && session.resident !== false) return false;
    if (filter && filter !== "active" && filter !== "dormant" && session.status !== filter) return false;
    const query = $("search").value.trim().toLowerCase();
    if (!query) return true;
    const template = state.templates.get(session.template_id);
    const haystack = [
      session.session_id,
      session.template_id,
      template ? template.name : "",
      statusOf(session),
      JSON.stringify(session.metadata || {}),
    ]
      .join(" ")
      .toLowerCase();
    return haystack.includes(query);
  }

  function applyFilter() {
    let shown = 0;
    for (const [id, row] of state.sessionRows) {
      const session = state.sessions.get(id);
      const visible = session !== undefined && matches(session);
      row.tr.hidden = !visible;
      if (visible) shown += 1;
    }
    const total = state.sessionRows.size;
    setText($("session-count"), shown === total ? `${total} session${total === 1 ? "" : "s"}` : `${shown} of ${total} sessions`);
    $("sessions-empty").hidden = shown > 0;
    setText($("sessions-empty"), total ? "No session matches." : "No sessions yet.");
  }

  // -- actions, with confirmation -------------------------------------------

  function confirmDialog({ text, ok, danger, timeout }) {
    return new Promise((resolve) => {
      const dialog = $("confirm");
      const okButton = $("confirm-ok");
      const input = $("confirm-timeout");
      setText($("confirm-text"), text);
      setText(okButton, ok);
      okButton.className = danger ? "primary danger" : "primary";
      $("confirm-timeout-row").hidden = timeout === undefined;
      input.value = timeout === undefined ? "" : String(timeout);
      input.setCustomValidity("");
      const finish = (value) => {
        okButton.onclick = $("confirm-cancel").onclick = dialog.oncancel = null;
        dialog.close();
        resolve(value);
      };
      okButton.onclick = () => {
        if (timeout === undefined) {
          finish(true);
          return;
        }
        const seconds = Number(input.value);
        if (!(seconds > 0)) {
          input.setCustomValidity("a positive number of seconds");
          input.reportValidity();
          return;
        }
        finish(seconds);
      };
      $("confirm-cancel").onclick = () => finish(null);
      dialog.oncancel = (event) => {
        event.preventDefault();
        finish(null);
      };
      dialog.showModal();
      (timeout === undefined ? $("confirm-cancel") : input).focus();
    });
  }

  const ACTIONS = {
    pause: {
      text: (id) => `Pause session ${id}? New turns wait in its mailbox until it is resumed; the idle timeout keeps running.`,
      ok: "Pause",
      done: "paused",
      call: (id) => api("POST", `${sessionPath(id)}/pause`),
    },
    resume: {
      text: (id) => `Resume session ${id}? Turns waiting in its mailbox run.`,
      ok: "Resume",
      done: "resumed",
      call: (id) => api("POST", `${sessionPath(id)}/resume`),
    },
    close: {
      text: (id) => `Close session ${id}? Its sandbox is stopped, waiting turns are cancelled, and it cannot be reopened.`,
      ok: "Close session",
      danger: true,
      done: "closed",
      call: (id) => api("DELETE", sessionPath(id)),
    },
    timeout: {
      text: (id) => `Set the idle timeout of session ${id}, counted from now:`,
      ok: "Set timeout",
      done: "given a new idle timeout",
      call: (id, seconds) => api("POST", `${sessionPath(id)}/timeout`, { body: { timeout_seconds: seconds } }),
    },
  };

  async function act(id, action) {
    const spec = ACTIONS[action];
    const session = state.sessions.get(id);
    const answer = await confirmDialog({
      text: spec.text(id),
      ok: spec.ok,
      danger: spec.danger,
      timeout: action === "timeout" ? (session ? session.timeout_seconds : 900) : undefined,
    });
    if (answer === null) return;
    const generation = state.generation;
    try {
      const view = await spec.call(id, answer);
      if (generation !== state.generation) return;
      state.sessions.set(id, { ...(session || {}), ...view });
      renderSessions();
      setText($("action-status"), `Session ${id} ${spec.done}.`);
    } catch (exc) {
      if (exc.status === 401) {
        signOut("Your key is no longer accepted; sign in again.");
        return;
      }
      showError(`Could not ${action} session ${id}: ${exc.message}`);
    }
    refreshSoon();
  }

  // -- one session: details and its turns, live -----------------------------

  function openDetail(id) {
    if (state.openId !== id) {
      state.openId = id;
      state.openWake = false;
      state.turnRows.clear();
      state.turnsLoaded = false;
      $("turns").tBodies[0].replaceChildren();
      $("detail-actions").replaceChildren();
      state.detailButtons = actionButtons(id, $("detail-actions"));
    }
    $("detail").hidden = false;
    renderDetailHead();
    for (const [key, row] of state.sessionRows) row.tr.classList.toggle("selected", key === id);
    refreshSoon();
  }

  function closeDetail() {
    state.openId = null;
    $("detail").hidden = true;
    for (const row of state.sessionRows.values()) row.tr.classList.remove("selected");
  }

  function renderDetailHead() {
    const id = state.openId;
    const s = state.sessions.get(id);
    setText($("detail-id"), id);
    if (!s) return;
    const status = statusOf(s);
    setBadge($("detail-state"), status);
    updateActionButtons(state.detailButtons, s);
    const now = serverNow();
    const template = state.templates.get(s.template_id);
    const facts = [
      ["Template", template ? `${template.name} ${template.version} (${s.template_id})` : s.template_id],
      ["Created", `${fmtWhen(s.created_at)} (${fmtDuration(now - s.created_at)} ago)`],
      ["Last activity", `${fmtDuration(now - s.last_activity)} ago`],
      ["Idle deadline", deadlineText(s, now) === "not idle" ? "not idle" : ENDED.has(s.status) ? "—" : fmtWhen(s.expires_at)],
      ["Idle timeout", `${s.timeout_seconds} s`],
      ["Turns", `${s.turns.ok} ok · ${s.turns.failed} failed · ${s.turns.queued} queued`],
      ["Restarts", String(s.restarts)],
      ["Sandbox", s.sandbox ? `${s.sandbox.kind}${s.sandbox.pid ? " · pid " + s.sandbox.pid : ""}` : "—"],
      ["Metadata", Object.keys(s.metadata || {}).length ? JSON.stringify(s.metadata) : "—"],
    ];
    if (s.reason) facts.push(["Reason", s.reason]);
    const dl = $("detail-facts");
    if (dl.children.length !== facts.length) {
      dl.replaceChildren(...facts.map(() => el("div", {}, el("dt"), el("dd"))));
    }
    facts.forEach(([name, value], i) => {
      setText(dl.children[i].children[0], name);
      setText(dl.children[i].children[1], value);
    });
  }

  function showDetailNote(message, withWake) {
    const note = $("detail-note");
    note.replaceChildren(message);
    if (withWake) {
      const button = el("button", { type: "button", text: "Load its turns (brings it back)" });
      button.addEventListener("click", () => {
        state.openWake = true;
        note.hidden = true;
        refreshSoon();
      });
      note.append(" ", button);
    }
    note.hidden = false;
  }

  async function refreshTurns(generation) {
    const id = state.openId;
    const session = state.sessions.get(id);
    if (session && session.resident === false && !state.openWake) {
      showDetailNote("This session is dormant: checkpointed, not in memory. Its next call brings it back.", true);
      $("detail-live").hidden = true;
      return;
    }
    let data;
    try {
      data = await api("GET", `${sessionPath(id)}/turns?limit=${TURNS_SHOWN}`);
    } catch (exc) {
      if (exc.status === 404 && generation === state.generation && id === state.openId) {
        showDetailNote(`This session has ended: ${exc.message}.`, false);
        $("detail-live").hidden = true;
        return;
      }
      throw exc;
    }
    if (generation !== state.generation || id !== state.openId) return;
    $("detail-note").hidden = true;
    $("detail-live").hidden = false;
    const turns = data.turns.slice().reverse();
    if (data.running) turns.unshift(data.running);
    const fresh = state.turnsLoaded;
    syncRows(
      $("turns").tBodies[0],
      state.turnRows,
      turns,
      (t) => t.idempotency_key,
      (key, turn) => makeTurnRow(key, turn, fresh),
      updateTurnRow,
    );
    state.turnsLoaded = true;
    $("turns-empty").hidden = turns.length > 0;
    setText($("turns-empty"), data.queued ? `No turns yet; ${data.queued} waiting.` : "No turns yet.");
  }

  function makeTurnRow(key, turn, fresh) {
    const cells = {};
    const tr = el("tr", { "data-request-id": turn.request_id, class: fresh ? "new" : null });
    for (const name of ["when", "request", "strategy", "outcome", "duration", "reply"]) {
      cells[name] = el("td", { class: name === "duration" ? "num" : name === "reply" ? "reply" : null });
      tr.append(cells[name]);
    }
    const row = { tr, cells, badge: el("span"), request: el("code") };
    cells.outcome.append(row.badge);
    cells.request.append(row.request);
    return row;
  }

  function updateTurnRow(row, turn) {
    const c = row.cells;
    setText(c.when, turn.finished_at ? fmtClock(turn.finished_at) : turn.outcome === "running" ? "running…" : "queued");
    c.when.title = `submitted ${fmtWhen(turn.submitted_at)}; Idempotency-Key ${turn.idempotency_key}`;
    setText(row.request, turn.request_id);
    setText(c.strategy, turn.strategy || "—");
    setBadge(row.badge, turn.outcome);
    row.badge.title = turn.error ? `${turn.error.type}: ${turn.error.message}` : "";
    setText(c.duration, turn.duration === null ? "—" : fmtSeconds(turn.duration));
    let reply = turn.reply === undefined ? "" : turn.reply;
    if (turn.reply_bytes > new TextEncoder().encode(reply).length) reply += ` … (${turn.reply_bytes} bytes)`;
    if (turn.streaming) reply = `[${turn.chunks} chunk${turn.chunks === 1 ? "" : "s"}] ` + reply;
    setText(c.reply, reply);
  }

  // -- templates ------------------------------------------------------------

  async function refreshTemplates(generation) {
    const data = await api("GET", "/v1/templates");
    if (generation !== state.generation) return;
    state.templates = new Map(data.templates.map((t) => [t.template_id, t]));
    state.templatesAt = Date.now();
    if (state.view === "templates") renderTemplates();
  }

  function renderTemplates() {
    const list = [...state.templates.values()].sort((a, b) => b.updated_at - a.updated_at);
    syncRows($("templates").tBodies[0], state.templateRows, list, (t) => t.template_id, makeTemplateRow, updateTemplateRow);
    $("templates-empty").hidden = list.length > 0;
  }

  function makeTemplateRow(id) {
    const cells = {};
    const tr = el("tr", { "data-template-id": id });
    for (const name of ["name", "version", "id", "phase", "sandbox", "updated", "log"]) {
      cells[name] = el("td");
      tr.append(cells[name]);
    }
    const row = {
      tr,
      cells,
      badge: el("span"),
      error: el("span", { class: "meta" }),
      log: el("pre", { class: "log" }),
      summary: el("summary"),
    };
    cells.id.append(el("code", { text: id }));
    cells.phase.append(row.badge, row.error);
    cells.log.append(el("details", {}, row.summary, row.log));
    return row;
  }

  function updateTemplateRow(row, t) {
    const c = row.cells;
    setText(c.name, t.name);
    setText(c.version, t.version);
    setBadge(row.badge, t.phase);
    setText(row.error, t.error || "");
    const sandbox = t.sandbox || {};
    setText(c.sandbox, sandbox.kind || "—");
    c.sandbox.title = sandbox.reason ? `asked for ${sandbox.requested}: ${sandbox.reason}` : "";
    setText(c.updated, `${fmtDuration(serverNow() - t.updated_at)} ago`);
    const lines = (t.build_log || "").split("\n");
    const tail = lines.slice(-40).join("\n");
    setText(row.summary, t.build_log ? `last ${Math.min(lines.length, 40)} lines` : "empty");
    setText(row.log, tail || "(no build log)");
  }

  async function onDeploy(event) {
    event.preventDefault();
    const file = $("deploy-file").files[0];
    if (!file) {
      setText($("deploy-status"), "Choose a .tar.gz of an agent directory first.");
      return;
    }
    $("deploy-submit").disabled = true;
    setText($("deploy-status"), `Uploading ${file.name}…`);
    try {
      const template = await api("POST", "/v1/templates", { body: file, headers: { "Content-Type": "application/gzip" } });
      setText($("deploy-status"), `${template.name} ${template.version} (${template.template_id}): ${template.phase}; its status updates below.`);
      $("deploy-file").value = "";
    } catch (exc) {
      if (exc.status === 401) {
        signOut("Your key is no longer accepted; sign in again.");
        return;
      }
      setText($("deploy-status"), `Deploy refused: ${exc.message}`);
    } finally {
      $("deploy-submit").disabled = false;
    }
    refreshSoon();
  }

  // -- cluster --------------------------------------------------------------

  async function refreshCluster(generation) {
    let data;
    try {
      data = await api("GET", "/v1/cluster");
    } catch (exc) {
      if (exc.status !== 404) throw exc;
      data = null; // a single node: no /v1/cluster
    }
    if (generation !== state.generation) return;
    let members;
    if (data) {
      members = data.members;
      setText(
        $("cluster-summary"),
        `${members.length} member${members.length === 1 ? "" : "s"} (placement ${data.placement}); this page is served by ${data.node}.`,
      );
    } else {
      const node = (state.lastStats && state.lastStats.node) || {};
      members = [
        {
          node: "this node",
          address: location.origin,
          machine: location.hostname,
          alive: node.accepting !== false,
          self: true,
          load: { sessions: node.sessions, running_turns: node.running_turns },
        },
      ];
      setText($("cluster-summary"), "A single node: this orchestrator runs alone (no --workers or --cluster).");
    }
    const most = Math.max(1, ...members.map((m) => (m.load && m.load.sessions) || 0));
    syncRows($("members").tBodies[0], state.memberRows, members, (m) => m.node, makeMemberRow, (row, m) => updateMemberRow(row, m, most));
  }

  function makeMemberRow(node) {
    const cells = {};
    const tr = el("tr", { "data-node": node });
    for (const name of ["node", "address", "machine", "state", "sessions", "running", "load"]) {
      cells[name] = el("td", name === "sessions" || name === "running" ? { class: "num" } : {});
      tr.append(cells[name]);
    }
    const row = { tr, cells, name: el("span"), tag: el("span", { class: "meta" }), badge: el("span"), bar: el("span") };
    cells.node.append(row.name, row.tag);
    cells.state.append(row.badge);
    cells.load.append(el("span", { class: "load" }, row.bar));
    return row;
  }

  function updateMemberRow(row, m, most) {
    const load = m.load || {};
    setText(row.name, m.node);
    setText(row.tag, m.self ? "serving this page" : "");
    setText(row.cells.address, m.address || "—");
    setText(row.cells.machine, m.machine || "—");
    setBadge(row.badge, m.alive ? "alive" : "down");
    row.badge.title = m.error || "";
    setText(row.cells.sessions, load.sessions === undefined || load.sessions === null ? "—" : load.sessions);
    setText(row.cells.running, load.running_turns === undefined || load.running_turns === null ? "—" : load.running_turns);
    row.bar.style.width = `${Math.round((100 * (load.sessions || 0)) / most)}%`;
  }

  // -- live charts (canvas) -------------------------------------------------

  function niceCeiling(value) {
    if (!(value > 0)) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  class Chart {
    constructor(canvas, legend, series, format) {
      this.canvas = canvas;
      this.legend = legend;
      this.series = series; // [{label, color}]
      this.format = format;
      this.reset();
    }

    reset() {
      this.data = this.series.map(() => []);
      this.draw();
      this.setLegend(this.series.map(() => null), "");
    }

    push(values, note) {
      values.forEach((value, i) => {
        const points = this.data[i];
        points.push(value === undefined || value === null || Number.isNaN(value) ? null : value);
        if (points.length > HISTORY) points.shift();
      });
      this.setLegend(values, note);
      this.draw();
    }

    setLegend(values, note) {
      const parts = [];
      this.series.forEach((s, i) => {
        parts.push(el("i", { style: null }), `${s.label} ${values[i] === null || values[i] === undefined ? "—" : this.format(values[i])}`);
      });
      this.legend.replaceChildren(...parts, note ? ` · ${note}` : "");
      [...this.legend.querySelectorAll("i")].forEach((swatch, i) => {
        swatch.style.background = this.series[i].color;
      });
    }

    draw() {
      const canvas = this.canvas;
      const ratio = window.devicePixelRatio || 1;
      const width = canvas.clientWidth;
      const height = canvas.clientHeight;
      if (!width || !height) return;
      if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
        canvas.width = Math.round(width * ratio);
        canvas.height = Math.round(height * ratio);
      }
      const ctx = canvas.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, width, height);
      const left = 48;
      const right = 6;
      const top = 8;
      const bottom = 14;
      let most = 0;
      for (const points of this.data) for (const v of points) if (v !== null && v > most) most = v;
      const ceiling = niceCeiling(most);
      const y = (v) => top + (height - top - bottom) * (1 - v / ceiling);
      ctx.font = "10px system-ui, sans-serif";
      ctx.textBaseline = "middle";
      ctx.lineWidth = 1;
      for (const fraction of [0, 0.5, 1]) {
        const yy = Math.round(y(ceiling * fraction)) + 0.5;
        ctx.strokeStyle = "#e8ebf0";
        ctx.beginPath();
        ctx.moveTo(left, yy);
        ctx.lineTo(width - right, yy);
        ctx.stroke();
        ctx.fillStyle = "#8a94a5";
        ctx.textAlign = "right";
        ctx.fillText(this.format(ceiling * fraction), left - 5, yy);
      }
      ctx.textAlign = "right";
      ctx.textBaseline = "alphabetic";
      ctx.fillText("now", width - right, height - 2);
      const step = (width - left - right) / (HISTORY - 1);
      this.data.forEach((points, index) => {
        const x = (i) => left + (HISTORY - points.length + i) * step;
        ctx.strokeStyle = ctx.fillStyle = this.series[index].color;
        ctx.lineWidth = 1.8;
        ctx.beginPath();
        let drawing = false;
        points.forEach((v, i) => {
          if (v === null) {
            drawing = false;
            return;
          }
          if (drawing) ctx.lineTo(x(i), y(v));
          else ctx.moveTo(x(i), y(v));
          drawing = true;
        });
        ctx.stroke();
        points.forEach((v, i) => {
          const alone = v !== null && (points[i - 1] ?? null) === null && (points[i + 1] ?? null) === null;
          if (alone) {
            ctx.beginPath();
            ctx.arc(x(i), y(v), 2.2, 0, 2 * Math.PI);
            ctx.fill();
          }
        });
      });
    }
  }

  let charts = {};

  /** The q-quantile of a histogram's observations (per-bucket counts, the last one +Inf). */
  function quantile(q, bounds, counts) {
    const total = counts.reduce((a, b) => a + b, 0);
    if (!total) return null;
    const rank = q * total;
    let below = 0;
    for (let i = 0; i < counts.length; i += 1) {
      const count = counts[i];
      if (count > 0 && below + count >= rank) {
        if (i >= bounds.length) return bounds[bounds.length - 1];
        const low = i === 0 ? 0 : bounds[i - 1];
        return low + (bounds[i] - low) * ((rank - below) / count);
      }
      below += count;
    }
    return bounds[bounds.length - 1];
  }

  function ingestStats(stats) {
    state.skew = stats.time - Date.now() / 1000;
    const prev = state.prevStats;
    state.prevStats = state.lastStats = stats;
    const sessions = stats.sessions;
    charts.sessions.push([sessions.active, sessions.running_turns], `${sessions.queued_turns} queued`);
    if (!stats.turns) return;
    const outcomes = stats.turns.by_outcome;
    const total = sum(outcomes);
    const notOk = NOT_OK.reduce((a, k) => a + (outcomes[k] || 0), 0);
    const starts = sum(stats.sandboxes.starts);
    const crashes = sum(stats.sandboxes.crashes);
    let okRate = null;
    let badRate = null;
    let p50 = null;
    let p99 = null;
    let newStarts = null;
    let newCrashes = null;
    // Turns/s and latency over the last WINDOW seconds (a counter that went back, a
    // restarted orchestrator, starts the window again).
    const win = state.window;
    win.push(stats);
    while (win.length > 2 && win[1].time <= stats.time - WINDOW) win.shift();
    const base = win[0];
    if (base !== stats && base.turns) {
      const seconds = stats.time - base.time;
      const baseNotOk = NOT_OK.reduce((a, k) => a + (base.turns.by_outcome[k] || 0), 0);
      const dOk = total - notOk - (sum(base.turns.by_outcome) - baseNotOk);
      const dBad = notOk - baseNotOk;
      const now = stats.turns.duration_seconds;
      const before = base.turns.duration_seconds;
      const delta = now.counts.map((c, i) => c - (before.counts[i] || 0));
      if (seconds > 0 && dOk >= 0 && dBad >= 0 && delta.every((d) => d >= 0)) {
        okRate = dOk / seconds;
        badRate = dBad / seconds;
        const q50 = quantile(0.5, now.buckets, delta);
        const q99 = quantile(0.99, now.buckets, delta);
        p50 = q50 === null ? null : q50 * 1000;
        p99 = q99 === null ? null : q99 * 1000;
      } else {
        state.window = [stats];
      }
    }
    if (prev && prev.sandboxes) {
      const dStarts = starts - sum(prev.sandboxes.starts);
      const dCrashes = crashes - sum(prev.sandboxes.crashes);
      if (dStarts >= 0 && dCrashes >= 0) {
        newStarts = dStarts;
        newCrashes = dCrashes;
      }
    }
    charts.turns.push([okRate, badRate], `${total} total`);
    const d = stats.turns.duration_seconds;
    charts.latency.push([p50, p99], d.count ? `mean ${fmtSeconds(d.sum / d.count)}` : "no turns yet");
    charts.sandboxes.push([newStarts, newCrashes], `${starts} started · ${crashes} crashed`);
  }

  // -- wiring ---------------------------------------------------------------

  function wire() {
    const rate = (v) => fmtNumber(v);
    const ms = (v) => (v >= 1000 ? `${fmtNumber(v / 1000)} s` : `${fmtNumber(v)} ms`);
    charts = {
      turns: new Chart($("chart-turns"), $("legend-turns"), [
        { label: "ok", color: "#1f9d55" },
        { label: "failed", color: "#d03a3a" },
      ], rate),
      latency: new Chart($("chart-latency"), $("legend-latency"), [
        { label: "p50", color: "#2f6fdf" },
        { label: "p99", color: "#c27c0e" },
      ], ms),
      sessions: new Chart($("chart-sessions"), $("legend-sessions"), [
        { label: "active", color: "#2f6fdf" },
        { label: "running turns", color: "#1f9d55" },
      ], rate),
      sandboxes: new Chart($("chart-sandboxes"), $("legend-sandboxes"), [
        { label: "starts", color: "#2f6fdf" },
        { label: "crashes", color: "#d03a3a" },
      ], rate),
    };
    $("login-form").addEventListener("submit", onLogin);
    $("logout").addEventListener("click", () => signOut(""));
    $("deploy-form").addEventListener("submit", onDeploy);
    $("detail-close").addEventListener("click", closeDetail);
    $("search").addEventListener("input", applyFilter);
    $("state-filter").addEventListener("change", applyFilter);
    $("refresh").addEventListener("change", () => {
      state.interval = Number($("refresh").value);
      refreshSoon();
    });
    for (const tab of document.querySelectorAll("#nav .tab")) {
      tab.addEventListener("click", () => showView(tab.dataset.view));
    }
    window.addEventListener("resize", () => {
      for (const chart of Object.values(charts)) chart.draw();
    });
  }

  boot();
})();
