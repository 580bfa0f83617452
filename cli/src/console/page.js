// The hookrun console's page: Agents from /api/agents, the Session list live from
// /api/sessions/watch (SSE), one Session's transcript live from
// /api/sessions/<name>/follow (SSE), and forms that POST JSON back. Every request carries
// this run's token; everything from the cluster is put in the page as text, never as HTML.
"use strict";

const TOKEN = document.querySelector('meta[name="console-token"]').content;
const FINISHED = new Set(["Complete", "Error"]);

const state = {
  sessions: new Map(),
  selected: null,
  follow: null,
  agentFilter: null,
  lastAgentText: null,
  closedShown: false,
  agentsTimer: null,
};

function withToken(path) {
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(phase) {
  return el("span", { class: "badge " + phase, "data-phase": phase, text: phase });
}

function when(iso) {
  if (!iso) return "";
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return iso;
  const seconds = Math.round((Date.now() - at.getTime()) / 1000);
  if (seconds < 60) return Math.max(seconds, 0) + "s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + "m ago";
  if (seconds < 86400) return Math.round(seconds / 3600) + "h ago";
  return at.toLocaleString();
}

// Failures -----------------------------------------------------------------------------

function showFailure(title, text) {
  document.getElementById("failure-title").textContent = title;
  document.getElementById("failure-text").textContent = text;
  document.getElementById("failure").hidden = false;
}

function hideFailure() {
  document.getElementById("failure").hidden = true;
}

async function answerOf(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch (_) {
    return { error: text || response.statusText };
  }
}

function failureTitle(body, status) {
  const reason = body && body.reason;
  if (reason === "Forbidden" || status === 403) return "Forbidden by Kubernetes RBAC";
  if (reason === "Invalid") return "Not sent";
  if (reason === "NotFound" || status === 404) return "Not found";
  return "Kubernetes request failed";
}

async function call(method, path, body) {
  const response = await fetch(withToken(path), {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
  });
  const answer = await answerOf(response);
  if (!response.ok) {
    const error = new Error(answer.error || response.statusText);
    error.title = failureTitle(answer, response.status);
    throw error;
  }
  return answer;
}

// Agents -------------------------------------------------------------------------------

async function loadAgents() {
  let answer;
  try {
    answer = await call("GET", "/api/agents");
  } catch (error) {
    showFailure(error.title || "Failed", error.message);
    const list = document.getElementById("agents");
    if (!list.querySelector(".agent")) {
      list.replaceChildren(el("li", { class: "empty", text: "Could not list Agents." }));
    }
    return;
  }
  renderAgents(answer.agents || []);
}

function scheduleAgents() {
  clearTimeout(state.agentsTimer);
  state.agentsTimer = setTimeout(loadAgents, 700);
}

function renderAgents(agents) {
  const list = document.getElementById("agents");
  const select = document.getElementById("invoke-agent");
  const chosen = select.value;
  list.replaceChildren();
  select.replaceChildren();
  if (agents.length === 0) {
    list.append(el("li", { class: "empty", text: "No Agents in this namespace." }));
  }
  for (const agent of agents) {
    const recent = el("div", { class: "recent", title: "most recent sessions" });
    for (const session of agent.recent.slice().reverse()) {
      recent.append(el("span", { class: session.phase, title: session.name + ": " + session.phase }));
    }
    const stats = agent.running + " running" +
      (agent.nextSchedule ? " · next " + when(agent.nextSchedule).replace(" ago", "") : "");
    const item = el("li", {
      class: "agent" + (state.agentFilter === agent.name ? " selected" : ""),
      "data-agent": agent.name,
      title: agent.message || "",
    },
      el("div", { class: "agent-name" },
        el("span", { class: "dot " + (agent.ready ? "ready" : "unready") }),
        agent.name),
      el("div", { class: "agent-reason", text: (agent.ready ? "Ready" : "Not ready") +
        (agent.reason ? " · " + agent.reason : "") }),
      el("div", { class: "chips" }, ...agent.triggers.map((t) => el("span", { class: "chip", text: t }))),
      el("div", { class: "agent-stats", text: stats }),
      recent);
    item.addEventListener("click", () => {
      state.agentFilter = state.agentFilter === agent.name ? null : agent.name;
      select.value = agent.name;
      for (const other of list.children) {
        other.classList.toggle("selected", other.dataset.agent === state.agentFilter);
      }
      renderSessions();
    });
    list.append(item);
    select.append(el("option", { value: agent.name, text: agent.name }));
  }
  if (chosen && agents.some((a) => a.name === chosen)) select.value = chosen;
}

// Sessions -----------------------------------------------------------------------------

function sortedSessions() {
  return [...state.sessions.values()]
    .filter((s) => !state.agentFilter || s.agent === state.agentFilter)
    .sort((a, b) => (b.created || "").localeCompare(a.created || "") || b.name.localeCompare(a.name));
}

function renderSessions(fresh) {
  const body = document.getElementById("sessions");
  const rows = sortedSessions();
  body.replaceChildren();
  document.getElementById("session-count").textContent = "(" + rows.length + ")";
  if (rows.length === 0) {
    body.append(el("tr", { class: "empty" }, el("td", { colspan: "5", text: "No sessions yet." })));
  }
  for (const session of rows) {
    const row = el("tr", {
      "data-session": session.name,
      class: [session.name === state.selected ? "selected" : "", session.name === fresh ? "fresh" : ""].join(" ").trim(),
    },
      el("td", { class: "name" }, el("code", { text: session.name })),
      el("td", { text: session.agent }),
      el("td", { class: "phase" }, badge(session.phase)),
      el("td", { class: "title", title: session.message || session.title, text: session.title + (session.titleCut ? "…" : "") }),
      el("td", { class: "when", title: session.created || "", text: when(session.created) }));
    row.addEventListener("click", () => selectSession(session.name));
    body.append(row);
  }
}

function watchSessions() {
  const live = document.getElementById("live");
  const source = new EventSource(withToken("/api/sessions/watch"));
  const setLive = (on, text) => {
    live.textContent = text;
    live.className = "live " + (on ? "on" : "off");
  };
  source.addEventListener("open", () => setLive(false, "listing…"));
  source.addEventListener("error", () => setLive(false, "reconnecting…"));
  source.addEventListener("reset", (event) => {
    setLive(true, "live");
    state.sessions.clear();
    for (const session of JSON.parse(event.data)) state.sessions.set(session.name, session);
    renderSessions();
    scheduleAgents();
  });
  source.addEventListener("upsert", (event) => {
    setLive(true, "live");
    const session = JSON.parse(event.data);
    const known = state.sessions.get(session.name);
    state.sessions.set(session.name, session);
    renderSessions(known && known.phase === session.phase ? null : session.name);
    if (!known || known.phase !== session.phase) scheduleAgents();
  });
  source.addEventListener("remove", (event) => {
    state.sessions.delete(JSON.parse(event.data).name);
    renderSessions();
    scheduleAgents();
  });
  source.addEventListener("failure", (event) => {
    const failure = JSON.parse(event.data);
    setLive(false, "not watching");
    showFailure(failureTitle(failure, failure.code), failure.error);
    const body = document.getElementById("sessions");
    if (state.sessions.size === 0) {
      body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: "5", text: "Could not watch Sessions." })));
    }
  });
}

