"""Name what photos show, with a checkpoint written by train.py.

    python predict.py IMAGE [IMAGE ...] CHECKPOINT [--top_k 5] [--category_names JSON] [--gpu]
    python predict.py photos/ CHECKPOINT --json            # a folder, searched recursively
    python predict.py 'photos/*.jpg' CHECKPOINT --csv out.csv --plot out.png
    python predict.py DATA_DIR/test CHECKPOINT --evaluate  # the report for a labelled folder
    python predict.py photos/ CHECKPOINT --explain --plot out.png  # where the model looked

Start-up matters here: this script imports only what the run needs (torch and model_utils for a
checkpoint; never torchvision, matplotlib or the training code unless a run asks for them).
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

from .. import errors
from ..app import inference
from ..app.inference import (
    IMAGE_FIX,
    Item,
    display_names,
    load_predictor,
    predict_paths,
    read_image,
    top_k,
)
from ..data import scanning
from ..errors import UserError
from ..utils import atomic
from ..version import __version__

# Images drawn in one --plot grid: beyond this a grid is too small to read.
PLOT_LIMIT = 24
TOP_K = 5  # classes shown where --top_k is not given


def build_parser():
    p = argparse.ArgumentParser(
        description="Predict the class of images with a checkpoint from train.py.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("image", nargs="+", metavar="IMAGE",
                   help="a photo, several photos, a folder (searched recursively) or a quoted "
                        "glob such as 'photos/*.jpg'")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint.pth written by train.py, or model.onnx or model.tflite from "
                        "export.py")
    p.add_argument("--top_k", type=int, metavar="K",
                   help=f"how many of the most likely classes to show (default: {TOP_K})")
    p.add_argument("--category_names", metavar="JSON",
                   help="JSON mapping class folder names to display names (default: the names "
                        "stored in the checkpoint)")
    p.add_argument("--gpu", nargs="?", const="cuda", metavar="DEVICE",
                   help="run on an accelerator: --gpu alone for CUDA, or cuda:1, mps "
                        "(default: the CPU)")
    p.add_argument("--precision", choices=inference.PRECISIONS, default="auto",
                   help=inference.PRECISION_HELP)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the predictions of each image and its "
                        "mirror image (twice the compute; default: off)")
    p.add_argument("--unknown_threshold", metavar="X",
                   help="call a photo unknown (none of the classes) when its novelty is above X; "
                        "lower calls more photos unknown (docs/open_set.md says how to pick one) "
                        "(default: the checkpoint's, chosen in training to keep 95%% of held-out "
                        "photos of the known classes)")
    out = p.add_argument_group("Output")
    out.add_argument("--json", action="store_true",
                     help="print one JSON document (a list, one object per image) instead of text")
    out.add_argument("--csv", metavar="FILE",
                     help="also write one row per image: path, then name and probability of each "
                          "of the top K (default: none)")
    out.add_argument("--plot", metavar="FILE.png",
                     help=f"also draw each photo beside a bar chart of its top K (the first "
                          f"{PLOT_LIMIT} images, as one grid; default: none)")
    out.add_argument("--explain", action="store_true",
                     help="where the model looked: the top class's heatmap over each photo, "
                          "in --plot, in --json (\"heatmap\") and as a grid of characters in "
                          "the text (a checkpoint only; default: off)")
    out.add_argument("--evaluate", action="store_true",
                     help="IMAGE is a folder of class folders named like the checkpoint's "
                          "classes: write the evaluation report (accuracy, per-class scores, "
                          "confusion matrix, confident mistakes) to --report_dir")
    out.add_argument("--report_dir", metavar="DIR",
                     help="where --evaluate writes its report (default: report)")
    return p


def main(argv=None):
    return errors.run_main(build_parser, run, argv)


def run(args):
    check_options(args)
    if args.evaluate:
        return evaluate(args)
    items = find_images(args.image)
    single = len(items) == 1 and not items[0].found  # one named photo: today's short output
    if single and not os.path.exists(items[0].path):  # say so before the model loads
        raise UserError(read_image(items[0], None)[1])
    # One photo computes on one thread: on a busy machine the threads of so short a forward
    # pass spend it waiting for one another (docs/design.md, "Figures behind the constants")
    predictor = load_predictor(args.checkpoint, args.gpu, args.precision,
                               threads=1 if len(items) == 1 else None)
    check_tta(args.tta, predictor, args.checkpoint)
    if args.explain:
        check_explain(predictor, args.checkpoint, args.tta)
    names = display_names(predictor.classes, predictor.class_names, args.category_names)
    threshold = unknown_threshold(args, predictor)
    results = predict_paths(predictor, items, args.tta, explain=args.explain)
    if not results:
        raise UserError(f"image {', '.join(args.image)}: no images found (only files that are "
                        f"not images); {IMAGE_FIX}")
    if single and results[0].error:
        raise UserError(results[0].error)
    k = clip_top_k(args.top_k or TOP_K, len(names))
    write_outputs(args, results, predictor.classes, names, k, single,
                  predictor.preprocess["crop_pct"], threshold)
    failed = [r for r in results if r.error]
    for result in failed:
        print(f"error: {result.error}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(results)} images could not be read; the others were "
              f"predicted", file=sys.stderr)
    return 1 if failed else 0


def check_options(args):
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k {args.top_k}: must be 1 or more")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UserError(f"--plot {args.plot}: the picture is written as PNG; give a name ending "
                        f"in .png")
    if args.report_dir and not args.evaluate:
        raise UserError(f"--report_dir {args.report_dir}: only --evaluate writes a report; add "
                        f"--evaluate, or drop --report_dir")
    if args.evaluate:
        others = [flag for flag, on in (("--json", args.json), ("--csv", args.csv),
                                        ("--plot", args.plot), ("--top_k", args.top_k),
                                        ("--explain", args.explain)) if on]
        if others:
            raise UserError(f"--evaluate writes its own report files; drop {', '.join(others)}")
        if len(args.image) != 1:
            raise UserError("--evaluate takes one folder of class folders, e.g. "
                            "python predict.py DATA_DIR/test checkpoint.pth --evaluate")
    if args.unknown_threshold is not None:
        args.unknown_threshold = parse_threshold(args.unknown_threshold)


def parse_threshold(text):
    """--unknown_threshold's value as a finite float, or a one-line UserError."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise UserError(f"--unknown_threshold {text}: not a finite number; give the novelty "
                        f"above which a photo is called unknown, e.g. 1.5 (--json shows each "
                        f"photo's novelty)")
    return value


