"""The evaluation report and the pictures people look at instead of reading numbers.

write_report: accuracy, top-5 accuracy and per-class precision/recall/F1 (report.txt and
metrics.json), every prediction (predictions.csv), the confusion matrix (confusion_matrix.png),
the most confident mistakes (mistakes.png, each with its heatmap: analysis/heatmaps.py) and,
given a training history, the training curves (curves.png). plot_predictions draws
predict.py's --plot; plot_data_issues the suspect labels and near-duplicates of data_issues.py.

matplotlib is imported inside the plotting functions only, with the Agg backend (files, no
window): predicting one photo never pays for it.
"""
import json
import math
import numbers
import os
import textwrap
import time

import numpy as np

from ..data import decode
from . import calibration
from . import heatmaps
from ..utils import atomic

MISTAKES_SHOWN = 24
REPORT_FILES = dict(text="report.txt", json="metrics.json", predictions="predictions.csv",
                    confusion="confusion_matrix.png", mistakes="mistakes.png",
                    curves="curves.png", calibration="calibration.png")


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------
def compute_metrics(probs, labels, num_classes):
    """Accuracy, top-5 accuracy, the confusion matrix and per-class precision/recall/F1."""
    probs, labels = np.asarray(probs), np.asarray(labels, dtype=np.int64)
    pred = probs.argmax(1)
    k = min(5, num_classes)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    hits = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = _ratio(hits, predicted)  # a class never predicted scores 0, as in scikit-learn
    recall = _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = support > 0  # macro averages over the classes the data has
    return dict(images=int(len(labels)), accuracy=float((pred == labels).mean()),
                top5_accuracy=float((top == labels[:, None]).any(1).mean()),
                macro=dict(precision=float(precision[present].mean()),
                           recall=float(recall[present].mean()), f1=float(f1[present].mean())),
                precision=precision, recall=recall, f1=f1, support=support,
                confusion=confusion, predicted=pred)


def _ratio(a, b):
    return np.divide(a, b, out=np.zeros(len(a)), where=b > 0)


def report_text(metrics, names):
    m = metrics
    width = max([len(n) for n in names] + [9])
    lines = [f"images {m['images']}   accuracy {100 * m['accuracy']:.1f}%   "
             f"top-5 accuracy {100 * m['top5_accuracy']:.1f}%", "",
             f"{'class':<{width}}  precision  recall     f1  support"]
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}}  {m['precision'][i]:9.3f}  {m['recall'][i]:6.3f}  "
                     f"{m['f1'][i]:5.3f}  {m['support'][i]:7d}")
    macro = m["macro"]
    lines.append(f"{'macro avg':<{width}}  {macro['precision']:9.3f}  {macro['recall']:6.3f}  "
                 f"{macro['f1']:5.3f}  {m['images']:7d}")
    return lines


def metrics_document(metrics, classes, names):
    m = metrics
    return {
        "images": m["images"], "accuracy": m["accuracy"],
        "top5_accuracy": m["top5_accuracy"], "macro": m["macro"],
        "per_class": [{"class": c, "name": names[i], "precision": float(m["precision"][i]),
                       "recall": float(m["recall"][i]), "f1": float(m["f1"][i]),
                       "support": int(m["support"][i])} for i, c in enumerate(classes)],
        "confusion_matrix": {"rows": "true class", "columns": "predicted class",
                             "classes": list(classes), "counts": m["confusion"].tolist()},
    }


