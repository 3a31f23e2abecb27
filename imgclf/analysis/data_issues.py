"""What is wrong with the labels, found from the stored backbone features once the head is
fitted: photos of one split that are near-duplicates of photos of another, and photos that
look mislabelled. Written to SAVE_DIR/report/data_issues.csv and data_issues.png; --exclude
FILE (data/exclude.py) leaves the photos a user agrees are bad out of the next run.

- Near-duplicates: each valid and test photo's nearest photo of an earlier split (train; for
  test also valid) by cosine similarity of the plain view's features less the train mean,
  computed in blocks so that no all-pairs matrix is held. A pair at or above
  NEAR_DUPLICATE_COSINE is named. So is each pair the scan's perceptual hashes name
  (data_report.find_near_duplicates): the features of a small photo, shrunk and recompressed,
  move with its texture, which its hash ignores. A pair only the hash names scores
  1 - differing bits / 64 in place of a cosine.
- Label errors: confident learning (Northcutt et al. 2021, the method of cleanlab's
  find_label_issues with its defaults: prune by noise rate, ranked by self-confidence) on
  held-out probabilities of the logistic head, k-fold over train+valid at the view set and C
  cross-validation chose. Implemented here in some 60 lines rather than depending on cleanlab
  (which pulls pandas); tests/test_data_issues.py checks it flags what cleanlab flags.

Where the head's choice was cross-validated (every data set under 2,000 valid photos), its
folds' fits at the chosen view set and C are those k heads: the head keeps their held-out
probabilities and the step fits nothing. Otherwise (a choice made on a held-out set, or class
weights) the step fits the k heads itself. It changes neither the fitted head nor the random
streams training uses.
"""
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import data_report
from ..heads import linear_probe
from ..utils import atomic
from ..utils.text import plural
from . import plots

CSV_NAME = "data_issues.csv"
PNG_NAME = "data_issues.png"
CSV_COLUMNS = ("path", "issue", "other", "score")
# On features centred on the train split's mean: uncentred, what all photos share drowns what
# tells two apart. Chosen on planted copies (docs/data_issues.md).
NEAR_DUPLICATE_COSINE = 0.92
# Rows per block of the nearest-neighbour search: a 4096 x 4096 block of similarities is
# 64 MiB, whatever the size of the data set.
BLOCK = 4096
# (earlier split, later split): each later photo is compared with every earlier photo.
SPLIT_PAIRS = (("train", "valid"), ("train", "test"), ("valid", "test"))
FIT_SPLITS = ("train", "valid")


@dataclass
class Findings:
    """near_duplicates: [(earlier split's path, later split's path, cosine, or 1 - bits / 64
    where only the perceptual hash names them)], most similar first; labels: [(path, given
    class, suggested class, held-out probability of the given class)], most suspect first;
    seconds the search took."""
    near_duplicates: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Finding them
# ---------------------------------------------------------------------------------------------
def find_issues(stored, scan, head, seed=0, fit_features=None, device=None):
    """Findings over stored = {split: (features (photos, views, dim), labels)} in the order of
    scan.samples[split] (view 0 the plain view): label errors from out-of-fold probabilities of
    logistic heads with the view set and C of head (a linear_probe.Head fitted on train+valid),
    near-duplicates from view 0. fit_features: train's and valid's features joined, where the
    caller holds them so (else they are joined here, a copy); device: where the fits run (the
    features' by default). The cross-validation's held-out logits, where head keeps them
    (head.held_out_logits), are used as they are: no fit."""
    started = time.monotonic()
    for split, (_, labels) in stored.items():
        expected = [label for _, label in scan.samples[split]]
        if not np.array_equal(np.asarray(labels), expected):
            raise RuntimeError(f"the {split} features are not in the order of the scan")
    findings = Findings()
    plain = {split: x[:, 0] for split, (x, _) in stored.items()}
    paths = {split: [p for p, _ in scan.samples[split]] for split in stored}
    findings.near_duplicates = with_hash_pairs(near_duplicates(plain, paths),
                                               data_report.find_near_duplicates(scan))
    fit = [s for s in FIT_SPLITS if s in stored]
    y = np.concatenate([np.asarray(stored[s][1]) for s in fit])
    x = fit_features
    if x is None and linear_probe.kept_logits(head, len(y), len(scan.classes)) is None:
        # joined only where a fit needs them
        x = torch.cat([stored[s][0] for s in fit])
    probs = out_of_fold_probs(x, y, len(scan.classes), head, seed, device=device)
    findings.labels = label_issues(probs, y, [p for s in fit for p in paths[s]], scan.classes)
    findings.seconds = time.monotonic() - started
    return findings


