"""serve.py's page: one HTML file, style and script inline, no outside assets, with the
CSP hash of its script; the heatmap is drawn over the photo where the model has one."""
import base64
import hashlib
import html

from . import heat_page

def render_page(model_name, num_classes, max_upload_bytes, explain=False, crop_pct=1.0):
    """The page's HTML and the CSP hash of its inline script (the only script allowed).
    explain: the page asks for the heatmap and draws it over the network's view of the photo
    (its centre crop, crop_pct of the shorter side)."""
    script = (PAGE_SCRIPT.replace("__MAX_BYTES__", str(int(max_upload_bytes)))
              .replace("__EXPLAIN__", "true" if explain else "false")
              .replace("__CROP__", repr(float(crop_pct)))
              .replace("__HEAT_SCRIPT__", heat_page.HEAT_SCRIPT))
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    page = (PAGE_HTML.replace("__MODEL__", html.escape(model_name))
            .replace("__HEAT_CSS__", heat_page.HEAT_CSS)
            .replace("__CLASSES__", str(num_classes))
            .replace("__LIMIT__", f"{max_upload_bytes / 1e6:g} MB")
            .replace("__SCRIPT__", script))
    return page, f"sha256-{digest}"


def page_headers(script_hash):
    """The page's response headers: its own script alone may run, and nothing is embedded."""
    return {"Content-Security-Policy": f"default-src 'none'; img-src blob:; "
                                       f"style-src 'unsafe-inline'; connect-src 'self'; "
                                       f"script-src '{script_hash}'; base-uri 'none'; "
                                       f"form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff"}


PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>What is in this photo?</title>
<style>
  :root { --ink: #1d2330; --muted: #5d6575; --line: #d9dee7; --accent: #2f6fde;
          --bar: #9db9ee; --bg: #f5f7fb; --card: #fff; --bad: #b3261e; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         color: var(--ink); background: var(--bg); }
  main { max-width: 880px; margin: 0 auto; padding: 20px 16px 40px; }
  h1 { font-size: 1.5rem; margin: 0 0 4px; }
  .sub { color: var(--muted); margin: 0 0 18px; font-size: .95rem; }
  .drop { display: block; border: 2px dashed #aab4c5; border-radius: 14px; background: var(--card);
          padding: 28px 16px; text-align: center; cursor: pointer; transition: .15s; }
  .drop:hover, .drop.over { border-color: var(--accent); background: #eef3fd; }
  .drop:focus-within { outline: 3px solid #9db9ee; outline-offset: 2px; }
  .drop strong { color: var(--accent); }
  .drop small { display: block; color: var(--muted); margin-top: 6px; }
  .visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden;
                     clip: rect(0 0 0 0); white-space: nowrap; }
  #status { min-height: 1.5em; margin: 14px 2px; color: var(--muted); }
  #status.error { color: var(--bad); font-weight: 600; }
  #result { display: none; gap: 20px; grid-template-columns: minmax(0, 1fr) minmax(0, 1.2fr);
            background: var(--card); border: 1px solid var(--line); border-radius: 14px;
            padding: 16px; align-items: start; }
  #result.ready { display: grid; }
__HEAT_CSS__
  #photo { width: 100%; max-height: 420px; object-fit: contain; border-radius: 10px;
           background: #eef0f4; }
  #top { font-size: 1.25rem; margin: 0 0 12px; }
  #top span { color: var(--muted); font-weight: 400; font-size: 1rem; }
  #verdict { margin: -6px 0 12px; color: var(--muted); }
  #verdict.unknown { color: #b3261e; font-weight: 600; }
  .row { display: grid; grid-template-columns: minmax(0, 9em) 1fr 4.2em; gap: 10px;
         align-items: center; margin: 8px 0; font-size: .95rem; }
  .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .track { height: 14px; background: #edf0f5; border-radius: 7px; overflow: hidden; }
  .fill { height: 100%; background: var(--bar); border-radius: 7px; }
  .row:first-child .fill { background: var(--accent); }
  .row:first-child .name { font-weight: 600; }
  .pct { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); }
  footer { color: var(--muted); font-size: .85rem; margin-top: 18px; }
  @media (max-width: 620px) {
    #result.ready { grid-template-columns: 1fr; }
    #photo { max-height: 240px; }
    .row { grid-template-columns: minmax(0, 7.5em) 1fr 3.8em; }
  }
</style>
</head>
<body>
<main>
  <h1>What is in this photo?</h1>
  <p class="sub">Model <b>__MODEL__</b> &middot; __CLASSES__ classes</p>
  <label class="drop" id="drop">
    <input class="visually-hidden" type="file" id="file" accept="image/*,.heic,.heif">
    <strong>Choose a photo</strong> or drop one here
    <small>JPEG, HEIC, PNG, WebP, BMP, TIFF or GIF, up to __LIMIT__. The photo is only used for this
      answer.</small>
  </label>
  <div id="status" role="status" aria-live="polite"></div>
  <section id="result" aria-label="Result">
    <figure style="margin: 0">
      <img id="photo" alt="The photo you chose">
      <canvas id="heat" aria-label="The photo with the heatmap over it"></canvas>
      <figcaption id="heatnote"></figcaption>
    </figure>
    <div>
      <h2 id="top"></h2>
      <p id="verdict"></p>
      <div id="bars"></div>
    </div>
  </section>
  <footer>Also an API: <code>POST /predict</code> with form field <code>file</code>.</footer>
</main>
<script>__SCRIPT__</script>
</body>
</html>
"""

PAGE_SCRIPT = """
const MAX_BYTES = __MAX_BYTES__;
const input = document.getElementById('file'), drop = document.getElementById('drop');
const status = document.getElementById('status'), result = document.getElementById('result');
const photo = document.getElementById('photo'), bars = document.getElementById('bars');
const top1 = document.getElementById('top');
const EXPLAIN = __EXPLAIN__, CROP = __CROP__;
const heat = document.getElementById('heat'), heatnote = document.getElementById('heatnote');
__HEAT_SCRIPT__

let shownUrl = null;

function say(text, isError) {
  status.textContent = text;
  status.className = isError ? 'error' : '';
}

function pct(p) { return (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + '%'; }

function render(data) {
  bars.replaceChildren();
  for (const p of data.predictions) {
    const row = document.createElement('div'); row.className = 'row';
    const name = document.createElement('div'); name.className = 'name';
    name.textContent = p.name; name.title = p.name + ' (' + p['class'] + ')';
    const track = document.createElement('div'); track.className = 'track';
    const fill = document.createElement('div'); fill.className = 'fill';
    fill.style.width = (100 * p.probability).toFixed(1) + '%';
    track.appendChild(fill);
    const value = document.createElement('div'); value.className = 'pct';
    value.textContent = pct(p.probability);
    row.append(name, track, value);
    bars.appendChild(row);
  }
  const best = data.predictions[0];
  top1.textContent = best.name + ' ';
  const sure = document.createElement('span'); sure.textContent = pct(best.probability);
  top1.appendChild(sure);
  // The unknown verdict, where the model has it: the bars then show only the nearest classes
  const verdict = document.getElementById('verdict');
  verdict.className = data.unknown ? 'unknown' : '';
  verdict.textContent = data.unknown === undefined ? '' : data.unknown
    ? 'None of my classes: this photo is unlike the training photos of every class; ' +
      'the bars show only the nearest.'
    : 'One of my classes.';
}

async function classify(file) {
  if (!file) return;
  if (file.size > MAX_BYTES) {
    say('That file is over the ' + (MAX_BYTES / 1e6) + ' MB limit; choose a smaller photo.', true);
    return;
  }
  if (shownUrl) URL.revokeObjectURL(shownUrl);
  shownUrl = URL.createObjectURL(file);
  photo.src = shownUrl;
  result.classList.remove('ready', 'heated');
  heatnote.textContent = '';
  say('Looking at ' + file.name + '\u2026');
  const form = new FormData(); form.append('file', file, file.name);
  const started = performance.now();
  try {
    const response = await fetch(EXPLAIN ? '/predict?explain=1' : '/predict',
                                 {method: 'POST', body: form});
    const data = await response.json().catch(() => ({error: 'the server answered ' +
                                                              response.status}));
    if (!response.ok) throw new Error(data.error || ('the server answered ' + response.status));
    render(data);
    if (data.heatmap) await drawHeat(data.heatmap, data.predictions[0].name);
    result.classList.add('ready');
    result.scrollIntoView({block: 'nearest'});  // on a phone the chart starts below the fold
    say(data.image + ' \u00b7 answered in ' + Math.round(performance.now() - started) + ' ms');
  } catch (err) {
    say('Could not classify this file: ' + err.message, true);
  }
}

input.addEventListener('change', () => classify(input.files[0]));
['dragenter', 'dragover'].forEach(t => drop.addEventListener(t, e => {
  e.preventDefault(); drop.classList.add('over');
}));
['dragleave', 'drop'].forEach(t => drop.addEventListener(t, e => {
  e.preventDefault(); drop.classList.remove('over');
}));
drop.addEventListener('drop', e => classify(e.dataTransfer.files[0]));
// A photo dropped beside the box should not make the browser leave the page.
window.addEventListener('dragover', e => e.preventDefault());
window.addEventListener('drop', e => e.preventDefault());
"""
