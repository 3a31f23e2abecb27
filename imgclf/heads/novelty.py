"""The unknown verdict: a novelty score per photo (higher = less like the training photos of
every class) and the threshold above which a photo is called "none of my classes".

The score is the larger of two z-scores, each measured on held-out photos of the known classes:
- energy: -logsumexp of the head's logits (Liu et al. 2020, "Energy-based out-of-distribution
  detection"), which the head's own view of the classes makes strong on photos of other,
  similar classes;
- kNN: minus the cosine similarity to the K-th nearest training photo of the class the head
  predicts (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors",
  made class-conditional), on features standardised as the
  head standardises them and L2-normalised, then projected on their PCA_DIMS principal
  directions (normalised before the projection, so that a photo whose features lie off those
  directions keeps a short projection: far from every training photo). Strong on photos
  unlike any training photo.
Each is a z-score against its values on out-of-fold photos of train+valid (the logits of the
cross-validation heads that did not see them; the neighbours in the other folds), and the
threshold is the KEEP quantile of the novelty of those photos. The larger, not the sum: on
photos of another kind (flowers for a digits head) the energy says "very known" as loudly as
the kNN says "unknown", and a sum cancels them (docs/open_set.md has the measurements).

What the score needs travels in the checkpoint under "novelty" (a plain dict of tensors and
numbers): the features' mean and scale, the PCA projection, the bank of projected training
features (float16, at most BANK_MAX photos) and their classes, K, the two z-score references
and the threshold.
"""
import numpy as np
import torch
from torch import nn

from ..errors import UserError
from . import linear_probe

NOVELTY_VERSION = 1
# The share of held-out known photos kept (called known) at the default threshold.
KEEP = 0.95
# The neighbour whose similarity counts (set by docs/open_set.md's measurements).
K = 10
# PCA dimensions of the bank: 256 float16 values a photo, 3,000 photos 1.5 MB; measured the
# same AUROC as the full 1,280 on held-out classes of flowers5 and the digits.
PCA_DIMS = 256
# Photos in the bank at most (a stratified random sample beyond): 40,000 x 256 float16 = 20 MB.
BANK_MAX = 40_000
CHECKPOINT_KEY = "novelty"


# ---------------------------------------------------------------------------------------------
# Fitting, at training time
# ---------------------------------------------------------------------------------------------
def photo_features(photos, views):
    """(photos, dim) float32: each photo's features averaged over the views the head predicts
    from (the mirror image too where it averages it in), as the model computes them."""
    return torch.as_tensor(photos)[:, list(views)].float().mean(1)


def fit(photos, labels, views, held_out_logits, seed=0, keep=KEEP):
    """The checkpoint's "novelty" entry from the training photos (photos, views, dim), their
    labels, the head's prediction views and the out-of-fold logits of every photo."""
    feats = photo_features(photos, views).cpu()
    scaler, projection, reduced = reduced_space(feats)
    labels = np.asarray(labels)
    bank_index = bank_photos(labels, BANK_MAX, seed)
    folds = linear_probe.photo_folds(labels, linear_probe.FOLDS, seed)
    k = class_k([labels[bank_index[folds[bank_index] != f]] for f in np.unique(folds)])
    predicted = torch.as_tensor(held_out_logits).argmax(1).cpu().numpy()
    knn = -out_of_fold_similarity(reduced, bank_index, labels, predicted, k, folds)
    return make_entry(scaler, projection, reduced[bank_index], labels[bank_index], k,
                      held_out_logits, knn, keep, len(feats))


