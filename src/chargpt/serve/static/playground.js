// The chargpt playground: stream text from /v1/completions, then show for any character what the
// model expected next (/v1/inspect's probabilities) and where each head looked (its attention).
// Plain JavaScript, no dependencies, no build step: the page works offline. What it shares with
// the exported page (the sampling distribution, the bars) is common.js's `window.chargptPage`.

const { $, shown, percent, setStatus, showTemperature, samplingDistribution, barRow } =
  window.chargptPage;

// viridis (matplotlib's, CC0) at 17 evenly spaced stops, interpolated in between
const VIRIDIS = [
  "440154", "48186a", "472d7b", "424086", "3b528b", "33638d", "2c728e", "26828e", "21918c",
  "1fa088", "28ae80", "3fbc73", "5ec962", "84d44b", "addc30", "d8e219", "fde725",
].map((hex) => [0, 2, 4].map((i) => parseInt(hex.slice(i, i + 2), 16)));

const KEY_STORAGE = "chargpt-api-key";
const NEXT = { word: "next", says: "the text's next character" }; // its bar's mark
const INTRO =
  "Generate some text, then pick a character: see what the model expects next and where it looked.";

const state = {
  model: null, // data[0] of GET /v1/models
  chars: [], // prompt + generated text, one entry per character (code point)
  promptLength: 0,
  inspection: null, // POST /v1/inspect's answer for the last context_length characters
  offset: 0, // index in `chars` of the inspection's first character
  selected: -1, // index in `chars` of the character on show
  requests: 0, // inspections asked for: only the latest one's answer is shown
  controller: null, // AbortController of the generation in progress
};

function viridis(weight) {
  const x = Math.min(Math.max(weight, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const f = x - i;
  const [r, g, b] = VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
  return `rgb(${r},${g},${b})`;
}

// --- talking to the server -------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(pageWords(message));
    this.status = status;
  }
}

// The server's errors name its API's fields and flags; the page says them with its own labels.
const PAGE_WORDS = [
  [/\bmax_tokens\b/g, "Max chars"],
  [/\btop_p\b/g, "Top-p"],
  [/\btop_k\b/g, "Top-k"],
  [/\btemperature\b/g, "Temperature"],
  [/\bseed\b/g, "Seed"],
  [/^prompt\b/, "The prompt"],
  [/, or send "on_unknown": "skip" to drop them/, " from the prompt"],
  [/ \(--[a-z-]+\)/g, ""], // the server's own flags: not the page's to change
];

function pageWords(message) {
  return PAGE_WORDS.reduce((text, [api, page]) => text.replace(api, page), message);
}