def find_issues_in_rows(stored, views, scan, seed=0):
    """find_issues over the AdamW head's stored rows, {split: (rows, labels)}: each photo's
    plain view, then views.get(split, 0) augmented views. The logistic head that gives the
    held-out probabilities learns from the plain views, its C chosen by cross-validation as
    the default head's is (the cost of the default head's choice, on one view set)."""
    started = time.monotonic()
    photos = {}
    for split, (rows, labels) in stored.items():
        per_photo = 1 + views.get(split, 0)
        plain = torch.from_numpy(np.asarray(rows[::per_photo], dtype=np.float32))
        photos[split] = plain[:, None], np.asarray(labels[::per_photo])
    fit = [s for s in FIT_SPLITS if s in photos]
    head, _ = linear_probe.choose_and_fit(
        torch.cat([photos[s][0] for s in fit]), np.concatenate([photos[s][1] for s in fit]),
        len(scan.classes), [linear_probe.PLAIN], seed)
    findings = find_issues(photos, scan, head, seed)
    findings.seconds = time.monotonic() - started
    return findings


def near_duplicates(plain, paths, threshold=NEAR_DUPLICATE_COSINE):
    """[(earlier path, later path, cosine)] of the split pairs present, most similar first:
    each later photo with its nearest earlier photo, where the cosine of their features, less
    the train split's mean, reaches threshold."""
    pairs = []
    mean = column_mean(plain["train"])
    for earlier, later in SPLIT_PAIRS:
        if earlier not in plain or later not in plain:
            continue
        best, cosine = nearest_neighbours(plain[later], plain[earlier], mean)
        for i in np.flatnonzero(cosine >= threshold):
            pairs.append((paths[earlier][best[i]], paths[later][i], float(cosine[i])))
    return sorted(pairs, key=lambda pair: -pair[2])


def with_hash_pairs(feature_pairs, hash_pairs):
    """The union of the pairs the features name, [(earlier, later, cosine)], and those the
    scan's perceptual hashes name, [(earlier, later, differing bits)]: a pair only the hash
    names scores 1 - bits / 64 (1 for an identical hash). Most similar first."""
    pairs = {(earlier, later): score for earlier, later, score in feature_pairs}
    for earlier, later, bits in hash_pairs:
        pairs.setdefault((earlier, later), 1 - bits / 64)
    return sorted(((a, b, score) for (a, b), score in pairs.items()), key=lambda p: -p[2])


def nearest_neighbours(queries, references, center=0.0, block=BLOCK):
    """For each query row, the index of the reference row of highest cosine similarity (of
    the rows less center) and that similarity; both sliceable (rows, dim), compared block by
    block."""
    best = np.zeros(len(queries), np.int64)
    cosine = np.full(len(queries), -np.inf, np.float32)
    for q in range(0, len(queries), block):
        query = _unit_rows(queries[q:q + block], center)
        top, where = torch.full((len(query),), -np.inf), torch.zeros(len(query), dtype=torch.long)
        for r in range(0, len(references), block):
            value, index = (query @ _unit_rows(references[r:r + block], center).T).max(1)
            better = value > top
            top[better], where[better] = value[better], index[better] + r
        cosine[q:q + block], best[q:q + block] = top.numpy(), where.numpy()
    return best, cosine


def _unit_rows(rows, center=0.0):
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.float32) - center
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)


def column_mean(rows, block=BLOCK):
    """The mean row of sliceable (rows, dim), summed block by block."""
    total = sum(torch.as_tensor(np.asarray(rows[i:i + block]), dtype=torch.float64).sum(0)
                for i in range(0, len(rows), block))
    return (total / len(rows)).float()


def out_of_fold_probs(photos, labels, num_classes, head, seed=0, k=linear_probe.FOLDS,
                      device=None):
    """Held-out probabilities (photos, classes): the softmax of linear_probe.held_out_logits
    (each photo's from a head with head's view set and C fitted on the other folds: those the
    cross-validation kept, else out_of_fold_fits', then kept on head). The fits run on
    device."""
    if k != linear_probe.FOLDS:  # other folds than the cross-validation's
        logits = linear_probe.out_of_fold_logits(photos, labels, num_classes, head, seed, k,
                                                 device)
    else:
        logits = linear_probe.held_out_logits(photos, labels, num_classes, head, seed, device)
    return torch.softmax(logits, 1).numpy()


def label_issues(probs, labels, paths, classes):
    """[(path, given class, suggested class, held-out probability of the given class)] of the
    photos confident learning flags, most suspect (lowest probability) first."""
    labels = np.asarray(labels)
    flagged = find_label_issues(labels, probs)
    self_confidence = probs[np.arange(len(labels)), labels]
    order = flagged[np.argsort(self_confidence[flagged], kind="stable")]
    suggested = probs.argmax(1)
    return [(paths[i], classes[labels[i]], classes[suggested[i]], float(self_confidence[i]))
            for i in order]


