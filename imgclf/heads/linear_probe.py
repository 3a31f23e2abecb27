"""The default head: multinomial logistic regression on stored features, fitted by full-batch
L-BFGS, with its L2 strength and its training views chosen by cross-validation over train+valid.

This is the linear-probe protocol of the strongest published evaluations of pretrained features
(CLIP's among them): on stored feature rows a full-batch fit reaches the optimum of a convex
objective in seconds, so there is no learning rate, schedule or epoch count to tune. What is
left, the L2 strength C and which views of each photo the head learns from, is chosen on
held-out folds of train+valid: with 10 valid photos a class, a choice made on the valid split
alone is mostly noise. The final head is then fitted on train+valid, twice the photos of the
train split in the few-shot case.

The cross-validation does not fit what cannot win: C runs from the strongest L2 to the
weakest, each fold's fit warm-started from its fit at the C before, and a view set's path ends
once its held-out loss has risen twice. The held-out probabilities of the chosen fits are kept
for the search for label errors (data_issues.py), which then fits nothing.

Measured on five data sets (flowers and handwritten digits, 10 photos a class to 600; see
docs/design.md), against the AdamW head with early stopping this replaced: +3.3 points on
the mean, +5.2 on the few-shot sets.

Past a few thousand photos the cross-validation costs 45 fits or more per view set, and a
valid split of that size is enough to choose on: C is then chosen on the valid split (or, for
a fit on the train split alone, on a stratified fifth of it) along a regularisation path, from
the strongest L2 to the weakest, each fit warm-started from the one before and the path ended
once the held-out loss has risen twice; the head is then fitted on train+valid, warm-started
from the chosen fit. Those fits read the feature rows where they lie (float16 as stored,
never standardised into a copy: the scaling is folded into the weights) in chunks of rows, so
their memory is the stored features plus a few chunks, on the device the run uses.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# The view sets and their rows (views.py): callers reach them through this module.
from .views import (AUG_VIEWS, MIRRORED, PLAIN, ViewSet, augmented, candidates,  # noqa: F401
                    training_rows)

# The inverse L2 strengths tried, in half-decade steps (scikit-learn's C: C times the summed
# loss plus half the squared weights). Features are standardised first, so one grid serves
# every backbone.
C_GRID = tuple(10.0 ** (k / 2) for k in range(-6, 3))  # 0.001 ... 10
FOLDS = 5
# From this many held-out photos on, C and the views are chosen on a held-out set along a
# warm-started path rather than by cross-validation (docs/scaling.md, "The head").
HOLDOUT_MIN_PHOTOS = 2000
# The path stops once the held-out loss has risen this many times in a row: weaker L2 only
# overfits more, and the weakest fits are the slowest. Cross-validation's paths stop so too.
PATH_PATIENCE = 2
# Values per chunk of a pass over the rows (the chunk's float32 rows or its logits, whichever is
# wider): 64 MB, so a pass's memory does not grow with the rows.
CHUNK_VALUES = 1 << 24
# Fits whose features x classes pass this many values run on the process's threads; smaller
# ones on one (training.single_thread: their matrix products are too small to share).
MULTITHREAD_VALUES = 1 << 30
# The share of the available memory a fit may plan to use.
MEMORY_SHARE = 0.8


@dataclass
class Head:
    """A fitted head on raw features: logits = features @ weight.T + bias, averaged over
    view_set.test; plus what the choice found (its held-out loss and accuracy, and on what)."""
    weight: torch.Tensor
    bias: torch.Tensor
    view_set: ViewSet
    c: float
    cv_loss: float = float("nan")
    cv_acc: float = float("nan")
    held_out: str = f"{FOLDS} folds of train+valid"
    # (photos, classes): each photo's probabilities from the fold fit that held it out, at
    # the chosen view set and C (None where the choice was made on a held-out set, or with
    # class weights): what data_issues.py's search for label errors needs, fitted once.
    held_out_probs: np.ndarray = None

    def logits(self, photos, device=None):
        """Logits (photos, classes) of photos (photos, views, dim), averaged over the
        prediction views; computed a chunk of photos at a time, on device if given."""
        photos = torch.as_tensor(photos)
        device = device or self.weight.device
        weight, bias = self.weight.to(device), self.bias.to(device)
        out = torch.empty(len(photos), len(bias), device=device)
        step = chunk_rows(len(bias), photos.shape[-1])
        for start in range(0, len(photos), step):
            part = photos[start:start + step].to(device=device, dtype=torch.float32)
            out[start:start + step] = torch.stack([part[:, v] @ weight.T + bias
                                                   for v in self.view_set.test]).mean(0)
        return out


def chunk_rows(num_classes, width):
    """Rows per chunk of a pass, so that neither its rows nor its logits pass CHUNK_VALUES."""
    return max(256, CHUNK_VALUES // max(num_classes, width))


class Standardizer:
    """Per-feature mean and scale of the rows a head trains on. The floor on the scale (a
    thousandth of the largest) keeps near-constant features, which some augmented views have,
    from being blown up. Rows other than float32, or more than chunk of them, are summed a
    chunk at a time (in float64), never copied whole."""

    def __init__(self, rows, chunk=None):
        if rows.dtype == torch.float32 and (chunk is None or len(rows) <= chunk):
            self.mean, std = rows.mean(0), rows.std(0)
        else:
            self.mean, std = chunked_moments(rows, chunk or len(rows))
        self.scale = std + 1e-3 * std.max() + 1e-12

    def __call__(self, rows):
        return (rows - self.mean) / self.scale

    @classmethod
    def streamed(cls, rows, num_classes, device=None):
        """The scaler of rows that fit_logistic reads a chunk at a time (float16 as stored, say):
        summed in the chunks of its passes, on device (the rows' by default)."""
        return cls(rows, chunk_rows(num_classes, rows.shape[1])).to(device or rows.device)

    def to(self, device):
        self.mean, self.scale = self.mean.to(device), self.scale.to(device)
        return self

    def unscaled(self, weight, bias):
        """The same head on raw features: W (x - m) / s + b = (W / s) x + (b - W m / s)."""
        weight = weight / self.scale
        return weight, bias - weight @ self.mean


def chunked_moments(rows, chunk):
    """(mean, standard deviation) of each column of rows, float32, summed in float64 a chunk
    of rows at a time around the first chunk's mean (no cancellation of large offsets)."""
    shift = rows[:chunk].double().mean(0)
    total = torch.zeros_like(shift)
    squares = torch.zeros_like(shift)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk].double() - shift
        total += part.sum(0)
        squares += part.pow(2).sum(0)
    n = len(rows)
    mean = total / n
    var = (squares - n * mean.pow(2)) / max(n - 1, 1)
    return (mean + shift).float(), var.clamp(min=0).sqrt().float()


