// convserve web page: pick a model, draw a digit or upload an image, show the top classes.
// Every prediction goes to the image endpoint, POST /models/{name}/predict, as a multipart `file`;
// once it is shown, the same file goes to POST /models/{name}/explain for what the model saw, and the user may send
// its true label to POST /v2/models/{name}/feedback (the prediction named by its X-Request-Id). The live quality
// section shows GET /v2/models/{name}/quality: accuracy, confusion matrix and drift per version; the rollouts
// section, GET /v2/models/{name}/rollout of every model: what serves, the candidate, its guards, the last decision.
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
const explainCard = $("explain-card");
const explainStatus = $("explain-status");
const explainBody = $("explain-body");
const modelInput = $("model-input");
const modelInputCaption = $("model-input-caption");
const saliencyCanvas = $("saliency");
const saliencyCaption = $("saliency-caption");
const featureMaps = $("feature-maps");
const feedbackForm = $("feedback");
const feedbackLabel = $("feedback-label");
const feedbackSend = $("feedback-send");
const feedbackStatus = $("feedback-status");
const qualityCard = $("quality-card");
const qualityStatus = $("quality-status");
const qualityVersions = $("quality-versions");

const EXPLAIN_IDLE = "After a prediction, this shows the image the model was given, where it looked, " +
  "and what its layers found.";
const INPUT_PIXELS = 168;  // the input and its heatmap are shown this wide, each pixel a visible square

let models = [];
let inked = false;      // anything drawn since the last clear
let drawing = null;     // the pointer id while a stroke is in progress
let last = null;        // the last point of the stroke
let timer = null;       // the debounced drawing prediction
let sequence = 0;       // only the answer to the newest request is shown
let previewUrl = null;
let feedbackFor = null;   // the prediction the feedback control is about: {model, id}
let qualitySequence = 0;  // only the answer to the newest quality request is shown

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
  clearExplanation(EXPLAIN_IDLE);
  hideFeedback();
  results.replaceChildren();
  placeholder.hidden = false;
  latency.textContent = "–";
  version.textContent = "–";
}

function percent(score) {
  return `${(score * 100).toFixed(1)}%`;
}

// The JSON body of an answer, or null when it has none (a proxy's HTML error page, an empty body).
async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

function reasonOf(response, body) {
  return body && body.error ? body.error : `The service answered HTTP ${response.status}.`;
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
    const body = await readJson(response);
    const ms = performance.now() - started;
    if (mine !== sequence) return;  // a newer request has been sent
    if (!response.ok || !body || !Array.isArray(body.predictions)) {
      clearResults();
      showError(reasonOf(response, body));
      return;
    }
    clearError();
    showPrediction(body, ms);
    offerFeedback(model, response.headers.get("x-request-id"), body.predictions[0]);
    explain(model, blob, filename, mine);
  } catch (err) {
    if (mine !== sequence) return;
    clearResults();
    showError(`Could not reach the service: ${err.message}`);
  } finally {
    if (mine === sequence && timer === null) results.setAttribute("aria-busy", "false");
  }
}

// ---- what the model sees ---------------------------------------------------

function clearExplanation(message) {
  explainStatus.textContent = message;
  explainBody.hidden = true;
  featureMaps.replaceChildren();
  explainCard.setAttribute("aria-busy", "false");
}

function dims(shape) {
  return shape.join("×");
}

// Where the heatmap is strongest, in words, for those who cannot see it.
function hottestPlace(saliency) {
  const [height, width] = saliency.shape;
  let best = -Infinity;
  let at = [0, 0];
  saliency.data.forEach((row, y) => row.forEach((value, x) => {
    if (value > best) {
      best = value;
      at = [y, x];
    }
  }));
  if (!(best > 0)) return "nowhere in particular: covering any part barely changes the answer";
  const vertical = ["top", "middle", "bottom"][Math.min(2, Math.floor((3 * at[0]) / height))];
  const horizontal = ["left", "centre", "right"][Math.min(2, Math.floor((3 * at[1]) / width))];
  return vertical === "middle" && horizontal === "centre" ? "in the centre" : `at the ${vertical} ${horizontal}`;
}

