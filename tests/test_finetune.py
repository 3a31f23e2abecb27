"""--finetune: what it trains, its micro-batched steps, and resuming it."""
import copy
import os

import pytest
import torch
from test_checkpoint import interrupt_after_epoch
from torch import nn

from conftest import FAST, timeless
from imgclf import checkpoints
from imgclf.cli import predict, train
from imgclf.engine import feature_trainer, finetune
from imgclf.models import classifier

FINETUNE = [*FAST, "--finetune", "--epochs", "3", "--patience", "0"]


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = classifier.build_model("efficientnet_lite0", 3, [0], dropout=0.0)
    finetune.unfreeze_tail(model.backbone, finetune.FinetuneTrainer.TRAINABLE_FRACTION)
    model.train()
    finetune.freeze_batchnorm(model)
    x = torch.randn(10, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 0])
    return model, x, y


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 1.0, 3.0])])
def test_micro_batches_take_the_same_step_as_one_batch(weight):
    """Gradients of micro-batches of 4, 4 and 2 images add up to the whole batch's, also for a
    class-weighted loss with label smoothing (a weighted mean over the batch)."""
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    model, x, y = _model_and_batch()
    other = copy.deepcopy(model)
    steps = []
    for net, micro in ((model, len(y)), (other, 4)):
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
        logits = finetune.train_step(net, optimizer, criterion, x, y, None, micro)
        assert logits.shape == (len(y), 3) and not logits.requires_grad
        steps.append(net.state_dict())
    changed = [k for k in steps[0] if not torch.equal(steps[0][k], _model_and_batch()[0]
                                                      .state_dict()[k])]
    assert changed, "the step changed no weight"
    for key in steps[0]:
        torch.testing.assert_close(steps[0][key], steps[1][key], rtol=1e-5, atol=1e-6,
                                   msg=key)


def keep_train_state(monkeypatch):
    """The run's state to resume from, which a complete checkpoint does not keep."""
    kept, make = {}, train.make_checkpoint

    def make_and_keep(*args):
        kept.update(args[-1].train_state)
        return make(*args)
    monkeypatch.setattr(train, "make_checkpoint", make_and_keep)
    return kept


def test_finetune_trains_the_last_stages_and_predict_uses_it(tmp_path, image_folder, capsys,
                                                             monkeypatch):
    train_state = keep_train_state(monkeypatch)
    assert train.main([image_folder, "--save_dir", str(tmp_path), *FINETUNE]) == 0
    out = capsys.readouterr().out
    assert "fine-tune step 2" in out and "epoch 3/3  train loss " in out and "test acc " in out
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert ckpt["finetuned"] is True
    pretrained = classifier.build_model("efficientnet_lite0", 3).state_dict()
    last = train_state["model"]  # the last epoch's weights
    assert torch.equal(last["backbone._conv_stem.weight"],
                       pretrained["backbone._conv_stem.weight"])  # the early layers stay frozen
    assert not torch.equal(last["backbone._conv_head.weight"],
                           pretrained["backbone._conv_head.weight"])
    # The checkpoint holds the best epoch: a fine-tuned one, or the linear probe (epoch 0)
    kept = ckpt["state_dict"]["backbone._conv_head.weight"]
    assert torch.equal(kept, pretrained["backbone._conv_head.weight"]) == (ckpt["epoch"] == 0)
    image = os.path.join(image_folder, "test", "fox", "000.jpg")
    assert predict.main([image, str(tmp_path / "checkpoint.pth"), "--top_k", "3"]) == 0
    # the top 3, and the unknown verdict where the probe (the default head) was kept
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + (ckpt.get("novelty") is not None)
    assert lines[0].startswith(" 1. ") and all(line.startswith("verdict: ") for line in lines[3:])


