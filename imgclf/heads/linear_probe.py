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
weakest, each fold's fit warm-started from its fit at the C before (or from the view set
before's fit at the same C), and a view set's path ends once its held-out loss has risen
twice. Those search fits stop at a looser tolerance (SEARCH_TOLERANCE); the (view set, C)
within REFINE_MARGIN of the best are then fitted again to the final fit's tolerance, so the
choice is made on the scores of exact fits. The held-out logits of the chosen fits are kept
for the search for label errors (data_issues.py) and the unknown verdict's calibration and
references (novelty.py), which then fit nothing. The fit itself is logistic.py's.

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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# The fit and the head (logistic.py): callers reach them through this module.
from .logistic import (CHUNK_VALUES, FOLDS, TOLERANCE, Head, Standardizer,  # noqa: F401
                       chunk_rows, chunked_moments, fit_logistic)

# The view sets and their rows (views.py): callers reach them through this module.
from .views import (AUG_VIEWS, MIRRORED, PLAIN, ViewSet, augmented, candidates,  # noqa: F401
                    training_rows)

# The inverse L2 strengths tried, in half-decade steps (scikit-learn's C: C times the summed
# loss plus half the squared weights). Features are standardised first, so one grid serves
# every backbone.
C_GRID = tuple(10.0 ** (k / 2) for k in range(-6, 3))  # 0.001 ... 10
# From this many held-out photos on, C and the views are chosen on a held-out set along a
# warm-started path rather than by cross-validation (docs/scaling.md, "The head").
HOLDOUT_MIN_PHOTOS = 2000
# The path stops once the held-out loss has risen this many times in a row: weaker L2 only
# overfits more, and the weakest fits are the slowest. Cross-validation's paths stop so too.
PATH_PATIENCE = 2
# Fits whose features x classes pass this many values run on the process's threads; smaller
# ones on one (training.single_thread: their matrix products are too small to share).
MULTITHREAD_VALUES = 1 << 30
# The search along each view set's C path stops its fold fits here: 2x fewer passes over the
# rows; their held-out losses moved by at most 0.017 (2.2%), most at the weakest L2, by 0.003
# near the best C, on a 2,768-photo 15-class set (docs/design.md, "The head's cost").
SEARCH_TOLERANCE = 5e-4
# The searched (view set, C) whose held-out loss is within this share of the best are fitted
# again to TOLERANCE before the choice: every C that the search's looser fits could have
# ranked wrongly.
REFINE_MARGIN = 0.03
# From this many photos held_out_fits' 2 folds by L-BFGS-B to SEARCH_TOLERANCE (docs/scaling.md).
LARGE_SEARCH_PHOTOS = 20000
# The share of the available memory a fit may plan to use.
MEMORY_SHARE = 0.8


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
    """One view set's cross-validation along C: its standardised rows and their scaler, each
    fold's latest fit, and its fits at each C so far (the refits' and the next view set's
    starts)."""
    view_set: ViewSet
    rows: tuple  # (rows, labels, weights, folds) of training_rows, standardised, with folds
    photos: torch.Tensor  # standardised
    scaler: Standardizer
    fits: list
    by_c: dict = field(default_factory=dict)  # C: [each fold's (weight, bias)], standardised


def fold_path(photos, labels, view_set, folds, class_weight):
    rows, row_labels, row_weights = training_rows(photos, labels, view_set, class_weight)
    scaler = Standardizer(rows)
    row_folds = folds.repeat_interleave(len(view_set.train))
    return FoldPath(view_set, (scaler(rows), row_labels, row_weights, row_folds), scaler(photos),
                    scaler, [None] * (int(folds.max()) + 1))