// The input, dimmed, with the positive saliency over it in red: stronger evidence, more opaque.
function drawSaliency(input, saliency) {
  const [height, width, channels] = input.shape;
  saliencyCanvas.width = width;
  saliencyCanvas.height = height;
  const paint = saliencyCanvas.getContext("2d");
  const image = paint.createImageData(width, height);
  const peak = Math.max(0, ...saliency.data.flat());
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const pixel = input.data[y][x];
      const rgb = channels === 3 ? pixel : [pixel[0], pixel[0], pixel[0]];
      const heat = peak > 0 ? Math.max(0, saliency.data[y][x]) / peak : 0;
      const alpha = 0.85 * heat;
      const i = 4 * (y * width + x);
      image.data[i] = (1 - alpha) * 0.6 * rgb[0] + alpha * 255;
      image.data[i + 1] = (1 - alpha) * 0.6 * rgb[1] + alpha * 200 * (1 - heat);
      image.data[i + 2] = (1 - alpha) * 0.6 * rgb[2];
      image.data[i + 3] = 255;
    }
  }
  paint.putImageData(image, 0, 0);
}

function featureMapItem(map) {
  const [height, width, channels] = map.shape;
  const li = document.createElement("li");
  li.className = "feature-map";
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  const layer = document.createElement("span");
  layer.className = "layer";
  layer.textContent = map.layer;
  const kind = document.createElement("span");
  kind.className = "op";
  kind.textContent = map.op;
  const shape = document.createElement("span");
  shape.className = "shape";
  shape.textContent = dims(map.shape);
  caption.append(layer, " ", kind, " ", shape);
  const img = document.createElement("img");
  img.alt = `${channels} feature maps of ${width}×${height} pixels from the ${map.op} layer ${map.layer}`;
  img.addEventListener("load", () => {  // small grids are shown twice as large, in whole pixels
    if (img.naturalWidth < 400) img.width = img.naturalWidth * 2;
  });
  img.src = `data:image/png;base64,${map.png}`;
  figure.append(caption, img);
  li.append(figure);
  return li;
}

function showExplanation(body, ms) {
  const {input, saliency} = body;
  const [height, width, channels] = input.shape;
  const kind = channels === 1 ? "grayscale" : channels === 3 ? "colour" : `${channels}-channel`;
  modelInput.src = `data:image/png;base64,${input.png}`;
  modelInput.alt = `The ${width}×${height} ${kind} image the model was given, after preprocessing`;
  modelInput.width = INPUT_PIXELS;
  modelInput.height = Math.round((INPUT_PIXELS * height) / width);
  modelInputCaption.textContent = `The model's input: ${dims(input.shape)}`;
  drawSaliency(input, saliency);
  saliencyCanvas.style.width = `${INPUT_PIXELS}px`;
  saliencyCanvas.style.height = `${modelInput.height}px`;
  saliencyCanvas.setAttribute("aria-label", `Heatmap over the input: the evidence for “${saliency.label}” ` +
    `lies ${hottestPlace(saliency)}.`);
  saliencyCaption.textContent = `Where it looked for “${saliency.label}”`;
  featureMaps.replaceChildren(...body.feature_maps.map(featureMapItem));
  explainBody.hidden = false;
  explainStatus.textContent = `Explained “${saliency.label}” in ${Math.round(ms)} ms: the input, ` +
    `where the model looked, and ${body.feature_maps.length} layers of feature maps.`;
}

async function explain(model, blob, filename, mine) {
  explainCard.setAttribute("aria-busy", "true");
  explainStatus.textContent = "Explaining the prediction…";
  const form = new FormData();
  form.append("file", blob, filename);
  const started = performance.now();
  try {
    const response = await fetch(`/models/${encodeURIComponent(model.name)}/explain`, {method: "POST", body: form});
    const body = await readJson(response);
    if (mine !== sequence) return;  // a newer prediction has been asked for
    if (!response.ok || !body || !body.saliency) {
      const reason = body && body.error ? body.error : `the service answered HTTP ${response.status}`;
      clearExplanation(`No explanation: ${reason}`);
      return;
    }
    showExplanation(body, performance.now() - started);
  } catch (err) {
    if (mine === sequence) clearExplanation(`No explanation: could not reach the service (${err.message}).`);
  } finally {
    if (mine === sequence) explainCard.setAttribute("aria-busy", "false");
  }
}