def confident_mistakes(probs, labels, limit=MISTAKES_SHOWN):
    """Indices of the wrong predictions, the most confident first."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    order = np.argsort(-probs[wrong, pred[wrong]], kind="stable")
    return wrong[order][:limit].tolist()


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def write_report(out_dir, probs, labels, classes, names, image_paths, history=None,
                 predictor=None, tta=False, novelty=None, threshold=None):
    """Write the report files into out_dir; return its metrics and the files written.
    predictor (a checkpoint's, see app/inference.py): draws each mistake's heatmap (tta: as
    predicted with predict.py --tta). With novelty (photos,) and its threshold, the report
    also counts the photos that the unknown verdict would call unknown."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    metrics = evaluation_metrics(probs, labels, len(classes), novelty, threshold)
    files = {key: os.path.join(out_dir, name) for key, name in REPORT_FILES.items()}
    if not history:
        files.pop("curves")
    os.makedirs(out_dir, exist_ok=True)
    atomic.write_text(files["text"], "\n".join(report_text(metrics, names)
                                                + open_set_lines(metrics)) + "\n")
    atomic.write_text(files["json"], json.dumps(
        evaluation_document(metrics, classes, names), indent=2) + "\n")
    calibration.plot_reliability(files["calibration"], probs, labels, _save,
                                 title=f"{len(labels)} photos: ")
    write_predictions_csv(files["predictions"], probs, labels, names, image_paths)
    plot_confusion(files["confusion"], metrics["confusion"], names)
    mistakes = [(image_paths[i], names[labels[i]], names[metrics["predicted"][i]],
                 float(probs[i].max())) for i in confident_mistakes(probs, labels)]
    wrong = int((metrics["predicted"] != labels).sum())
    maps = heatmaps.mistake_heatmaps(predictor, [m[0] for m in mistakes], tta)
    plot_mistakes(files["mistakes"], mistakes, wrong, len(labels), maps,
                  predictor.preprocess["crop_pct"] if maps else None)
    if history:
        plot_curves(history, files["curves"])
    return dict(metrics=metrics, names=list(names), files=files)


def open_set_lines(metrics):
    """report.txt's lines on calibration and the unknown verdict."""
    lines = ["", f"expected calibration error {100 * metrics['ece']:.1f}% (15 bins of the top "
                 f"probability; calibration.png)"]
    unknown = metrics.get("unknown")
    if unknown:
        lines.append(f"called unknown at threshold {unknown['threshold']:.2f}: "
                     f"{unknown['count']} of {metrics['images']} photos "
                     f"({100 * unknown['share']:.1f}%)")
    return lines


def evaluation_metrics(probs, labels, num_classes, novelty=None, threshold=None):
    """compute_metrics, the expected calibration error, and with novelty (photos,) and its
    threshold how many photos the unknown verdict calls unknown."""
    metrics = compute_metrics(probs, labels, num_classes)
    metrics["ece"] = calibration.expected_calibration_error(probs, labels)
    if novelty is not None and threshold is not None:
        called = np.asarray(novelty, dtype=np.float64) > threshold
        metrics["unknown"] = dict(threshold=float(threshold), count=int(called.sum()),
                                  share=float(called.mean()))
    return metrics


def evaluation_document(metrics, classes, names):
    """metrics.json: the metrics, the calibration error and the unknown count."""
    return {**metrics_document(metrics, classes, names), **open_set_document(metrics)}


def open_set_document(metrics):
    document = {"ece": metrics["ece"]}
    if metrics.get("unknown"):
        document["unknown"] = metrics["unknown"]
    return document


def write_predictions_csv(path, probs, labels, names, image_paths):
    rows = [["image", "true", "predicted", "probability", "correct"]]
    for path_i, p, label in zip(image_paths, probs, labels):
        best = int(p.argmax())
        rows.append([path_i, names[label], names[best], f"{p[best]:.4f}", int(best == label)])
    atomic.write_csv(path, rows)


HISTORY_CSV = "history.csv"
HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "valid_acc")
# Written where the history has them: the learning rate at the epoch's end, its duration
HISTORY_OPTIONAL_COLUMNS = ("learning_rate", "seconds")


def write_history_csv(save_dir, history):
    """SAVE_DIR/history.csv: one row per epoch, as Keras' CSVLogger writes. A run without
    epochs (a head fitted in one go) writes none, and removes the one of an earlier run, which
    would describe another checkpoint. Returns the path written, or None."""
    path = os.path.join(save_dir, HISTORY_CSV)
    if not history:
        atomic.remove_quietly(path)
        return None
    columns = list(HISTORY_COLUMNS) + [c for c in HISTORY_OPTIONAL_COLUMNS
                                       if any(c in row for row in history)]
    # repr of a float reads back to the same float
    rows = [columns] + [[_csv_number(row.get(c)) for c in columns] for row in history]
    atomic.write_csv(path, rows, lineterminator="\n")
    return path


def _csv_number(value):
    if value is None:
        return ""
    return int(value) if isinstance(value, numbers.Integral) else repr(float(value))


