"""Where the model looked (--explain): the map against the logits, mirrored views, the
backbone families, the object in one quadrant, and the map in --json, --plot, serve and the
report."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_sample
# serve.py's fixtures: the page in a headless browser (skipped where there is none)
from test_serve import MISSING, browser, live_server, screenshot_dir  # noqa: F401
from imgclf.analysis import heatmaps, report
from imgclf.app import heat_page, inference
from imgclf.cli import predict
from imgclf.data import decode
from imgclf.errors import UserError
from imgclf.models import explain, hardware
from imgclf.models.classifier import build_model


def images(n=3, size=96, seed=0):
    """Photos of shapes off centre (a map that is the same mirrored would hide a missing flip),
    preprocessed as Lite0 sees them."""
    pre = dict(size=size, crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3, upscale="bilinear")
    return torch.from_numpy(np.stack([decode.eval_array(draw_sample(i, seed + i, 96), pre)
                                      for i in range(n)]))


def seeded_model(arch="efficientnet_lite0", flip_tta=False, hidden_units=(), **kw):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4, hidden_units=hidden_units, flip_tta=flip_tta, **kw)
    with torch.no_grad():  # logits of a few units, not near 0: a real test of the sum
        model.head[-1].weight.normal_(0, 0.05)
        model.head[-1].bias.normal_(0, 1)
    return model.eval()


def direct_cam(model, x):
    """W_c . f_ij / (h w) of the top class, from the feature map the backbone pools: the
    textbook CAM, with the mirror view's flipped back and averaged where the model does."""
    maps = []
    handle = explain.feature_module(model.backbone).register_forward_hook(
        lambda m, i, out: maps.append(out))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    weight = model.head[-1].weight[logits.argmax(1)]  # (N, channels)
    cams = [torch.einsum("nk,nkhw->nhw", weight, f) / f[0, 0].numel() for f in maps]
    if len(cams) == 2:
        cams = [cams[0] / 2, cams[1].flip(-1) / 2]
    return logits.numpy(), sum(cams).detach().numpy()


@pytest.mark.parametrize("flip_tta", [False, True])
def test_map_is_the_class_activation_map_and_sums_to_the_logit(flip_tta):
    model = seeded_model(flip_tta=flip_tta)
    x = images()
    logits, probs, top, maps = explain.Explainer(model, torch.device("cpu"))(x)
    reference, cam = direct_cam(model, x)
    np.testing.assert_allclose(logits, reference, atol=1e-5)
    assert (top == reference.argmax(1)).all()
    np.testing.assert_allclose(maps, cam, atol=1e-6)
    bias = model.head[-1].bias.detach().numpy()[top]
    np.testing.assert_allclose(maps.sum((1, 2)) + bias, logits[np.arange(3), top], atol=1e-5)
    assert maps.shape == (3, 3, 3)  # 96 px / Lite0's stride of 32
    assert explain.is_exact(model)


def test_mirrored_view_is_flipped_back_and_averaged():
    """predict.py --tta on a model without flip_tta: the mean of the photo's map and its
    mirror image's map flipped back; the same as a model that averages the mirror itself."""
    x = images()
    plain = explain.Explainer(seeded_model(), torch.device("cpu"))
    _, _, top, maps = plain(x, mirror=True)
    _, _, _, own = plain(x)
    _, _, _, mirrored = plain(x.flip(-1))
    np.testing.assert_allclose(maps, (own + mirrored[..., ::-1]) / 2, atol=1e-6)
    _, _, _, averaged = explain.Explainer(seeded_model(flip_tta=True), torch.device("cpu"))(x)
    np.testing.assert_allclose(maps, averaged, atol=1e-6)
    assert not np.allclose(own, mirrored[..., ::-1], atol=1e-3)  # the flip is not a no-op


def test_a_given_class_gets_its_own_map():
    """target: the map of the class the plain prediction named (not this pass's top-1)."""
    model, x = seeded_model(), images()
    explainer = explain.Explainer(model, torch.device("cpu"))
    _, _, top, maps = explainer(x)
    other = (top + 1) % 4
    _, _, drawn, other_maps = explainer(x, target=other)
    assert (drawn == other).all() and not np.allclose(maps, other_maps, atol=1e-3)
    weight = model.head[-1].weight.detach()[torch.from_numpy(other)]
    handle = explain.feature_module(model.backbone).register_forward_hook(
        lambda m, i, out: features.append(out))
    features = []
    with torch.no_grad():
        model(x)
    handle.remove()
    cam = torch.einsum("nk,nkhw->nhw", weight, features[0]) / features[0][0, 0].numel()
    np.testing.assert_allclose(other_maps, cam.numpy(), atol=1e-6)


