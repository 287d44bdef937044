// The page of `mambastep serve`: completions streamed as they are generated, the caller's
// sessions (fork, checkpoint, roll back, download), and the state's bytes against a KV cache's.
// The API key stays in this browser tab (sessionStorage); nothing is loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = sessionStorage.getItem("mambastep-key") || "";
keyInput.addEventListener("change", () => { sessionStorage.setItem("mambastep-key", keyInput.value); refresh(); });

let card = null;           // /v1/models: state bytes, a transformer's KV bytes per token
let current = null;        // the selected session
const history = [];        // [position, state bytes] of the selected session, as it grows

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (keyInput.value) h.Authorization = `Bearer ${keyInput.value}`;
  return h;
}

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error ? data.error.message : `${response.status}`);
  return data;
}

function say(message) { $("status").textContent = message || ""; }

// Server-sent events from a POST: calls onData with each parsed `data:` object.
async function stream(path, body, onData) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(data.error ? data.error.message : `${response.status}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const payload = line.slice(6);
      if (payload === "[DONE]") return;
      const data = JSON.parse(payload);
      if (data.error) throw new Error(data.error.message);
      onData(data);
    }
  }
}

function sampling() {
  return { max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value), stream: true };
}

$("send").addEventListener("click", async () => {
  $("output").textContent = "";
  say();
  try {
    await stream("/v1/completions", { prompt: $("prompt").value, ...sampling() }, (chunk) => {
      for (const choice of chunk.choices) $("output").textContent += choice.text;
    });
  } catch (err) { say(err.message); }
});

$("to-session").addEventListener("click", async () => {
  if (!current) { say("select or create a session first"); return; }
  $("output").textContent = "";
  say();
  try {
    if ($("prompt").value) await api("POST", `/v1/sessions/${current.id}/feed`, { text: $("prompt").value });
    await stream(`/v1/sessions/${current.id}/generate`, sampling(), (chunk) => {
      if (chunk.object === "session.generate.chunk") $("output").textContent += chunk.text;
      else if (chunk.session) show(chunk.session);
    });
  } catch (err) { say(err.message); }
});

async function refresh() {
  try {
    if (!card) {
      card = (await api("GET", "/v1/models")).data[0];
      $("model").textContent = `${card.id}: ${card.family}, ${card.parameters.toLocaleString()} parameters, `
        + `${(card.state_bytes / 1024).toFixed(1)} KiB of state per sequence`;
    }
    const list = await api("GET", "/v1/sessions?limit=200");
    const ul = $("session-list");
    ul.replaceChildren();
    for (const item of list.data) {
      const li = document.createElement("li");
      li.textContent = `${item.id}  ${item.position} tokens`;
      li.dataset.id = item.id;
      if (current && current.id === item.id) li.classList.add("selected");
      li.addEventListener("click", () => { history.length = 0; show(item); refresh(); });
      ul.appendChild(li);
    }
    say();
  } catch (err) { say(err.message); }
  draw();
}

function show(session) {
  current = session;
  $("current").hidden = false;
  $("current-id").textContent = session.id;
  $("current-position").textContent = session.position.toLocaleString();
  $("current-state").textContent = `${(session.state_bytes / 1024).toFixed(1)} KiB`;
  if (!history.length || history[history.length - 1][0] !== session.position) history.push([session.position, session.state_bytes]);
  draw();
}

$("new-session").addEventListener("click", async () => {
  try { history.length = 0; show(await api("POST", "/v1/sessions", {})); refresh(); } catch (err) { say(err.message); }
});
$("refresh").addEventListener("click", refresh);
$("fork").addEventListener("click", async () => {
  if (!current) return;
  try { history.length = 0; show(await api("POST", `/v1/sessions/${current.id}/fork`)); refresh(); } catch (err) { say(err.message); }
});
$("checkpoint").addEventListener("click", async () => {
  if (!current) return;
  try {
    const checkpoint = await api("POST", `/v1/sessions/${current.id}/checkpoints`);
    $("checkpoints").textContent = `checkpoint ${checkpoint.id} at ${checkpoint.position} tokens`;
  } catch (err) { say(err.message); }
});
$("rollback").addEventListener("click", async () => {
  if (!current) return;
  try { show(await api("POST", `/v1/sessions/${current.id}/rollback`, { tokens: Number($("undo").value) })); refresh(); }
  catch (err) { say(err.message); }
});
$("download").addEventListener("click", async () => {
  if (!current) return;
  const response = await fetch(`/v1/sessions/${current.id}/file`, { headers: headers(false) });
  if (!response.ok) { say(`download failed: ${response.status}`); return; }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = `${current.id}.session`;
  link.click();
  URL.revokeObjectURL(link.href);
});

// The chart: bytes against context tokens, the session's own state (flat) and what a
// transformer of the same width and depth would hold in its KV cache at the same context.
function draw() {
  const canvas = $("chart");
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 70, bottom = 30;
  g.clearRect(0, 0, w, h);
  if (!card) return;
  const tokens = Math.max(256, ...history.map(([p]) => p)) * 1.1;
  const top = Math.max(card.state_bytes, card.transformer_kv_bytes_per_token * tokens) * 1.1;
  const x = (t) => left + (w - left - 10) * t / tokens;
  const y = (b) => h - bottom - (h - bottom - 10) * b / top;
  g.strokeStyle = "#999"; g.fillStyle = "#333"; g.font = "11px sans-serif";
  g.beginPath(); g.moveTo(left, 10); g.lineTo(left, h - bottom); g.lineTo(w - 10, h - bottom); g.stroke();
  g.textAlign = "center";
  g.fillText("context tokens", (left + w) / 2, h - 6);
  g.fillText("0", left, h - bottom + 14);
  g.fillText(`${Math.round(tokens)}`, w - 30, h - bottom + 14);
  g.textAlign = "right";
  g.fillText(`${(top / 1024 / 1024).toFixed(2)} MiB`, left - 6, 16);
  g.fillText(`${(card.state_bytes / 1024).toFixed(0)} KiB`, left - 6, y(card.state_bytes) + 4);
  g.textAlign = "left";
  g.lineWidth = 2;
  g.strokeStyle = "#d62728";  // a transformer's KV cache: grows with every token
  g.beginPath(); g.moveTo(x(0), y(0)); g.lineTo(x(tokens), y(card.transformer_kv_bytes_per_token * tokens)); g.stroke();
  g.strokeStyle = "#1f77b4";  // this model's state: the same at every position
  g.beginPath(); g.moveTo(x(0), y(card.state_bytes)); g.lineTo(x(tokens), y(card.state_bytes)); g.stroke();
  g.fillStyle = "#1f77b4";
  for (const [position, bytes] of history) { g.beginPath(); g.arc(x(position), y(bytes), 4, 0, 2 * Math.PI); g.fill(); }
}

refresh();
