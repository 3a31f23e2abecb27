"""Where the model looked: a heatmap of the evidence for the top class over each photo.

For a linear head on globally average-pooled features the class activation map (CAM) is exact:
logit_c = mean over positions ij of (W_c . f_ij) + b_c, so the map W_c . f_ij / (h w), summed
over the positions, plus the bias, is the logit. It is computed here as gradient x activation at
the backbone's last feature map (the logit's gradient there is W_c / (h w) at every position),
which is that same map for a linear head and stays defined for the others: a head with hidden
layers, or VGG's and AlexNet's fully connected layers after the feature map, get its first-order
estimate (gradient x activation, as in Simonyan et al. and Shrikumar et al.), not an exact
decomposition. Only the head (and those layers) are differentiated: the backbone runs once per
view (in float32, below), so the cost is the head's backward pass and one product per position.

With mirrored test-time averaging (the model's flip_tta, or predict.py --tta) the mirror view's
map is flipped back and averaged with the photo's, as its logits are.

The map is computed in float32, whatever precision plain prediction uses: on the object its
cells are small differences of large sums (the evidence for the class minus the evidence
against it, a fifth to a quarter of their total on the quadrant canvases of
bench/heatmap_bench.py), which a bfloat16 backbone's 8-bit mantissa does not keep: its
normalised maps were 0.04 to 0.08 (median) from the float32 ones, 40 to 80 times the exports'
HEATMAP_ATOL, with another peak cell on 10-12% of those canvases (docs/explain.md).
"""
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

# The module whose output is the backbone's last feature map before the pool, by backbone class
# (torchvision's class names; EfficientNetLite is ours and names the point feature_map).
FEATURE_MODULES = {"EfficientNetLite": "feature_map", "ResNet": "layer4", "DenseNet": "features",
                   "VGG": "features", "AlexNet": "features", "EfficientNet": "features",
                   "MobileNetV2": "features", "MobileNetV3": "features",
                   "ConvNeXt": "features", "RegNet": "trunk_output", "MNASNet": "layers",
                   "ShuffleNetV2": "conv5"}
# Backbones whose pooled features are the plain mean of that map (ReLU at most in between): with
# a linear head their map is the exact CAM. VGG, AlexNet (fully connected layers), MobileNetV3
# (a hidden layer) and ConvNeXt (a LayerNorm after the pool) get the gradient estimate.
EXACT_FAMILIES = ("EfficientNetLite", "ResNet", "DenseNet", "EfficientNet", "MobileNetV2",
                  "RegNet", "MNASNet", "ShuffleNetV2")


def feature_module(backbone):
    """The module that outputs the backbone's last feature map; a UserError where none does."""
    name = FEATURE_MODULES.get(type(backbone).__name__)
    if name is None:
        raise UserError(f"--explain: not available for a {type(backbone).__name__} backbone "
                        f"(no convolutional feature map to draw); use a convolutional --arch "
                        f"such as efficientnet_lite0, resnet50 or densenet121")
    return backbone.get_submodule(name)


def is_exact(model):
    """Whether the heatmap is the exact class activation map (sum + bias == the logit)."""
    linear_head = sum(isinstance(m, torch.nn.Linear) for m in model.head.modules()) == 1
    return linear_head and type(model.backbone).__name__ in EXACT_FAMILIES


@contextmanager
def frozen(model):
    """No weight takes part in autograd while inside: only the feature map is differentiated,
    so no graph is kept for the backbone. The flags are put back (a model still training)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


class Explainer:
    """An ImageClassifier -> batch -> (probabilities, top-1 class, heatmap per photo)."""

    def __init__(self, model, device=None):
        self.model = model
        self.device = device or next(model.parameters()).device
        self.module = feature_module(model.backbone)
        self.exact = is_exact(model)

    def __call__(self, x, mirror=False, target=None):
        """x: float32 tensor (N, 3, H, W), preprocessed; mirror: average with the mirror image
        (predict.py --tta); target: the class to draw for each photo (N,), None for the top-1
        of this pass's logits. Returns (logits (N, K), probabilities (N, K), the class drawn
        (N,), maps (N, h, w)): numpy arrays, logits and probabilities averaged over the
        views as prediction averages them, maps in the photo's orientation."""
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        views = [x, x.flip(-1)] if mirror else [x]
        logits, leaves = self._forward(views)
        probs = torch.stack([v.softmax(1) for v in logits]).mean(0)
        top = probs.argmax(1) if target is None else torch.as_tensor(target, device=probs.device)
        chosen = sum(v.gather(1, top[:, None]).sum() for v in logits)
        grads = torch.autograd.grad(chosen, leaves)
        per_view = len(leaves) // len(views)  # 2 where the model averages the mirror itself
        maps = 0
        for i, (act, grad) in enumerate(zip(leaves, grads)):
            contribution = (act.float() * grad.float()).sum(1)
            mirrored = (i // per_view == 1) != (i % per_view == 1)
            maps = maps + (contribution.flip(-1) if mirrored else contribution)
        maps = maps / len(views)
        logit = torch.stack(logits).mean(0)
        return tuple(t.detach().cpu().numpy() for t in (logit, probs, top, maps))

    def _forward(self, views):
        """Each view's logits, and each feature map the backbone made, as leaves of the graph
        (in the order made: the photo's, then its mirror's where the model averages them)."""
        leaves = []

        def as_leaf(module, inputs, output):
            leaves.append(output.detach().requires_grad_())
            return leaves[-1].clone()  # DenseNet's ReLU works in place: not on a leaf
        handle = self.module.register_forward_hook(as_leaf)
        try:
            with frozen(self.model), torch.enable_grad(), torch.autocast(
                    self.device.type, enabled=False):  # float32: see the module's docstring
                logits = [self.model(view).float() for view in views]
        finally:
            handle.remove()
        return logits, leaves


# ---------------------------------------------------------------------------------------------
# The map as people see it
# ---------------------------------------------------------------------------------------------
def heatmap_grid(evidence, digits=3):
    """The JSON heatmap: the map's positive evidence divided by its largest, so 1 is where the
    model found the most for its top class and 0 where it found none (or evidence against);
    rows top to bottom, each a list of numbers left to right."""
    positive = np.maximum(np.asarray(evidence, dtype=np.float64), 0.0)
    peak = positive.max() if positive.size else 0.0
    scaled = positive / peak if peak > 0 else positive
    return np.round(scaled, digits).tolist()


def upsample(grid, height, width):
    """The coarse grid resized bilinearly to height x width (as drawn over the photo)."""
    t = torch.as_tensor(np.asarray(grid, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def peak_position(grid, size=224):
    """(row, column) of the largest value of the grid upsampled to size x size, as fractions
    of the height and width (0 top/left, 1 bottom/right)."""
    fine = upsample(grid, size, size)
    row, col = divmod(int(fine.argmax()), size)
    return (row + 0.5) / size, (col + 0.5) / size