// Transcript ---------------------------------------------------------------------------

function transcriptAdd(node) {
  const list = document.getElementById("transcript");
  const empty = list.querySelector(".empty");
  if (empty) empty.remove();
  list.append(node);
  list.scrollTop = list.scrollHeight;
}

function bubble(kind, who, text, type) {
  return el("li", { class: "msg " + kind, "data-type": type || kind },
    el("span", { class: "who", text: who }), text);
}

function statusLine(text, phase) {
  return el("li", { class: "status-line " + (phase || ""), "data-type": "status", text });
}

function setPhase(phase) {
  const node = document.getElementById("transcript-phase");
  node.replaceWith(Object.assign(badge(phase), { id: "transcript-phase" }));
  document.getElementById("send").hidden = FINISHED.has(phase);
}

function showEvent(event) {
  switch (event.type) {
    case "user.message":
      transcriptAdd(bubble("user", "you / caller", event.content, event.type));
      break;
    case "agent.message":
      state.lastAgentText = event.content;
      transcriptAdd(bubble("agent", "agent", event.content, event.type));
      break;
    case "agent.turn_complete":
      break;
    case "session.status_running":
      transcriptAdd(statusLine("pod running"));
      break;
    case "session.status_closed":
      state.closedShown = true;
      transcriptAdd(statusLine("ended: " + event.content, event.content));
      break;
    default:
      transcriptAdd(bubble("other", event.type, event.content, event.type));
  }
}

