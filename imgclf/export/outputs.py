"""The network an export converts: the checkpoint's classifier with, beside its probabilities,
the unknown verdict's novelty (heads/novelty.py) and the top class's heatmap (models/explain.py)
where the checkpoint and the network can carry them.

The heatmap is the class activation map, exact for a linear head on a feature map whose plain
mean is the pooled features (models/explain.is_exact, and checked on an input here): the top
class's weight row times the feature map at each position, one more matrix product, then
normalised as predict.py --json's "heatmap" (explain.heatmap_grid): its positive part divided
by its largest value, so 1 is where the model found the most for its top class. With the mirror
image averaged in (the checkpoint's flip_tta) the mirror's map is flipped back and averaged, as
explain.Explainer averages it. Each export checks its heatmap against Explainer's within
HEATMAP_ATOL on the check photos.
"""
import contextlib

import numpy as np

from .checks import CheckFailed

HEATMAP_ATOL = 1e-3  # the largest |difference| of the normalised heatmap (values 0..1)
TINY = 1e-12         # the heatmap's divisor at least this: an all-negative map stays 0


def carries_heatmap(model):
    """Whether an export of model carries the heatmap output, saying why not where it does
    not (heatmap_problem)."""
    problem = heatmap_problem(model)
    if problem:
        print(f"no heatmap output: {problem}")
    return problem is None


def heatmap_problem(model):
    """Why the network cannot carry the exact heatmap (None: it can)."""
    import torch

    from ..errors import UserError
    from ..models import explain
    try:
        module = explain.feature_module(model.backbone)
    except UserError:
        return f"no convolutional feature map in a {type(model.backbone).__name__} backbone"
    if not explain.is_exact(model):
        return ("the heatmap is exact only for a linear head on the pooled feature map "
                "(a head with hidden layers gets a gradient estimate, which a graph without "
                "gradients cannot compute)")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), tap(module) as maps:
        pooled = model.backbone(x)
    if not torch.allclose(maps[0].float().mean((2, 3)), pooled.float(), atol=1e-5):
        return "the pooled features are not the plain mean of the feature map"
    return None


@contextlib.contextmanager
def tap(module):
    """A list that collects each output of module while inside."""
    maps = []
    handle = module.register_forward_hook(lambda m, i, output: maps.append(output))
    try:
        yield maps
    finally:
        handle.remove()


def build(model, scorer=None, heatmap=False):
    """The network to convert: image -> probabilities (softmax applied), then novelty (N,)
    with a scorer, then heatmap (N, h, w) with heatmap."""
    import torch
    from torch import nn

    from ..models import explain

    class ExportedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.scorer, self.heatmap = model, scorer, heatmap
            self.module = explain.feature_module(model.backbone) if heatmap else None

        def forward(self, image):
            net = self.model
            views = [image, image.flip(-1)] if net.flip_tta else [image]
            feats, maps = [], []
            for view in views:
                if self.heatmap:
                    with tap(self.module) as tapped:
                        feats.append(net.backbone(view))
                    maps.append(tapped[0])
                else:
                    feats.append(net.backbone(view))
            # In ImageClassifier.forward's (and ScoredClassifier's) order of operations
            logits = net.head(feats[0])
            features = feats[0]
            if net.flip_tta:
                logits = (logits + net.head(feats[1])) / 2
                features = (features + feats[1]) / 2
            outputs = [torch.softmax(logits, dim=1)]
            if self.scorer is not None:
                outputs.append(self.scorer(features, logits))
            if self.heatmap:
                outputs.append(class_map(net.head, logits, maps))
            return tuple(outputs) if len(outputs) > 1 else outputs[0]

    return ExportedNet().eval()


def class_map(head, logits, maps):
    """The top class's activation map (N, h, w), normalised to 0..1: maps are each view's
    feature map (N, C, h, w), the mirror's second (flipped back here)."""
    import torch
    linear = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    weight = linear.weight[logits.argmax(1)].unsqueeze(1)  # (N, 1, C): the top class's row
    evidence = 0
    for i, fmap in enumerate(maps):
        n, c, h, w = fmap.shape
        view = torch.matmul(weight, fmap.float().reshape(n, c, h * w)).reshape(n, h, w)
        evidence = evidence + (view.flip(-1) if i == 1 else view)
    evidence = evidence / (len(maps) * h * w)  # explain.Explainer's scale: sum + bias = logit
    positive = torch.relu(evidence)
    peak = positive.amax(dim=(1, 2), keepdim=True).clamp(min=TINY)
    return positive / peak


def reference_heatmaps(model, arrays):
    """Explainer's maps for preprocessed photos (3, H, W), normalised as
    explain.heatmap_grid normalises them (without its rounding): (N, h, w)."""
    import torch

    from ..models.explain import Explainer
    explainer = Explainer(model, torch.device("cpu"))
    out = []
    for start in range(0, len(arrays), 16):
        maps = explainer(torch.from_numpy(np.stack(arrays[start:start + 16])))[3]
        positive = np.maximum(maps, 0.0)
        peak = positive.reshape(len(maps), -1).max(1).reshape(-1, 1, 1)
        out.append(np.where(peak > 0, positive / np.maximum(peak, TINY), positive))
    return np.concatenate(out).astype(np.float32)


def check_heatmaps(values, reference, runtime):
    """Refuse (CheckFailed) a heatmap further than HEATMAP_ATOL from Explainer's; print how
    far it is and where its peak lies."""
    values = np.asarray(values, np.float32).reshape(reference.shape)
    diff = float(np.abs(values - reference).max())
    same_peak = int((values.reshape(len(values), -1).argmax(1)
                     == reference.reshape(len(reference), -1).argmax(1)).sum())
    print(f"heatmap ({reference.shape[1]} x {reference.shape[2]}) vs predict --explain's: max "
          f"|difference| {diff:.2e}, same peak cell on {same_peak}/{len(values)}")
    if diff > HEATMAP_ATOL:
        raise CheckFailed(f"{runtime}'s heatmap differs from predict --explain's by up to "
                          f"{diff:.2e} (allowed {HEATMAP_ATOL:.0e})")
