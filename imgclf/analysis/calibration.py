"""Whether the probabilities shown can be taken at their word: the expected calibration error
(ECE), the reliability diagram (report/calibration.png), and temperature scaling (Guo et al.
2017) fitted on held-out logits, corrected for the scale of the head it is applied to.

ECE here is the usual one: the photos binned by their top probability into BINS equal-width
bins, each bin's |accuracy - mean top probability| weighted by its share of the photos. It is
biased upward on few photos: ece_if_calibrated says what a perfectly calibrated model would
measure on the same photos (3.3% on flowers5's 868 test photos; docs/open_set.md).
matplotlib is imported inside the plotting function only.
"""
import numpy as np

BINS = 15
# Temperatures tried, log-spaced: a coarse-to-fine search needs no optimiser and cannot fail.
TEMPERATURES = np.exp(np.linspace(np.log(0.2), np.log(5.0), 161))
# Draws of ece_if_calibrated: its standard error is below 0.1 point from a few hundred photos.
NULL_DRAWS = 100


def reliability_bins(probs, labels, bins=BINS):
    """(count, mean confidence, accuracy) per bin of the top probability, as arrays."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    # bin i holds confidences in (i / bins, (i + 1) / bins]; a confidence of 0 goes to bin 0
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    total_conf = np.bincount(which, weights=confidence, minlength=bins)
    total_correct = np.bincount(which, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, total_conf / count, total_correct / count


def expected_calibration_error(probs, labels, bins=BINS):
    """The ECE of probabilities (photos, classes) against the true labels, in [0, 1]."""
    probs = np.asarray(probs, dtype=np.float64)
    return top_label_ece(probs.max(1), probs.argmax(1) == np.asarray(labels), bins)


def top_label_ece(confidence, correct, bins=BINS):
    """The ECE of top probabilities (photos,) against whether the top class was right."""
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.bincount(which, weights=confidence - correct, minlength=bins)
    return float(np.abs(gap).sum() / count.sum())


def ece_if_calibrated(probs, draws=NULL_DRAWS, seed=0):
    """The ECE that a perfectly calibrated model with these top probabilities would measure
    on this many photos (consistency resampling, Broecker and Smith 2007): the mean over draws
    in which each photo's top class is right with probability its top probability. The ECE of
    a few hundred photos is far above 0 even then (the bins' accuracies are noisy), so a
    measured ECE is read against this."""
    confidence = np.asarray(probs, dtype=np.float64).max(1)
    rng = np.random.default_rng(seed)
    return float(np.mean([top_label_ece(confidence, rng.random(len(confidence)) < confidence)
                          for _ in range(draws)]))


def softmax(logits, temperature=1.0):
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def log_loss(logits, labels, temperature=1.0):
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(1, keepdims=True)
    log_norm = np.log(np.exp(z - top).sum(1)) + top[:, 0]
    return float((log_norm - z[np.arange(len(z)), labels]).mean())


def fit_temperature(logits, labels, scale=1.0):
    """(temperature, ECE before, ECE after) from held-out logits: the temperature of their lowest
    log loss, times scale, for the head whose logits are scale times theirs (the out-of-fold
    logits come from heads fitted on fewer photos: linear_probe.out_of_fold_fits); the ECE of
    the held-out logits without and with their own temperature."""
    labels = np.asarray(labels, dtype=np.int64)
    best = min(TEMPERATURES, key=lambda t: log_loss(logits, labels, t))
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, best), labels)
    return float(best * scale), before, after


def plot_reliability(path, probs, labels, save, title="", bins=BINS):
    """The reliability diagram: accuracy against confidence per bin (bars), the diagonal of
    perfect calibration, and how many photos each bin holds (below). save(fig, path) writes."""
    from matplotlib import pyplot as plt
    count, confidence, accuracy = reliability_bins(probs, labels, bins)
    ece = expected_calibration_error(probs, labels, bins)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                      gridspec_kw=dict(height_ratios=[3, 1]))
    edges = np.linspace(0, 1, bins + 1)
    used = count > 0
    top.bar(edges[:-1][used], accuracy[used], width=1 / bins, align="edge", color="#4c72b0",
            edgecolor="white", label="accuracy of the photos in the bin")
    top.plot([0, 1], [0, 1], "--", color="#444444", label="perfect calibration")
    top.plot(confidence[used], accuracy[used], "o", color="#dd8452", markersize=4,
             label="mean top probability -> accuracy")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}expected calibration error {100 * ece:.1f}%", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(edges[:-1], count, width=1 / bins, align="edge", color="#999999",
               edgecolor="white")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("top probability (confidence)")
    bottom.set_ylabel("photos")
    save(fig, path)
    return ece