async function api(path, body = undefined, signal = undefined) {
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function reportError(error) {
  if (error instanceof ApiError && error.status === 401) {
    $("key-row").hidden = false;
    $("api-key").focus();
    setStatus("This server needs an API key: enter it above, then try again.", true);
  } else {
    setStatus(error.message, true);
  }
}

// Server-sent events: yield the data of each event ("data: ...\n\n"; \r\n line ends accepted).
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

// --- the model's facts -----------------------------------------------------------------------

async function loadModel() {
  try {
    const response = await api("/v1/models");
    state.model = (await response.json()).data[0];
  } catch (error) {
    $("facts").textContent =
      error instanceof ApiError && error.status === 401
        ? "This server asks for an API key: enter it below to see the model."
        : "The model could not be loaded.";
    reportError(error);
    return;
  }
  const m = state.model;
  const facts = [
    `<strong>${escapeHtml(m.id)}</strong>`,
    m.parameters != null && `${m.parameters.toLocaleString("en")} parameters`,
    m.context_length != null && `context ${m.context_length} characters`,
    m.vocab_size != null && `vocabulary ${m.vocab_size}`,
    typeof m.best_val_loss === "number" && `val loss ${m.best_val_loss.toFixed(3)}`,
  ];
  $("facts").innerHTML = facts.filter(Boolean).join(" · ");
  setStatus("");
}

function escapeHtml(text) {
  const div = document.createElement("div");
  div.textContent = text;
  return div.innerHTML;
}

// --- generation ------------------------------------------------------------------------------

function completionRequest() {
  const number = (id) => Number($(id).value);
  const request = {
    model: state.model?.id,
    prompt: $("prompt").value,
    max_tokens: number("max-tokens"),
    temperature: number("temperature"),
    top_p: number("top-p"),
    stream: true,
  };
  if (number("top-k") > 0) request.top_k = number("top-k");
  if ($("seed").value !== "") request.seed = number("seed");
  return request;
}

async function generate() {
  if (state.controller) return;
  if (!state.model) await loadModel();
  if (!state.model) return;
  const request = completionRequest();
  state.controller = new AbortController();
  setGenerating(true);
  resetText(request.prompt);
  setStatus("Generating…");
  const started = performance.now();
  let stopped = false;
  try {
    const response = await api("/v1/completions", request, state.controller.signal);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error.message);
      appendText(chunk.choices?.[0]?.text ?? "", "generated");
      setStatus(`Generating… ${state.chars.length - state.promptLength} characters`);
    }
  } catch (error) {
    if (error.name === "AbortError") stopped = true;
    else reportError(error);
  } finally {
    state.controller = null;
    setGenerating(false);
  }
  const made = state.chars.length - state.promptLength;
  const seconds = (performance.now() - started) / 1000;
  if (!$("status").classList.contains("error")) {
    setStatus(`${stopped ? "Stopped" : "Done"}: ${made} characters in ${seconds.toFixed(1)} s`);
  }
  await inspectWindow(state.chars.length);
  select(state.chars.length - 1);
}

function stop() {
  state.controller?.abort();
}

function setGenerating(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
  $("text").setAttribute("aria-busy", String(on));
  if (on) $("stop").focus();
  else if (document.activeElement === $("stop") || document.activeElement === document.body) {
    $("text").focus();
  }
}

// --- the text, one clickable span per character ----------------------------------------------

function resetText(prompt) {
  state.chars = [];
  state.inspection = null;
  state.selected = -1;
  $("text").replaceChildren();
  appendText(prompt, "prompt");
  state.promptLength = state.chars.length;
  renderInspection();
}

function appendText(text, className) {
  const fragment = document.createDocumentFragment();
  for (const char of text) {
    const span = document.createElement("span");
    span.dataset.i = String(state.chars.length);
    span.textContent = char === "\n" ? "↵\n" : char;
    span.className = char === "\n" ? `${className} newline` : className;
    state.chars.push(char);
    fragment.append(span);
  }
  $("text").append(fragment);
}

function spanAt(i) {
  return $("text").children[i];
}

function select(i) {
  if (i < 0 || i >= state.chars.length) return;
  spanAt(state.selected)?.classList.remove("selected");
  state.selected = i;
  const span = spanAt(i);
  span.classList.add("selected");
  span.scrollIntoView({ block: "nearest" });
  if (state.inspection && !inWindow(i)) inspectWindow(i + 1); // the context before i
  renderInspection();
}

function inWindow(i) {
  return i >= state.offset && i < state.offset + state.inspection.chars.length;
}

// Arrow keys move through the text; up and down keep the column, as in an editor.
function moveSelection(event) {
  const i = state.selected < 0 ? state.chars.length - 1 : state.selected;
  const lineStart = (j) => state.chars.lastIndexOf("\n", j - 1) + 1;
  const moves = {
    ArrowLeft: () => i - 1,
    ArrowRight: () => i + 1,
    Home: () => (event.ctrlKey ? 0 : lineStart(i)),
    End: () => state.chars.length - 1,
    ArrowUp: () => {
      const start = lineStart(i);
      if (start === 0) return i;
      const above = lineStart(start - 1);
      return Math.min(above + (i - start), start - 1);
    },
    ArrowDown: () => {
      const next = state.chars.indexOf("\n", i) + 1;
      if (next === 0) return i;
      const end = state.chars.indexOf("\n", next);
      return Math.min(next + (i - lineStart(i)), end < 0 ? state.chars.length - 1 : end);
    },
  };
  if (!moves[event.key]) return;
  event.preventDefault();
  select(Math.min(Math.max(moves[event.key](), 0), state.chars.length - 1));
}