def summary_lines(summary):
    m, names = summary["metrics"], summary["names"]
    lines = [f"evaluated {m['images']} images: accuracy {100 * m['accuracy']:.1f}%, "
             f"top-5 accuracy {100 * m['top5_accuracy']:.1f}%, "
             f"macro F1 {m['macro']['f1']:.3f}"]
    if "ece" in m:
        unknown = m.get("unknown")
        lines.append(f"calibration error {100 * m['ece']:.1f}%" + (
            f"; called unknown (novelty above {unknown['threshold']:.2f}): {unknown['count']} "
            f"of {m['images']} ({100 * unknown['share']:.1f}%)" if unknown else ""))
    present = np.flatnonzero(m["support"] > 0)
    weakest = present[np.argsort(m["f1"][present], kind="stable")][:3]
    if len(present) > 3:
        lines.append("lowest F1: " + ", ".join(f"{names[i]} {m['f1'][i]:.2f}" for i in weakest))
    folder = os.path.dirname(summary["files"]["text"]) or "."
    lines.append(f"report: {folder}/ (" + ", ".join(
        os.path.basename(p) for p in summary["files"].values()) + ")")
    return lines


def write_training_report(save_dir, model, scan, names, preprocess, device, history,
                          test_probs=None, test_novelty=None, threshold=None):
    """End of a completed training run: the training curves and, when there is a test split,
    the report on it, in SAVE_DIR/report. test_probs (in the order of scan.samples["test"]),
    when training already computed them, spare a second pass over the photos."""
    out_dir = os.path.join(save_dir, "report")
    if "test" not in scan.samples:
        os.makedirs(out_dir, exist_ok=True)
        plot_curves(history, os.path.join(out_dir, REPORT_FILES["curves"]))
        print(f"report: {out_dir}/ (curves.png; no test split to evaluate)")
        return
    started = time.monotonic()
    display = [names[c] for c in scan.classes]
    from ..app import inference  # its batched, overlapped image reading
    predictor = inference.TorchPredictor.from_model(model, scan.classes, display, preprocess,
                                                    device)
    if test_probs is not None:
        paths, labels = zip(*scan.samples["test"])
        summary = write_report(out_dir, test_probs, list(labels), scan.classes, display,
                               list(paths), history, predictor, novelty=test_novelty,
                               threshold=threshold)
        _print_summary(summary, started)
        return
    label_of = dict(scan.samples["test"])
    results = [r for r in inference.predict_paths(predictor,
                                                  [inference.Item(p) for p in label_of])
               if r.error is None]
    summary = write_report(out_dir, np.stack([r.probs for r in results]),
                           [label_of[r.path] for r in results], scan.classes, display,
                           [r.path for r in results], history, predictor)
    _print_summary(summary, started)


def _print_summary(summary, started):
    lines = summary_lines(summary)
    lines[0] = lines[0].replace("evaluated", "test split:", 1)
    print("\n".join(lines) + f"  [{time.monotonic() - started:.1f}s]")


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, dpi=100):
    """Write the figure atomically, with everything drawn kept inside it."""
    plt = _pyplot()
    try:
        with atomic.AtomicFile(path) as f:
            fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)


def _wrap(text, width):
    return "\n".join(textwrap.wrap(str(text), width, break_long_words=True)[:2]) or str(text)


def _shorten(text, width):
    """At most width characters, cut in the middle: both ends of a path say the most."""
    if len(text) <= width:
        return text
    head = (width - 3) // 2
    return text[:head] + "..." + text[-(width - 3 - head):]


def _tail(path):
    """The file name and its folder: in a folder of class folders, the folder says a lot."""
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def _picture(path, square=None):
    """An RGB array of the photo, reduced for drawing (a square centre crop if asked);
    a grey tile if the file cannot be read any more."""
    from PIL import ImageOps
    try:
        img = decode.load_rgb(path, 2 * (square or 320))  # twice the drawn size: sharp
    except decode.IMAGE_ERRORS:
        return np.full((64, 64, 3), 200, dtype=np.uint8)
    if square:
        img = ImageOps.fit(img, (square, square))
    else:
        img.thumbnail((320, 320))
    return np.asarray(img)