def unknown_threshold(args, predictor):
    """The threshold of the unknown verdict: --unknown_threshold, else the model's; None for a
    model without novelty data (a checkpoint older than the verdict, or of a run stopped
    before it was fitted), said once on stderr."""
    stored = getattr(predictor, "unknown_threshold", None)
    if stored is None:
        if args.unknown_threshold is not None:
            raise UserError(f"--unknown_threshold: {args.checkpoint} has no novelty data (every "
                            f"finished training run stores it); train it again, or drop "
                            f"--unknown_threshold")
        why = ("trained before the unknown verdict" if getattr(predictor, "predates_novelty",
                                                               False)
               else "its training was stopped before the verdict was fitted")
        print(f"note: {args.checkpoint} has no novelty data ({why}): no unknown verdict; "
              f"train again for one", file=sys.stderr)
        return None
    return stored if args.unknown_threshold is None else args.unknown_threshold


def check_tta(tta, predictor, path):
    """--tta averages each photo with its mirror image: refused for a model that does so
    already (the head was chosen so in training), where it would change nothing."""
    if tta and predictor.averages_mirror:
        raise UserError(f"--tta: {path} averages each photo with its mirror image already (its "
                        f"head was chosen so in training); drop --tta")


def check_explain(predictor, path, tta=False):
    """--explain needs a checkpoint's network or an export with its heatmap output; says once
    where the map is an estimate."""
    if not hasattr(predictor, "model"):  # an exported model: the heatmap is one of its outputs
        if not getattr(predictor, "has_heatmap", False):
            raise UserError(f"--explain: {path} does not carry the heatmap (exported before "
                            f"exports carried it, or its head has hidden layers); export it "
                            f"again, or give the checkpoint.pth it was exported from")
        if tta:
            raise UserError(f"--explain --tta: {path}'s heatmap is of the photo alone; drop "
                            f"--tta, or give the checkpoint.pth it was exported from")
        return
    from ..models import explain
    explain.feature_module(predictor.model.backbone)  # refuses a backbone with no feature map
    if not explain.is_exact(predictor.model):
        print("note: --explain: this model has layers between its feature map and its class "
              "scores (a head with hidden layers, or VGG's/AlexNet's), so the heatmap is a "
              "gradient x activation estimate, not an exact class activation map",
              file=sys.stderr)


