"""The Python API, for notebooks and scripts: the commands' work without a subprocess.

    import imgclf
    clf = imgclf.train("flowers", save_dir="run")     # train.py's options, by their long names
    clf = imgclf.load("run/checkpoint.pth")           # or a model.onnx from export
    results = clf.predict(["rose.jpg", "more/"], top_k=3)
    results[0].top                                    # [("rose", 0.93), ("tulip", 0.05), ...]
    clf.evaluate("flowers/test")["accuracy"]
    clf.export("model.onnx")

A user mistake raises imgclf.UserError with the one-line message the commands print; a photo
that cannot be read gives a Prediction whose .error says why, not an exception.
"""
import argparse
import base64
import contextlib
import html
import io
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError

# Thumbnail side of a photo in a prediction's notebook table.
THUMBNAIL_PX = 96


def train(data_dir=None, **options):
    """Train as `python train.py DATA_DIR --option value ...` does and return the Classifier of
    the checkpoint it saved. Options are train.py's long names: save_dir="run", arch="vgg16",
    gpu=True, epochs=10, hidden_units=[512]; a flag takes True. Writes the same files."""
    from .cli import train as command
    from .engine import distributed
    from .utils.stopping import StopSignals
    args = parse_options(command.build_parser(), [data_dir] if data_dir else [], options)
    try:
        with StopSignals():
            status = command.run(args)
    finally:
        distributed.shutdown()
    if status != 0:
        raise UserError(f"train: stopped with exit status {status}; nothing new was loaded")
    if args.check:  # the data report only: no model
        return None
    save_dir = command.DEMO_DIR if args.demo and args.save_dir == "." else args.save_dir
    return load(os.path.join(save_dir, "checkpoint.pth"))


def load(path, gpu=None, precision="auto"):
    """A Classifier for a checkpoint from train.py or an .onnx or .tflite model from
    export.py."""
    from .app.inference import load_predictor
    return Classifier(path, load_predictor(path, gpu, precision))


def parse_options(parser, positional, options):
    """argv for a command's parser from keyword options; an unknown option or a bad value is a
    UserError naming it (argparse would print its usage and exit)."""
    flags = {action.dest: action for action in parser._actions if action.option_strings}
    argv = [str(p) for p in positional]
    for name, value in options.items():
        action = flags.get(name)
        if action is None:
            raise UserError(f"{name}=: not an option of this command; its options are "
                            f"{', '.join(sorted(n for n in flags if n != 'help'))}")
        flag = action.option_strings[-1]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if value:
                argv.append(flag)
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv)
    except SystemExit:
        lines = errors.getvalue().strip().splitlines() or ["invalid options"]
        raise UserError(lines[-1].split("error: ", 1)[-1]) from None


@dataclass
class Prediction:
    """One image's answer: .top is [(name, probability), ...] best first; .error says why a
    file could not be read (then .top is empty)."""
    path: str = None
    top: list = field(default_factory=list)
    error: str = None
    probabilities: np.ndarray = field(default=None, repr=False)
    image: object = field(default=None, repr=False)  # the PIL image or array given, if any
    # predict(explain=True): the top class's heatmap, as predict.py --json gives it
    heatmap: np.ndarray = field(default=None, repr=False)
    # The unknown verdict (None where the model has none): novelty above the threshold
    unknown: bool = None
    novelty: float = None

    def _repr_html_(self):
        """A notebook shows the photo beside its top classes."""
        rows = "".join(f"<tr><td>{html.escape(str(n))}</td><td>{100 * p:.1f}%</td></tr>"
                       for n, p in self.top)
        if self.unknown:
            rows += "<tr><td colspan=2><b>unknown</b>: unlike every class's photos</td></tr>"
        if self.error:
            rows = f"<tr><td colspan=2>{html.escape(self.error)}</td></tr>"
        thumb = self._thumbnail_uri()
        img = f'<img src="{thumb}" style="max-width:{THUMBNAIL_PX}px">' if thumb else ""
        title = html.escape(os.path.basename(self.path)) if self.path else "image"
        return (f"<table><tr><td rowspan={len(self.top) + 2}>{img}</td><th colspan=2>{title}"
                f"</th></tr>{rows}</table>")

    def _thumbnail_uri(self):
        from PIL import Image

        from .data import decode
        try:
            if self.image is not None:
                img = to_pil(self.image)
            elif self.path:
                img = decode.load_rgb(self.path, THUMBNAIL_PX)
            else:
                return None
        except (OSError, ValueError):
            return None
        img = img.copy()
        img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def as_heatmap(evidence):
    """The map as predict.py --json gives it (rows top to bottom, 0..1), as an array."""
    if evidence is None:
        return None
    from .models.explain import heatmap_grid
    return np.array(heatmap_grid(evidence))


def to_pil(image):
    """A PIL image or an HxW / HxWx3 / HxWx4 uint8 array -> an RGB PIL image."""
    from PIL import Image

    from .data import decode
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UserError(f"image array of dtype {image.dtype}: give uint8 pixels (0-255), "
                            f"height x width [x channels]")
        image = Image.fromarray(image)
    return decode.to_rgb(image)