def plot_confusion(path, confusion, names):
    """Rows are true classes, shaded by the share of each row; sizes and fonts grow with the
    number of classes so 102 names stay readable."""
    plt = _pyplot()
    from matplotlib.colors import PowerNorm
    n = len(names)
    cell = 0.55 if n <= 10 else 0.4 if n <= 30 else 0.2  # inches per class
    font = 10 if n <= 30 else 8 if n <= 60 else 7
    side = max(4.0, n * cell)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    rows = confusion.sum(1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    # A square-root scale: a few confused images in a large class still show.
    image = ax.imshow(share, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1),
                      interpolation="nearest")
    labels = [_shorten(str(name), 30) for name in names]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="#d0d0d0", linewidth=0.4 if n > 30 else 0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("predicted class", fontsize=font + 2)
    ax.set_ylabel("true class", fontsize=font + 2)
    total, right = int(confusion.sum()), int(np.trace(confusion))
    numbers = n <= 30  # beyond that, a number per cell is too small to read
    ax.set_title(f"Confusion matrix: {right} of {total} right ({100 * right / max(total, 1):.1f}%)"
                 f"\ncolour: share of the true class{'; numbers: images' if numbers else ''}",
                 fontsize=font + 3)
    if numbers:
        for t, p in zip(*np.nonzero(confusion)):
            ax.text(p, t, str(confusion[t, p]), ha="center", va="center", fontsize=font - 1,
                    color="white" if share[t, p] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.035, pad=0.02, shrink=0.8)
    _save(fig, path, dpi=130 if n > 60 else 100)  # small names get more pixels