// ---- feedback: the true label of the prediction shown ---------------------------

function hideFeedback() {
  feedbackFor = null;
  feedbackForm.hidden = true;
  feedbackForm.removeAttribute("data-request-id");
  setFeedbackStatus("", false);
}

function setFeedbackStatus(message, failed) {
  feedbackStatus.textContent = message;
  feedbackStatus.classList.toggle("failed", failed);
}

// The image endpoint answers one image per request, so the prediction is (its request id, index 0).
function offerFeedback(model, requestId, prediction) {
  if (!requestId) {
    hideFeedback();
    return;
  }
  feedbackFor = {model: model.name, id: requestId};
  feedbackForm.dataset.requestId = requestId;
  feedbackLabel.replaceChildren(...model.labels.map((label, classId) => new Option(label, String(classId))));
  feedbackLabel.value = String(prediction.class_id);  // a right answer is confirmed with one click
  feedbackSend.disabled = false;
  feedbackForm.setAttribute("aria-busy", "false");
  setFeedbackStatus("", false);
  feedbackForm.hidden = false;
}

async function sendFeedback(event) {
  event.preventDefault();
  const target = feedbackFor;
  if (!target) return;
  feedbackSend.disabled = true;
  feedbackForm.setAttribute("aria-busy", "true");
  setFeedbackStatus("Sending…", false);
  let message;
  let recorded = false;
  try {
    const response = await fetch(`/v2/models/${encodeURIComponent(target.model)}/feedback`, {
      method: "POST",
      headers: {"content-type": "application/json"},
      body: JSON.stringify({id: target.id, index: 0, label: Number(feedbackLabel.value)}),
    });
    const body = await readJson(response);
    recorded = response.ok && body !== null && body.accepted === 1;
    message = !recorded ? reasonOf(response, body) : body.new ? "Thanks, recorded." : "Thanks, already recorded.";
  } catch (err) {
    message = `Could not reach the service: ${err.message}`;
  }
  if (feedbackFor === target) {  // still the prediction shown
    setFeedbackStatus(message, !recorded);
    feedbackSend.disabled = false;
    feedbackForm.setAttribute("aria-busy", "false");
  }
  if (recorded && target.model === select.value) refreshQuality();
}

feedbackForm.addEventListener("submit", sendFeedback);

// ---- live quality ----------------------------------------------------------------

const DRIFT_LEVELS = {none: "no real shift", moderate: "a moderate shift", significant: "a significant shift"};
const HIT_RGB = "29, 78, 216";    // the accent: right answers, on the diagonal
const MISS_RGB = "194, 65, 12";   // mistakes, off the diagonal

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

function accuracyText(v) {
  if (v.accuracy === null) return "no labels yet";
  const [low, high] = v.accuracy_ci95;
  return `${percent(v.accuracy)} (${v.correct} of ${v.labelled} right; 95% interval ${percent(low)}–${percent(high)})`;
}

function driftText(drift) {
  if (drift.psi === null) return drift.reference ? "–" : "not measured: this version has no reference distribution";
  return `PSI ${drift.psi.toFixed(3)}: ${DRIFT_LEVELS[drift.level] || drift.level} from the ${drift.reference}`;
}

function stat(name, key, value) {
  const row = element("div");
  const dd = element("dd", "", value);
  dd.dataset.stat = key;
  row.append(element("dt", "", name), dd);
  return row;
}

