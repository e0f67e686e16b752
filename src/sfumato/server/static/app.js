// sfumato web UI: vanilla JS over the server's own routes, no dependencies.
//   lists      GET /sdapi/v1/{sd-models,loras,samplers,schedulers,upscalers,latent-upscale-modes,options}
//              (each sd-models entry's default_size is the model's native size: width and height follow
//              the selected model until the user changes them)
//   generate   POST /api/v1/jobs (txt2img, or img2img with init_images and, to inpaint, a mask),
//              then its server-sent events (progress + preview URL, end); DELETE /api/v1/jobs/ID interrupts
//   history    GET /api/v1/jobs (each job's images, infotexts, seeds and recorded parameters)
//   PNG info   POST /sdapi/v1/png-info
// ?api_key=KEY in the page's address is passed on to every request.
"use strict";

const key = new URLSearchParams(location.search).get("api_key");
const withKey = (path) => key ? path + (path.includes("?") ? "&" : "?") + "api_key=" + encodeURIComponent(key) : path;
const $ = (id) => document.getElementById(id);

const state = {
  mode: "txt2img",
  job: null,          // the running job's id
  events: null,       // its EventSource
  lastSeed: null,     // seed of the image on show (for the reuse button)
  shown: null,        // {job, index}: the result on show (for reuse / send to)
  masked: false,      // anything painted on the mask
  previewBusy: false,
  sizeEdited: false,  // the user chose a width/height: stop following the model's native size
  cfgEdited: false,   // the user chose a CFG scale: stop following the model's own
  samplers: [], schedules: [], models: [],
};

async function api(path, options = {}) {
  const r = await fetch(withKey(path), options);
  let body = null;
  try { body = await r.json(); } catch { /* empty or not JSON */ }
  if (!r.ok) throw new Error((body && (body.detail || body.error)) || `${r.status} ${r.statusText}`);
  return body;
}
const postJSON = (path, body) => api(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(body)});

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function option(value, text, selected = false) {
  const o = document.createElement("option");
  o.value = value; o.textContent = text; o.selected = selected;
  return o;
}

// --- lists from the server ---------------------------------------------------------------------

async function loadLists() {
  const [models, loras, samplers, schedules, upscalers, latentModes, options] = await Promise.all([
    api("/sdapi/v1/sd-models"), api("/sdapi/v1/loras"), api("/sdapi/v1/samplers"),
    api("/sdapi/v1/schedulers"), api("/sdapi/v1/upscalers"), api("/sdapi/v1/latent-upscale-modes"),
    api("/sdapi/v1/options")]);
  state.models = models; state.samplers = samplers; state.schedules = schedules;
  $("model").replaceChildren(...models.map(m => option(m.title, m.model_name, m.title === options.sd_model_checkpoint)));
  if (!models.length) $("model").append(option("", "(no model)"));
  $("refiner").replaceChildren(option("", "None", true), ...models.map(m => option(m.title, m.model_name)));
  const group = (label, names) => {
    const g = document.createElement("optgroup");
    g.label = label; g.append(...names.map(n => option(n, n, n === "Latent")));
    return g;
  };
  $("hr-upscaler").replaceChildren(group("Latent (upscale the latents)", latentModes.map(m => m.name)),
                                   group("Image (upscale the decoded image)", upscalers.map(u => u.name)));
  setIf("clip-skip", options.CLIP_stop_at_last_layers);
  followModel();
  if (loras.length) {
    $("lora").replaceChildren(...loras.map(l => option(l.name, l.alias || l.name)));
  } else {
    $("lora").replaceChildren(option("", "(none found)"));
    $("lora").disabled = $("lora-add").disabled = true;
  }
  const preferred = samplers.find(s => s.name === "DPM++ 2M") || samplers[0];
  $("sampler").replaceChildren(...samplers.map(s => option(s.name, s.name, s === preferred)));
  $("schedule").replaceChildren(...schedules.map(s => option(s.name, s.label, s.name === "automatic")));
}

// --- width and height follow the model -------------------------------------------------------------

const modelOf = (title) => state.models.find(m => m.title === title);

// The selected model's native size into width/height, unless the user has chosen a size.
function followModel() {
  const m = modelOf($("model").value);
  const size = m && m.default_size;
  $("size-native").hidden = !size || !state.sizeEdited;
  if (!size) {
    $("size-hint").textContent = m ? "This model's native size is unknown." : "";
  } else {
    $("size-native").textContent = `Use the model's size (${size}×${size})`;
    $("size-hint").textContent = state.sizeEdited ? `${m.model_name} makes ${size}×${size} images natively.`
      : `${size}×${size}: the native size of ${m.model_name} (follows the model until you change it).`;
    if (!state.sizeEdited) { $("width").value = size; $("height").value = size; }
  }
  const cfg = m && m.default_cfg;  // the guidance the model generates with (the built-in model's is 2)
  if (cfg && !state.cfgEdited) $("cfg").value = cfg;
  hiresSize();
}

