"""export.py on a fine-tuned checkpoint (train.py --finetune): its backbone's weights are in the
checkpoint, and every format must carry them and predict as the fine-tuned network does.

The formats of the mobile extra skip, saying why, where it is not installed (as in
test_export_mobile.py)."""
import contextlib
import importlib.util
import io
import json
import os
import re

import numpy as np
import pytest

from conftest import FAST, make_image_folder
from imgclf.cli import export, predict, train
from imgclf.export import checks, outputs
from imgclf.heads import novelty

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
HAVE_LITERT = all(importlib.util.find_spec(m) for m in
                  ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"))
HAVE_COREML = importlib.util.find_spec("coremltools") is not None
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx/onnxruntime not installed "
                                "(optional: pip install -e '.[export]')")
needs_litert = pytest.mark.skipif(not HAVE_LITERT, reason="litert-torch, ai-edge-litert and "
                                  "ai-edge-quantizer are not installed (optional: pip install "
                                  "-e '.[mobile]')")
needs_coreml = pytest.mark.skipif(not HAVE_COREML, reason="coremltools is not installed "
                                  "(optional: pip install -e '.[mobile]')")
FINETUNE = [*FAST, "--finetune", "--epochs", "1", "--patience", "0"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A one-epoch --finetune run whose fine-tuned backbone is kept: its bar (the default head's
    valid loss) is made infinite, as in test_finetune.py, since on these easy pictures the
    default head cannot be beaten and the run would keep the pretrained backbone."""
    from imgclf import checkpoints
    from imgclf.engine import feature_trainer
    base = tmp_path_factory.mktemp("finetuned")
    data = make_image_folder(base / "data")
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
        patch.setattr(feature_trainer.FeatureTrainer, "valid_loss_of_train_fit",
                      lambda self: float("inf"))
        assert train.main([data, "--save_dir", str(base / "run"), *FINETUNE]) == 0
    path = str(base / "run" / "checkpoint.pth")
    ckpt = checkpoints.load_checkpoint(path)
    assert ckpt["finetuned"] is True and ckpt["epoch"] == 1  # the fine-tuned epoch, kept
    return dict(data=data, checkpoint=path, ckpt=ckpt)


def run_export(argv):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = export.main(argv)
    return status, printed.getvalue()


def parity(text, runtime):
    """(max probability difference, photos with the same top-1, photos) of a parity line."""
    found = re.search(rf"{re.escape(runtime)} vs PyTorch: max \|probability difference\| "
                      rf"(\S+), top-1 same on (\d+)/(\d+)", text)
    assert found, text
    return float(found.group(1)), int(found.group(2)), int(found.group(3))


def networks(ckpt):
    """The checkpoint's network, and its head on the pretrained backbone instead."""
    from imgclf import checkpoints
    from imgclf.models import classifier
    tuned = checkpoints.model_from_checkpoint(ckpt).eval()
    pretrained = classifier.build_model("efficientnet_lite0", len(ckpt["classes"])).eval()
    pretrained.head.load_state_dict(tuned.head.state_dict())
    return tuned, pretrained


def photo_batch(finetuned):
    """The test photos' paths and their preprocessed arrays (N, 3, H, W)."""
    from imgclf.data import decode
    folder = os.path.join(finetuned["data"], "test")
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(folder) for n in names)
    return paths, np.stack([decode.load_eval_array(p, finetuned["ckpt"]["preprocess"])
                            for p in paths])


@needs_onnx
def test_onnx_export_of_a_finetuned_checkpoint_carries_its_backbone(finetuned, tmp_path):
    import onnxruntime as ort
    import torch
    out = str(tmp_path / "model.onnx")
    status, text = run_export([finetuned["checkpoint"], "--out", out, "--check_count", "0"])
    assert status == 0, text
    diff, same, count = parity(text, "ONNX Runtime (float32)")
    assert diff <= checks.PARITY_ATOL and same == count == 12
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    # the unknown verdict's novelty too: its bank is the fine-tuned backbone's features
    assert [o.name for o in session.get_outputs()] == ["probabilities", "novelty", "heatmap"]
    paths, batch = photo_batch(finetuned)
    probs, novelty_out, heat = session.run(None, {"image": batch})
    tuned, pretrained = networks(finetuned["ckpt"])
    scored = novelty.ScoredClassifier(tuned, novelty.scorer_from_checkpoint(finetuned["ckpt"]))
    with torch.inference_mode():
        np.testing.assert_allclose(probs, tuned(torch.from_numpy(batch)).softmax(1).numpy(),
                                   atol=checks.PARITY_ATOL, rtol=0)
        np.testing.assert_allclose(novelty_out, scored(torch.from_numpy(batch))[:, -1].numpy(),
                                   atol=1e-3, rtol=0)
    np.testing.assert_allclose(heat, outputs.reference_heatmaps(tuned, list(batch)),
                               atol=outputs.HEATMAP_ATOL, rtol=0)
    # The pretrained backbone would give other maps: the export is the fine-tuned network
    other = outputs.reference_heatmaps(pretrained, list(batch))
    assert np.abs(heat - other).max() > 10 * outputs.HEATMAP_ATOL