// --- inspection ------------------------------------------------------------------------------

// Inspect the context_length characters that end at `end` (exclusive): what the model reads
// before predicting character `end`.
async function inspectWindow(end) {
  const context = state.model?.context_length ?? end;
  const offset = Math.max(0, end - context);
  const text = state.chars.slice(offset, end).join("");
  if (!text) return;
  const request = ++state.requests;
  let inspection;
  try {
    const response = await api("/v1/inspect", { text, model: state.model?.id });
    inspection = await response.json();
    inspection.attention = inspection.attention.map((layer) => layer.map(triangleRows));
  } catch (error) {
    reportError(error);
    return;
  }
  if (request !== state.requests) return; // a later selection asked for another window
  state.inspection = inspection;
  state.offset = offset;
  [...$("text").children].forEach((span, i) => span.classList.toggle("outside", !inWindow(i)));
  $("context-size").textContent = `${inspection.chars.length} characters`;
  $("text-legend").hidden = false;
  renderInspection();
}

// One head of /v1/inspect's `attention`: base64 of little-endian float16s, the lower triangle
// row after row. Its rows: row t holds position t's t + 1 weights over positions 0..t.
function triangleRows(packed) {
  const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
  const halves = new DataView(bytes.buffer);
  const weights = new Float32Array(bytes.length / 2);
  for (let i = 0; i < weights.length; i++) weights[i] = fromFloat16(halves.getUint16(2 * i, true));
  const rows = [];
  for (let t = 0; (t * (t + 1)) / 2 < weights.length; t++) {
    const start = (t * (t + 1)) / 2; // rows 0..t-1 hold 1 + 2 + ... + t weights
    rows.push(weights.subarray(start, start + t + 1));
  }
  return rows;
}

// IEEE 754 half precision: 1 sign bit, 5 exponent bits, 10 fraction bits.
function fromFloat16(bits) {
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  let magnitude;
  if (exponent === 0) magnitude = fraction * 2 ** -24; // subnormal
  else if (exponent === 31) magnitude = fraction ? NaN : Infinity;
  else magnitude = (1024 + fraction) * 2 ** (exponent - 25);
  return bits & 0x8000 ? -magnitude : magnitude;
}

function renderInspection() {
  const t = state.selected - state.offset; // position within the inspected window
  const seen = state.inspection;
  const ready = seen && state.selected >= 0 && t >= 0 && t < seen.chars.length;
  $("bars-legend").hidden = !ready;
  $("scale").hidden = !ready || seen.n_layer === 0;
  if (!ready) {
    $("bars").replaceChildren();
    $("heads").replaceChildren();
    $("position").textContent =
      seen && state.selected >= 0 ? "Reading the context before this character…" : INTRO;
    return;
  }
  describePosition(seen, t);
  renderBars(seen, t);
  renderHeads(seen, t);
}

function describePosition(seen, t) {
  const before = seen.chars.slice(Math.max(0, t - 11), t + 1).map(shown).join("");
  const next = state.chars[state.selected + 1];
  const best = seen.top[t][0];
  $("position").textContent =
    `After “${t > 11 ? "…" : ""}${before}” (character ${state.selected + 1} of ` +
    `${state.chars.length}), the model's likeliest next character is ` +
    `“${shown(best.char)}” at ${percent(best.prob)}` +
    (next === undefined ? "." : `; the text goes on with “${shown(next)}”.`);
}

