// The page: load the model once, then classify each photo chosen, taken or dropped, in this
// browser with ONNX Runtime Web (WebAssembly). model.json, written by export.py, carries the
// classes, the preprocessing and which outputs the model has.
'use strict';

const $ = id => document.getElementById(id);
const TOP_K = 5;
// The browser's downscaled decode of a large JPEG. On five 12 MP photos (largest probability
// difference from the checkpoint): 'medium' 0.10, 'high' 0.16, 'low' 0.21; decoding all 12
// million pixels and averaging blocks in JavaScript: 0.09, at 1.4x the time.
const DRAFT_RESIZE = 'medium';
let shownUrl = null;

function say(text, isError) {
  $('status').textContent = text;
  $('status').className = isError ? 'error' : '';
}

function pct(p) { return (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + '%'; }

async function loadModel() {
  const meta = await (await fetch('model.json')).json();
  ort.env.wasm.wasmPaths = meta.runtime_base;
  // Threads need a cross-origin-isolated page (COOP/COEP headers), which a plain static host
  // does not give; one thread is what most visitors get, and what docs/export.md measures.
  ort.env.wasm.numThreads = self.crossOriginIsolated ?
    Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const session = await ort.InferenceSession.create(meta.model, {
    executionProviders: ['wasm'], graphOptimizationLevel: 'all'});
  const size = meta.preprocess.size;
  // One run on a blank image, so that the first photo does not pay for the first run's setup.
  await session.run({[meta.input]: new ort.Tensor('float32', new Float32Array(3 * size * size),
                                                  [1, 3, size, size])});
  $('about').textContent = meta.title + ' \u00b7 ' + meta.classes.length + ' classes';
  return {meta, session};
}

// The photo's width and height as shown (EXIF orientation applied), without decoding it.
function imageSize(file) {
  return new Promise((resolve, reject) => {
    const img = new Image(), url = URL.createObjectURL(file);
    img.onload = () => {
      URL.revokeObjectURL(url);
      resolve([img.naturalWidth, img.naturalHeight]);
    };
    img.onerror = () => {
      URL.revokeObjectURL(url);
      reject(new Error('this browser cannot read it as an image'));
    };
    img.src = url;
  });
}

// The photo's pixels: EXIF orientation applied, no colour-profile conversion (Pillow applies
// none), transparency on white (as decode.to_rgb in Python). A JPEG at least twice the size
// the resize needs comes at the scale Pillow's draft decode gives (the browser's downscaled
// decode, not libjpeg's DCT scaling: the one difference from Python).
async function decode(file, pre, isJpeg) {
  let resize = {};
  if (isJpeg) {
    const [w, h] = await imageSize(file);
    const scale = jpegDraftScale(w, h, evalSide(pre));
    if (scale > 1) {
      resize = {resizeWidth: Math.ceil(w / scale), resizeHeight: Math.ceil(h / scale),
                resizeQuality: DRAFT_RESIZE};
    }
  }
  const bitmap = await createImageBitmap(file, {imageOrientation: 'from-image',
                                                colorSpaceConversion: 'none',
                                                premultiplyAlpha: 'none', ...resize});
  const {width, height} = bitmap;
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  ctx.fillStyle = '#fff';
  ctx.fillRect(0, 0, width, height);
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  return {data: ctx.getImageData(0, 0, width, height).data, width, height};
}

// A photo file -> the model's input, float32 (3 * size * size), as Python computes it.
async function modelInput(file, pre) {
  const head = new Uint8Array(await file.slice(0, 3).arrayBuffer());
  const img = await decode(file, pre, isJpegBytes(head));
  const decoded = performance.now();
  return {input: evalTensorData(img, pre), decoded, width: img.width, height: img.height};
}

async function predict(model, file) {
  const {meta, session} = model;
  const size = meta.preprocess.size;
  const t0 = performance.now();
  const {input, decoded, width, height} = await modelInput(file, meta.preprocess);
  const t2 = performance.now();
  const outputs = await session.run({[meta.input]: new ort.Tensor('float32', input,
                                                                  [1, 3, size, size])});
  const t3 = performance.now();
  return {
    probabilities: Array.from(outputs[meta.outputs.probabilities].data),
    novelty: meta.outputs.novelty ? outputs[meta.outputs.novelty].data[0] : null,
    heatmap: meta.outputs.heatmap ? outputs[meta.outputs.heatmap] : null,
    width, height,
    timing: {decode: decoded - t0, preprocess: t2 - decoded, model: t3 - t2, total: t3 - t0},
  };
}

function render(meta, answer) {
  const order = answer.probabilities.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0])
    .slice(0, Math.min(TOP_K, meta.classes.length));
  $('bars').replaceChildren(...order.map(([p, i]) => {
    const row = document.createElement('div'); row.className = 'row';
    const name = document.createElement('div'); name.className = 'name';
    name.textContent = meta.class_names[i]; name.title = meta.class_names[i] + ' (' +
                                                         meta.classes[i] + ')';
    const track = document.createElement('div'); track.className = 'track';
    const fill = document.createElement('div'); fill.className = 'fill';
    fill.style.width = (100 * p).toFixed(1) + '%';
    track.appendChild(fill);
    const value = document.createElement('div'); value.className = 'pct';
    value.textContent = pct(p);
    row.append(name, track, value);
    return row;
  }));
  const [best, bestIndex] = order[0];
  $('top').textContent = meta.class_names[bestIndex] + ' ';
  const sure = document.createElement('span'); sure.textContent = pct(best);
  $('top').appendChild(sure);
  renderVerdict(meta, answer);
  answer.top = bestIndex;
  renderHeatmap(meta, answer);
}

