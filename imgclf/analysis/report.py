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
import numbers
import os
import time

import numpy as np

from ..utils import atomic
from . import calibration, heatmaps, plots

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
    calibration.plot_reliability(files["calibration"], probs, labels, plots.save,
                                 title=f"{len(labels)} photos: ")
    write_predictions_csv(files["predictions"], probs, labels, names, image_paths)
    plots.plot_confusion(files["confusion"], metrics["confusion"], names)
    mistakes = [(image_paths[i], names[labels[i]], names[metrics["predicted"][i]],
                 float(probs[i].max())) for i in confident_mistakes(probs, labels)]
    wrong = int((metrics["predicted"] != labels).sum())
    maps = heatmaps.mistake_heatmaps(predictor, [m[0] for m in mistakes], tta)
    plots.plot_mistakes(files["mistakes"], mistakes, wrong, len(labels), maps,
                  predictor.preprocess["crop_pct"] if maps else None)
    if history:
        plots.plot_curves(history, files["curves"])
    return dict(metrics=metrics, names=list(names), files=files)


def open_set_lines(metrics):
    """report.txt's lines on calibration and the unknown verdict."""
    lines = ["", f"expected calibration error {100 * metrics['ece']:.1f}% (15 bins of the top "
                 f"probability; calibration.png); a perfectly calibrated model would measure "
                 f"{100 * metrics['ece_if_calibrated']:.1f}% on these {metrics['images']} photos"]
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
    metrics["ece_if_calibrated"] = calibration.ece_if_calibrated(probs)
    if novelty is not None and threshold is not None:
        called = np.asarray(novelty, dtype=np.float64) > threshold
        metrics["unknown"] = dict(threshold=float(threshold), count=int(called.sum()),
                                  share=float(called.mean()))
    return metrics


def evaluation_document(metrics, classes, names):
    """metrics.json: the metrics, the calibration error and the unknown count."""
    return {**metrics_document(metrics, classes, names), **open_set_document(metrics)}


def open_set_document(metrics):
    document = {"ece": metrics["ece"], "ece_if_calibrated": metrics["ece_if_calibrated"]}
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
        lines.append(f"calibration error {100 * m['ece']:.1f}% (perfectly calibrated: "
                     f"{100 * m['ece_if_calibrated']:.1f}%)" + (
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
        plots.plot_curves(history, os.path.join(out_dir, REPORT_FILES["curves"]))
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