def fit_logistic(x, y, num_classes, c, sample_weight=None, init=None, max_iter=500,
                 scaler=None, device=None):
    """Weights (classes, features) and bias minimising the sample-weighted mean cross-entropy
    plus |W|^2 / (2 C n), n the summed weights: scikit-learn's objective divided by C n, the
    same optimum with gradients of a size L-BFGS handles well. init warm-starts from an earlier
    (weight, bias); rows of weight 0 take no part (held-out folds).

    With scaler, x is raw (float16 as stored, say) and the fit is the one on scaler(x): the
    scaling is folded into each pass, and the weights returned are those of the standardised
    rows. Each pass reads x a chunk of rows at a time (as float32, on device: x's own by
    default), so its memory does not grow with the rows."""
    device = torch.device(device) if device is not None else x.device
    w = torch.ones(len(y)) if sample_weight is None else sample_weight
    n = float(w.sum())
    w, y = (w / n).to(device), y.to(device)
    l2 = 1.0 / (2.0 * c * n)
    weight = torch.zeros(num_classes, x.shape[1]) if init is None else init[0].clone()
    bias = torch.zeros(num_classes) if init is None else init[1].clone()
    weight = weight.to(device).requires_grad_(True)
    bias = bias.to(device).requires_grad_(True)
    step = chunk_rows(num_classes, x.shape[1])
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=10,
                                  tolerance_grad=1e-4, tolerance_change=1e-9,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = 0.0
        for start in range(0, len(y), step):
            stop = start + step
            rows = x[start:stop].to(device=device, dtype=torch.float32)
            weight_x, bias_x = (weight, bias) if scaler is None else \
                scaler.unscaled(weight, bias)
            ce = F.cross_entropy(torch.addmm(bias_x, rows, weight_x.T), y[start:stop],
                                 reduction="none")
            part = (w[start:stop] * ce).sum()
            part.backward()  # the chunk's graph goes now: memory of one chunk at a time
            loss = loss + part.detach()
        penalty = l2 * weight.pow(2).sum()
        penalty.backward()
        return loss + penalty.detach()

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def photo_folds(labels, k, seed):
    """A fold number for each photo, stratified: each class's photos are dealt round the folds
    in a random order, starting where the previous class stopped."""
    rng = np.random.default_rng(seed)
    folds, offset = np.empty(len(labels), np.int64), 0
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        folds[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    return folds


@dataclass
class FoldPath:
    """One view set's cross-validation along C: its standardised rows, each fold's latest fit,
    every photo's held-out probabilities at the best C so far, and how often the held-out loss
    has risen since."""
    view_set: ViewSet
    rows: tuple  # (rows, labels, weights, folds) of training_rows, standardised, with folds
    photos: torch.Tensor  # standardised
    fits: list
    best: float = float("inf")
    rises: int = 0
    probs: torch.Tensor = None


def fold_path(photos, labels, view_set, folds, class_weight):
    rows, row_labels, row_weights = training_rows(photos, labels, view_set, class_weight)
    scaler = Standardizer(rows)
    row_folds = folds.repeat_interleave(len(view_set.train))
    return FoldPath(view_set, (scaler(rows), row_labels, row_weights, row_folds), scaler(photos),
                    [None] * (int(folds.max()) + 1))


def cross_validate(photos, labels, num_classes, view_sets, seed=0, grid=C_GRID, k=FOLDS,
                   class_weight=None, on_fit=None):
    """Held-out (mean log loss, accuracy) over k folds of photos for each (view set, C) fitted
    (validate_paths)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(photos.device)
    return validate_paths(photos, labels, num_classes, view_sets, seed, grid, k, class_weight,
                          on_fit)[0]


def validate_paths(photos, labels, num_classes, view_sets, seed=0, grid=C_GRID, k=FOLDS,
                   class_weight=None, on_fit=None):
    """({(view set, C): held-out (mean log loss, accuracy)}, {view set: every photo's held-out
    probabilities at its best C}) over k folds of photos. A photo's views stay in its fold;
    held-out photos are predicted as the view set predicts. Each view set's rows are
    standardised once with all their photos' statistics (no labels involved), and a fold's
    held-out rows get weight 0 rather than a copy of the matrix. C runs from the strongest L2
    to the weakest, each fold's fit warm-started from its fit at the C before (so each score
    is the one fitting every C gave), and a view set's path stops once its held-out loss has
    risen PATH_PATIENCE times in a row (weaker L2 only overfits more). on_fit() is called
    after each fit."""
    folds = torch.from_numpy(photo_folds(labels.cpu().numpy(), k, seed)).to(photos.device)
    scores, probs = {}, {}
    for view_set in view_sets:  # one view set's standardised rows at a time
        path = fold_path(photos, labels, view_set, folds, class_weight)
        for c in sorted(grid):
            scores[view_set, c] = fit_folds(path, labels, num_classes, c, folds, on_fit)
            if path.rises == PATH_PATIENCE:
                break
        probs[view_set] = path.probs
    return scores, probs


def fit_folds(path, labels, num_classes, c, folds, on_fit=None):
    """Fit each fold of path at C; its held-out (mean log loss, accuracy), and path updated."""
    rows, row_labels, row_weights, row_folds = path.rows
    logits = torch.zeros(len(labels), num_classes, device=labels.device)
    for fold, init in enumerate(path.fits):
        held = folds == fold
        if not held.any():
            continue
        path.fits[fold] = fit_logistic(rows, row_labels, num_classes, c,
                                       row_weights * (row_folds != fold), init)
        logits[held] = Head(*path.fits[fold], path.view_set, c).logits(path.photos[held])
        if on_fit:
            on_fit()
    loss = F.cross_entropy(logits, labels, reduction="sum").item() / len(labels)
    if loss < path.best:
        path.best, path.rises, path.probs = loss, 0, torch.softmax(logits, 1)
    else:
        path.rises += 1
    return loss, (logits.argmax(1) == labels).float().mean().item()


@dataclass
class Holdout:
    """The photos a choice is made on, and the fits that leave them out: the first `fit`
    photos, of which those where `mask` is False get weight 0 (a held-out fold)."""
    photos: np.ndarray  # indices
    fit: int
    mask: torch.Tensor = None
    name: str = ""


def holdout(labels, valid, seed, k=FOLDS):
    """What to choose C and the views on: the valid split (the last `valid` photos) when it
    holds HOLDOUT_MIN_PHOTOS, else a stratified fold of all photos when that does; None (cross-
    validation) for smaller data sets, where a held-out set that small is mostly noise."""
    n = len(labels)
    if valid >= HOLDOUT_MIN_PHOTOS:
        return Holdout(np.arange(n - valid, n), n - valid, name=f"the valid split's {valid} photos")
    if n >= k * HOLDOUT_MIN_PHOTOS:
        folds = torch.from_numpy(photo_folds(np.asarray(labels), k, seed))
        held = np.flatnonzero(folds.numpy() == 0)
        return Holdout(held, n, folds != 0, name=f"a held-out fifth's {len(held)} photos")
    return None


def held_out_score(head, photos, labels, index, device=None):
    """(mean log loss, accuracy) of head on photos[index], a chunk at a time."""
    step = chunk_rows(len(head.bias), photos.shape[-1])
    loss, correct = 0.0, 0
    for start in range(0, len(index), step):
        part = torch.as_tensor(index[start:start + step])
        logits = head.logits(photos[part.to(photos.device)], device)
        truth = labels[part].to(logits.device)
        loss += F.cross_entropy(logits, truth, reduction="sum").item()
        correct += (logits.argmax(1) == truth).sum().item()
    return loss / len(index), correct / len(index)


def holdout_path(photos, labels, num_classes, view_set, held, grid=C_GRID, class_weight=None,
                 device=None, on_fit=None, starts=None):
    """({C: held-out (loss, accuracy)}, {C: the fit's (weight, bias), standardised}) along
    the path from the strongest L2 to the weakest, each fit warm-started from the one before,
    or from starts[C] (another view set's fit: the same C on nearly the same rows is closer);
    it stops once the held-out loss has risen PATH_PATIENCE times in a row."""
    rows, row_labels, row_weights = training_rows(photos[:held.fit], labels[:held.fit],
                                                  view_set, class_weight)
    if held.mask is not None:
        row_weights = row_weights * held.mask.repeat_interleave(len(view_set.train))
    scaler = Standardizer.streamed(rows, num_classes, device)
    scores, fits, best, rises, init = {}, {}, float("inf"), 0, None
    for c in sorted(grid):
        init = fit_logistic(rows, row_labels, num_classes, c, row_weights,
                            (starts or {}).get(c, init), scaler=scaler, device=device)
        fits[c] = init
        scores[c] = held_out_score(Head(*scaler.unscaled(*init), view_set, c), photos, labels,
                                   held.photos, device)
        if on_fit:
            on_fit()
        best, rises = (scores[c][0], 0) if scores[c][0] < best else (best, rises + 1)
        if rises == PATH_PATIENCE:
            break
    return scores, fits


def out_of_fold_logits(photos, labels, num_classes, head, seed=0, k=FOLDS, device=None):
    """Held-out logits (photos, classes): out_of_fold_fits' logits."""
    return out_of_fold_fits(photos, labels, num_classes, head, seed, k, device)[0]


def out_of_fold_fits(photos, labels, num_classes, head, seed=0, k=FOLDS, device=None):
    """(held-out logits (photos, classes), scale). Each photo's logits come from a head with
    head's view set and C fitted on the other folds of the cross-validation (a fold's rows get
    weight 0 rather than a copy of the matrix), warm-started from head, which is near every
    fold's optimum. The rows stay as stored (float16, say): the fits fold the scaling in a chunk
    at a time. scale: how much larger head's logits are than the fold heads' on the same
    photos (all of them; logit_spread's ratio): fitted on (k-1)/k of the photos with the same
    C, the fold heads are less confident than head, the more so the fewer the photos, so what
    is learnt from their held-out logits (a temperature) applies to head's logits times scale."""
    view_set, c = head.view_set, head.c
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    folds = torch.from_numpy(photo_folds(np.asarray(labels), k, seed))
    rows, row_labels, row_weights = training_rows(photos, labels_t, view_set)
    scaler = Standardizer.streamed(rows, num_classes, device)
    row_folds = folds.repeat_interleave(len(view_set.train))
    weight, bias = head.weight.to(scaler.scale.device), head.bias.to(scaler.scale.device)
    start = weight * scaler.scale, bias + weight @ scaler.mean
    logits, spreads = torch.zeros(len(labels_t), num_classes), []
    for fold in range(k):
        held = folds == fold
        if not held.any():
            continue
        fitted = fit_logistic(rows, row_labels, num_classes, c,
                              row_weights * (row_folds != fold).to(row_weights), start,
                              scaler=scaler, device=device)
        fold_logits = Head(*scaler.unscaled(*fitted), view_set, c).logits(photos, device).cpu()
        logits[held] = fold_logits[held]
        spreads.append(logit_spread(fold_logits))
    return logits, logit_spread(head.logits(photos, device).cpu()) / float(np.mean(spreads))


def logit_spread(logits):
    """The root mean square of logits (photos, classes) about each photo's mean: their scale,
    which is what a temperature divides (a shift common to a photo's logits changes nothing)."""
    return float((logits - logits.mean(1, keepdim=True)).pow(2).mean().sqrt())


def fit_head(photos, labels, num_classes, view_set, c, class_weight=None, init=None,
             device=None, streamed=False):
    """The head fitted on every photo given, with the given view set and C, on raw features
    (returned on the CPU). streamed: the rows are read where they lie, the scaling folded into
    the fit, on device (for large data; init then warm-starts it from an earlier standardised
    fit)."""
    rows, row_labels, row_weights = training_rows(
        photos, torch.as_tensor(labels, dtype=torch.long), view_set, class_weight)
    if streamed:
        scaler = Standardizer.streamed(rows, num_classes, device)
        weight, bias = fit_logistic(rows, row_labels, num_classes, c, row_weights, init,
                                    scaler=scaler, device=device)
    else:
        scaler = Standardizer(rows)
        weight, bias = fit_logistic(scaler(rows), row_labels, num_classes, c, row_weights,
                                    init)
    weight, bias = scaler.unscaled(weight, bias)
    return Head(weight.cpu(), bias.cpu(), view_set, c)


def choose_and_fit(photos, labels, num_classes, view_sets, seed=0, class_weight=None, valid=0,
                   device=None, on_fit=None):
    """Choose (view set, C) by the lowest held-out log loss (a tie keeps the earlier view set
    and the stronger regularisation), then fit the head with them on all photos. The choice is
    made by cross-validation, or on a held-out set where one is large enough (holdout(): the
    last `valid` photos are the valid split). class_weight (classes,) weighs each class's
    photos in the fits (--balance). device: where the fits run (default: the photos'), the head
    returned is on the CPU. on_fit(planned) is called after each fit, planned the most fits
    there will be (a path that stops early makes fewer)."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    held = holdout(np.asarray(labels), valid, seed)
    planned = len(view_sets) * len(C_GRID) * FOLDS + 1 if held is None else \
        len(C_GRID) + len(view_sets)
    fitted = (lambda: on_fit(planned)) if on_fit else None
    if held is None:
        photos = on_device(torch.as_tensor(photos, dtype=torch.float32), device)
        labels_t = labels_t.to(photos.device)
        if class_weight is not None:
            class_weight = class_weight.to(photos.device)
        scores, probs = validate_paths(photos, labels_t, num_classes, view_sets, seed,
                                       class_weight=class_weight, on_fit=fitted)
        view_set, c = min(scores, key=lambda key: scores[key][0])
        head = fit_head(photos, labels_t, num_classes, view_set, c, class_weight)
        if class_weight is None:  # the search for label errors fits unweighted heads
            head.held_out_probs = probs[view_set].cpu().numpy()
        held_out = Head.held_out
    else:
        photos = on_device(torch.as_tensor(photos), device)
        scores, fits, grid, starts = {}, {}, C_GRID, None
        for view_set in view_sets:
            path_scores, path_fits = holdout_path(photos, labels_t, num_classes, view_set, held,
                                                  grid, class_weight, device, fitted, starts)
            scores.update({(view_set, c): score for c, score in path_scores.items()})
            fits.update({(view_set, c): fit for c, fit in path_fits.items()})
            # The other view sets at the first's C alone (each photo weighs 1 whatever its
            # views, so C means the same for all), warm-started from its fit.
            if starts is None:
                best = min(path_scores, key=lambda c: path_scores[c][0])
                grid, starts = (best,), {best: path_fits[best]}
        view_set, c = min(scores, key=lambda key: scores[key][0])
        head = fit_head(photos, labels_t, num_classes, view_set, c, class_weight,
                        init=fits[view_set, c], device=device, streamed=True)
        held_out = held.name
    if fitted:
        fitted()
    head.cv_loss, head.cv_acc = scores[view_set, c]
    head.held_out = held_out
    return head, scores


def on_device(photos, device):
    """photos on device if given and there is room for them there (half the free memory of a
    GPU); else where they are, and the fits stream chunks of them to the device."""
    if device is None or torch.device(device) == photos.device:
        return photos
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if photos.element_size() * photos.numel() > free // 2:
            return photos
    return photos.to(device)


def choice_line(head, scores, seconds=None):
    """What was chosen and why, in one line (ending with the seconds it took, if given)."""
    others = {}
    for (view_set, c), (loss, _) in scores.items():
        if view_set != head.view_set and loss < others.get(view_set.name, float("inf")):
            others[view_set.name] = loss
    rest = "; ".join(f"{name} {loss:.3f}" for name, loss in others.items())
    took = f" {seconds:.1f}s" if seconds is not None else ""
    return (f"head: logistic regression on {head.view_set.name}, C={head.c:.3g} (held-out loss "
            f"{head.cv_loss:.3f}, accuracy {100 * head.cv_acc:.1f}% over {head.held_out}"
            + (f"; best of {rest}" if rest else "") + ")" + took)


def fit_memory(photos, views, dim, num_classes):
    """Bytes a fit of the head needs, about: its photos' float16 features twice (as read and
    joined), a pass's chunks, the weights with L-BFGS's history of them, and the held-out
    probabilities of every photo that data_issues.py's search for label errors keeps."""
    features = 2 * photos * views * dim * 2
    chunks = 8 * CHUNK_VALUES * 4
    weights = 30 * num_classes * (dim + 1) * 4
    probabilities = photos * num_classes * 4
    return features + chunks + weights + probabilities


def available_memory():
    """MEMORY_SHARE of the memory the system can give without swapping (MemAvailable of
    /proc/meminfo; where there is none, no bound)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(MEMORY_SHARE * int(fields["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        return float("inf")
