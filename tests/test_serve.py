"""serve.py: the JSON API and its limits, a bounded load test, and the page in a real browser."""
import glob
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

import serving
from conftest import FLOWERS5, ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))

MISSING = [p for m, p in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                          ("python_multipart", "python-multipart"))
           if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed "
                                "(optional: pip install -e '.[serve]')")

LIMIT = 300_000  # a small upload limit keeps the oversize cases cheap


@pytest.fixture(scope="module")
def server(trained):
    from imgclf.app import inference
    from imgclf.cli import serve
    app = serve.create_app(inference.load_predictor(trained["checkpoint"]), "checkpoint.pth",
                           top_k=5, max_upload_bytes=LIMIT, max_concurrent=8)
    with serving.background_server(app) as url:
        yield dict(trained, url=url, port=int(url.rsplit(":", 1)[1]))


@pytest.fixture
def client(server):
    from serve_load import Client
    c = Client("127.0.0.1", server["port"], timeout=30)
    yield c
    c.close()


def photo_bytes(trained):
    """A real flower photo where the shared photos are here, else a generated test image."""
    paths = sorted(glob.glob(os.path.join(FLOWERS5, "test", "*", "*.jpg")))
    path = paths[0] if paths else os.path.join(trained["data"], "test", "dog", "000.jpg")
    with open(path, "rb") as f:
        return os.path.basename(path), f.read()