// Rows: the true class; columns: the predicted class; each cell shaded by its count, blue on the diagonal
// (right), orange off it (mistakes), so both where the model is right and how it errs stand out.
function confusionTable(v) {
  const {labels, confusion} = v;
  const peak = Math.max(1, ...confusion.flat());
  const vertical = labels.some((label) => label.length > 2);  // long labels stand upright above their column
  const table = element("table", vertical ? "confusion vertical" : "confusion");
  table.dataset.version = v.version;
  table.append(element("caption", "", `Confusion matrix of version ${v.version}, ` +
    `${plural(v.labelled, "labelled prediction", "labelled predictions")}: rows are the true class, ` +
    "columns the predicted class."));
  const head = element("thead");
  const axis = element("tr");
  const predictedAxis = element("th", "axis", "Predicted →");
  predictedAxis.colSpan = labels.length;
  predictedAxis.scope = "colgroup";
  axis.append(element("td", "corner"), predictedAxis);
  const columns = element("tr");
  const trueAxis = element("th", "axis", "True ↓");
  trueAxis.scope = "col";
  columns.append(trueAxis, ...labels.map((label) => {
    const th = element("th", "column-label");
    th.scope = "col";
    th.append(element("span", "", label));
    return th;
  }));
  head.append(axis, columns);
  const body = element("tbody");
  body.append(...labels.map((trueLabel, t) => {
    const row = element("tr");
    const th = element("th", "row-label", trueLabel);
    th.scope = "row";
    row.append(th, ...labels.map((predictedLabel, p) => {
      const count = confusion[t][p];
      const cell = element("td", t === p ? "cell hit" : "cell miss", String(count));
      cell.dataset.true = String(t);
      cell.dataset.predicted = String(p);
      cell.title = `True ${trueLabel}, predicted ${predictedLabel}: ${plural(count, "prediction", "predictions")}`;
      if (count > 0) {
        const strength = 0.15 + (0.85 * count) / peak;
        cell.style.backgroundColor = `rgba(${t === p ? HIT_RGB : MISS_RGB}, ${strength.toFixed(3)})`;
        if (strength > 0.55) cell.classList.add("strong");
      } else {
        cell.classList.add("zero");
      }
      return cell;
    }));
    return row;
  }));
  table.append(head, body);
  const frame = element("div", "confusion-frame");
  frame.append(table);
  return frame;
}

function versionQuality(model, v) {
  const article = element("article", "quality-version");
  article.dataset.version = v.version;
  article.append(element("h3", "", `${model.name} v${v.version}`));
  const drift = stat("Drift", "drift", driftText(v.drift));
  if (v.drift.level) drift.querySelector("dd").classList.add(`drift-${v.drift.level}`);
  const stats = element("dl", "quality-stats");
  stats.append(
    stat("Predictions", "predictions", String(v.predictions)),
    stat("Labelled", "labelled", String(v.labelled)),
    stat("Live accuracy", "accuracy", accuracyText(v)),
    drift);
  article.append(stats);
  if (v.labelled > 0) {
    article.append(confusionTable(v), element("p", "muted legend",
      "Blue: right answers (true = predicted); orange: mistakes. The darker the cell, the more predictions."));
  } else {
    article.append(element("p", "muted", "No labelled predictions yet: the confusion matrix fills in as true " +
      "labels are sent with “Was this right?”."));
  }
  return article;
}

function showQualityMessage(message) {
  qualityStatus.textContent = message;
  qualityVersions.replaceChildren();
}

async function refreshQuality() {
  const model = currentModel();
  const mine = ++qualitySequence;
  if (!model) {
    showQualityMessage("No model selected.");
    return;
  }
  qualityCard.setAttribute("aria-busy", "true");
  try {
    const response = await fetch(`/v2/models/${encodeURIComponent(model.name)}/quality`);
    const body = await readJson(response);
    if (mine !== qualitySequence) return;  // a newer refresh, or another model, has been asked for
    if (!response.ok || !body || !Array.isArray(body.versions)) {
      showQualityMessage(`No live quality: ${reasonOf(response, body)}`);
      return;
    }
    if (body.versions.length === 0) {
      showQualityMessage(`No predictions of ${model.name} logged yet.`);
      return;
    }
    qualityVersions.replaceChildren(...body.versions.map((v) => versionQuality(model, v)));
    qualityStatus.textContent = `${model.name}: ${plural(body.versions.length, "version", "versions")} with ` +
      `logged predictions, newest first (as of ${new Date().toLocaleTimeString()}).`;
  } catch (err) {
    if (mine === qualitySequence) showQualityMessage(`No live quality: could not reach the service (${err.message}).`);
  } finally {
    if (mine === qualitySequence) qualityCard.setAttribute("aria-busy", "false");
  }
}

