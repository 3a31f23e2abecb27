"""The heatmap output of the exports (imgclf/export/outputs.py): the class activation map in the
graph, equal to predict.py --explain's, the mirror image averaged in where the checkpoint does
so; refused where it differs; absent, saying why, where the network cannot carry it exactly."""
import contextlib
import importlib.util
import io
import os

import numpy as np
import pytest

from imgclf.cli import export
from imgclf.export import outputs

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


def checkpoint_model(trained, flip_tta=False):
    from imgclf import checkpoints
    model = checkpoints.model_from_checkpoint(
        checkpoints.load_checkpoint(trained["checkpoint"])).eval()
    model.flip_tta = flip_tta
    return model


def photos(trained):
    from imgclf import checkpoints
    from imgclf.data import decode
    preprocess = checkpoints.load_checkpoint(trained["checkpoint"])["preprocess"]
    folder = os.path.join(trained["data"], "test")
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(folder) for n in names)
    return [decode.load_eval_array(p, preprocess) for p in paths]


@pytest.mark.parametrize("flip_tta", [False, True])
def test_the_graph_heatmap_is_the_explainer_map(trained, flip_tta):
    import torch
    model = checkpoint_model(trained, flip_tta)
    assert outputs.heatmap_problem(model) is None
    arrays = photos(trained)
    with torch.inference_mode():
        probs, heat = outputs.build(model, heatmap=True)(torch.from_numpy(np.stack(arrays)))
        np.testing.assert_allclose(probs.numpy(), model(torch.from_numpy(np.stack(arrays)))
                                   .softmax(1).numpy(), atol=1e-6)
    reference = outputs.reference_heatmaps(model, arrays)
    assert heat.shape == reference.shape and heat.shape[1:] == (2, 2)  # 64 px in, 2 x 2 cells
    np.testing.assert_allclose(heat.numpy(), reference, atol=1e-5)
    assert heat.max() == pytest.approx(1.0) and heat.min() >= 0
    if flip_tta:  # the mirror's map is averaged in: not the photo's own map
        alone = outputs.reference_heatmaps(checkpoint_model(trained), arrays)
        assert np.abs(alone - reference).max() > 1e-3


def test_a_head_with_hidden_layers_carries_no_heatmap():
    from imgclf.models import classifier
    model = classifier.build_model("efficientnet_lite0", 3, hidden_units=[8]).eval()
    assert "exact only for a linear head" in outputs.heatmap_problem(model)


@pytest.mark.skipif(not HAVE_ONNX, reason="onnx/onnxruntime not installed (optional: pip "
                                          "install -e '.[export]')")
def test_an_onnx_heatmap_that_differs_is_refused_and_nothing_written(trained, tmp_path,
                                                                     monkeypatch, capsys):
    real = outputs.reference_heatmaps
    monkeypatch.setattr(outputs, "reference_heatmaps",
                        lambda model, arrays: 1 - real(model, arrays))
    out = tmp_path / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        status = export.main([trained["checkpoint"], "--out", str(out), "--check_count", "3"])
    assert status == 1
    assert capsys.readouterr().err.startswith(
        "error: the export failed its check, nothing written: ONNX Runtime's heatmap differs "
        "from predict --explain's by up to ")
    assert os.listdir(tmp_path) == []


def test_check_heatmaps_prints_the_difference_and_the_peaks(capsys):
    reference = np.zeros((2, 2, 2), np.float32)
    reference[:, 0, 1] = 1
    outputs.check_heatmaps(reference.reshape(2, 4) + 1e-4, reference, "X")
    assert capsys.readouterr().out == ("heatmap (2 x 2) vs predict --explain's: max |difference| "
                                       "1.00e-04, same peak cell on 2/2\n")