function sizeChosen() {  // width/height set by the user, an input image or reused parameters
  state.sizeEdited = true;
  followModel();
}

// what the hires pass will make, computed as the server does (a multiple of 8)
function hiresSize() {
  const scale = num("hr-scale");
  const to = (v) => Math.max(8, Math.floor(Math.floor(v * scale) / 8) * 8);
  const [w, h] = [num("width"), num("height")];
  $("hr-size").value = scale > 0 ? `${w}×${h} → ${to(w)}×${to(h)}.` : "";
}

// --- mode tabs (arrow keys move between them, as the ARIA tabs pattern says) --------------------

function setMode(mode) {
  state.mode = mode;
  $("form").dataset.mode = mode;
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const on = tab.dataset.mode === mode;
    tab.setAttribute("aria-selected", on);
    tab.tabIndex = on ? 0 : -1;
    if (on) $("form").setAttribute("aria-labelledby", tab.id);
  }
}

function setupTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => setMode(tab.dataset.mode));
    tab.addEventListener("keydown", (e) => {
      const step = {ArrowRight: 1, ArrowLeft: -1}[e.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      setMode(next.dataset.mode); next.focus(); e.preventDefault();
    });
  });
}

// --- input image and mask ----------------------------------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

const round8 = (v) => Math.max(8, Math.min(2048, Math.round(v / 8) * 8));

function setInitImage(src) {
  return new Promise((resolve, reject) => {
    const img = $("init-img");
    img.onload = () => {
      const canvas = $("mask");
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      clearMask();
      $("editor").dataset.empty = "false";
      $("width").value = round8(img.naturalWidth); $("height").value = round8(img.naturalHeight);
      sizeChosen();
      resolve();
    };
    img.onerror = () => reject(new Error("that file is not an image this browser can read"));
    img.src = src;
  });
}

function clearMask() {
  const c = $("mask");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  state.masked = false;
}

function setupMask() {
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  let last = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    const scale = canvas.width / r.width;
    return {x: (e.clientX - r.left) * scale, y: (e.clientY - r.top) * scale, scale};
  };
  const stroke = (from, to) => {
    ctx.strokeStyle = ctx.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--mask") || "red";
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = +$("brush").value * to.scale;  // brush size in screen pixels
    ctx.beginPath(); ctx.moveTo(from.x, from.y); ctx.lineTo(to.x + 0.01, to.y); ctx.stroke();
    state.masked = true;
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = at(e); stroke(last, last); e.preventDefault();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = at(e); stroke(last, p); last = p;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("mask-clear").addEventListener("click", clearMask);
  $("mask-all").addEventListener("click", () => {
    ctx.fillStyle = "red"; ctx.fillRect(0, 0, canvas.width, canvas.height); state.masked = true;
  });
  $("init-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (file) await setInitImage(await readAsDataURL(file)).catch(err => status(err.message, true));
  });
}

// --- the request -------------------------------------------------------------------------------

const num = (id) => Number($(id).value);

function request() {
  const body = {
    type: state.mode === "txt2img" ? "txt2img" : "img2img",
    prompt: $("prompt").value, negative_prompt: $("negative").value,
    sampler_name: $("sampler").value, scheduler: $("schedule").value,
    steps: num("steps"), cfg_scale: num("cfg"), width: num("width"), height: num("height"),
    seed: num("seed"), batch_size: num("batch-size"), n_iter: num("n-iter"),
  };
  const overrides = {CLIP_stop_at_last_layers: num("clip-skip")};
  if ($("model").value) overrides.sd_model_checkpoint = $("model").value;
  body.override_settings = overrides;
  if ($("refiner").value) {
    body.refiner_checkpoint = $("refiner").value;
    body.refiner_switch_at = num("refiner-switch");
  }
  if (state.mode === "txt2img" && $("enable-hr").checked) {
    if (body.refiner_checkpoint) throw new Error("hires fix and a refiner cannot run together: turn one off");
    Object.assign(body, {enable_hr: true, hr_upscaler: $("hr-upscaler").value, hr_scale: num("hr-scale"),
                         hr_second_pass_steps: num("hr-steps"), denoising_strength: num("hr-strength")});
  }
  if (state.mode !== "txt2img") {
    if ($("editor").dataset.empty === "true") throw new Error("choose or drop an input image first");
    body.init_images = [$("init-img").src];
    body.denoising_strength = num("strength");
  }
  if (state.mode === "inpaint") {
    if (!state.masked) throw new Error("paint a mask over the part of the image to repaint first");
    body.mask = $("mask").toDataURL("image/png");  // the painted strokes are the mask's alpha channel
    body.mask_blur = num("mask-blur");
    body.inpainting_fill = num("fill");
    body.inpaint_full_res = $("full-res").value === "true";
    body.inpaint_full_res_padding = num("padding");
    body.inpainting_mask_invert = num("mask-invert");
  }
  return body;
}