def test_finetune_that_does_worse_than_the_linear_probe_keeps_the_probe(tmp_path, image_folder,
                                                                     monkeypatch, capsys):
    monkeypatch.setattr(finetune.FinetuneTrainer, "BACKBONE_LR_SCALE", 1e4)  # wrecks the backbone
    train_state = keep_train_state(monkeypatch)
    assert train.main([image_folder, "--save_dir", str(tmp_path), *FINETUNE]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning did not lower the valid loss below the default mode's head's" in out
    assert "keeping the pretrained backbone, with the default mode's head" in out
    assert "head: logistic regression on " in out  # what train.py without --finetune fits
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    pretrained = classifier.build_model("efficientnet_lite0", 3).state_dict()
    assert ckpt["epoch"] == 0 and ckpt["epochs_run"] == 3
    for key, value in pretrained.items():
        if key.startswith("backbone."):
            assert torch.equal(ckpt["state_dict"][key], value), key
    best_finetuned = min(h["valid_loss"] for h in ckpt["history"])
    assert train_state["early_stopping"]["best_loss"] < best_finetuned  # the probe's


@pytest.mark.parametrize("bar", [0.0, float("inf")])
def test_finetune_is_kept_only_where_it_beats_the_default_head(tmp_path, image_folder,
                                                               monkeypatch, capsys, bar):
    """The default mode's head, fitted on the train split, sets the valid loss that fine-tuning
    must beat: an unbeatable one keeps the pretrained backbone, an infinite one fine-tunes."""
    monkeypatch.setattr(feature_trainer.FeatureTrainer, "valid_loss_of_train_fit", lambda self: bar)
    assert train.main([image_folder, "--save_dir", str(tmp_path), *FINETUNE]) == 0
    out = capsys.readouterr().out
    assert f"the default mode's head, fitted on the train split, has valid loss {bar:.3f}" in out
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert (ckpt["epoch"] == 0) == (bar == 0.0)
    assert ("keeping the pretrained backbone" in out) == (bar == 0.0)


def test_finetune_past_the_memory_bound_has_the_linear_probe_as_its_bar(tmp_path, image_folder,
                                                                        monkeypatch, capsys):
    """Where the default head's features would not fit in memory, fine-tuning's bar is the
    linear probe's valid loss (the epoch head, which the run then keeps where fine-tuning
    does not beat it): the default head is never fitted."""
    from imgclf.heads import linear_probe
    monkeypatch.setattr(linear_probe, "available_memory", lambda: 0)
    monkeypatch.setattr(feature_trainer.FeatureTrainer, "valid_loss_of_train_fit", None)  # not called
    bars = []
    monkeypatch.setattr(finetune.FinetuneTrainer, "prepare",
                        lambda self, prepare=finetune.FinetuneTrainer.prepare:
                        bars.append((self.bar, self.bar_name())) or prepare(self))
    assert train.main([image_folder, "--save_dir", str(tmp_path), *FINETUNE]) == 0
    out = capsys.readouterr().out
    assert "head: the logistic head needs about " in out
    assert "fine-tune: the default mode's head" not in out and "fine-tune step 2" in out
    assert bars == [(None, "the linear probe's")]


def test_finetune_resume_ends_like_an_uninterrupted_run(tmp_path, image_folder, monkeypatch,
                                                        capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    cache = ["--cache_dir", str(tmp_path / "cache")]
    assert train.main([image_folder, "--save_dir", str(full), *FINETUNE, *cache]) == 0
    with monkeypatch.context() as m:
        interrupt_after_epoch(m, 1)
        assert train.main([image_folder, "--save_dir", str(part), *FINETUNE, *cache]) == 130
    assert "resume with: python train.py" in capsys.readouterr().err
    assert train.main([image_folder, "--save_dir", str(part), *FINETUNE, *cache,
                       "--resume", str(part / "checkpoint.pth")]) == 0
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(part / "checkpoint.pth", weights_only=True)
    assert a["metrics"] == b["metrics"] and timeless(a["history"]) == timeless(b["history"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
