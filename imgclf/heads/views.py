"""Which views of each photo the logistic head learns from: the view sets cross-validation
chooses among, and the training rows of one (each photo weighing 1 whatever its views).

Features arrive per photo as an array (photos, views, dim): view 0 is the plain centre crop,
view 1 its mirror image, views 2.. random augmentations (features.py stores them so).
"""
from dataclasses import dataclass

import torch

from ..utils.text import plural

# Augmented views are stored only on request (--aug_views N, --always_augment: this many).
# Stored by default for sets up to 1,000 photos, they were chosen on two of the panel's four
# small sets, for 3 and 8 test photos of 868, at 4 more backbone passes of every train and
# valid photo: past the reference's wall on a 2-class set, and a decode twice the size of a
# 12 MP photo (docs/design.md).
AUG_VIEWS = 4


@dataclass(frozen=True)
class ViewSet:
    """Which views of a photo are training rows, and which views' logits are averaged to
    predict (view 1, the mirror image, means flip averaging at prediction time too)."""
    name: str
    train: tuple
    test: tuple


PLAIN = ViewSet("plain views", (0,), (0,))
MIRRORED = ViewSet("plain + mirrored views", (0, 1), (0, 1))


def augmented(views):
    name = f"plain + mirrored + {plural(views, 'augmented view')}"
    return ViewSet(name, tuple(range(2 + views)), (0, 1))


def candidates(stored_views, always_augment=False):
    """The view sets cross-validation chooses from, given the views stored per photo (1: plain
    only; 2: plus the mirror image; more: plus augmentations)."""
    if stored_views > 2:
        return [augmented(stored_views - 2)] if always_augment else \
            [PLAIN, MIRRORED, augmented(stored_views - 2)]
    return [PLAIN, MIRRORED][:stored_views]


def training_rows(photos, labels, view_set, class_weight=None):
    """(rows, labels, weights) of the view set: each photo weighs 1 in all (times its class's
    weight, with --balance), whatever its number of views, so that C means the same for every
    view set. The rows are a view of photos where they can be (the view sets' training views
    are the first ones stored), not a copy."""
    views = len(view_set.train)
    if view_set.train == tuple(range(views)):
        rows = photos[:, :views].reshape(-1, photos.shape[-1])
    else:
        rows = photos[:, list(view_set.train)].reshape(-1, photos.shape[-1])
    row_labels = labels.repeat_interleave(views)
    weights = torch.full((len(rows),), 1.0 / views, device=labels.device)
    if class_weight is not None:
        weights = weights * class_weight[row_labels]
    return rows, row_labels, weights