// --- generating: job + server-sent events --------------------------------------------------------

function busy(on) {
  $("generate").disabled = on;
  $("interrupt").disabled = !on;
  $("result").setAttribute("aria-busy", on);
}

async function generate() {
  let body;
  try { body = request(); } catch (err) { status(err.message, true); return; }
  busy(true);
  status("Queued…");
  $("progress").value = 0;
  $("steps-done").textContent = "";
  try {
    const job = await postJSON("/api/v1/jobs", body);
    state.job = job.id;
    follow(job);
  } catch (err) {
    busy(false); status(err.message, true);
  }
}

function follow(job) {
  const events = new EventSource(withKey(job.events));
  state.events = events;
  let lastState = "queued";
  events.addEventListener("progress", (e) => {
    const d = JSON.parse(e.data);
    $("progress").value = d.progress;
    if (d.state !== lastState) { lastState = d.state; status(d.state === "running" ? "Generating…" : d.state); }
    if (d.steps) $("steps-done").textContent = `step ${d.step} / ${d.steps} · ${Math.round(100 * d.progress)}%`
      + (d.eta ? ` · about ${Math.ceil(d.eta)} s left` : "");
    if (d.preview) showPreview(d.preview);
  });
  events.addEventListener("end", (e) => { events.close(); finished(JSON.parse(e.data)); });
  events.onerror = async () => {  // the stream broke: ask once for the job's state
    if (events.readyState !== EventSource.CLOSED) return;
    try { finished(await api(`/api/v1/jobs/${job.id}`)); } catch (err) { status(err.message, true); busy(false); }
  };
}

function showPreview(url) {
  if (state.previewBusy) return;  // one preview request at a time: the server renders each one
  state.previewBusy = true;
  let img = $("images").querySelector("img.preview");
  if (!img) {
    img = document.createElement("img");
    img.className = "preview"; img.alt = "Preview of the image being generated";
    $("images").replaceChildren(img);
  }
  img.onload = img.onerror = () => { state.previewBusy = false; };
  img.src = withKey(`${url}?t=${Date.now()}`);
}

function finished(job) {
  if (state.job !== job.id) return;
  state.job = null; state.events = null;
  busy(false);
  $("progress").value = job.state === "done" ? 1 : 0;
  if (job.state === "done" || job.state === "interrupted") {
    showJob(job, 0);
    status(`Done: ${job.images.length} image${job.images.length === 1 ? "" : "s"}, seed ${job.seeds[0]}.`);
  } else if (job.state === "cancelled") {
    status("Interrupted.");
    $("images").replaceChildren();
  } else {
    status(`Failed: ${job.error || job.state}`, true);
  }
  loadHistory();
}

async function interrupt() {
  if (!state.job) return;
  $("interrupt").disabled = true;
  status("Interrupting…");
  try { await api(`/api/v1/jobs/${state.job}`, {method: "DELETE"}); } catch (err) { status(err.message, true); }
}

// --- showing a result, reusing its parameters ------------------------------------------------------

function showJob(job, index) {
  state.shown = {job, index};
  state.lastSeed = job.seeds[index] ?? job.parameters?.seed ?? null;
  $("seed-reuse").disabled = state.lastSeed === null;
  $("images").replaceChildren(...job.images.map((src, i) => {
    const img = document.createElement("img");
    img.src = withKey(src);
    img.alt = `Result ${i + 1} of ${job.images.length}: ${(job.parameters?.prompt || "").slice(0, 120)}`;
    img.tabIndex = 0;
    img.addEventListener("click", () => showJob(job, i));
    img.addEventListener("keydown", (e) => { if (e.key === "Enter") showJob(job, i); });
    return img;
  }));
  $("info").textContent = job.infotexts[index] || "";
  $("result-actions").hidden = false;
  for (const b of document.querySelectorAll("#gallery button")) b.setAttribute("aria-current", b.dataset.job === job.id);
}

