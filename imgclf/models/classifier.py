"""The classifier: a backbone and a new head, built from the checkpoint's model_args."""
from torch import nn

from .backbones import build_backbone
from .efficientnet_lite import LITE_ARCHS, build_lite_backbone


# ---------------------------------------------------------------------------------------------
# The classifier: backbone + head
# ---------------------------------------------------------------------------------------------
def build_head(in_features, hidden_units, num_classes, dropout):
    """Hidden layers with ReLU and dropout, then the class layer; [] or [0] means one Linear."""
    layers, width = [nn.Dropout(dropout)], in_features
    for units in hidden_units:
        if units <= 0:
            continue
        layers += [nn.Linear(width, units), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ImageClassifier(nn.Module):
    """backbone, then head. With flip_tta the logits are the mean of the photo's and its mirror
    image's: the default head is fitted, where cross-validation chose so, to predict that way."""

    def __init__(self, backbone, head, flip_tta=False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.flip_tta = flip_tta

    def forward(self, x):
        logits = self.head(self.backbone(x))
        if self.flip_tta:  # two passes, not one of twice the batch: that exports with a free batch
            logits = (logits + self.head(self.backbone(x.flip(-1)))) / 2
        return logits


def build_model(arch, num_classes, hidden_units=(), dropout=0.0, weights_path=None,
                pretrained=True, flip_tta=False):
    """The whole network. pretrained=False skips loading backbone weights: use it when a
    checkpoint's state dict will overwrite them anyway."""
    if arch in LITE_ARCHS and not pretrained:
        backbone = build_lite_backbone(arch, weights_path)  # its shape lives in the weights file
    else:
        backbone = build_backbone(arch, weights_path, pretrained)
    head = build_head(backbone.num_features, list(hidden_units), num_classes, dropout)
    return ImageClassifier(backbone, head, flip_tta)


def freeze(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module