function selectSession(name) {
  if (state.follow) state.follow.close();
  state.selected = name;
  state.lastAgentText = null;
  state.closedShown = false;
  renderSessions();
  const heading = document.getElementById("transcript-title");
  heading.textContent = name;
  heading.classList.add("session-title");
  document.getElementById("transcript").replaceChildren(el("li", { class: "empty", text: "Loading…" }));
  document.getElementById("transcript-meta").textContent = "";
  const source = new EventSource(withToken("/api/sessions/" + encodeURIComponent(name) + "/follow"));
  state.follow = source;
  source.addEventListener("session", (event) => {
    const session = JSON.parse(event.data);
    state.lastAgentText = null;
    state.closedShown = false;
    document.getElementById("transcript").replaceChildren();
    document.getElementById("transcript-meta").textContent =
      "Agent " + session.agent + (session.source ? " · started by " + session.source : "") +
      (session.created ? " · " + new Date(session.created).toLocaleString() : "");
    setPhase(session.phase);
    if (session.title) transcriptAdd(bubble("user", "title", session.title, "title"));
  });
  source.addEventListener("event", (event) => showEvent(JSON.parse(event.data)));
  source.addEventListener("phase", (event) => setPhase(JSON.parse(event.data).phase));
  source.addEventListener("finished", (event) => {
    const end = JSON.parse(event.data);
    setPhase(end.phase);
    if (end.response && end.response !== state.lastAgentText) {
      transcriptAdd(bubble("agent", "answer", end.response, "answer"));
    }
    if (!state.closedShown || end.message) {
      transcriptAdd(statusLine(end.phase + (end.message ? ": " + end.message : ""), end.phase));
    }
    // A finished Session's transcript is whole; reconnecting would only repeat it.
    source.close();
  });
  source.addEventListener("failure", (event) => {
    const failure = JSON.parse(event.data);
    showFailure(failureTitle(failure, failure.code), "following " + name + ": " + failure.error);
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      showFailure("Transcript unavailable", "could not follow " + name + " (is it deleted, or is reading it forbidden?)");
    }
  });
}

// Forms --------------------------------------------------------------------------------

function parseEnv(text) {
  const env = [];
  for (const part of text.split(/[\n,]/)) {
    const item = part.trim();
    if (!item) continue;
    const at = item.indexOf("=");
    if (at <= 0) throw new Error("env: write KEY=value, got " + JSON.stringify(item));
    env.push({ name: item.slice(0, at).trim(), value: item.slice(at + 1) });
  }
  return env;
}

async function invoke(event) {
  event.preventDefault();
  const note = document.getElementById("invoke-note");
  const submit = document.getElementById("invoke-submit");
  note.className = "note";
  let request;
  try {
    request = {
      agent: document.getElementById("invoke-agent").value,
      title: document.getElementById("invoke-title").value,
      env: parseEnv(document.getElementById("invoke-env").value),
    };
  } catch (error) {
    note.className = "note bad";
    note.textContent = error.message;
    return;
  }
  submit.disabled = true;
  note.textContent = "Starting…";
  try {
    const answer = await call("POST", "/api/invoke", request);
    hideFailure();
    note.textContent = "Started " + answer.session.name;
    document.getElementById("invoke-title").value = "";
    state.sessions.set(answer.session.name, answer.session);
    selectSession(answer.session.name);
  } catch (error) {
    note.className = "note bad";
    note.textContent = "Not started.";
    showFailure(error.title || "Failed", error.message);
  } finally {
    submit.disabled = false;
  }
}

async function send(event) {
  event.preventDefault();
  const name = state.selected;
  const box = document.getElementById("send-message");
  const submit = document.getElementById("send-submit");
  if (!name || !box.value.trim()) return;
  submit.disabled = true;
  try {
    await call("POST", "/api/sessions/" + encodeURIComponent(name) + "/input", { message: box.value });
    box.value = "";
    hideFailure();
  } catch (error) {
    showFailure(error.title || "Failed", error.message);
  } finally {
    submit.disabled = false;
  }
}

document.getElementById("invoke").addEventListener("submit", invoke);
document.getElementById("send").addEventListener("submit", send);
document.getElementById("failure-close").addEventListener("click", hideFailure);
setInterval(() => renderSessions(), 30000);
loadAgents();
watchSessions();