function selectByText(select, wanted) {
  if (wanted === undefined || wanted === null || wanted === "") return;
  const w = String(wanted).toLowerCase();
  const o = [...select.options].find(o => o.value.toLowerCase() === w || o.textContent.toLowerCase() === w);
  if (o) select.value = o.value;
}

function setIf(id, value) {
  if (value !== undefined && value !== null && value !== "") $(id).value = value;
}

// parameters as a job records them (the request's field names)
function applyRequest(p, seed) {
  setIf("prompt", p.prompt ?? ""); $("negative").value = p.negative_prompt ?? "";
  selectByText($("sampler"), p.sampler_name || p.sampler_index);
  selectByText($("schedule"), p.scheduler || "automatic");
  const hires = !!p.enable_hr;
  for (const [id, k] of [["steps", "steps"], ["cfg", "cfg_scale"], ["width", "width"], ["height", "height"],
                         ["batch-size", "batch_size"], ["n-iter", "n_iter"],
                         [hires ? "hr-strength" : "strength", "denoising_strength"],
                         ["mask-blur", "mask_blur"], ["fill", "inpainting_fill"], ["padding", "inpaint_full_res_padding"],
                         ["hr-scale", "hr_scale"], ["hr-steps", "hr_second_pass_steps"],
                         ["refiner-switch", "refiner_switch_at"]])
    setIf(id, p[k]);
  if (p.inpaint_full_res !== undefined) $("full-res").value = String(!!p.inpaint_full_res);
  setIf("seed", seed ?? p.seed);
  selectByText($("model"), p.override_settings?.sd_model_checkpoint);
  setIf("clip-skip", p.override_settings?.CLIP_stop_at_last_layers);
  setHires(hires);
  selectByText($("hr-upscaler"), p.hr_upscaler);
  $("refiner").value = "";
  selectByText($("refiner"), p.refiner_checkpoint);
  refinerChanged();
  if (p.cfg_scale !== undefined && p.cfg_scale !== null) state.cfgEdited = true;  // reused: keep it
  if (p.width || p.height) sizeChosen(); else followModel();
}

function setHires(on) {
  $("enable-hr").checked = on;
  $("hr-options").disabled = !on;
}

function refinerChanged() {
  $("refiner-switch").disabled = !$("refiner").value;
}

// parameters as a PNG's infotext has them (AUTOMATIC1111's names, values as strings)
function applyInfotext(p) {
  $("prompt").value = p["Prompt"] ?? ""; $("negative").value = p["Negative prompt"] ?? "";
  selectByText($("sampler"), p["Sampler"]);
  selectByText($("schedule"), p["Schedule type"] || "automatic");
  setIf("steps", p["Steps"]); setIf("cfg", p["CFG scale"]); setIf("seed", p["Seed"]);
  const hires = p["Hires upscale"] !== undefined || p["Hires upscaler"] !== undefined;
  setIf(hires ? "hr-strength" : "strength", p["Denoising strength"]); setIf("mask-blur", p["Mask blur"]);
  setHires(hires);
  setIf("hr-scale", p["Hires upscale"]); setIf("hr-steps", p["Hires steps"] ?? (hires ? 0 : undefined));
  selectByText($("hr-upscaler"), p["Hires upscaler"]);
  $("clip-skip").value = p["Clip skip"] ?? 1;
  const named = (name) => state.models.find(m => m.model_name === name || m.title === name);
  if (p["Model"] && named(p["Model"])) $("model").value = named(p["Model"]).title;
  $("refiner").value = p["Refiner"] && named(p["Refiner"]) ? named(p["Refiner"]).title : "";
  setIf("refiner-switch", p["Refiner switch at"]);
  refinerChanged();
  if (p["CFG scale"]) state.cfgEdited = true;  // read from the image: keep it
  const size = /^(\d+)x(\d+)$/.exec(p["Size"] || "");
  if (size) { $("width").value = size[1]; $("height").value = size[2]; sizeChosen(); } else followModel();
}

async function sendTo(mode) {
  const {job, index} = state.shown;
  setMode(mode);
  const blob = await (await fetch(withKey(job.images[index]))).blob();
  await setInitImage(await readAsDataURL(blob));  // a data URL: it goes into the request as it is
  status(`Sent the image to ${mode}.`);
  $("prompt").focus();
}

// --- history gallery ---------------------------------------------------------------------------