function renderBars(seen, t) {
  const logprobs = seen.logprobs[t];
  const sampled = samplingDistribution(
    logprobs,
    Number($("temperature").value),
    Number($("top-k").value),
    Number($("top-p").value),
  );
  const index = new Map(seen.vocab.map((c, i) => [c, i]));
  const candidates = seen.top[t].map((c) => c.char);
  const next = state.chars[state.selected + 1];
  if (next !== undefined && index.has(next) && !candidates.includes(next)) candidates.push(next);
  const rows = candidates.map((char) => {
    const i = index.get(char);
    return barRow(char, Math.exp(logprobs[i]), sampled[i], char === next ? NEXT : null);
  });
  $("bars").replaceChildren(...rows);
}

// --- attention: a grid of layers x heads, each a strip of weights over the characters so far --

function renderHeads(seen, t) {
  const grid = $("heads");
  if (seen.n_layer === 0) {
    grid.replaceChildren(noteParagraph(seen.note ?? "This model has no attention."));
    return;
  }
  grid.style.gridTemplateColumns = `auto repeat(${seen.n_head}, minmax(0, 1fr))`;
  const cells = [document.createElement("span")];
  for (let h = 0; h < seen.n_head; h++) cells.push(label(`head ${h}`, "column-label"));
  for (let l = 0; l < seen.n_layer; l++) {
    cells.push(label(`layer ${l}`, "row-label"));
    for (let h = 0; h < seen.n_head; h++) cells.push(headCell(seen, l, h, t));
  }
  grid.replaceChildren(...cells);
  requestAnimationFrame(drawStrips);
}

function label(text, className) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  return span;
}

function noteParagraph(text) {
  const p = document.createElement("p");
  p.className = "note";
  p.textContent = text;
  return p;
}

function headCell(seen, layer, head, t) {
  const weights = seen.attention[layer][head][t];
  const top = weights.indexOf(Math.max(...weights));
  const back = t - top;
  const where = back === 0 ? "itself" : back === 1 ? "1 back" : `${back} back`;
  const summary = `“${shown(seen.chars[top])}”, ${where}, ${percent(weights[top])}`;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "head";
  button.dataset.layer = String(layer);
  button.dataset.head = String(head);
  button.title = `Layer ${layer}, head ${head}: most weight on ${summary}`;
  button.setAttribute("aria-label", `${button.title}. Open its matrix.`);
  const canvas = document.createElement("canvas");
  canvas.className = "strip";
  const caption = document.createElement("span");
  caption.className = "caption";
  const offset = back ? `−${back}` : "0";
  caption.textContent = `${shown(seen.chars[top])} ${offset} ${percent(weights[top])}`;
  button.append(canvas, caption);
  button.addEventListener("click", () => openMatrix(layer, head));
  return button;
}

function drawStrips() {
  const seen = state.inspection;
  const t = state.selected - state.offset;
  for (const canvas of $("heads").querySelectorAll("canvas.strip")) {
    const { layer, head } = canvas.parentElement.dataset;
    const weights = seen.attention[layer][head][t];
    const ctx = fitCanvas(canvas, canvas.clientWidth, canvas.clientHeight);
    const width = canvas.clientWidth / weights.length;
    weights.forEach((w, j) => {
      ctx.fillStyle = viridis(w);
      ctx.fillRect(j * width, 0, width + 0.5, canvas.clientHeight); // overlap: no seams
    });
  }
}

// Size a canvas's bitmap to its CSS size times the screen's pixel ratio; draw in CSS pixels.
function fitCanvas(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return ctx;
}

// --- one head enlarged: its whole T x T matrix, the lab's `wei` -------------------------------

function matrixLayout(T) {
  const cell = Math.max(9, Math.min(22, Math.floor(720 / T)));
  return { cell, margin: cell + 8 };
}

function openMatrix(layer, head) {
  const rows = state.inspection.attention[layer][head];
  const T = rows.length;
  const t = state.selected - state.offset;
  const { cell, margin } = matrixLayout(T);
  drawMatrix($("matrix"), rows, state.inspection.chars, t);
  $("matrix").dataset.layer = String(layer);
  $("matrix").dataset.head = String(head);
  $("matrix-title").textContent = `Layer ${layer}, head ${head}: wei, ${T} × ${T}`;
  $("matrix-readout").textContent = readout(rows, t);
  $("matrix-dialog").showModal();
  const scroll = $("matrix-scroll");
  scroll.scrollTop = margin + (t + 0.5) * cell - scroll.clientHeight / 2; // the selected row
  scroll.scrollLeft = margin + (t + 3) * cell - scroll.clientWidth; // its end, by the diagonal
}

