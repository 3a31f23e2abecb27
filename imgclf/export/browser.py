"""The web export in a real browser: its folder served on 127.0.0.1, the page opened in headless
Chromium (through selenium and chromedriver), photos classified by the page's own code path
(decode, preprocessing, ONNX Runtime Web). Used by export.py's check before the folder is
written, by the tests and by bench/web_bench.py."""
import base64
import contextlib
import functools
import http.server
import importlib.util
import shutil
import tempfile
import threading

import numpy as np

PAGE_TIMEOUT = 120  # seconds for the page to load the runtime and the model


def browser_missing():
    """Why the page cannot be run here (None: it can)."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver (apt-get install chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "no selenium (pip install selenium)"
    return None


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".wasm": "application/wasm",
                      ".js": "text/javascript", ".onnx": "application/octet-stream"}

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a browser closed mid-download (the test quit it): nothing to report


@contextlib.contextmanager
def serve_folder(folder):
    """A static file server of folder on a free port of 127.0.0.1: yields (url, server)."""
    handler = functools.partial(QuietHandler, directory=folder)
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def headless_chromium(width=1100, height=900):
    """A headless Chromium with a fresh profile, driven by selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory(prefix="web-check-profile-") as profile:
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        driver.set_script_timeout(PAGE_TIMEOUT)
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver, url):
    """Load the page and wait until its model is ready; raises RuntimeError with the page's
    own message where it cannot load (no runtime, say)."""
    driver.get(url)
    outcome = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        if (typeof ort === 'undefined') { done('the runtime did not load (no network?)'); return; }
        if (!window.imgclf) { done('the page script did not start'); return; }
        window.imgclf.ready.then(() => done('ok'), err => done(String(err)));""")
    if outcome != "ok":
        raise RuntimeError(outcome)


def classify_in_page(driver, data, name="photo.jpg"):
    """One photo (its file's bytes) through the page, as if chosen: its answer and timing."""
    answer = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        window.imgclf.classify(new File([bytes], arguments[1]))
          .then(a => done({probabilities: a.probabilities, timing: a.timing,
                           heatmap: a.heatmap ? Array.from(a.heatmap.data) : null}),
                err => done({error: String(err && err.message || err)}));""",
                                         base64.b64encode(data).decode(), name)
    if "error" in answer:
        raise RuntimeError(f"the page could not classify {name}: {answer['error']}")
    return answer


def predict_files(driver, files):
    """[(name, bytes)] -> (probabilities (N, classes), [timing dict], heatmaps (N, h * w) or
    None where the model has no heatmap output)."""
    answers = [classify_in_page(driver, data, name) for name, data in files]
    heatmaps = (np.asarray([a["heatmap"] for a in answers], dtype=np.float32)
                if all(a.get("heatmap") is not None for a in answers) else None)
    return (np.asarray([a["probabilities"] for a in answers], dtype=np.float32),
            [a["timing"] for a in answers], heatmaps)


def phone_screen(driver, width=400, height=850):
    """Make the page think it is on a phone: a 400 px wide viewport (a headless window cannot
    be made narrower than 500 px), touch, twice the pixels."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 2,
                            "mobile": True})


def desktop_screen(driver):
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def wait_offline_ready(driver):
    """Whether the service worker has stored page, model and runtime (False: not supported)."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; window.imgclf.offline.then(done);")