def fit_on_held_out(bank_feats, bank_labels, held_feats, held_logits, seed=0, keep=KEEP):
    """The "novelty" entry of a head that has no out-of-fold fits (the epoch head,
    fine-tuning): the bank from bank_feats (photos, dim), the train split's features as the
    model computes them; the z-score references and the threshold from a split the head was
    not fitted on (the valid split: held_feats and the head's held_logits), each of whose
    photos meets the whole bank as a new photo does."""
    bank_feats = torch.as_tensor(bank_feats).float().cpu()
    scaler, projection, reduced = reduced_space(bank_feats)
    bank_labels = np.asarray(bank_labels)
    chosen = bank_photos(bank_labels, BANK_MAX, seed)
    bank, bank_labels = reduced[chosen], bank_labels[chosen]
    k = class_k([bank_labels])
    held = unit_rows(scaler(torch.as_tensor(held_feats).float().cpu())) @ projection.half().float()
    predicted = torch.as_tensor(held_logits).argmax(1).cpu().numpy()
    knn = -kth_similarity(held, bank, k, classes=(predicted, bank_labels))
    return make_entry(scaler, projection, bank, bank_labels, k, held_logits, knn, keep,
                      len(bank_feats))


def class_k(banks):
    """The neighbour that counts: K, or fewer where a class has fewer photos in one of the
    banks (labels of each bank a held-out photo meets): its K-th photo must exist."""
    smallest = min(np.bincount(labels)[np.unique(labels)].min() for labels in banks)
    return int(max(1, min(K, smallest)))


def reduced_space(feats):
    """(the Standardizer, the PCA projection (dim, dims), the photos' projected unit rows as
    stored (float16 values)) of feats (photos, dim)."""
    scaler = linear_probe.Standardizer(feats)
    standard = unit_rows(scaler(feats))
    dims = int(min(PCA_DIMS, feats.shape[1], max(len(feats) - 1, 1)))
    projection = principal_directions(standard, 0.0, dims)
    return scaler, projection, (standard @ projection).half().float()


def make_entry(scaler, projection, bank, bank_labels, k, held_logits, knn, keep, photos):
    """The entry, its references and threshold from the held-out photos' logits and kNN
    scores (minus the k-th similarity)."""
    energy = -torch.logsumexp(torch.as_tensor(held_logits).float().cpu(), 1)
    refs = torch.tensor([energy.mean(), energy.std(), knn.mean(), knn.std()])
    refs[1::2] = torch.nan_to_num(refs[1::2], nan=1.0).clamp(min=1e-6)  # one photo: no spread
    novelty = combine(energy, knn, refs)
    return {"version": NOVELTY_VERSION, "mean": scaler.mean, "scale": scaler.scale,
            "projection": projection.half(), "bank": bank.half(),
            "bank_labels": torch.as_tensor(np.asarray(bank_labels), dtype=torch.int32),
            "k": int(k), "z": refs,
            "threshold": float(torch.quantile(novelty.double(), keep)), "keep": float(keep),
            "photos": int(photos)}


def principal_directions(feats, mean, dims, block=8192):
    """(dim, dims): the leading eigenvectors of the centred features' covariance, summed in
    float64 a block of rows at a time (a dim x dim matrix, whatever the number of photos)."""
    cov = torch.zeros(feats.shape[1], feats.shape[1], dtype=torch.float64)
    for start in range(0, len(feats), block):
        part = (feats[start:start + block] - mean).double()
        cov += part.T @ part
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vectors[:, -dims:].flip(1).float()


