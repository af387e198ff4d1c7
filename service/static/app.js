// convserve web page: pick a model, draw a digit or upload an image, show the top classes.
// Every prediction goes to the image endpoint, POST /models/{name}/predict, as a multipart `file`.
"use strict";

const TOP_K = 5;
const DEBOUNCE_MS = 300;
const STROKE_WIDTH = 20;

const $ = (id) => document.getElementById(id);
const select = $("model-select");
const modelInfo = $("model-info");
const drawPanel = $("draw-panel");
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const fileInput = $("file-input");
const fileName = $("file-name");
const dropZone = $("drop-zone");
const preview = $("preview");
const errorBox = $("error");
const placeholder = $("placeholder");
const results = $("results");
const latency = $("latency");
const version = $("version");

let models = [];
let inked = false;      // anything drawn since the last clear
let drawing = null;     // the pointer id while a stroke is in progress
let last = null;        // the last point of the stroke
let timer = null;       // the debounced drawing prediction
let sequence = 0;       // only the answer to the newest request is shown
let previewUrl = null;

function currentModel() {
  return models.find((m) => m.name === select.value);
}

// ---- messages and results ------------------------------------------------

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function clearError() {
  errorBox.textContent = "";
  errorBox.hidden = true;
}

function clearResults() {
  results.replaceChildren();
  placeholder.hidden = false;
  latency.textContent = "–";
  version.textContent = "–";
}

function percent(score) {
  return `${(score * 100).toFixed(1)}%`;
}

function showPrediction(body, ms) {
  const prediction = body.predictions[0];
  const items = prediction.top_k.map((entry) => {
    const top = entry.class_id === prediction.class_id;
    const li = document.createElement("li");
    li.className = top ? "bar top" : "bar";
    li.dataset.classId = String(entry.class_id);
    if (top) li.setAttribute("aria-current", "true");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = entry.label;
    const track = document.createElement("span");
    track.className = "track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(100, entry.score * 100))}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "percent";
    value.textContent = percent(entry.score);
    li.append(label, track, value);
    return li;
  });
  results.replaceChildren(...items);
  placeholder.hidden = true;
  latency.textContent = `${Math.round(ms)} ms`;
  version.textContent = `${body.model} v${body.version}`;
}

// ---- the one prediction path ----------------------------------------------

async function predict(blob, filename) {
  const model = currentModel();
  if (!model) return;
  const mine = ++sequence;
  results.setAttribute("aria-busy", "true");
  const form = new FormData();
  form.append("file", blob, filename);
  const started = performance.now();
  try {
    const response = await fetch(
      `/models/${encodeURIComponent(model.name)}/predict?top_k=${TOP_K}`, {method: "POST", body: form});
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    const ms = performance.now() - started;
    if (mine !== sequence) return;  // a newer request has been sent
    if (!response.ok || !body || !Array.isArray(body.predictions)) {
      clearResults();
      showError(body && body.error ? body.error : `The service answered HTTP ${response.status}.`);
      return;
    }
    clearError();
    showPrediction(body, ms);
  } catch (err) {
    if (mine !== sequence) return;
    clearResults();
    showError(`Could not reach the service: ${err.message}`);
  } finally {
    if (mine === sequence && timer === null) results.setAttribute("aria-busy", "false");
  }
}

// ---- models ---------------------------------------------------------------

function describe(model) {
  const [, height, width, channels] = model.input.shape;
  const kind = model.digit ? "digit model" : channels === 1 ? "grayscale" : "colour";
  return `Version ${model.default_version} · ${width}×${height}×${channels} ${kind} · ${model.labels.length} classes`;
}

function selectModel() {
  const model = currentModel();
  cancelScheduled();
  sequence++;  // answers for the previous model are stale
  results.setAttribute("aria-busy", "false");
  clearError();
  clearResults();
  if (!model) return;
  modelInfo.textContent = describe(model);
  drawPanel.hidden = !model.digit;
  if (model.digit && inked) schedulePrediction();
}

async function loadModels() {
  try {
    const response = await fetch("/models");
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    models = body.models.filter((m) => m.default_version !== null && m.input);
  } catch (err) {
    select.replaceChildren(new Option("No models", ""));
    showError(`Could not load the models: ${err.message}`);
    return;
  }
  if (models.length === 0) {
    select.replaceChildren(new Option("No ready models", ""));
    showError("No model is ready to serve yet.");
    return;
  }
  select.replaceChildren(...models.map((m) => new Option(m.digit ? `${m.name} (draw or upload)` : m.name, m.name)));
  const preferred = models.find((m) => m.digit) || models[0];
  select.value = preferred.name;
  select.disabled = false;
  selectModel();
}

select.addEventListener("change", selectModel);

// ---- drawing --------------------------------------------------------------

function resetCanvas() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#000";
  ctx.fillStyle = "#000";
  ctx.lineWidth = STROKE_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  inked = false;
}

function point(event) {
  const box = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * canvas.width) / box.width,
    y: ((event.clientY - box.top) * canvas.height) / box.height,
  };
}

function cancelScheduled() {
  if (timer !== null) clearTimeout(timer);
  timer = null;
}

function schedulePrediction() {
  cancelScheduled();
  results.setAttribute("aria-busy", "true");
  timer = setTimeout(() => {
    timer = null;
    if (!inked) {
      results.setAttribute("aria-busy", "false");
      return;
    }
    canvas.toBlob((blob) => {
      if (blob) predict(blob, "drawing.png");
      else {
        results.setAttribute("aria-busy", "false");
        showError("Could not read the drawing.");
      }
    }, "image/png");
  }, DEBOUNCE_MS);
}

canvas.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  drawing = event.pointerId;
  last = point(event);
  ctx.beginPath();
  ctx.arc(last.x, last.y, STROKE_WIDTH / 2, 0, Math.PI * 2);
  ctx.fill();
  inked = true;
  schedulePrediction();
});

canvas.addEventListener("pointermove", (event) => {
  if (event.pointerId !== drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    ctx.beginPath();
    ctx.moveTo(last.x, last.y);
    ctx.lineTo(p.x, p.y);
    ctx.stroke();
    last = p;
  }
  schedulePrediction();
});

function endStroke(event) {
  if (event.pointerId !== drawing) return;
  drawing = null;
  last = null;
  schedulePrediction();
}

canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

$("clear").addEventListener("click", () => {
  cancelScheduled();
  sequence++;
  results.setAttribute("aria-busy", "false");
  resetCanvas();
  clearError();
  clearResults();
});

// ---- uploads --------------------------------------------------------------

function upload(file) {
  if (!file) return;
  fileName.textContent = file.name;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
  preview.hidden = true;
  if (file.type.startsWith("image/")) {
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.alt = `Preview of ${file.name}`;
    preview.hidden = false;
  }
  cancelScheduled();
  predict(file, file.name);  // the server decides what it can decode
}

fileInput.addEventListener("change", () => {
  upload(fileInput.files[0]);
  fileInput.value = "";  // choosing the same file again still uploads it
});

dropZone.addEventListener("click", () => fileInput.click());
dropZone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    fileInput.click();
  }
});
for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    dropZone.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropZone.addEventListener(type, () => dropZone.classList.remove("over"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  upload(event.dataTransfer.files[0]);
});
// A file dropped next to the zone must not replace the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

resetCanvas();
clearError();
loadModels();