def clip_top_k(top_k, num_classes):
    k = min(top_k, num_classes)
    if k < top_k:
        print(f"note: --top_k {top_k} is more than the {num_classes} classes; showing {k}",
              file=sys.stderr)
    return k


def write_outputs(args, results, classes, names, k, single, crop_pct=None, threshold=None):
    """crop_pct: of the network's view, under --plot's heatmaps (--explain); threshold: of the
    unknown verdict (None: the model has none)."""
    tops = [top_k(r.probs, k) if r.error is None else None for r in results]
    if args.json:
        print(json.dumps(json_document(results, k, classes, names, threshold), indent=2))
    else:
        print_human(results, tops, names, single, threshold)
    if args.csv:
        write_csv(args.csv, results, tops, names, k, threshold)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot:
        plot(args.plot, results, tops, names, crop_pct)


# ---------------------------------------------------------------------------------------------
# Finding and reading images
# ---------------------------------------------------------------------------------------------
def find_images(sources):
    """The files that IMAGE arguments name, in order and without repeats: files as given,
    folders searched recursively (hidden and system files left out, as in training), globs
    expanded. A named file that does not exist is kept, to be reported with the others."""
    items, seen = [], set()
    for source in sources:
        if os.path.isdir(source):
            paths, found = folder_files(source), True
            if not paths:
                raise UserError(f"image folder {source}: no files in it or its subfolders; "
                                f"give a folder that holds photos (JPEG, HEIC, PNG, WebP, BMP, "
                                f"TIFF, GIF)")
        elif os.path.exists(source) or not glob.has_magic(source):
            paths, found = [source], False
        else:
            paths, found = expand_glob(source), True
        for path in paths:
            if path not in seen:
                seen.add(path)
                items.append(Item(path, found))
    return items


def folder_files(folder):
    return scanning.walk_files(folder)


def expand_glob(pattern):
    paths = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        paths += folder_files(match) if os.path.isdir(match) else [match]
    if not paths:
        raise UserError(f"image {pattern}: no file matches this pattern; check the path")
    return paths


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def format_top_k(names, indices, probs, width=None):
    width = width or max(len(names[i]) for i in indices)
    return [f"{rank:>2}. {names[i]:<{width}}  {100 * p:5.1f}%"
            for rank, (i, p) in enumerate(zip(indices, probs), 1)]


def print_human(results, tops, names, single, threshold=None):
    if single:
        print("\n".join(format_top_k(names, *tops[0]) + verdict_lines(results[0], threshold)
                        + heatmap_lines(results[0], names, tops[0])))
        return
    width = max(len(name) for name in names)  # one column of percentages for all images
    for result, top in zip(results, tops):
        if result.error:
            continue  # reported on stderr
        print(result.path)
        print("\n".join("  " + line for line in format_top_k(names, *top, width=width)
                        + verdict_lines(result, threshold) + heatmap_lines(result, names, top)))


def verdict_lines(result, threshold):
    """The unknown verdict in plain words, under the top K (none without novelty data)."""
    if threshold is None or result.novelty is None:
        return []
    return [inference.verdict_line(result.novelty, threshold)]


HEAT_CHARS = " .:-=+*#%@"  # from no evidence for the top class to the most


def heatmap_lines(result, names, top):
    """--explain in text: the heatmap as a grid of characters, two per cell (about square)."""
    if result.heatmap is None:
        return []
    from ..models.explain import heatmap_grid
    grid = heatmap_grid(result.heatmap)
    levels = len(HEAT_CHARS) - 1
    lines = [f"where it saw {names[top[0][0]]} ({len(grid)}x{len(grid[0])} over the centre "
             f"crop; '{HEAT_CHARS[-1]}' most, ' ' none):"]
    return lines + ["  |" + "".join(2 * HEAT_CHARS[round(v * levels)] for v in row) + "|"
                    for row in grid]


def json_document(results, k, classes, names, threshold=None):
    return [{"image": r.path, "error": r.error} if r.error else
            inference.prediction_object(r.path, r.probs, k, classes, names, r.heatmap,
                                        r.novelty, threshold)
            for r in results]