def bank_photos(labels, limit, seed=0):
    """Indices of the photos in the bank: all of them up to limit, else a random sample of
    limit with each class's share kept."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:max(1, round(limit * np.mean(labels == c)))]
              for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def out_of_fold_similarity(reduced, bank_index, labels, predicted, k, folds):
    """Each photo's k-th largest cosine with the bank's photos of its predicted class in the
    other folds (the folds of the head's cross-validation): a held-out photo's, as a new
    photo's is against the whole bank. Leaving out only the photo itself called 7-9% of the
    known test photos unknown at the 95% threshold (near-copies within a split), the folds
    5-6%."""
    out = torch.empty(len(reduced))
    for fold in np.unique(folds):
        others = bank_index[folds[bank_index] != fold]
        held = np.flatnonzero(folds == fold)
        out[held] = kth_similarity(reduced[held], reduced[others], k,
                                   classes=(predicted[held], labels[others]))
    return out


def kth_similarity(queries, bank, k, self_index=None, block=1024, classes=None):
    """The k-th largest cosine of each query row with the bank's rows (both unit rows); with
    self_index (the bank's row i is query self_index[i]) a query's own row is left out; with
    classes (each query's class, each bank row's) only the rows of the query's class count."""
    out = torch.empty(len(queries))
    own = None
    if self_index is not None:
        own = torch.full((len(queries),), -1, dtype=torch.long)
        own[torch.as_tensor(self_index)] = torch.arange(len(self_index))
    for start in range(0, len(queries), block):
        sims = queries[start:start + block] @ bank.T
        if own is not None:
            rows = torch.nonzero(own[start:start + block] >= 0).flatten()
            sims[rows, own[start:start + block][rows]] = -float("inf")
        if classes is not None:
            sims = same_class_only(sims, torch.as_tensor(classes[0][start:start + block]),
                                   torch.as_tensor(classes[1]))
        out[start:start + block] = sims.topk(k, dim=1).values[:, -1]
    return out


def same_class_only(sims, query_classes, bank_classes):
    """sims (queries, bank) with the bank rows of other classes than each query's set below
    every cosine (-2): the k-th nearest photo of the predicted class, not of any class. Next
    to energy, this scored better than the nearest photos of every class on held-out
    classes of flowers5 and the digits (docs/open_set.md)."""
    same = bank_classes.long()[None, :] == query_classes.long()[:, None]
    return torch.where(same, sims, torch.full_like(sims, -2.0))


# What kth_largest puts in place of a value it has counted: below every cosine and the -2 of
# same_class_only, finite (an inf constant is one more thing a converter may mishandle).
COUNTED = -1e30


def kth_largest(values, k):
    """(N,): the k-th largest value of each row of values (N, M), as values.topk(k, 1).values
    [:, -1] (ties counted once each) but without a sort: k - 1 rounds of setting each row's
    largest entry (its first, among equals) to COUNTED, then the row maximum. For exports whose
    runtime has no sort op (LiteRT: topk converts to STABLEHLO_SORT, which its interpreter does
    not run); M values k times, cheap for the K = 10 the scorer uses."""
    columns = torch.arange(values.shape[1], device=values.device)[None, :]
    for _ in range(k - 1):
        top = values.argmax(1, keepdim=True)
        values = torch.where(columns == top, torch.full_like(values, COUNTED), values)
    return values.amax(1)


def unit_rows(rows):
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)


def combine(energy, knn, refs):
    """The novelty: the larger of the two scores' z-scores against the held-out known photos."""
    return torch.maximum((energy - refs[0]) / refs[1], (knn - refs[2]) / refs[3])


# ---------------------------------------------------------------------------------------------
# Scoring, at prediction time (PyTorch and the ONNX export)
# ---------------------------------------------------------------------------------------------
class NoveltyScorer(nn.Module):
    """(features (N, dim), logits (N, classes)) -> novelty (N,), in float32 whatever the
    autocast around it: the bank's cosines differ in the third digit in bfloat16."""

    def __init__(self, entry):
        super().__init__()
        self.register_buffer("mean", entry["mean"].float())
        self.register_buffer("scale", entry["scale"].float())
        self.register_buffer("projection", entry["projection"].float())
        self.register_buffer("bank", entry["bank"].float())
        self.register_buffer("z", entry["z"].float())
        # The bank's classes (absent from entries written before the class-conditional kNN:
        # those score against the nearest photos of every class, as they were fitted)
        labels = entry.get("bank_labels")
        self.register_buffer("bank_labels", None if labels is None else labels.long())
        self.k = int(entry["k"])
        self.threshold = float(entry["threshold"])
        # Set by an export whose runtime cannot sort (to_tflite): the k-th neighbour by
        # kth_largest instead of topk, the same value
        self.sort_free = False

    def forward(self, features, logits):
        with torch.autocast(features.device.type, enabled=False):
            energy = -torch.logsumexp(logits.float(), 1)
            standard = (features.float() - self.mean) / self.scale
            standard = standard / standard.norm(dim=1, keepdim=True).clamp(min=1e-12)
            sims = (standard @ self.projection) @ self.bank.T
            if self.bank_labels is not None:
                sims = same_class_only(sims, logits.argmax(1), self.bank_labels)
            kth = (kth_largest(sims, self.k) if self.sort_free
                   else sims.topk(self.k, dim=1).values[:, -1])
            return combine(energy, -kth, self.z)


class ScoredClassifier(nn.Module):
    """A classifier (models.classifier.ImageClassifier) with its novelty: x -> (N, classes + 1),
    the logits then the novelty in the last column (one output, so that every forward helper
    and the ONNX export take it as they take the logits)."""

    def __init__(self, model, scorer):
        super().__init__()
        self.model, self.scorer = model, scorer

    def forward(self, x):
        features, logits = features_and_logits(self.model, x)
        return torch.cat([logits, self.scorer(features, logits)[:, None]], 1)


class FeaturesAndLogits(nn.Module):
    """x -> (N, dim + classes): the features and logits of features_and_logits side by side
    (one output, for the forward helpers): what a fine-tuned model's verdict is fitted on."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.cat(features_and_logits(self.model, x), 1)


def features_and_logits(model, x):
    """(features, logits) of x as ImageClassifier.forward computes the logits: with the
    mirror image averaged in where it averages it (both the features and the logits)."""
    features = model.backbone(x)
    logits = model.head(features)
    if model.flip_tta:
        mirrored = model.backbone(x.flip(-1))
        logits = (logits + model.head(mirrored)) / 2
        features = (features + mirrored) / 2
    return features, logits


def scorer_from_checkpoint(ckpt, path="checkpoint"):
    """The NoveltyScorer of a checkpoint, or None for one trained before the verdict existed
    (or by a mode that stores none); a UserError for a damaged entry."""
    entry = ckpt.get(CHECKPOINT_KEY)
    if entry is None:
        return None
    problem = entry_problem(entry)
    if problem:
        raise UserError(f"checkpoint {path}: its novelty data is not valid ({problem}); the "
                        f"file was altered or damaged, train again")
    return NoveltyScorer(entry)


def entry_problem(entry):
    """What is wrong with a checkpoint's novelty entry, or ""."""
    if not isinstance(entry, dict) or entry.get("version") != NOVELTY_VERSION:
        return "not a novelty entry of this version"
    tensors = [entry.get(name) for name in ("mean", "scale", "projection", "bank", "z")]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "mean, scale, projection, bank and z must be tensors"
    mean, scale, projection, bank, z = tensors
    if not (mean.ndim == 1 and scale.shape == mean.shape and bool((scale > 0).all())
            and projection.ndim == 2 and bank.ndim == 2 and z.shape == (4,)
            and projection.shape == (len(mean), bank.shape[1])):
        return "its shapes do not fit together"
    labels = entry.get("bank_labels")
    if labels is not None and not (isinstance(labels, torch.Tensor) and labels.shape == (len(bank),)
                                   and not labels.is_floating_point()):
        return "bank_labels must be an integer tensor, one per bank photo"
    k, threshold = entry.get("k"), entry.get("threshold")
    if not (isinstance(k, int) and 1 <= k <= len(bank)):
        return f"k {k!r} is not between 1 and the bank's {len(bank)} photos"
    if not (isinstance(threshold, float) and np.isfinite(threshold)) or not bool(
            torch.isfinite(z).all() and (z[1::2] > 0).all()):
        return "its threshold or z-score references are not finite"
    return ""


def entry_bytes(entry):
    return sum(t.numel() * t.element_size() for t in entry.values() if isinstance(t, torch.Tensor))