def raw_exchange(port, head, body=b"", read_timeout=10):
    """Send bytes on a fresh connection, read until the server closes it (as it does after
    refusing an upload), and return the status and JSON of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_part, _, payload = data.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), json.loads(payload)


def test_good_photo_gets_the_predict_json(server, client):
    name, data = photo_bytes(server)
    status, answer = client.post_file("/predict", name, data)
    assert status == 200
    assert answer["image"] == name
    preds = answer["predictions"]
    assert len(preds) == 3  # top_k 5, but the model knows 3 classes
    assert {p["class"] for p in preds} == {"cat", "dog", "fox"}
    assert all(set(p) == {"class", "name", "probability"} for p in preds)
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-3


def test_answer_matches_the_predictor(server, client):
    from imgclf.app import inference
    from imgclf.data import decode
    path = os.path.join(server["data"], "test", "fox", "002.jpg")
    with open(path, "rb") as f:
        status, answer = client.post_file("/predict", "fox.jpg", f.read())
    predictor = inference.load_predictor(server["checkpoint"])
    probs = predictor.probabilities(
        decode.eval_array(decode.load_rgb(path), predictor.preprocess)[None])[0]
    assert status == 200
    assert answer["predictions"][0]["class"] == predictor.classes[int(np.argmax(probs))]
    # The object of predict.py --json, rounding included.
    _, novelty = predictor.scores(
        decode.eval_array(decode.load_rgb(path), predictor.preprocess)[None])
    assert answer == inference.prediction_object("fox.jpg", probs, 5, predictor.classes,
                                                 predictor.class_names, novelty=novelty[0],
                                                 threshold=predictor.unknown_threshold)


def test_an_iphone_heic_photo_is_answered_as_its_jpeg_would_be(server, client):
    from PIL import Image

    import messy
    path = os.path.join(server["data"], "test", "fox", "002.jpg")
    status, answer = client.post_file("/predict", "IMG_0002.HEIC",
                                      messy.heic(Image.open(path).convert("RGB")))
    with open(path, "rb") as f:
        _, as_jpeg = client.post_file("/predict", "fox.jpg", f.read())
    assert status == 200 and answer["image"] == "IMG_0002.HEIC"
    # HEIC's own compression moves the probabilities a little, not the answer
    assert answer["predictions"][0]["class"] == as_jpeg["predictions"][0]["class"]


def test_large_photo_under_the_limit_is_sent_after_100_continue(server, client):
    from PIL import Image
    noise = np.random.default_rng(0).integers(0, 256, size=(250, 250, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    assert 100_000 < len(buf.getvalue()) < LIMIT
    status, answer = client.post_file("/predict", "noise.png", buf.getvalue(),
                                      content_type="image/png")
    assert status == 200 and answer["image"] == "noise.png"


def test_file_name_is_only_echoed_never_a_path(server, client):
    _, data = photo_bytes(server)
    status, answer = client.post_file("/predict", "../../etc/passwd", data)
    assert status == 200 and answer["image"] == "passwd"
    status, answer = client.post_file("/predict", "C:\\x\\..\\evil.jpg", data)
    assert status == 200 and answer["image"] == "evil.jpg"


def test_oversize_is_413_before_the_body_is_read(server):
    # Announce 50 MB but send only 1 KB of it: the answer must come without the rest.
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 50000000\r\n\r\n")
    status, answer = raw_exchange(server["port"], head, b"x" * 1024)
    assert status == 413 and "limit" in answer["error"]


def test_oversize_without_content_length_is_413(server):
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % 65536 + b"y" * 65536 + b"\r\n"
    status, answer = raw_exchange(server["port"], head, chunk * 6)  # 384 KB, no end chunk
    assert status == 413 and "limit" in answer["error"]


def test_stalled_upload_is_408(server, monkeypatch):
    from imgclf.cli import serve
    monkeypatch.setattr(serve, "UPLOAD_TIMEOUT_S", 0.5)
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n")
    status, answer = raw_exchange(server["port"], head, b"--b\r\n")
    assert status == 408 and "took over" in answer["error"]


def test_oversize_file_in_form_is_413(server, client):
    status, answer = client.post_file("/predict", "big.jpg", b"\xff" * (LIMIT + 1000))
    assert status == 413 and "error" in answer


@pytest.mark.parametrize("what, data, expected", [
    ("not an image", b"hello, this is text and no photo\n" * 20, 415),
    ("empty file", b"", 400),
])
def test_bad_uploads_get_json_errors(server, client, what, data, expected):
    status, answer = client.post_file("/predict", "x.jpg", data)
    assert status == expected and isinstance(answer["error"], str), what


def test_truncated_photo_is_415(server, client):
    _, data = photo_bytes(server)
    status, answer = client.post_file("/predict", "cut.jpg", data[:len(data) // 2])
    assert status == 415 and "truncated" in answer["error"]


def test_empty_body_wrong_field_and_malformed_multipart_are_400(server, client):
    assert client.request("POST", "/predict", b"", {})[0] == 400
    assert client.request("POST", "/predict", b"",
                          {"Content-Type": "multipart/form-data; boundary=zz"})[0] == 400
    _, data = photo_bytes(server)
    status, answer = client.post_file("/predict", "a.jpg", data, field="photo")
    assert status == 400 and "'file'" in answer["error"]
    status, answer = client.request("POST", "/predict", b"--zz\r\ngarbage without end",
                                    {"Content-Type": "multipart/form-data; boundary=zz"})
    assert status == 400 and "error" in answer
    status, answer = client.request("POST", "/predict", data, {"Content-Type": "image/jpeg"})
    assert status == 400 and "multipart" in answer["error"]


def test_wrong_method_and_unknown_path(server, client):
    assert client.request("GET", "/predict") == (405, {"error": "Method Not Allowed"})
    assert client.request("PUT", "/predict", b"x")[0] == 405
    assert client.request("GET", "/nothing-here")[0] == 404


def test_health_and_page(server, client):
    status, health = client.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["classes"] == 3
    client.conn.request("GET", "/")
    response = client.conn.getresponse()
    page = response.read().decode()
    assert response.status == 200 and "<title>" in page and 'type="file"' in page
    assert "script-src 'sha256-" in response.getheader("content-security-policy")
    # Everything inline: no script, style, font or image fetched from anywhere else.
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_past_the_concurrency_cap_answers_503(trained):
    from imgclf.cli import serve
    from serve_load import Client
    started, release = threading.Event(), threading.Event()

    class SlowPredictor:
        classes, class_names = ["a", "b"], ["a", "b"]
        preprocess = dict(size=32, crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3)

        def probabilities(self, batch):
            started.set()
            release.wait(20)
            return np.full((len(batch), 2), 0.5, dtype=np.float32)

    app = serve.create_app(SlowPredictor(), "slow", max_concurrent=1)
    _, data = photo_bytes(trained)
    with serving.background_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        first = {}
        worker = threading.Thread(target=lambda: first.update(
            answer=Client("127.0.0.1", port).post_file("/predict", "a.jpg", data)))
        worker.start()
        assert started.wait(20)
        status, answer = Client("127.0.0.1", port).post_file("/predict", "b.jpg", data)
        release.set()
        worker.join(20)
    assert status == 503 and "busy" in answer["error"]
    assert first["answer"][0] == 200


def test_load_300_requests_8_at_once_a_third_bad_no_5xx(server):
    from serve_load import payloads, report_lines, run_load
    files = payloads()
    files["oversize"] = ("huge.jpg", os.urandom(LIMIT + 10_000))
    result = run_load(server["url"], files, total=300, concurrency=8, bad_every=3)
    print("\n" + "\n".join(report_lines(result)))
    assert result["5xx"] == 0 and result["failed"] == 0
    assert result["statuses"]["good -> 200"] == 200
    assert sum(n for k, n in result["statuses"].items() if not k.startswith("good")) == 100


def test_serve_cli_errors_are_one_line(trained, capsys, tmp_path):
    from imgclf.cli import serve
    assert serve.main([str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        assert serve.main([trained["checkpoint"], "--port", str(busy.getsockname()[1])]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert err.startswith("error: cannot listen on 127.0.0.1:") and len(err.splitlines()) == 1


def test_precision_fp32_reaches_the_predictor(trained, monkeypatch, capsys):
    """serve.py loads its model as predict.py does, --precision included (what fp32 computes
    is tested in test_predict.py)."""
    from imgclf.cli import serve
    loaded = []

    def load_predictor(path, gpu=None, precision="auto"):
        loaded.append(precision)
        return predictor(path, gpu, precision)
    def bind(host, port):  # the model is loaded: stop before listening
        bound.append(port)
        raise serve.UserError("not serving in this test")
    predictor, bound = serve.inference.load_predictor, []
    monkeypatch.setattr(serve.inference, "load_predictor", load_predictor)
    monkeypatch.setattr(serve, "bind", bind)
    assert serve.main([trained["checkpoint"], "--precision", "fp32"]) == 2
    assert (loaded, bound) == (["fp32"], [8000])
    assert capsys.readouterr().err == "error: not serving in this test\n"


def test_without_fastapi_serve_says_what_to_install(monkeypatch, capsys, tmp_path):
    from imgclf.cli import serve
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert serve.main([str(tmp_path / "model.onnx")]) == 2
    assert capsys.readouterr().err == ("error: serve.py needs the optional package fastapi: "
                                       "pip install -e '.[serve]'\n")


# ---------------------------------------------------------------------------------------------
# The page in a real headless browser
# ---------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
HAVE_SELENIUM = importlib.util.find_spec("selenium") is not None


@pytest.fixture
def live_server(trained):
    """serve.py as a user starts it, on a free port; yields its URL."""
    proc = subprocess.Popen([sys.executable, "serve.py", trained["checkpoint"], "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line
        yield line.split(" on ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no headless browser: apt-get install -y chromium chromium-driver")
    if not HAVE_SELENIUM:
        pytest.skip("selenium is not installed: pip install selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def screenshot_dir(tmp_path):
    """Screenshots go to $SERVE_SCREENSHOT_DIR when set (to look at), else the test's tmp dir."""
    folder = os.environ.get("SERVE_SCREENSHOT_DIR") or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    return folder


