"""Name what a photo shows, with a checkpoint written by train.py.

    python predict.py IMAGE CHECKPOINT [--top_k 5] [--category_names JSON] [--gpu]

Start-up matters here: this script imports only what the run needs (torch and model_utils for a
checkpoint, never torchvision or matplotlib unless asked for).
"""
import argparse
import os
import sys

import numpy as np

import data_utils
from data_utils import UserError


def build_parser():
    p = argparse.ArgumentParser(
        description="Predict the class of an image with a checkpoint from train.py.")
    p.add_argument("image", metavar="IMAGE", help="the image file to classify")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pth written by train.py")
    p.add_argument("--top_k", type=int, default=5, metavar="K",
                   help="how many of the most likely classes to print (default: 5)")
    p.add_argument("--category_names", metavar="JSON",
                   help="JSON mapping class folder names to display names (default: the names "
                        "stored in the checkpoint)")
    p.add_argument("--gpu", nargs="?", const="cuda", metavar="DEVICE",
                   help="run on an accelerator: --gpu alone for CUDA, or cuda:1, mps "
                        "(default: the CPU)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args):
    if args.top_k < 1:
        raise UserError(f"--top_k {args.top_k}: must be 1 or more")
    predictor = load_predictor(args.checkpoint, args.gpu)
    names = display_names(predictor.classes, predictor.class_names, args.category_names)
    image = load_image(args.image, predictor.preprocess)
    probs = predictor.probabilities(image[None])[0]
    k = min(args.top_k, len(names))
    if k < args.top_k:
        print(f"note: --top_k {args.top_k} is more than the {len(names)} classes; showing {k}",
              file=sys.stderr)
    top = np.argsort(-probs, kind="stable")[:k]
    print("\n".join(format_top_k(names, top.tolist(), probs[top].tolist())))
    return 0


class TorchPredictor:
    """A checkpoint from train.py: classes, preprocessing, and batch -> probabilities."""

    def __init__(self, path, gpu=None):
        import torch
        import model_utils
        device = model_utils.resolve_device(gpu)
        ckpt = model_utils.load_checkpoint(path)
        self.classes = list(ckpt["classes"])
        self.class_names = list(ckpt.get("class_names") or self.classes)
        self.preprocess = ckpt["preprocess"]
        self.model = model_utils.model_from_checkpoint(ckpt, path)
        self._forward = model_utils.fast_forward(self.model, device)
        self._torch = torch

    def probabilities(self, batch):
        """float32 array (N, 3, H, W), preprocessed -> float32 array (N, classes)."""
        logits = self._forward(self._torch.from_numpy(np.ascontiguousarray(batch)))
        return self._torch.softmax(logits, dim=1).numpy()


def load_predictor(path, gpu=None):
    return TorchPredictor(path, gpu)


def display_names(classes, stored_names, category_names=None):
    if category_names:
        names = data_utils.read_category_names(category_names)
        return list(data_utils.check_category_names(names, classes, category_names).values())
    return list(stored_names or classes)


def load_image(path, preprocess):
    if not os.path.exists(path):
        raise UserError(f"image {path}: no such file; give the path of a photo")
    if os.path.isdir(path):
        raise UserError(f"image {path}: is a folder; give the path of a photo")
    if not os.path.isfile(path):  # a pipe or a device: reading it would block or never end
        raise UserError(f"image {path}: not a regular file; give the path of a photo")
    try:
        img = data_utils.load_rgb(path)
    except data_utils.IMAGE_ERRORS as err:
        raise UserError(f"image {path}: cannot be read: {data_utils.describe_image_error(err)}; "
                        f"give a JPEG, PNG, WebP, BMP, TIFF or GIF photo") from None
    return data_utils.eval_array(img, preprocess)


def format_top_k(names, indices, probs):
    width = max(len(names[i]) for i in indices)
    return [f"{rank:>2}. {names[i]:<{width}}  {100 * p:5.1f}%"
            for rank, (i, p) in enumerate(zip(indices, probs), 1)]


if __name__ == "__main__":
    sys.exit(main())