def test_predictor_explains_in_float32_where_it_predicts_in_bfloat16(monkeypatch):
    """A predictor whose plain path runs in bfloat16 (forced here, as on a CPU with native
    bf16) still draws the float32 map: bf16 loses it, its cells being small differences of
    large sums (models/explain.py)."""
    monkeypatch.setattr(hardware, "autocast_dtype", lambda device: torch.bfloat16)
    model, x = seeded_model(), images()
    pre = dict(size=96, crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3, upscale="bilinear")
    predictor = inference.TorchPredictor.from_model(model, list("abcd"), None, pre,
                                                    torch.device("cpu"))
    reference, cam = direct_cam(model, x)
    probs, maps = predictor.explain(x.numpy())
    np.testing.assert_allclose(maps, cam, atol=1e-5)
    # the answer is the plain path's, as without --explain, and the map is of its top class
    plain = predictor.probabilities(x.numpy())
    np.testing.assert_array_equal(probs, plain)
    assert (plain.argmax(1) == reference.argmax(1)).all()
    # the forced precision is real: the plain path's probabilities are not float32's
    assert np.abs(plain - torch.softmax(torch.from_numpy(reference), 1).numpy()).max() > 1e-4


def test_hidden_layers_get_a_gradient_map_said_to_be_an_estimate():
    model = seeded_model(hidden_units=(16,))
    _, _, _, maps = explain.Explainer(model, torch.device("cpu"))(images())
    assert maps.shape == (3, 3, 3) and np.isfinite(maps).all()
    assert not explain.is_exact(model)


@pytest.mark.parametrize("arch, exact", [("resnet18", True), ("densenet121", True),
                                         ("vgg11", False)])
def test_torchvision_families_find_their_feature_map(arch, exact):
    model = seeded_model(arch, pretrained=False)
    x = images(2, size=64)
    logits, _, top, maps = explain.Explainer(model, torch.device("cpu"))(x)
    assert maps.shape == (2, 2, 2)  # 64 px / stride 32
    assert explain.is_exact(model) == exact
    if exact:
        bias = model.head[-1].bias.detach().numpy()[top]
        np.testing.assert_allclose(maps.sum((1, 2)) + bias, logits[np.arange(2), top],
                                   rtol=1e-4, atol=1e-4)


def test_a_transformer_backbone_is_refused_in_one_line():
    class VisionTransformer(torch.nn.Module):
        pass
    with pytest.raises(UserError, match="--explain: not available for a VisionTransformer"):
        explain.feature_module(VisionTransformer())


def test_heatmap_grid_is_positive_evidence_over_its_peak():
    grid = explain.heatmap_grid(np.array([[-1.0, 0.5], [2.0, 1.0]]))
    assert grid == [[0.0, 0.25], [1.0, 0.5]]
    assert explain.heatmap_grid(np.full((2, 2), -1.0)) == [[0.0, 0.0], [0.0, 0.0]]
    assert explain.peak_position(grid, 8) == (0.8125, 0.0625)  # bottom left


def quadrant_canvas(class_index, quadrant, seed, side=64):
    canvas = Image.new("RGB", (2 * side, 2 * side), (128, 128, 128))
    row, col = divmod(quadrant, 2)
    canvas.paste(draw_sample(class_index, seed, side), (col * side, row * side))
    return canvas


def test_object_in_one_quadrant_gets_the_peak_there():
    """The bench's measure on shapes: a head fitted as class centroids of Lite0's features of
    the conftest shapes (full frame, 64 px), then each shape pasted into each quadrant of a grey
    canvas twice its side: the top class is the shape's and the peak is in its quadrant."""
    model = seeded_model()
    pre = dict(size=64, crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3, upscale="bilinear")
    photos = torch.from_numpy(np.stack([decode.eval_array(draw_sample(c, s, 64), pre)
                                        for c in range(4) for s in range(6)]))
    with torch.no_grad():
        features = model.backbone(photos).reshape(4, 6, -1).mean(1)
        model.head[-1].weight.copy_(features - features.mean(0))
        model.head[-1].bias.zero_()
    pre["size"] = 128
    canvases = [(quadrant_canvas(c, q, 100 + 4 * c + q), c, q) for c in range(4) for q in range(4)]
    batch = torch.from_numpy(np.stack([decode.eval_array(img, pre) for img, _, _ in canvases]))
    _, _, top, maps = explain.Explainer(model, torch.device("cpu"))(batch)
    found = [explain.peak_position(m, 128) for m in maps]
    hits = [2 * (row >= 0.5) + (col >= 0.5) == q for (row, col), (_, _, q) in zip(found, canvases)]
    assert sum(hits) >= 15, hits  # 16 canvases; chance would be 4
    assert (top == [c for _, c, _ in canvases]).mean() >= 0.75