$("quality-refresh").addEventListener("click", refreshQuality);

// ---- rollouts ----------------------------------------------------------------

const rolloutCard = $("rollout-card");
const rolloutStatus = $("rollout-status");
const rolloutTable = $("rollout-table");
const rolloutRows = $("rollout-rows");
const GUARD_MARKS = {holds: "✓", fails: "✗", pending: "…", no_data: "–"};
let rolloutSequence = 0;

function guardCell(guards) {
  const cell = element("td");
  const names = ["agreement", "errors", "latency", "accuracy"].filter((n) => guards && guards[n]);
  if (names.length === 0) {
    cell.textContent = "–";
    return cell;
  }
  for (const name of names) {
    const g = guards[name];
    const value = g.value === null || g.value === undefined ? "" :
      name === "agreement" ? ` ${(100 * g.value).toFixed(1)}%` : ` ${g.value}`;
    const span = element("span", `guard guard-${g.status}`, `${GUARD_MARKS[g.status] || "?"} ${name}${value}`);
    span.title = g.detail || g.status;
    cell.append(span);
  }
  if (guards.candidate_answers !== undefined) {
    cell.append(element("div", "muted", `${guards.candidate_answers} of ${guards.min_requests} candidate answers`));
  }
  return cell;
}

function rolloutRow(r) {
  const row = element("tr");
  row.append(element("th", "", r.model));
  row.firstChild.scope = "row";
  row.append(element("td", "", r.stable === null ? "–" : `version ${r.stable}`));
  row.append(element("td", "", r.candidate === null ? (r.state === "off" ? "rollouts off" : "none") :
    `version ${r.candidate}: ${r.state}${r.state === "canary" ? ` (${Math.round(100 * r.traffic)}% of traffic)` : ""}`));
  row.append(guardCell(r.guards));
  const last = (r.history || [])[0];
  row.append(element("td", "", last ? `version ${last.version} ${last.decision.replace("_", " ")}: ${last.reason} ` +
    `(${new Date(last.at * 1000).toLocaleString()})` : "–"));
  return row;
}

async function refreshRollouts() {
  const mine = ++rolloutSequence;
  if (models.length === 0) {
    rolloutStatus.textContent = "No model to show.";
    rolloutTable.hidden = true;
    return;
  }
  rolloutCard.setAttribute("aria-busy", "true");
  try {
    const answers = await Promise.all(models.map(async (m) => {
      const response = await fetch(`/v2/models/${encodeURIComponent(m.name)}/rollout`);
      const body = await readJson(response);
      return response.ok && body ? body : {model: m.name, stable: null, candidate: null, state: "unknown",
        guards: {}, history: [], error: reasonOf(response, body)};
    }));
    if (mine !== rolloutSequence) return;
    rolloutRows.replaceChildren(...answers.map(rolloutRow));
    rolloutTable.hidden = false;
    const running = answers.filter((a) => a.candidate !== null).length;
    rolloutStatus.textContent = `${plural(running, "rollout", "rollouts")} running ` +
      `(as of ${new Date().toLocaleTimeString()}).`;
  } catch (err) {
    if (mine === rolloutSequence) rolloutStatus.textContent = `No rollouts: could not reach the service (${err.message}).`;
  } finally {
    if (mine === rolloutSequence) rolloutCard.setAttribute("aria-busy", "false");
  }
}

$("rollout-refresh").addEventListener("click", refreshRollouts);

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
  refreshQuality();
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
    showQualityMessage("No model to show.");
    return;
  }
  if (models.length === 0) {
    select.replaceChildren(new Option("No ready models", ""));
    showError("No model is ready to serve yet.");
    showQualityMessage("No model to show.");
    return;
  }
  select.replaceChildren(...models.map((m) => new Option(m.digit ? `${m.name} (draw or upload)` : m.name, m.name)));
  const preferred = models.find((m) => m.digit) || models[0];
  select.value = preferred.name;
  select.disabled = false;
  selectModel();
  refreshRollouts();
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