def cross_validate(photos, labels, num_classes, view_sets, seed=0, grid=C_GRID, k=FOLDS,
                   class_weight=None, on_fit=None):
    """Held-out (mean log loss, accuracy) over k folds of photos for each (view set, C) fitted
    (validate_paths)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(photos.device)
    return validate_paths(photos, labels, num_classes, view_sets, seed, grid, k, class_weight,
                          on_fit)[0]


def validate_paths(photos, labels, num_classes, view_sets, seed=0, grid=C_GRID, k=FOLDS,
                   class_weight=None, on_fit=None):
    """({(view set, C): held-out (mean log loss, accuracy)}, {view set: (every photo's held-out
    logits at its best C, its fold heads' mean logit_spread)}) over k folds of photos. A
    photo's views stay in its fold; held-out photos are predicted as the view set predicts.
    Each view set's rows are
    standardised once with all their photos' statistics (no labels involved), and a fold's
    held-out rows get weight 0 rather than a copy of the matrix.

    Each view set's path (search_path) runs C from the strongest L2 to the weakest with fits
    stopped at SEARCH_TOLERANCE; the C whose held-out loss is within REFINE_MARGIN of the best
    so far are then fitted again to TOLERANCE, warm-started from those fits (refine): their
    scores and held-out logits are those of exact fits, as the final head's fit is exact.
    on_fit() is called after each fit."""
    folds = torch.from_numpy(photo_folds(labels.cpu().numpy(), k, seed)).to(photos.device)
    scores, logits, before, best = {}, {}, None, float("inf")
    for view_set in view_sets:  # one view set's standardised rows at a time
        path = fold_path(photos, labels, view_set, folds, class_weight)
        searched = search_path(path, labels, num_classes, grid, folds, on_fit, before)
        best = min(best, min(loss for loss, _ in searched.values()))
        logits[view_set] = refine(path, searched, best * (1 + REFINE_MARGIN), labels,
                                  num_classes, folds, on_fit)
        scores.update({(view_set, c): score for c, score in searched.items()})
        before, path.rows, path.photos = path, None, None  # its fits alone are kept
    return scores, logits


def search_path(path, labels, num_classes, grid, folds, on_fit=None, before=None):
    """{C: held-out (mean log loss, accuracy)} of path's fits at SEARCH_TOLERANCE, from the
    strongest L2 to the weakest, each fold's fit warm-started from its fit at the C before
    (or from the view set before's at the same C: view_starts); the path stops once its
    held-out loss has risen PATH_PATIENCE times in a row (weaker L2 only overfits more)."""
    scores, best, rises = {}, float("inf"), 0
    for c in sorted(grid):
        scores[c], _ = fit_folds(path, labels, num_classes, c, folds, on_fit,
                                 view_starts(before, path, c), SEARCH_TOLERANCE)
        best, rises = (scores[c][0], 0) if scores[c][0] < best else (best, rises + 1)
        if rises == PATH_PATIENCE:
            break
    return scores


def refine(path, scores, bound, labels, num_classes, folds, on_fit=None):
    """Fit again to TOLERANCE, from the search's fits, each C of scores whose held-out loss is
    at most bound (scores updated). (held-out logits, the fold heads' mean logit_spread over
    all photos) of the best of them (None if none): what out_of_fold_fits returns, fitted."""
    best, kept = float("inf"), None
    for c, (loss, _) in list(scores.items()):
        if loss > bound:
            continue
        scores[c], held = fit_folds(path, labels, num_classes, c, folds, on_fit, path.by_c[c],
                                    TOLERANCE)
        if scores[c][0] < best:
            spreads = [logit_spread(Head(*fit, path.view_set, c).logits(path.photos))
                       for fit in path.fits if fit is not None]
            best, kept = scores[c][0], (held, float(np.mean(spreads)))
    return kept


def view_starts(before, path, c):
    """Starts of path's folds at C: the view set before's fold fits at C (nearly the same
    rows, the same C: nearer the optimum than this view set's fits at the C before), moved to
    path's standardisation; None where that set's path did not reach C."""
    if before is None or c not in before.by_c:
        return None
    return [None if fit is None else restandardised(fit, before.scaler, path.scaler)
            for fit in before.by_c[c]]


def restandardised(fit, source, target):
    """A fit (weight, bias) on rows standardised by source, as the same head on rows
    standardised by target."""
    weight, bias = source.unscaled(*fit)
    return weight * target.scale, bias + weight @ target.mean


def fit_folds(path, labels, num_classes, c, folds, on_fit=None, starts=None,
              tolerance=TOLERANCE):
    """Fit each fold of path at C to tolerance, warm-started from starts[fold] where given,
    else from its fit at the C before, else (the first C) from zero: never from another fold's
    fit, which has seen this fold's photos (with random labels and C=100 that start gave 86%
    "held-out" accuracy, chance being 25%). ((mean log loss, accuracy), logits) held out;
    path's fits updated, and kept under path.by_c[C]."""
    rows, row_labels, row_weights, row_folds = path.rows
    logits = torch.zeros(len(labels), num_classes, device=labels.device)
    for fold, init in enumerate(path.fits):
        held = folds == fold
        if not held.any():
            continue
        if starts is not None and starts[fold] is not None:
            init = starts[fold]
        path.fits[fold] = fit_logistic(rows, row_labels, num_classes, c,
                                       row_weights * (row_folds != fold), init,
                                       tolerance=tolerance)
        logits[held] = Head(*path.fits[fold], path.view_set, c).logits(path.photos[held])
        if on_fit:
            on_fit()
    path.by_c[c] = list(path.fits)
    loss = F.cross_entropy(logits, labels, reduction="sum").item() / len(labels)
    return (loss, (logits.argmax(1) == labels).float().mean().item()), logits


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


def out_of_fold_fits(photos, labels, num_classes, head, seed=0, k=FOLDS, device=None,
                     solver="torch", tolerance=TOLERANCE, head_spread=None, exact=True):
    """(held-out logits (photos, classes), scale). Each photo's logits come from a head with
    head's view set and C fitted on the other folds of the cross-validation (a fold's rows get
    weight 0), started from zero: from head, which has seen the fold, they stopped at once and
    their "held-out" logits were head's own (100% out-of-fold accuracy, 89.6% on test). Rows
    stay as stored, the scaling folded in (its moments exact, or in float32 a chunk at a time:
    chunked_moments). scale: how much larger head's logits (head_spread,
    if given) are than the fold heads' on all photos: fitted on (k-1)/k of the photos, the fold
    heads are less confident, so a temperature learnt on their logits applies to head's
    logits times scale."""
    view_set, c = head.view_set, head.c
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    folds = torch.from_numpy(photo_folds(np.asarray(labels), k, seed))
    rows, row_labels, row_weights = training_rows(photos, labels_t, view_set)
    scaler = Standardizer.streamed(rows, num_classes, device, exact)
    row_folds = folds.repeat_interleave(len(view_set.train))
    logits, spreads = torch.zeros(len(labels_t), num_classes), []
    for fold in range(k):
        held = folds == fold
        if not held.any():
            continue
        fitted = fit_logistic(rows, row_labels, num_classes, c,
                              row_weights * (row_folds != fold).to(row_weights),
                              scaler=scaler, device=device, solver=solver, tolerance=tolerance)
        fold_logits = Head(*scaler.unscaled(*fitted), view_set, c).logits(photos, device).cpu()
        logits[held] = fold_logits[held]
        spreads.append(logit_spread(fold_logits))
    if head_spread is None:
        head_spread = logit_spread(head.logits(photos, device).cpu())
    return logits, spread_ratio(head_spread, float(np.mean(spreads)))


def spread_ratio(head_spread, fold_spread):
    """How much larger head's logits are than the fold heads': 1 where either does not vary
    (a backbone whose features are all alike, say): there is no scale to carry over."""
    return head_spread / fold_spread if head_spread > 0 and fold_spread > 0 else 1.0


def logit_spread(logits):
    """The root mean square of logits (photos, classes) about each photo's mean: their scale,
    which is what a temperature divides (a shift common to a photo's logits changes nothing)."""
    return float((logits - logits.mean(1, keepdim=True)).pow(2).mean().sqrt())


def held_out_logits(photos, labels, num_classes, head, seed=0, device=None):
    """Held-out logits (photos, classes) of head's view set and C, each photo's from a fit on
    the other folds: those head keeps (no fit, and photos may then be None), else
    held_out_fits'."""
    kept = kept_logits(head, len(labels), num_classes)
    if kept is not None:
        return kept
    return held_out_fits(photos, labels, num_classes, head, seed, device)[0]


def held_out_fits(photos, labels, num_classes, head, seed=0, device=None):
    """out_of_fold_fits' (held-out logits, scale): from what head's cross-validation kept (its
    fold heads' logits and spread: no fit here), else out_of_fold_fits', then kept on head (a
    choice made on a held-out set, class weights): the search for label errors and the unknown
    verdict both ask, and the k fits are made once."""
    kept = kept_logits(head, len(labels), num_classes)
    head_spread = logit_spread(head.logits(photos, device).cpu())
    if kept is None:
        kept, scale = out_of_fold_fits(photos, labels, num_classes, head, seed, device=device,
                                       head_spread=head_spread, **search_fits(len(labels)))
        head.held_out_logits, head.held_out_spread = kept.numpy(), head_spread / scale
        return kept, scale
    return kept, spread_ratio(head_spread, head.held_out_spread)


def search_fits(photos):
    """out_of_fold_fits' folds, solver and tolerance for held_out_fits on this many photos."""
    if photos < LARGE_SEARCH_PHOTOS:
        return {"k": FOLDS, "solver": "torch", "tolerance": TOLERANCE}
    return {"k": 2, "solver": "scipy", "tolerance": SEARCH_TOLERANCE, "exact": False}


def kept_logits(head, photos, num_classes):
    """head's cross-validation's held-out logits (a tensor) where it kept them for this many
    photos and classes, else None."""
    kept = head.held_out_logits
    if kept is None or kept.shape != (photos, num_classes):
        return None
    return torch.from_numpy(kept)


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
    # cross-validation: each searched fit, refitted at most once, then the final fit
    planned = 2 * len(view_sets) * len(C_GRID) * FOLDS + 1 if held is None else \
        len(C_GRID) + len(view_sets)
    fitted = (lambda: on_fit(planned)) if on_fit else None
    if held is None:
        photos = on_device(torch.as_tensor(photos, dtype=torch.float32), device)
        labels_t = labels_t.to(photos.device)
        if class_weight is not None:
            class_weight = class_weight.to(photos.device)
        scores, logits = validate_paths(photos, labels_t, num_classes, view_sets, seed,
                                        class_weight=class_weight, on_fit=fitted)
        view_set, c = min(scores, key=lambda key: scores[key][0])
        head = fit_head(photos, labels_t, num_classes, view_set, c, class_weight)
        if class_weight is None:  # out_of_fold_logits fits unweighted heads
            kept, head.held_out_spread = logits[view_set]
            head.held_out_logits = kept.cpu().numpy()
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
    joined), a pass's chunks, the weights with L-BFGS's history of them and the fold fits two
    view sets' cross-validation keeps (FoldPath.by_c), and the held-out logits of every photo
    that the head keeps (held_out_logits)."""
    features = 2 * photos * views * dim * 2
    chunks = 8 * CHUNK_VALUES * 4
    weights = (30 + 2 * len(C_GRID) * FOLDS) * num_classes * (dim + 1) * 4
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