# ---------------------------------------------------------------------------------------------
# predict.py --explain
# ---------------------------------------------------------------------------------------------
def run_predict(capsys, *argv):
    capsys.readouterr()
    status = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_json_heatmap_rows_and_plot(trained, capsys, tmp_path):
    test_dir = os.path.join(trained["data"], "test")
    plot = tmp_path / "plot.png"
    status, out, _ = run_predict(capsys, test_dir, trained["checkpoint"], "--json", "--explain",
                                 "--plot", plot, "--top_k", 2)
    assert status == 0
    doc = json.loads(out)
    assert len(doc) == 12
    for entry in doc:
        grid = np.array(entry["heatmap"])
        assert grid.shape == (2, 2)  # the checkpoint's 64 px input / Lite0's stride of 32
        assert grid.min() >= 0 and grid.max() == 1.0
    with Image.open(plot) as img:
        assert img.size[0] > 400
    # rows run top to bottom: the JSON is the map itself, not transposed or flipped
    predictor = inference.load_predictor(trained["checkpoint"])
    path = doc[0]["image"]
    _, maps = predictor.explain(decode.load_eval_array(path, predictor.preprocess)[None])
    assert doc[0]["heatmap"] == explain.heatmap_grid(maps[0])


def test_text_output_draws_the_map_and_plain_runs_have_none(trained, capsys):
    photo = os.path.join(trained["data"], "test", "cat", "000.jpg")
    status, out, _ = run_predict(capsys, photo, trained["checkpoint"], "--explain")
    lines = out.splitlines()
    assert status == 0 and lines[-3].startswith("where it saw ")
    assert len(lines[-2]) == len(lines[-1]) == 3 + 2 * 2 + 1  # "  |", 2 cells x 2, "|"
    status, out, _ = run_predict(capsys, photo, trained["checkpoint"])
    assert "where it saw" not in out
    status, out, _ = run_predict(capsys, photo, trained["checkpoint"], "--json")
    assert "heatmap" not in json.loads(out)[0]


def test_python_api_gives_the_heatmap_when_asked(trained):
    import imgclf
    clf = imgclf.load(trained["checkpoint"])
    photo = os.path.join(trained["data"], "test", "fox", "000.jpg")
    with Image.open(photo) as img:
        in_memory = img.convert("RGB")
    from_file, from_memory = clf.predict([photo, in_memory], top_k=2, explain=True)
    assert from_file.heatmap.shape == from_memory.heatmap.shape == (2, 2)
    np.testing.assert_allclose(from_file.heatmap, from_memory.heatmap, atol=1e-3)
    assert from_file.heatmap.max() == 1.0
    assert clf.predict(photo)[0].heatmap is None


def test_tta_and_the_estimate_note_reach_predict(trained, capsys, monkeypatch):
    photo = os.path.join(trained["data"], "test", "dog", "001.jpg")
    status, out, err = run_predict(capsys, photo, trained["checkpoint"], "--explain", "--tta",
                                   "--json")
    assert status == 0 and np.array(json.loads(out)[0]["heatmap"]).shape == (2, 2)
    assert "estimate" not in err  # the test checkpoint's head is linear: the exact map
    monkeypatch.setattr(explain, "is_exact", lambda model: False)  # as with --hidden_units
    status, out, err = run_predict(capsys, photo, trained["checkpoint"], "--explain",
                                   "--top_k", 3)
    assert status == 0 and err.count("\n") == 1
    assert "gradient x activation estimate, not an exact class activation map" in err


def test_explain_refusals_are_one_line(trained, capsys, monkeypatch):
    photo = os.path.join(trained["data"], "test", "cat", "000.jpg")
    status, _, err = run_predict(capsys, os.path.dirname(photo), trained["checkpoint"],
                                 "--evaluate", "--explain")
    assert status == 2 and "drop --explain" in err
    real = predict.load_predictor

    class OnnxLike:  # what an .onnx model's predictor lacks: explain
        def __init__(self, *a, **k):
            self.__dict__.update({k: getattr(real(trained["checkpoint"]), k) for k in (
                "classes", "class_names", "preprocess", "averages_mirror")})
    monkeypatch.setattr(predict, "load_predictor", OnnxLike)
    status, _, err = run_predict(capsys, photo, "model.onnx", "--explain")
    assert status == 2 and err.count("\n") == 1 and "does not carry the heatmap" in err
    assert "does not carry the heatmap" in heat_page.explain_error(OnnxLike())