def write_csv(path, results, tops, names, k, threshold=None):
    """One row per image: its top K, then (with the unknown verdict) "unknown" (1 or 0) and
    "novelty", then the error of an image that could not be read."""
    header = ["image"]
    for rank in range(1, k + 1):
        header += [f"name_{rank}", f"probability_{rank}"]
    verdict = [] if threshold is None else ["unknown", "novelty"]
    rows = [header + verdict + ["error"]]
    for result, top in zip(results, tops):
        row = [result.path]
        if result.error:
            rows.append(row + [""] * (2 * k + len(verdict)) + [result.error])
            continue
        for i, p in zip(*top):
            row += [names[i], f"{p:.4f}"]
        if verdict:
            row += [int(inference.is_unknown(result.novelty, threshold)),
                    f"{result.novelty:.4f}"]
        rows.append(row + [""])
    try:
        atomic.write_csv(path, rows)
    except OSError as err:
        raise UserError(f"--csv {path}: cannot write it ({err.strerror}); give a writable "
                        f"path") from None


def plot(path, results, tops, names, crop_pct=None):
    from ..analysis import plots
    shown = [(r.path, [names[i] for i in top[0]], top[1])
             for r, top in zip(results, tops) if not r.error]
    maps = [r.heatmap for r in results if not r.error][:PLOT_LIMIT]
    if len(shown) > PLOT_LIMIT:
        print(f"note: --plot draws the first {PLOT_LIMIT} of the {len(shown)} images",
              file=sys.stderr)
        shown = shown[:PLOT_LIMIT]
    if shown:
        try:
            plots.plot_predictions(path, shown, maps if maps and maps[0] is not None else None,
                                   crop_pct)
        except OSError as err:
            raise UserError(f"--plot {path}: cannot write it ({err}); give a writable "
                            f"path") from None
        print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# --evaluate
# ---------------------------------------------------------------------------------------------
def evaluate(args):
    root = args.image[0]
    predictor = load_predictor(args.checkpoint, args.gpu, args.precision)
    check_tta(args.tta, predictor, args.checkpoint)
    names = display_names(predictor.classes, predictor.class_names, args.category_names)
    items, labels = labelled_images(root, predictor.classes)
    threshold = unknown_threshold(args, predictor)
    results = predict_paths(predictor, items, args.tta)
    label_of = dict(zip((item.path for item in items), labels))
    good = [r for r in results if r.error is None]
    failed = [r for r in results if r.error]
    if not good:
        raise UserError(f"{root}: none of its images could be read; {IMAGE_FIX}")
    from ..analysis import report
    summary = report.write_report(args.report_dir or "report", np.stack([r.probs for r in good]),
                                  np.array([label_of[r.path] for r in good]),
                                  predictor.classes, names, [r.path for r in good],
                                  predictor=predictor, tta=args.tta,
                                  novelty=np.array([r.novelty for r in good])
                                  if threshold is not None else None, threshold=threshold)
    print("\n".join(report.summary_lines(summary)))
    for result in failed:
        print(f"error: {result.error}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(results)} images could not be read and were left out",
              file=sys.stderr)
    return 1 if failed else 0


def labelled_images(root, classes):
    """(items, labels) for a folder of class folders named like the checkpoint's classes."""
    if not os.path.isdir(root):
        raise UserError(f"--evaluate {root}: no such folder; give a folder of class folders, "
                        f"e.g. DATA_DIR/test")
    paths, labels, unknown = scanning.labelled_files(root, classes)
    if unknown:
        hint = ""
        if "test" in scanning.find_split_dirs(root):
            hint = f" (it holds split folders: did you mean {os.path.join(root, 'test')}?)"
        raise UserError(f"--evaluate {root}: class folder(s) the checkpoint does not know: "
                        f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}{hint}; "
                        f"its classes are {', '.join(classes[:10])}"
                        f"{' ...' if len(classes) > 10 else ''}")
    items = [Item(path, found=True) for path in paths]
    if not items:
        raise UserError(f"--evaluate {root}: no images in its class folders; give a folder "
                        f"like DATA_DIR/test with one folder of photos per class")
    return items, labels


if __name__ == "__main__":
    sys.exit(main())
