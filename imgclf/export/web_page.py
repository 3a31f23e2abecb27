"""The folder of export.py --format web: a page that classifies photos in the browser, with no
server (to_web.py exports and checks it).

    DIR/index.html      the page: take or choose a photo, see the top classes
    DIR/app.js          loads the model once, runs it on each photo, draws the answer
    DIR/preprocess.js   the checkpoint's preprocessing: Pillow's resize and rounding, ported
    DIR/sw.js           a service worker that keeps page, model and runtime for offline use
    DIR/model.json      classes, names, preprocessing, the model's outputs, where the runtime is
    DIR/model.onnx      the model as the ONNX export writes it (checked the same way)
    DIR/ort.wasm.min.js, ort-wasm-simd-threaded.mjs, ort-wasm-simd-threaded.wasm
                        ONNX Runtime Web's WebAssembly build, with --web_runtime only

Every URL in the folder is relative, so it works from any static host. The runtime comes from
jsDelivr by default, or from a local copy of the npm package with --web_runtime.
"""
import hashlib
import io
import json
import os
import tarfile
from importlib import resources

from ..data import decode
from ..errors import UserError

RUNTIME_VERSION = "1.30.0"
RUNTIME_CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{RUNTIME_VERSION}/dist/"
# The WebAssembly build's loader and its two parts, what the page loads: the package's dist/
# holds 136 MB, mostly other builds (WebGPU, WebGL) and source maps.
RUNTIME_SCRIPT = "ort.wasm.min.js"
RUNTIME_FILES = (RUNTIME_SCRIPT, "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE_FILES = ("index.html", "app.js", "preprocess.js", "sw.js")
WEB_FORMAT = "image-classifier-web"
RUNTIME_HINT = (f"give the npm package: npm pack onnxruntime-web@{RUNTIME_VERSION}, then "
                f"--web_runtime onnxruntime-web-{RUNTIME_VERSION}.tgz")


def find_runtime(path):
    """--web_runtime PATH -> {file name: bytes}. PATH: the .tgz that `npm pack` writes, the
    package's folder (node_modules/onnxruntime-web) or its dist/."""
    if not os.path.exists(path):
        raise UserError(f"--web_runtime {path}: no such file or folder; {RUNTIME_HINT}")
    if os.path.isfile(path):
        return runtime_from_tarball(path)
    for folder in (path, os.path.join(path, "dist"), os.path.join(path, "package", "dist")):
        if all(os.path.isfile(os.path.join(folder, n)) for n in RUNTIME_FILES):
            files = {}
            for name in RUNTIME_FILES:
                with open(os.path.join(folder, name), "rb") as f:
                    files[name] = f.read()
            return files
    raise UserError(f"--web_runtime {path}: has no {', '.join(RUNTIME_FILES)}, nor has its "
                    f"dist/; {RUNTIME_HINT}")


def runtime_from_tarball(path):
    try:
        with tarfile.open(path) as tar:
            members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers()
                       if m.isfile() and m.name.startswith("package/dist/")}
            missing = [n for n in RUNTIME_FILES if n not in members]
            if missing:
                raise UserError(f"--web_runtime {path}: the package has no "
                                f"{', '.join(missing)}; {RUNTIME_HINT}")
            return {n: tar.extractfile(members[n]).read() for n in RUNTIME_FILES}
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"--web_runtime {path}: not a readable npm package ({err}); "
                        f"{RUNTIME_HINT}") from None


def page_asset(name):
    """One of the page's files, shipped in the package beside this module (web/)."""
    return resources.files(__package__).joinpath("web", name).read_text(encoding="utf-8")


def model_json(ckpt, outputs, runtime_base, onnx_meta):
    """What the page needs besides the weights: the facts the .onnx metadata carries.
    outputs: the model's output names; onnx_meta: its metadata_props as a dict."""
    classes = list(ckpt["classes"])
    data_root = str((ckpt.get("data") or {}).get("root") or "").rstrip("/\\")
    meta = {
        "format": WEB_FORMAT, "format_version": 1,
        "title": (f"{ckpt['model_args'].get('arch', 'model')} trained on "
                  f"{os.path.basename(data_root) or 'your photos'}"),
        "classes": classes,
        "class_names": list(ckpt.get("class_names") or classes),
        "preprocess": dict(ckpt["preprocess"]),
        "model": "model.onnx", "input": "image",
        # Output name -> its role; the page draws "novelty" and "heatmap" where they exist.
        "outputs": {name: name for name in outputs},
        "runtime_base": runtime_base, "runtime_version": RUNTIME_VERSION,
    }
    # The unknown verdict: an output "novelty" (N,) and its threshold in the metadata
    if "novelty" in outputs and "unknown_threshold" in onnx_meta:
        meta["novelty"] = {"threshold": float(json.loads(onnx_meta["unknown_threshold"]))}
    return meta