// The T x T weights, keys labelled above and below, queries on the left; row t outlined.
function drawMatrix(canvas, rows, chars, t) {
  const T = rows.length;
  const { cell, margin } = matrixLayout(T);
  const width = margin + T * cell;
  const height = 2 * margin + T * cell;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = fitCanvas(canvas, width, height);
  ctx.fillStyle = "#ececec";
  ctx.fillRect(margin, margin, T * cell, T * cell);
  rows.forEach((row, q) =>
    row.forEach((w, k) => {
      ctx.fillStyle = viridis(w);
      ctx.fillRect(margin + k * cell, margin + q * cell, cell, cell);
    }),
  );
  ctx.fillStyle = "#222";
  ctx.font = `${Math.min(cell - 1, 14)}px ui-monospace, monospace`;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  chars.forEach((c, i) => {
    const along = margin + i * cell + cell / 2;
    ctx.fillText(shown(c), along, margin / 2); // keys above
    ctx.fillText(shown(c), along, height - margin / 2); // and below
    ctx.fillText(shown(c), margin / 2, along); // queries on the left
  });
  ctx.strokeStyle = "#e8e8e8";
  ctx.lineWidth = 2;
  ctx.strokeRect(margin, margin + t * cell, (t + 1) * cell, cell);
  ctx.strokeStyle = "#111";
  ctx.lineWidth = 1;
  ctx.strokeRect(margin - 1, margin + t * cell - 1, (t + 1) * cell + 2, cell + 2);
}

function readout(rows, q, k = undefined) {
  const chars = state.inspection.chars;
  const quote = (i) => `“${shown(chars[i])}” (${i + 1})`;
  if (k !== undefined) {
    return k > q
      ? `${quote(q)} cannot see ${quote(k)}: it comes later.`
      : `${quote(q)} gives ${quote(k)} a weight of ${rows[q][k].toFixed(3)}.`;
  }
  const best = Array.from(rows[q], (w, i) => [w, i])
    .sort((a, b) => b[0] - a[0])
    .slice(0, 3)
    .map(([w, i]) => `${quote(i)} ${w.toFixed(2)}`);
  return `${quote(q)} looks most at ${best.join(", ")}. Point at a cell for its weight.`;
}

function matrixPointer(event) {
  const seen = state.inspection;
  const rows = seen.attention[$("matrix").dataset.layer][$("matrix").dataset.head];
  const { cell, margin } = matrixLayout(rows.length);
  const k = Math.floor((event.offsetX - margin) / cell);
  const q = Math.floor((event.offsetY - margin) / cell);
  if (q >= 0 && k >= 0 && q < rows.length && k < rows.length) {
    $("matrix-readout").textContent = readout(rows, q, k);
  }
}

// --- wiring ----------------------------------------------------------------------------------

function start() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  $("key-row").hidden = !$("api-key").value;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadModel();
  });
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller && !$("matrix-dialog").open) stop();
  });
  $("text").addEventListener("click", (event) => {
    const span = event.target.closest("span[data-i]");
    if (span) select(Number(span.dataset.i));
  });
  $("text").addEventListener("keydown", moveSelection);
  for (const id of ["temperature", "top-k", "top-p"]) {
    $(id).addEventListener("input", () => {
      showTemperature();
      renderInspection();
    });
  }
  $("matrix-close").addEventListener("click", () => $("matrix-dialog").close());
  $("matrix").addEventListener("mousemove", matrixPointer);
  new ResizeObserver(() => state.inspection && drawStrips()).observe($("heads"));
  showTemperature();
  renderInspection();
  loadModel();
}

start();