@needs_onnx
def test_the_onnx_heatmap_is_predict_json_heatmap(finetuned, tmp_path, capsys):
    import onnxruntime as ort
    out = str(tmp_path / "model.onnx")
    assert run_export([finetuned["checkpoint"], "--out", out, "--check_count", "2"])[0] == 0
    paths, batch = photo_batch(finetuned)
    heat = ort.InferenceSession(out).run(["heatmap"], {"image": batch[:3]})[0]
    capsys.readouterr()
    assert predict.main([*paths[:3], finetuned["checkpoint"], "--explain", "--json",
                         "--precision", "fp32"]) == 0
    answers = json.loads(capsys.readouterr().out)
    for grid, ours in zip([a["heatmap"] for a in answers], heat):
        np.testing.assert_allclose(ours, np.asarray(grid), atol=1e-3, rtol=0)  # 3 digits


@needs_litert
def test_tflite_export_of_a_finetuned_checkpoint(finetuned, tmp_path):
    from imgclf.app.litert_predictor import LiteRTPredictor, read_metadata
    from imgclf.export import to_tflite
    out = str(tmp_path / "model.tflite")
    status, text = run_export([finetuned["checkpoint"], "--format", "tflite", "--out", out,
                               "--check_count", "0"])
    assert status == 0, text
    diff, same, count = parity(text, "LiteRT (float32)")
    assert diff <= checks.PARITY_ATOL and same == count == 12
    import torch
    paths, batch = photo_batch(finetuned)
    tuned, _ = networks(finetuned["ckpt"])
    with torch.inference_mode():
        reference = tuned(torch.from_numpy(batch)).softmax(1).numpy()
    predictor = LiteRTPredictor(out)
    np.testing.assert_allclose(predictor.probabilities(batch), reference,
                               atol=checks.PARITY_ATOL, rtol=0)
    # The heatmap travels too, checked before writing and here again
    assert "heatmap (2 x 2) vs predict --explain's" in text
    assert read_metadata(out)["outputs"] == ["probabilities", "novelty", "heatmap"]
    # ... and the unknown verdict's novelty (sort-free in the model), as PyTorch's topk gives it
    assert re.search(r"LiteRT novelty .* vs PyTorch: max \|difference\| \S+, same verdict on "
                     r"12/12", text), text
    scored = novelty.ScoredClassifier(tuned, novelty.scorer_from_checkpoint(finetuned["ckpt"]))
    with torch.inference_mode():
        expected = scored(torch.from_numpy(batch))[:, -1].numpy()
    np.testing.assert_allclose(predictor.scores(batch)[1], expected,
                               atol=to_tflite.NOVELTY_ATOL, rtol=0)
    heatmaps = to_tflite.predict_heatmaps(out, list(batch))
    np.testing.assert_allclose(heatmaps, outputs.reference_heatmaps(tuned, list(batch)),
                               atol=outputs.HEATMAP_ATOL, rtol=0)
    # predict.py --explain with the .tflite reads the same output
    probs, maps = predictor.explain(batch)
    np.testing.assert_allclose(probs, reference, atol=checks.PARITY_ATOL, rtol=0)
    np.testing.assert_allclose(maps, heatmaps, atol=1e-6)


@needs_coreml
def test_coreml_export_of_a_finetuned_checkpoint(finetuned, tmp_path):
    out = str(tmp_path / "Model.mlpackage")
    status, text = run_export([finetuned["checkpoint"], "--format", "coreml", "--out", out,
                               "--check_count", "0"])
    assert status == 0, text
    diff, same, count = parity(text, "Core ML program (float32, computed here)")
    assert diff <= checks.PARITY_ATOL and same == count == 12
    # The heatmap travels too: an output named so, its numbers checked before writing
    assert "heatmap (2 x 2) vs predict --explain's" in text
    import coremltools as ct
    spec = ct.models.MLModel(out, skip_model_load=True).get_spec()
    # ... and the unknown verdict's novelty, checked against PyTorch's
    assert re.search(r"Core ML novelty .* vs PyTorch: max \|difference\| \S+, same verdict "
                     r"on 12/12", text), text
    assert [o.name for o in spec.description.output] == ["classLabel", "classLabel_probs",
                                                         "novelty", "heatmap"]
    assert spec.description.predictedProbabilitiesName == "classLabel_probs"