def test_page_in_a_browser_shows_the_photo_and_the_chart(live_server, browser, trained,
                                                         tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    name, data = photo_bytes(trained)
    photo = tmp_path / name
    photo.write_bytes(data)
    shots = screenshot_dir(tmp_path)

    browser.set_window_size(1100, 900)
    browser.get(live_server)
    assert "What is in this photo?" in browser.title
    browser.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(browser, 60).until(ec.visibility_of_element_located((By.CSS_SELECTOR,
                                                                       "#result.ready")))
    rows = browser.find_elements(By.CSS_SELECTOR, "#bars .row")
    assert len(rows) == 3
    assert browser.find_element(By.ID, "top").text.split()[0] in ("cat", "dog", "fox")
    assert browser.execute_script("return document.getElementById('photo').naturalWidth") > 0
    assert name in browser.find_element(By.ID, "status").text
    browser.save_screenshot(os.path.join(shots, "serve-desktop.png"))

    # A phone-sized screen: the photo above the chart, nothing cut off sideways.
    browser.set_window_size(390, 844)
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth")
    browser.save_screenshot(os.path.join(shots, "serve-phone.png"))

    # Not a photo: the page says so instead of showing a stale answer.
    junk = tmp_path / "notes.jpg"
    junk.write_bytes(b"no pixels here")
    browser.find_element(By.ID, "file").send_keys(str(junk))
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "status"),
                                                                      "Could not classify"))
    assert "not a usable image" in browser.find_element(By.ID, "status").text
    assert os.path.getsize(os.path.join(shots, "serve-desktop.png")) > 10_000


def test_page_accepts_a_dropped_photo(live_server, browser, trained):
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    name, data = photo_bytes(trained)
    browser.get(live_server)
    # Selenium cannot drag a file from the desktop; build the same drop event in the page.
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], arguments[1], {type: 'image/jpeg'}));
        document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    """, base64.b64encode(data).decode(), name)
    WebDriverWait(browser, 60).until(ec.visibility_of_element_located((By.CSS_SELECTOR,
                                                                       "#result.ready")))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .row")) == 3