class Classifier:
    """A trained model: predict, evaluate, export. Made by imgclf.load or imgclf.train."""

    def __init__(self, path, predictor):
        self.path = path
        self.predictor = predictor
        self.classes = list(predictor.classes)
        self.names = list(predictor.class_names)
        self.preprocess = predictor.preprocess
        # The unknown verdict's threshold (None: the model has no verdict); may be changed
        self.unknown_threshold = getattr(predictor, "unknown_threshold", None)

    def __repr__(self):
        shown = ", ".join(self.names[:5]) + (", ..." if len(self.names) > 5 else "")
        return f"Classifier({self.path!r}, {len(self.names)} classes: {shown})"

    def predict(self, images, top_k=5, explain=False):
        """One Prediction per image, in order. images: a path (file or folder, searched like
        predict.py's IMAGE), a PIL image, a uint8 array, or a list of those. explain: each
        Prediction's .heatmap is where the model saw its top class (predict.py --explain)."""
        if explain:
            from .cli.predict import check_explain
            check_explain(self.predictor, self.path)
        if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getpixel"):
            images = [images]
        k = max(1, min(int(top_k), len(self.names)))
        entries = list(self._entries(images, explain))
        paths = [e for e in entries if not isinstance(e, Prediction)]
        by_path = self._predict_paths(paths, explain)
        results = []
        for entry in entries:
            result = entry if isinstance(entry, Prediction) else by_path[entry.path]
            if result.probabilities is not None:
                top = np.argsort(-result.probabilities, kind="stable")[:k]
                result.top = [(self.names[i], float(result.probabilities[i])) for i in top]
            if result.novelty is not None and self.unknown_threshold is not None:
                result.unknown = bool(result.novelty > self.unknown_threshold)
            results.append(result)
        return results

    def _entries(self, images, explain=False):
        """Item (a file to read) or a ready Prediction (an in-memory image), input by input."""
        from .app.inference import Item
        from .cli.predict import find_images
        for image in images:
            if isinstance(image, (str, os.PathLike)):
                source = os.fspath(image)
                if os.path.exists(source) or any(c in source for c in "*?["):
                    yield from find_images([source])
                else:
                    yield Item(source)
            else:
                yield self._predict_image(image, explain)

    def _predict_image(self, image, explain=False):
        from .app.inference import batch_scores
        from .data import decode
        array = decode.eval_array(to_pil(image), self.preprocess)
        probs, novelty = batch_scores(self.predictor, array[None])
        novelty = None if novelty is None else float(novelty[0])
        if explain:
            probs, maps = self.predictor.explain(array[None])
            return Prediction(probabilities=probs[0], image=image, heatmap=as_heatmap(maps[0]),
                              novelty=novelty)
        return Prediction(probabilities=probs[0], image=image, novelty=novelty)

    def _predict_paths(self, items, explain=False):
        from .app.inference import predict_paths
        if not items:
            return {}
        results = {r.path: r for r in predict_paths(self.predictor, items, explain=explain)}
        out = {}
        for item in items:
            r = results.get(item.path)
            if r is None:  # a stray non-image file found in a folder: left out, as in training
                out[item.path] = Prediction(item.path, error=f"image {item.path}: not an image")
            else:
                out[item.path] = Prediction(item.path, error=r.error, probabilities=r.probs,
                                            heatmap=as_heatmap(r.heatmap), novelty=r.novelty)
        return out

    def evaluate(self, folder, report_dir=None):
        """Accuracy, top-5 accuracy, macro and per-class precision/recall/F1 and the confusion
        matrix of a folder of class folders (the metrics.json of predict.py --evaluate);
        report_dir: also write that report there."""
        from .analysis import report
        from .app.inference import predict_paths
        from .cli.predict import labelled_images
        items, labels = labelled_images(os.fspath(folder), self.classes)
        label_of = dict(zip((item.path for item in items), labels))
        good = [r for r in predict_paths(self.predictor, items) if r.error is None]
        if not good:
            raise UserError(f"{folder}: none of its images could be read")
        probs = np.stack([r.probs for r in good])
        truth = np.array([label_of[r.path] for r in good])
        threshold = self.unknown_threshold
        novelty = np.array([r.novelty for r in good]) if threshold is not None else None
        if report_dir:
            report.write_report(os.fspath(report_dir), probs, truth, self.classes, self.names,
                                [r.path for r in good], predictor=self.predictor,
                                novelty=novelty, threshold=threshold)
        metrics = report.evaluation_metrics(probs, truth, len(self.classes), novelty, threshold)
        return report.evaluation_document(metrics, self.classes, self.names)

    def export(self, out, **options):
        """Write the model for other runtimes (export.py's options by their long names) after
        its parity check; returns the path written."""
        from .cli import export as command
        kind = {".onnx": "an ONNX", ".tflite": "a LiteRT"}.get(
            os.path.splitext(self.path.lower())[1])
        if kind:
            raise UserError(f"{self.path}: already {kind} model; export its checkpoint")
        args = parse_options(command.build_parser(), [self.path], dict(options, out=out))
        command.run(args)
        return os.fspath(out)