async function loadHistory() {
  const jobs = (await api("/api/v1/jobs?limit=60")).filter(j => j.images.length);
  $("gallery").replaceChildren(...jobs.map(job => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button"; b.dataset.job = job.id;
    const prompt = job.parameters?.prompt || "(no prompt)";
    const when = new Date(job.created * 1000).toLocaleString();
    b.setAttribute("aria-label", `${job.mode}: ${prompt}, ${when}`);
    b.title = job.infotexts[0] || prompt;
    const img = document.createElement("img");
    img.src = withKey(job.images[0]); img.alt = ""; img.loading = "lazy";
    const caption = document.createElement("span");
    caption.textContent = `${job.mode} · ${prompt}`;
    b.append(img, caption);
    b.addEventListener("click", () => {
      showJob(job, 0);
      status(`Showing a past ${job.mode} result from ${when}.`);
      $("result").focus();
    });
    li.append(b);
    return li;
  }));
  if (!jobs.length) {
    const li = document.createElement("li"); li.className = "hint"; li.textContent = "No images yet.";
    $("gallery").append(li);
  }
}

// --- PNG parameters: drop anywhere, or choose a file -------------------------------------------------

async function readPngParameters(file) {
  try {
    const r = await postJSON("/sdapi/v1/png-info", {image: await readAsDataURL(file)});
    if (!r.info) { status(`${file.name} has no generation parameters.`, true); return; }
    applyInfotext(r.parameters);
    $("info").textContent = r.info;
    status(`Read the parameters of ${file.name}.`);
  } catch (err) { status(err.message, true); }
}

function setupDrop() {
  let depth = 0;
  const overlay = $("drop-overlay");
  const hasFiles = (e) => [...e.dataTransfer.types].includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth++; overlay.hidden = !!e.target.closest?.("#editor");
    $("editor").classList.toggle("over", !!e.target.closest?.("#editor"));
  });
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    const inEditor = !!e.target.closest?.("#editor") && state.mode !== "txt2img";
    overlay.hidden = inEditor; $("editor").classList.toggle("over", inEditor);
  });
  document.addEventListener("dragleave", () => {
    if (--depth <= 0) { depth = 0; overlay.hidden = true; $("editor").classList.remove("over"); }
  });
  document.addEventListener("drop", async (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0; overlay.hidden = true; $("editor").classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (!file) return;
    if (e.target.closest?.("#editor") && state.mode !== "txt2img") {
      await setInitImage(await readAsDataURL(file)).catch(err => status(err.message, true));
    } else {
      await readPngParameters(file);
    }
  });
  $("png-file").addEventListener("change", (e) => { if (e.target.files[0]) readPngParameters(e.target.files[0]); });
}

// --- wiring ----------------------------------------------------------------------------------

function setup() {
  setupTabs(); setupMask(); setupDrop();
  $("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  for (const id of ["prompt", "negative"])
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); if (!state.job) generate(); }
    });
  $("interrupt").addEventListener("click", interrupt);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("reuse").addEventListener("click", () => {
    const {job, index} = state.shown;
    applyRequest(job.parameters || {}, job.seeds[index]);
    if (job.mode !== state.mode) setMode(job.mode);
    const noImage = job.mode !== "txt2img" && $("editor").dataset.empty === "true";
    status(`Parameters of the ${job.mode} result are in the form` +
           (noImage ? " (the history keeps no input images: choose one)." : "."));
    $("prompt").focus();
  });
  $("model").addEventListener("change", followModel);
  $("cfg").addEventListener("input", () => { state.cfgEdited = true; });
  for (const id of ["width", "height"]) $(id).addEventListener("input", sizeChosen);
  $("hr-scale").addEventListener("input", hiresSize);
  $("size-native").addEventListener("click", () => { state.sizeEdited = false; followModel(); });
  $("enable-hr").addEventListener("change", () => setHires($("enable-hr").checked));
  $("refiner").addEventListener("change", refinerChanged);
  $("to-img2img").addEventListener("click", () => sendTo("img2img"));
  $("to-inpaint").addEventListener("click", () => sendTo("inpaint"));
  $("history-refresh").addEventListener("click", loadHistory);
  $("lora-add").addEventListener("click", () => {
    const name = $("lora").value;
    if (name) { $("prompt").value = `${$("prompt").value.trimEnd()} <lora:${name}:1>`.trimStart(); $("prompt").focus(); }
  });
}

setup();
Promise.all([loadLists(), loadHistory()])
  .then(() => { document.body.dataset.ready = "true"; })
  .catch((err) => status(`Could not reach the server: ${err.message}`, true));