# ---------------------------------------------------------------------------------------------
# serve.py and the report
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (optional: "
                    "pip install -e '.[serve]')")
def test_serve_answers_the_heatmap_when_asked(trained):
    from fastapi.testclient import TestClient
    from imgclf.cli import serve
    app = serve.create_app(inference.load_predictor(trained["checkpoint"]), "checkpoint.pth")
    client = TestClient(app)
    photo = os.path.join(trained["data"], "test", "dog", "000.jpg")
    with open(photo, "rb") as f:
        data = f.read()
    plain = client.post("/predict", files={"file": ("dog.jpg", data, "image/jpeg")}).json()
    asked = client.post("/predict?explain=1",
                        files={"file": ("dog.jpg", data, "image/jpeg")}).json()
    assert "heatmap" not in plain
    assert asked["predictions"] == plain["predictions"]
    assert np.array(asked["heatmap"]).shape == (2, 2) and np.max(asked["heatmap"]) == 1.0
    page = client.get("/").text
    assert "const EXPLAIN = true" in page and "drawHeat(data.heatmap" in page
    assert '<canvas id="heat"' in page

    class NoExplain:  # an .onnx model's predictor: no explain()
        def __init__(self, real):
            self.classes, self.class_names = real.classes, real.class_names
            self.preprocess, self.probabilities = real.preprocess, real.probabilities
    onnx_like = TestClient(serve.create_app(NoExplain(inference.load_predictor(
        trained["checkpoint"])), "model.onnx"))
    refused = onnx_like.post("/predict?explain=1", files={"file": ("dog.jpg", data, "image/jpeg")})
    assert refused.status_code == 400 and "does not carry the heatmap" in refused.json()["error"]
    assert "const EXPLAIN = false" in onnx_like.get("/").text
    assert onnx_like.post("/predict", files={"file": ("dog.jpg", data, "image/jpeg")}).json()[
        "predictions"] == plain["predictions"]


def test_mistakes_png_has_a_heatmap_per_mistake(trained, tmp_path, monkeypatch):
    predictor = inference.load_predictor(trained["checkpoint"])
    paths = sorted(os.path.join(root, f) for root, _, files in
                   os.walk(os.path.join(trained["data"], "test")) for f in files)
    labels = np.arange(len(paths)) % 3
    probs = np.full((len(paths), 3), 0.1)
    probs[np.arange(len(paths)), (labels + 1) % 3] = 0.8  # every photo a mistake
    drawn = []
    monkeypatch.setattr(heatmaps, "draw_heatmap",
                        lambda ax, pic, m, crop: drawn.append(np.shape(m)) or ax.imshow(pic))
    summary = report.write_report(str(tmp_path), probs, labels, predictor.classes,
                                  predictor.classes, paths, predictor=predictor)
    with Image.open(summary["files"]["mistakes"]) as img:
        img.load()
    assert drawn == [(2, 2)] * len(paths)


@pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (optional: "
                    "pip install -e '.[serve]')")
def test_page_draws_the_heatmap_over_the_photo(live_server, browser, trained, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    browser.set_window_size(1100, 900)
    browser.get(live_server)
    browser.find_element(By.ID, "file").send_keys(
        os.path.join(trained["data"], "test", "fox", "001.jpg"))
    WebDriverWait(browser, 60).until(ec.visibility_of_element_located((By.CSS_SELECTOR,
                                                                       "#result.heated")))
    assert browser.find_element(By.ID, "heat").is_displayed()
    assert not browser.find_element(By.ID, "photo").is_displayed()
    assert browser.find_element(By.ID, "heatnote").text.startswith("Heatmap: where the model saw")
    # the canvas holds the photo and the colours over it, not a blank
    distinct = browser.execute_script(
        "const d = document.getElementById('heat').getContext('2d').getImageData(0, 0, 420, 420)"
        ".data; const seen = new Set(); for (let i = 0; i < d.length; i += 4 * 97) "
        "seen.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]); return seen.size;")
    assert distinct > 50
    browser.save_screenshot(os.path.join(screenshot_dir(tmp_path), "serve-heatmap.png"))
