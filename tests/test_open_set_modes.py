"""The unknown verdict of the other training modes: the epoch head (--head adamw) and a kept
fine-tuned backbone (--finetune), whose references and threshold come from the valid split
(novelty.fit_on_held_out); and predict's note where a checkpoint has none."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import EPOCHS, FAST, make_image_folder
from PIL import Image

from imgclf import checkpoints
from imgclf.cli import predict, train
from imgclf.data import decode
from imgclf.engine import feature_trainer
from imgclf.heads import novelty
from imgclf.models import classifier


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A small image folder and two photos unlike its classes (noise, a flat grey)."""
    base = tmp_path_factory.mktemp("open_set_modes")
    data = make_image_folder(base / "data")
    noise = str(base / "noise.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8)).save(noise)
    flat = str(base / "flat.png")
    Image.new("RGB", (48, 48), (128, 128, 128)).save(flat)
    return dict(data=data, noise=noise, flat=flat, base=base,
                known=os.path.join(data, "test", "dog", "000.jpg"))


def verdicts(capsys, checkpoint, *images):
    capsys.readouterr()
    assert predict.main([*images, checkpoint, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_fit_on_held_out_keeps_the_held_out_share_and_flags_far_photos():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32)) * 4
    labels = np.repeat(np.arange(3), 200)
    bank = torch.tensor(centres[labels] + rng.normal(size=(600, 32)), dtype=torch.float32)
    held_labels = np.repeat(np.arange(3), 100)
    held = torch.tensor(centres[held_labels] + rng.normal(size=(300, 32)), dtype=torch.float32)
    logits = held @ torch.tensor(centres.T, dtype=torch.float32) / 10
    entry = novelty.fit_on_held_out(bank, labels, held, logits)
    assert novelty.entry_problem(entry) == "" and entry["photos"] == 600
    scorer = novelty.NoveltyScorer(entry)
    called = (scorer(held, logits) > scorer.threshold).float().mean().item()
    assert called == pytest.approx(1 - novelty.KEEP, abs=0.01)  # the references' own photos
    far = torch.tensor(rng.normal(size=(50, 32)) * 4, dtype=torch.float32)
    far_logits = far @ torch.tensor(centres.T, dtype=torch.float32) / 10
    assert (scorer(far, far_logits) > scorer.threshold).float().mean().item() > 0.9


def test_the_epoch_head_has_the_unknown_verdict(photos, capsys, tmp_path):
    save = tmp_path / "adamw"
    assert train.main([photos["data"], "--save_dir", str(save), "--head", "adamw", *FAST,
                       *EPOCHS]) == 0
    assert "keeps 95% of the valid photos" in capsys.readouterr().out
    path = str(save / "checkpoint.pth")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    entry = ckpt["novelty"]
    assert novelty.entry_problem(entry) == ""
    assert entry["photos"] == len(entry["bank"]) == ckpt["data"]["counts"]["train"]
    assert ckpt["metrics"]["unknown_threshold"] == entry["threshold"]
    answers = verdicts(capsys, path, photos["noise"], photos["flat"], photos["known"])
    assert [a["unknown"] for a in answers] == [True, True, False]
    metrics = json.load(open(save / "report" / "metrics.json"))
    assert metrics["unknown"]["count"] == round(metrics["unknown"]["share"] * metrics["images"])


def fine_tuned_features(model, preprocess, paths):
    """The features (photos, dim) that the model computes for the photos, as predict does."""
    x = torch.from_numpy(np.stack([decode.load_eval_array(p, preprocess) for p in paths]))
    with torch.no_grad():
        return novelty.features_and_logits(model.eval(), x)[0]


def test_a_kept_fine_tuned_backbone_has_the_verdict_from_its_own_features(photos, capsys,
                                                                          tmp_path, monkeypatch):
    # an unbeatable bar for the default head: fine-tuning is kept (test_finetune.py)
    monkeypatch.setattr(feature_trainer.FeatureTrainer, "valid_loss_of_train_fit",
                        lambda self: float("inf"))
    save = tmp_path / "ft"
    assert train.main([photos["data"], "--save_dir", str(save), *FAST, "--finetune",
                       "--epochs", "2", "--patience", "0"]) == 0
    assert "the fine-tuned backbone's features of 30 train photos" in capsys.readouterr().out
    path = str(save / "checkpoint.pth")
    ckpt = checkpoints.load_checkpoint(path)
    assert ckpt["epoch"] > 0 and novelty.entry_problem(ckpt["novelty"]) == ""
    train_photos = sorted(os.path.join(root, name) for root, _, names in
                          os.walk(os.path.join(photos["data"], "train")) for name in names)
    model = checkpoints.model_from_checkpoint(ckpt, path)
    tuned = fine_tuned_features(model, ckpt["preprocess"], train_photos).mean(0)
    model.backbone = classifier.build_model("efficientnet_lite0", 3).backbone
    pretrained = fine_tuned_features(model, ckpt["preprocess"], train_photos).mean(0)
    stored = ckpt["novelty"]["mean"].float()
    # the bank's standardisation is the fine-tuned backbone's, not the stored features'
    assert (tuned - stored).abs().max() < 0.05 * stored.abs().max()
    assert (pretrained - stored).abs().max() > 4 * (tuned - stored).abs().max()
    answers = verdicts(capsys, path, photos["noise"], photos["known"])
    assert [a["unknown"] for a in answers] == [True, False]


def test_predict_says_when_a_checkpoint_was_stopped_before_its_verdict(photos, capsys,
                                                                       tmp_path):
    save = tmp_path / "run"
    assert train.main([photos["data"], "--save_dir", str(save), *FAST]) == 0
    ckpt = torch.load(save / "checkpoint.pth", map_location="cpu", weights_only=True)
    ckpt["novelty"] = None
    stopped = str(tmp_path / "stopped.pth")
    torch.save(ckpt, stopped)
    capsys.readouterr()
    assert predict.main([photos["known"], stopped, "--top_k", "3"]) == 0
    out, err = capsys.readouterr()
    assert "verdict" not in out
    assert err.strip() == (f"note: {stopped} has no novelty data (its training was stopped "
                           f"before the verdict was fitted): no unknown verdict; train again "
                           f"for one")