def plot_mistakes(path, mistakes, wrong, total, maps=None, crop_pct=None):
    """A grid of the most confident mistakes: (image path, true name, predicted name, prob);
    maps: each one's heatmap of the predicted class, drawn over the network's view."""
    plt = _pyplot()
    if not mistakes:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No mistakes on {total} images", ha="center", va="center",
                fontsize=14)
        _save(fig, path)
        return
    cols = min(6, len(mistakes))
    rows = math.ceil(len(mistakes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.7, rows * 3.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, (image_path, true, predicted, prob)) in enumerate(zip(axes.flat, mistakes)):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        if maps and maps[i] is not None:
            heatmaps.draw_heatmap(ax, _picture(image_path, square=240), maps[i], crop_pct)
        else:
            ax.imshow(_picture(image_path, square=240))
        ax.set_title(f"predicted: {_wrap(predicted, 24)} ({100 * prob:.0f}%)", fontsize=9,
                     color="#b00020")
        ax.set_xlabel(f"true: {_wrap(true, 24)}\n{_shorten(os.path.basename(image_path), 32)}",
                      fontsize=9, color="#1b5e20")
    fig.suptitle(f"The {len(mistakes)} most confident mistakes ({wrong} wrong of {total} "
                 f"images)" + (f"\n{heatmaps.HEAT_NOTE}" if maps else ""), fontsize=13)
    _save(fig, path)


def plot_data_issues(path, findings, names, suspects=12, pairs=6):
    """The most suspect labels as thumbnails (given class against the class they look like),
    then the most similar near-duplicate pairs side by side. names maps class folders to
    display names."""
    plt = _pyplot()
    shown_labels, shown_pairs = findings.labels[:suspects], findings.near_duplicates[:pairs]
    cols, pairs_a_row = 6, 3
    label_rows = math.ceil(len(shown_labels) / cols)
    pair_rows = math.ceil(len(shown_pairs) / pairs_a_row)
    fig = plt.figure(figsize=(cols * 2.5, (label_rows + pair_rows) * 3.4 + 0.4),
                     layout="constrained")
    parts = fig.subfigures(2, 1, height_ratios=[max(label_rows, 0.01), max(pair_rows, 0.01)])
    if shown_labels:
        parts[0].suptitle(f"The {len(shown_labels)} most suspect of {len(findings.labels)} "
                          f"photos that look mislabelled", fontsize=13)
        axes = parts[0].subplots(label_rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (image_path, given, suggested, confidence) in zip(axes.flat, shown_labels):
            _thumbnail(ax, image_path)
            ax.set_title(f"given: {_wrap(names.get(given, given), 22)}", fontsize=9,
                         color="#b00020")
            ax.set_xlabel(f"looks like: {_wrap(names.get(suggested, suggested), 22)}\n"
                          f"held-out p(given) {100 * confidence:.0f}%\n"
                          f"{_shorten(os.path.basename(image_path), 28)}", fontsize=8,
                          color="#1b5e20")
    if shown_pairs:
        parts[1].suptitle(f"The {len(shown_pairs)} closest of {len(findings.near_duplicates)} "
                          f"near-duplicate pairs across splits", fontsize=13)
        cells = parts[1].subfigures(pair_rows, pairs_a_row, squeeze=False).flat
        for cell, (earlier, later, score) in zip(cells, shown_pairs):
            cell.suptitle(f"similarity {score:.3f}", fontsize=9)
            for ax, image_path in zip(cell.subplots(1, 2), (earlier, later)):
                _thumbnail(ax, image_path)
                ax.set_xlabel(_shorten(_split_and_tail(image_path), 28), fontsize=8)
    _save(fig, path)


def _thumbnail(ax, image_path):
    ax.axis("on")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.imshow(_picture(image_path, square=200))


def _split_and_tail(path):
    """split/class/file: which split a near-duplicate sits in is the point."""
    split = os.path.basename(os.path.dirname(os.path.dirname(path)))
    return os.path.join(split, _tail(path))


def plot_curves(history, path):
    """Train and valid loss, and valid accuracy, per epoch; the kept (best) epoch marked."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train loss")
    valid_loss = [h["valid_loss"] for h in history]
    loss_ax.plot(epochs, valid_loss, "o-", ms=3, label="valid loss")
    acc_ax.plot(epochs, [100 * h["valid_acc"] for h in history], "o-", ms=3, color="C2",
                label="valid accuracy")
    best = epochs[int(np.argmin(valid_loss))]
    for ax, ylabel in ((loss_ax, "loss"), (acc_ax, "accuracy (%)")):
        ax.axvline(best, color="grey", linestyle="--", linewidth=1,
                   label=f"lowest valid loss (epoch {best})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    loss_ax.set_title("Loss")
    acc_ax.set_title("Valid accuracy")
    _save(fig, path)


def plot_predictions(path, shown, maps=None, crop_pct=None):
    """Each photo beside a horizontal bar chart of its top K; shown: [(image path, names,
    probabilities)], most likely first. Several images make one grid. maps: each photo's
    heatmap of its top class (predict.py --explain), drawn over the network's view."""
    plt = _pyplot()
    n, k = len(shown), max(len(names) for _, names, _ in shown)
    pairs = 1 if n == 1 else 2 if n <= 4 else 3
    rows = math.ceil(n / pairs)
    height = max(2.8, 0.32 * k + 1.0)
    fig = plt.figure(figsize=(pairs * 7.2, rows * height), layout="constrained")
    grid = fig.add_gridspec(rows, 2 * pairs, width_ratios=[1.0, 1.3] * pairs)
    for i, (image_path, names, probs) in enumerate(shown):
        row, col = divmod(i, pairs)
        photo = fig.add_subplot(grid[row, 2 * col])
        if maps is not None:
            heatmaps.draw_heatmap(photo, _picture(image_path, square=320), maps[i], crop_pct)
        else:
            photo.imshow(_picture(image_path))
        photo.axis("off")
        photo.set_title(_shorten(_tail(image_path), 40), fontsize=10)
        _bars(fig.add_subplot(grid[row, 2 * col + 1]), names, probs)
    if maps is not None:
        fig.suptitle(heatmaps.HEAT_NOTE.replace("predicted", "top"), fontsize=10)
    _save(fig, path)


def _bars(ax, names, probs):
    percents = [100 * p for p in probs]
    y = np.arange(len(names))
    ax.barh(y, percents, color=["#1f5fa8"] + ["#8fb3dc"] * (len(names) - 1))
    ax.set_yticks(y, [_wrap(name, 22) for name in names], fontsize=10)
    ax.invert_yaxis()  # the most likely on top
    ax.set_xlim(0, 100)
    ax.set_xlabel("probability (%)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    for yi, pct in zip(y, percents):
        inside = pct > 75
        ax.text(pct - 1 if inside else pct + 1, yi, f"{pct:.1f}%", va="center", fontsize=9,
                ha="right" if inside else "left", color="white" if inside else "black")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
