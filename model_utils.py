"""Building and loading a model and its checkpoint: the public names of imgclf.models and
imgclf.checkpoints, for a reader of the classic train.py / predict.py / model_utils.py trio.

    from model_utils import build_model, load_checkpoint, model_from_checkpoint
    ckpt = load_checkpoint("checkpoint.pth")        # torch.load(weights_only=True), checked
    model = model_from_checkpoint(ckpt)             # build_model(**ckpt["model_args"]) + weights
"""
from imgclf.checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from imgclf.models.backbones import build_backbone, default_preprocessing, known_archs
from imgclf.models.classifier import ImageClassifier, build_head, build_model
from imgclf.models.hardware import resolve_device

__all__ = ["load_checkpoint", "model_from_checkpoint", "save_checkpoint", "build_backbone",
           "default_preprocessing", "known_archs", "ImageClassifier", "build_head", "build_model",
           "resolve_device"]