// The "unknown" verdict, where the model has a novelty output and the checkpoint a threshold.
function renderVerdict(meta, answer) {
  const verdict = $('verdict');
  const unknown = answer.novelty !== null && meta.novelty &&
                  answer.novelty > meta.novelty.threshold;
  verdict.style.display = unknown ? 'block' : 'none';
  if (unknown) {
    verdict.textContent = 'Probably none of these: this photo is unlike the training photos ' +
      '(novelty ' + answer.novelty.toFixed(3) + ', threshold ' +
      meta.novelty.threshold.toFixed(3) + ').';
  }
}

// The heatmap output (1, h, w), 0..1 as predict.py --json gives it, over the part of the photo
// the model sees (the centre square's crop_pct), as serve.py's page draws it: each cell from
// blue (no evidence) to red (the most), more opaque the more evidence, smoothed by the
// canvas's scaling.
function renderHeatmap(meta, answer) {
  const canvas = $('heatmap');
  canvas.style.display = answer.heatmap ? 'block' : 'none';
  $('heatnote').textContent = answer.heatmap ? 'Heatmap: where the model saw ' +
    meta.class_names[answer.top] + ' (red: most), over the part of the photo it looks at.' : '';
  if (!answer.heatmap) return;
  const [h, w] = answer.heatmap.dims.slice(-2), values = answer.heatmap.data;
  const side = Math.min(answer.width, answer.height) * meta.preprocess.crop_pct;
  canvas.width = answer.width; canvas.height = answer.height;
  const small = new OffscreenCanvas(w, h), sctx = small.getContext('2d');
  for (let i = 0; i < w * h; i++) {
    const v = Math.min(1, Math.max(0, values[i]));
    sctx.fillStyle = 'hsla(' + Math.round(240 * (1 - v)) + ', 100%, 50%, ' +
                     (0.15 + 0.45 * v).toFixed(2) + ')';
    sctx.fillRect(i % w, Math.floor(i / w), 1, 1);
  }
  const ctx = canvas.getContext('2d');
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, (answer.width - side) / 2, (answer.height - side) / 2, side, side);
}

async function classify(modelReady, file) {
  if (!file) return;
  if (shownUrl) URL.revokeObjectURL(shownUrl);
  shownUrl = URL.createObjectURL(file);
  $('photo').src = shownUrl;
  $('result').classList.remove('ready');
  say('Looking at ' + file.name + '\u2026');
  try {
    const model = await modelReady;
    const started = performance.now();
    const answer = await predict(model, file);
    render(model.meta, answer);
    answer.timing.shown = performance.now() - started;
    window.imgclf.last = answer;
    $('result').classList.add('ready');
    $('result').scrollIntoView({block: 'nearest'});  // on a phone the chart starts below
    const t = answer.timing;
    say(file.name + ' \u00b7 answered in ' + Math.round(t.total) + ' ms (model ' +
        Math.round(t.model) + ' ms)');
    return answer;
  } catch (err) {
    say('Could not classify this file: ' + (err && err.name === 'InvalidStateError' ?
        'this browser cannot read it as an image' : (err.message || err)), true);
    throw err;
  }
}

// Offline once loaded: the service worker keeps the page, the model and the runtime.
async function registerOffline() {
  if (!('serviceWorker' in navigator) || location.protocol === 'file:') return false;
  await navigator.serviceWorker.register('sw.js');
  await navigator.serviceWorker.ready;
  $('footer').textContent = 'Runs in this browser: the photo never leaves the device. ' +
                            'Saved for offline use.';
  return true;
}

function wire(modelReady) {
  const run = file => classify(modelReady, file).catch(() => {});
  for (const id of ['file', 'camera']) {
    $(id).addEventListener('change', () => run($(id).files[0]));
  }
  const drop = $('drop');
  ['dragenter', 'dragover'].forEach(t => drop.addEventListener(t, e => {
    e.preventDefault(); drop.classList.add('over');
  }));
  ['dragleave', 'drop'].forEach(t => drop.addEventListener(t, e => {
    e.preventDefault(); drop.classList.remove('over');
  }));
  drop.addEventListener('drop', e => run(e.dataTransfer.files[0]));
  // A photo dropped beside the boxes should not make the browser leave the page.
  window.addEventListener('dragover', e => e.preventDefault());
  window.addEventListener('drop', e => e.preventDefault());
}

const modelReady = loadModel();
modelReady.then(() => say('Ready: choose or take a photo.'),
                err => say('Could not load the model: ' + (err.message || err), true));
wire(modelReady);
// For tests and the export's own check: the same path as a chosen photo, answers returned.
window.imgclf = {
  ready: modelReady.then(() => true),
  offline: registerOffline().catch(() => false),
  classify: blob => classify(modelReady, blob),
  // The model's input for a photo, with the model's preprocessing or another one
  input: async (blob, pre) => Array.from(
    (await modelInput(blob, pre || (await modelReady).meta.preprocess)).input),
  last: null,
};
