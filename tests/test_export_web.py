"""export.py --format web: the folder, its check in headless Chromium, the page's preprocessing
against Python's to the bit, the page at phone and desktop widths, and offline once loaded.

The browser tests need chromium, chromium-driver and selenium, and ONNX Runtime Web's npm
package: $IMGCLF_ORT_WEB (its .tgz or folder), else .cache/npm/onnxruntime-web-VERSION.tgz,
which this file fills with `npm pack` where npm is installed and the registry reachable
(.ci/run does it first). Without them they skip, saying why; with IMGCLF_REQUIRE_WEB=1 (set by
.ci/run) they fail instead, so that CI runs them for real."""
import base64
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from imgclf.export import browser, web_page
from imgclf.cli import export
from imgclf.data import decode

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
pytestmark = pytest.mark.skipif(not HAVE_ONNX, reason="onnx/onnxruntime not installed "
                                "(optional: pip install -e '.[export]')")
RUNTIME_CACHE = os.path.join(ROOT, ".cache", "npm")
REQUIRED = os.environ.get("IMGCLF_REQUIRE_WEB") == "1"


def skip_or_fail(why):
    if REQUIRED:
        pytest.fail(f"IMGCLF_REQUIRE_WEB=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def ort_web():
    """ONNX Runtime Web's npm package (.tgz or folder)."""
    given = os.environ.get("IMGCLF_ORT_WEB")
    if given:
        return given
    tgz = os.path.join(RUNTIME_CACHE, f"onnxruntime-web-{web_page.RUNTIME_VERSION}.tgz")
    if not os.path.isfile(tgz) and shutil.which("npm"):
        os.makedirs(RUNTIME_CACHE, exist_ok=True)
        subprocess.run(["npm", "pack", f"onnxruntime-web@{web_page.RUNTIME_VERSION}",
                        "--pack-destination", RUNTIME_CACHE], capture_output=True, timeout=600)
    if not os.path.isfile(tgz):
        skip_or_fail(f"no ONNX Runtime Web: set IMGCLF_ORT_WEB, or npm pack "
                     f"onnxruntime-web@{web_page.RUNTIME_VERSION} into {RUNTIME_CACHE}")
    return tgz


@pytest.fixture(scope="session")
def with_browser():
    missing = browser.browser_missing()
    if missing:
        skip_or_fail(f"no headless browser: {missing}")


@pytest.fixture(scope="module")
def exported(trained, ort_web, with_browser, tmp_path_factory):
    """The trained checkpoint exported for the web with a local runtime, checked in Chromium."""
    out = tmp_path_factory.mktemp("web") / "site"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert export.main([trained["checkpoint"], "--format", "web", "--out", str(out),
                            "--web_runtime", ort_web, "--check_count", "0"]) == 0
    return dict(trained, out=str(out), log=log.getvalue())


@pytest.fixture
def page(exported):
    """The exported folder on a local static server, in a fresh headless Chromium."""
    with browser.serve_folder(exported["out"]) as (url, server), \
            browser.headless_chromium() as driver:
        browser.open_page(driver, url)
        yield dict(exported, url=url, server=server, driver=driver)


def test_the_export_checks_the_page_on_every_test_photo_and_writes_the_folder(exported):
    log = exported["log"]
    line = next(x for x in log.splitlines() if x.startswith("the page in headless Chromium"))
    same, total = map(int, re.search(r"top-1 same on (\d+)/(\d+)", line).groups())
    assert same == total == 12  # 4 test photos x 3 classes
    assert float(re.search(r"difference\| ([0-9.e+-]+)", line)[1]) <= export.PARITY_ATOL
    names = sorted(os.listdir(exported["out"]))
    assert names == sorted(["index.html", "app.js", "preprocess.js", "sw.js", "model.json",
                            "model.onnx", *web_page.RUNTIME_FILES])
    # Relative URLs only, so that any static host (or a sub-folder of one) serves it
    for name in ("index.html", "app.js", "sw.js", "model.json"):
        with open(os.path.join(exported["out"], name)) as f:
            text = f.read()
        assert "://" not in text and not re.search(r"""(src|href)=["']?/""", text), name
    with open(os.path.join(exported["out"], "model.json")) as f:
        meta = json.load(f)
    assert meta["runtime_base"] == "./"
    assert meta["outputs"] == {"probabilities": "probabilities", "novelty": "novelty",
                               "heatmap": "heatmap"}
    assert set(meta["novelty"]) == {"threshold"}  # the page's unknown verdict
    # The heatmap checked twice: ONNX Runtime's, then the page's, each against predict --explain's
    heat = [x for x in log.splitlines() if x.startswith("heatmap (2 x 2) vs predict --explain's")]
    assert len(heat) == 2 and all("same peak cell on 12/12" in x for x in heat), log


def page_input(driver, data, preprocess):
    """The model's input the page computes from a file's bytes with that preprocessing."""
    return np.asarray(driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        window.imgclf.input(new Blob([bytes]), arguments[1]).then(done);""",
                                                  base64.b64encode(data).decode(), preprocess),
                      dtype=np.float32)


def test_the_page_gets_pythons_input_to_the_bit(page, tmp_path):
    """The page's decode + resize + crop + normalise against decode.load_eval_array: photos
    smaller and larger than the resize, both filters, EXIF rotation, PNG and JPEG."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        (640, 480), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to show
    cases = {"small.jpg": (base.resize((50, 37)), dict(format="JPEG", quality=90)),
             "rotated.jpg": (base.resize((60, 45)), dict(format="JPEG", exif=exif.tobytes())),
             "large.png": (base.resize((333, 250)), dict(format="PNG")),
             "wide.png": (base.resize((640, 100)), dict(format="PNG"))}
    preprocess = dict(size=64, crop_pct=0.875, mean=[0.485, 0.456, 0.406],
                      std=[0.229, 0.224, 0.225])
    for upscale in ("bicubic", "bilinear"):
        pre = dict(preprocess, upscale=upscale)
        for name, (img, options) in cases.items():
            buffer = io.BytesIO()
            img.save(buffer, **options)
            want = decode.load_eval_array(io.BytesIO(buffer.getvalue()), pre).ravel()
            got = page_input(page["driver"], buffer.getvalue(), pre)
            assert np.array_equal(got, want), (name, upscale)


def test_a_large_jpeg_reaches_the_model_close_to_pythons_input(page):
    """A JPEG at least twice the size the resize needs: Python decodes it at 1/8 scale in
    libjpeg, the page has the browser decode it at that size: close (a level or so), not equal."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize(
        (1600, 1200), Image.BICUBIC)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    pre = dict(size=64, crop_pct=0.875, upscale="bicubic", mean=[0.5] * 3, std=[0.5] * 3)
    want = decode.load_eval_array(io.BytesIO(buffer.getvalue()), pre).ravel()
    got = page_input(page["driver"], buffer.getvalue(), pre)
    diff = np.abs(got - want) * 0.5 * 255  # in levels of 0-255
    assert diff.mean() < 2 and diff.max() < 8, (diff.mean(), diff.max())  # seen: 1.1, 3


def test_the_page_at_phone_and_desktop_widths(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    driver = page["driver"]
    photo = os.path.join(page["data"], "test", "fox", "000.jpg")
    for width, screen in ((400, browser.phone_screen), (1100, browser.desktop_screen)):
        screen(driver)
        driver.refresh()
        browser.open_page(driver, page["url"])
        assert driver.execute_script("return window.innerWidth") == width
        driver.find_element(By.ID, "file").send_keys(photo)  # the user's own path: a chosen file
        WebDriverWait(driver, 60).until(ec.visibility_of_element_located((By.CSS_SELECTOR,
                                                                           "#result.ready")))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#bars .row")) == 3
        assert driver.find_element(By.ID, "top").text.split()[0] == "fox"
        assert "answered in" in driver.find_element(By.ID, "status").text
        assert driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
        driver.save_screenshot(str(tmp_path / f"web-{width}.png"))
    # Not a photo: the page says so instead of showing a stale answer
    junk = tmp_path / "notes.jpg"
    junk.write_bytes(b"no pixels here")
    driver.find_element(By.ID, "file").send_keys(str(junk))
    WebDriverWait(driver, 30).until(ec.text_to_be_present_in_element((By.ID, "status"),
                                                                      "Could not classify"))
    assert not driver.find_element(By.ID, "result").is_displayed()
    # The camera's input is there for phones, without forcing it on anyone who picks a file
    assert driver.find_element(By.ID, "camera").get_attribute("capture") == "environment"
    assert driver.find_element(By.ID, "file").get_attribute("capture") is None


def test_the_page_draws_the_heatmap_over_the_photo(page):
    from selenium.webdriver.common.by import By
    driver = page["driver"]
    with open(os.path.join(page["data"], "test", "fox", "000.jpg"), "rb") as f:
        answer = browser.classify_in_page(driver, f.read(), "000.jpg")
    assert len(answer["heatmap"]) == 4 and max(answer["heatmap"]) == pytest.approx(1.0)
    canvas = driver.find_element(By.ID, "heatmap")
    assert canvas.is_displayed() and int(canvas.get_attribute("width")) == 48  # the photo's
    note = driver.find_element(By.ID, "heatnote").text
    assert note.startswith("Heatmap: where the model saw ") and "(red: most)" in note


def test_the_page_works_with_the_server_gone_once_loaded(page):
    driver = page["driver"]
    assert browser.wait_offline_ready(driver) is True
    page["server"].shutdown()
    page["server"].server_close()
    driver.refresh()  # the page, its scripts, the runtime and the model now come from the cache
    browser.open_page(driver, page["url"])
    with open(os.path.join(page["data"], "test", "dog", "001.jpg"), "rb") as f:
        answer = browser.classify_in_page(driver, f.read(), "001.jpg")
    assert int(np.argmax(answer["probabilities"])) == 1  # cat, dog, fox


def test_without_a_browser_the_export_says_what_was_checked(trained, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setattr(browser, "browser_missing", lambda: "no chromium (test)")
    out = tmp_path / "site"
    assert export.main([trained["checkpoint"], "--format", "web", "--out", str(out),
                        "--check_count", "2"]) == 0
    printed = capsys.readouterr().out
    assert "not checked in a browser (no chromium (test))" in printed
    with open(out / "index.html") as f:
        assert web_page.RUNTIME_CDN + web_page.RUNTIME_SCRIPT in f.read()
    with open(out / "sw.js") as f:  # the runtime from the CDN is kept for offline use too
        assert web_page.RUNTIME_CDN + "ort-wasm-simd-threaded.wasm" in f.read()


def test_an_int8_page_is_judged_as_int8_models_are(trained, ort_web, with_browser, tmp_path,
                                                  capsys):
    out = tmp_path / "site"
    assert export.main([trained["checkpoint"], "--format", "web", "--quantize", "--out",
                        str(out), "--web_runtime", ort_web, "--check_count", "6"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"the page vs the int8 model in ONNX Runtime: max \|probability "
                     r"difference\| [0-9.e+-]+, top-1 same on 6/6", printed), printed
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["quantization"].startswith("int8")


def test_a_page_that_disagrees_writes_nothing(trained, tmp_path, monkeypatch, capsys):
    def wrong(folder, photos, preprocess):
        probs = np.full((len(photos), 3), 1 / 3, dtype=np.float32)
        return probs, 100.0, None
    monkeypatch.setattr(web_page, "run_in_browser", wrong)
    out = tmp_path / "site"
    assert export.main([trained["checkpoint"], "--format", "web", "--out", str(out)]) == 1
    assert "the export failed its check, nothing written: The page" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no folder, no temporary one left


@pytest.mark.parametrize("argv, message", [
    (["--format", "web", "--web_runtime", "nowhere.tgz"],
     r"--web_runtime nowhere.tgz: no such file or folder; give the npm package: npm pack "
     r"onnxruntime-web@"),
    (["--web_runtime", "x"], r"--web_runtime x: only for --format web; drop it"),
])
def test_option_mistakes_are_one_line(trained, tmp_path, capsys, argv, message):
    out = tmp_path / "site"
    assert export.main([trained["checkpoint"], "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not os.path.exists(out)


def test_an_unknown_format_is_refused_by_name(trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main([trained["checkpoint"], "--format", "png"])
    assert exit_info.value.code == 2
    assert "--format: invalid choice: 'png'" in capsys.readouterr().err


def test_out_that_is_another_folder_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "mine.jpg").write_bytes(b"keep me")
    assert export.main([trained["checkpoint"], "--format", "web", "--out", str(out)]) == 2
    assert "exists and is not a web export" in capsys.readouterr().err
    assert os.listdir(out) == ["mine.jpg"]


def test_web_runtime_takes_the_npm_tarball_or_its_folder(tmp_path):
    import tarfile
    pkg = tmp_path / "package" / "dist"
    pkg.mkdir(parents=True)
    for name in web_page.RUNTIME_FILES:
        (pkg / name).write_bytes(name.encode())
    tgz = tmp_path / "ort.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "package", arcname="package")
    expected = {n: n.encode() for n in web_page.RUNTIME_FILES}
    assert web_page.find_runtime(str(tgz)) == expected
    assert web_page.find_runtime(str(tmp_path / "package")) == expected
    assert web_page.find_runtime(str(pkg)) == expected
    (pkg / "ort.wasm.min.js").unlink()
    with pytest.raises(web_page.UserError, match=r"has no ort.wasm.min.js"):
        web_page.find_runtime(str(pkg))


def tiny_model_with_novelty(path, size, threshold):
    """An ONNX model shaped like an export with the unknown verdict: probabilities of 3
    classes (a softmax of the channel means) and a novelty (N,) (the mean of the image)."""
    import onnx
    from onnx import TensorProto, helper
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["means"]),
             helper.make_node("Softmax", ["means"], ["probabilities"], axis=1),
             helper.make_node("ReduceMean", ["means"], ["novelty"], axes=[1], keepdims=0)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                      ["batch", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("novelty", TensorProto.FLOAT, ["batch"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="unknown_threshold", value=json.dumps(threshold))
    onnx.save(model, path)


def test_the_page_shows_the_unknown_verdict_of_a_novelty_output(trained, ort_web, with_browser,
                                                                tmp_path):
    from imgclf import checkpoints
    ckpt = checkpoints.load_checkpoint(trained["checkpoint"])
    size = ckpt["preprocess"]["size"]
    tiny_model_with_novelty(str(tmp_path / "tiny.onnx"), size, threshold=-100.0)
    folder = tmp_path / "site"
    folder.mkdir()
    files = web_page.page_files(str(tmp_path / "tiny.onnx"), ckpt,
                                  web_page.find_runtime(ort_web))
    web_page.write_files(str(folder), files)
    meta = json.loads(files["model.json"])
    assert meta["outputs"]["novelty"] == "novelty" and meta["novelty"] == {"threshold": -100.0}
    with browser.serve_folder(str(folder)) as (url, _), browser.headless_chromium() as driver:
        browser.open_page(driver, url)
        with open(os.path.join(trained["data"], "test", "cat", "000.jpg"), "rb") as f:
            browser.classify_in_page(driver, f.read(), "000.jpg")
        verdict = driver.find_element("id", "verdict")
        assert verdict.is_displayed() and "Probably none of these" in verdict.text