def page_files(onnx_path, ckpt, runtime_files=None):
    """{file name: bytes} of the folder, for the .onnx file at onnx_path."""
    import onnx
    graph = onnx.load(onnx_path)
    outputs = [o.name for o in graph.graph.output]
    onnx_meta = {p.key: p.value for p in graph.metadata_props}
    runtime_base = "./" if runtime_files else RUNTIME_CDN
    files = dict(runtime_files or {})
    with open(onnx_path, "rb") as f:
        files["model.onnx"] = f.read()
    files["model.json"] = json.dumps(model_json(ckpt, outputs, runtime_base, onnx_meta),
                                     indent=1).encode()
    files["index.html"] = page_asset("index.html").replace(
        "__RUNTIME_SCRIPT__", runtime_base + RUNTIME_SCRIPT).encode()
    for name in ("app.js", "preprocess.js"):
        files[name] = page_asset(name).encode()
    # The service worker keeps all of the above (the runtime from wherever it comes), under a
    # name that changes with their contents, so that a new export replaces the old one.
    cached = ["./"] + sorted(files) + ([] if runtime_files else
                                       [RUNTIME_CDN + n for n in RUNTIME_FILES])
    version = hashlib.sha256(b"".join(hashlib.sha256(files[n]).digest()
                                      for n in sorted(files))).hexdigest()[:16]
    files["sw.js"] = (page_asset("sw.js").replace("__FILES__", json.dumps(cached))
                      .replace("__VERSION__", version).encode())
    return files


def refuse_other_folder(out):
    """--out may be a new folder, an empty one or an earlier web export (replaced): not a
    folder of something else, which the export would delete."""
    if os.path.exists(out) and not is_web_export(out):
        raise UserError(f"--out {out}: exists and is not a web export; give a new folder, or "
                        f"remove it first")


def is_web_export(folder):
    try:
        with open(os.path.join(folder, "model.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == WEB_FORMAT
    except (OSError, ValueError, AttributeError):
        return os.path.isdir(folder) and not os.listdir(folder)  # an empty folder will do


def write_files(folder, files):
    """Into a private folder, moved into place atomically afterwards (checks.py)."""
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


class PageNotRun(Exception):
    """The page could not be run here (no browser; the runtime did not load): why."""


def run_in_browser(folder, photos, preprocess):
    """The page of folder in headless Chromium on photos (paths, or [(name, bytes)]): its
    probabilities (N, classes), median milliseconds per answer, and its heatmaps (N, h * w;
    None where the model has none)."""
    import numpy as np

    from . import browser
    missing = browser.browser_missing()
    if missing:
        raise PageNotRun(missing)
    files = page_check_files(photos, preprocess) if isinstance(photos[0], str) else photos
    with browser.serve_folder(folder) as (url, _), browser.headless_chromium() as driver:
        try:
            browser.open_page(driver, url)
        except RuntimeError as err:
            raise PageNotRun(f"the page did not load: {err}; --web_runtime PATH gives it a "
                             f"local runtime") from None
        probs, timings, heatmaps = browser.predict_files(driver, files)
    return probs, float(np.median([t["total"] for t in timings])), heatmaps


def page_check_files(paths, preprocess):
    """[(name, bytes)] to give the page for each check photo: the file itself where the page
    decodes it to the same pixels as Python (a JPEG under twice the size the resize needs);
    otherwise a PNG of the pixels Python decoded (a large JPEG, which libjpeg decodes at a
    reduced scale that a browser cannot ask for, or a format a browser may not read: HEIC,
    TIFF), so that the check is on preprocessing and model, exactly."""
    side = decode.eval_side(preprocess)
    files = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        name = os.path.basename(path)
        if not (data[:3] == b"\xff\xd8\xff" and jpeg_kept_whole(data, side)):
            buffer = io.BytesIO()
            decode.load_rgb(io.BytesIO(data), side).save(buffer, format="PNG")
            data, name = buffer.getvalue(), name + ".png"
        files.append((name, data))
    return files


def jpeg_kept_whole(data, side):
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        return min(img.size) < 2 * side