# ---------------------------------------------------------------------------------------------
# Confident learning (cleanlab.filter.find_label_issues, filter_by="prune_by_noise_rate")
# ---------------------------------------------------------------------------------------------
def find_label_issues(labels, probs):
    """Indices (ascending) of the photos whose given label confident learning doubts.

    A photo counts confidently as class j where its probability of j reaches class j's
    threshold, the mean probability of j over the photos labelled j (the most probable such
    class if several do). Those counts (the confident joint of given and true class),
    calibrated to the class sizes, say how many photos of each given class truly belong to
    each other class; that many are flagged, those with the largest margin p(j) - p(given).
    A photo whose most probable class is its given one is never flagged."""
    num_classes = probs.shape[1]
    joint = confident_joint(labels, probs)
    prune = _keep_one_per_class(joint.T)
    flagged = np.zeros(len(labels), bool)
    for given in range(num_classes):
        members = np.flatnonzero(labels == given)
        if len(members) <= 1:  # cleanlab's min_examples_per_class
            continue
        for true in range(num_classes):
            count = prune[true, given]
            if true != given and count > 0:
                margin = probs[members, true] - probs[members, given]
                flagged[members[np.argsort(-margin, kind="stable")[:count]]] = True
    given_is_argmax = _argmax_favouring(probs, labels) == labels
    return np.flatnonzero(flagged & ~given_is_argmax)


def confident_joint(labels, probs):
    """(given, true) counts of confidently counted photos, calibrated: each row sums to its
    class's photos, the whole to the photos."""
    num_classes = probs.shape[1]
    counts = np.bincount(labels, minlength=num_classes)
    thresholds = np.array([probs[labels == k, k].mean() if counts[k] else 2.0
                           for k in range(num_classes)]).clip(min=2e-6)
    confident = probs >= thresholds - 1e-6
    above = confident.sum(1)
    guess = np.where(above > 1, probs.argmax(1), confident.argmax(1))
    kept = above > 0
    # Built (true, given) and transposed, as cleanlab builds it: the memory order decides the
    # order of the sums below, and a row of 4.5 and 1.5 rounds by their last bits.
    joint = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(joint, (guess[kept], labels[kept]), 1)
    joint = joint.T
    np.fill_diagonal(joint, joint.diagonal().clip(min=1))
    calibrated = (joint.T / joint.sum(1).clip(min=1e-100) * counts).T
    calibrated = calibrated / calibrated.sum().clip(min=1e-100) * counts.sum()
    return _round_rows(calibrated)


def _keep_one_per_class(prune):
    """cleanlab's _keep_at_least_n_per_class with n=1 on the (true, given) counts: a column's
    diagonal raised to 1 takes the difference evenly from the column's other entries."""
    diagonal = prune.diagonal()
    raised = np.maximum(diagonal, 1)
    others = np.maximum(np.count_nonzero(prune, axis=0) - 1.0, 1.0)
    out = (prune - (raised - diagonal) / others).clip(min=0)
    np.fill_diagonal(out, raised)
    return _round_rows(out.astype(int))


def _round_rows(matrix):
    """Each row rounded to integers that keep the row's (rounded) sum: the entries whose
    rounding lost most take the difference (cleanlab's round_preserving_row_totals)."""
    out = np.empty(matrix.shape, np.int64)
    for i, row in enumerate(np.asarray(matrix, float)):
        ints = row.round()
        diff = int(round(row.sum().round() - ints.sum()))
        if diff:
            step = 1 if diff > 0 else -1
            order = np.argsort(row - ints)[::-step][:abs(diff)]
            ints[order] += step
        out[i] = ints
    return out


def _argmax_favouring(probs, labels):
    """argmax of each row with the given label winning ties (within 1e-6)."""
    nudged = probs.copy()
    nudged[np.arange(len(labels)), labels] += 1e-6
    return nudged.argmax(1)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def write_report(save_dir, findings, names):
    """SAVE_DIR/report/data_issues.csv and .png, and the summary line; with no findings (the
    run did not look) the files of an earlier run are removed, as they describe other data."""
    out_dir = os.path.join(save_dir, "report")
    csv_path, png_path = os.path.join(out_dir, CSV_NAME), os.path.join(out_dir, PNG_NAME)
    if findings is None:
        atomic.remove_quietly(csv_path)
        atomic.remove_quietly(png_path)
        return None
    started = time.monotonic()
    write_csv(csv_path, findings)
    if findings.near_duplicates or findings.labels:
        plots.plot_data_issues(png_path, findings, names)
    else:
        atomic.remove_quietly(png_path)
    findings.seconds += time.monotonic() - started
    print(summary_line(findings, out_dir))
    return csv_path


def write_csv(path, findings):
    rows = [CSV_COLUMNS]
    rows += [[earlier, "near_duplicate", later, f"{cosine:.4f}"]
             for earlier, later, cosine in findings.near_duplicates]
    rows += [[path_i, "label", suggested, f"{confidence:.4f}"]
             for path_i, _, suggested, confidence in findings.labels]
    atomic.write_csv(path, rows, lineterminator="\n")


def summary_line(findings, out_dir):
    dups, labels = len(findings.near_duplicates), len(findings.labels)
    files = f"{out_dir}/{CSV_NAME}" + (f" and {PNG_NAME}" if dups or labels else "")
    return (f"data issues: {plural(dups, 'near-duplicate')} across splits, "
            f"{plural(labels, 'photo')} that look{'s' * (labels == 1)} mislabelled; see "
            f"{files}  [{findings.seconds:.1f}s]")
