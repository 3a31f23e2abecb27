"""Inference, shared by predict.py, serve.py and train.py's report: a model file -> a
predictor (classes, preprocessing, batch -> probabilities), images read in overlapped batches,
the top K, and the JSON object of one prediction.

Start-up matters here: only what a run needs is imported (torch and model_utils for a
checkpoint, onnxruntime for an .onnx file, ai-edge-litert for a .tflite file).
"""
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import UnidentifiedImageError

from ..data import decode, scanning
from ..data.category_names import check_category_names, read_category_names
from ..errors import UserError
from ..utils.progress import Progress

# Decoding threads that prepare the next batches while the model runs the current one.
DECODE_THREADS = 2
IMAGE_FIX = "give a JPEG, HEIC, PNG, WebP, BMP, TIFF or GIF photo"
# --precision of predict.py and serve.py: "auto" computes in bfloat16 (or float16) where the
# hardware does it natively; "fp32" in float32 everywhere, as the ONNX export does.
PRECISIONS = ("auto", "fp32")
PRECISION_HELP = ("auto: bfloat16 where the CPU or GPU computes it natively, several times "
                  "faster, probabilities within a point or so of float32's; fp32: float32 "
                  "everywhere, the probabilities of the float32 ONNX export (an .onnx model "
                  "computes in the precision it was exported in) (default: auto)")


# ---------------------------------------------------------------------------------------------
# Predictors: a checkpoint -> classes, preprocessing, and batch -> probabilities
# ---------------------------------------------------------------------------------------------
class TorchPredictor:
    """A checkpoint from train.py: classes, preprocessing, and batch -> probabilities."""

    def __init__(self, path, gpu=None, precision="auto", threads=None):
        from .. import checkpoints
        from ..models import hardware
        device = hardware.resolve_device(gpu)
        if threads and device.type == "cpu":
            import torch
            torch.set_num_threads(threads)
        from ..heads import novelty
        ckpt = checkpoints.load_checkpoint(path)
        model = checkpoints.model_from_checkpoint(ckpt, path)
        scorer = novelty.scorer_from_checkpoint(ckpt, path)
        # Older than the verdict (no "novelty" key at all), not a mode that fits none (None)
        self.predates_novelty = novelty.CHECKPOINT_KEY not in ckpt
        self._setup(model, ckpt["classes"], ckpt.get("class_names"), ckpt["preprocess"], device,
                    float32=precision == "fp32", scorer=scorer)

    @classmethod
    def from_model(cls, model, classes, class_names, preprocess, device):
        """A predictor for a model in memory (train.py's report on its test split)."""
        self = cls.__new__(cls)
        self._setup(model, classes, class_names, preprocess, device)
        return self

    def _setup(self, model, classes, class_names, preprocess, device, float32=False,
               scorer=None):
        import torch

        from ..models import hardware
        self.classes = list(classes)
        self.class_names = list(class_names or self.classes)
        self.preprocess = preprocess
        self.model = model
        self.batch_size = hardware.inference_batch_size(device)
        # With novelty data the forward pass gives the logits and the novelty in one output
        # (heads/novelty.ScoredClassifier); None where the checkpoint has none.
        self.unknown_threshold = scorer.threshold if scorer is not None else None
        if scorer is not None:
            from ..heads.novelty import ScoredClassifier
            model = ScoredClassifier(model, scorer)
        self._forward = hardware.fast_forward(model, device, float32)
        # Whether the model averages each photo with its mirror image (predict.py --tta would
        # change nothing)
        self.averages_mirror = bool(getattr(self.model, "flip_tta", False))  # not the wrapper's
        self._torch = torch
        self.device = device
        # Whether plain prediction runs in bf16/fp16: explain() then adds a plain pass
        self._reduced = not float32 and hardware.autocast_dtype(device) is not None
        self._explainer = None  # made on the first explain(): no cost to plain prediction

    def explain(self, batch, tta=False):
        """float32 array (N, 3, H, W), preprocessed -> (probabilities (N, classes), the top
        class's evidence map (N, h, w)): see models/explain.py. tta: average with the mirror
        image, as batch_probabilities does. The map is computed in float32 (models/explain.py
        says why); where plain prediction runs in reduced precision, the probabilities are
        still its own (one more plain pass) and the map is of its top class."""
        from ..models.explain import Explainer
        if self._explainer is None:
            self._explainer = Explainer(self.model, self.device)
        probs = target = None
        if self._reduced:  # the same answer as without --explain, in the same precision
            probs = batch_probabilities(self, batch, tta)
            target = probs.argmax(1)
        _, own, _, maps = self._explainer(
            self._torch.from_numpy(np.ascontiguousarray(batch)), mirror=tta, target=target)
        return (own if probs is None else probs), maps

    def probabilities(self, batch):
        """float32 array (N, 3, H, W), preprocessed -> float32 array (N, classes)."""
        return self.scores(batch)[0]

    def scores(self, batch):
        """float32 array (N, 3, H, W), preprocessed -> (probabilities (N, classes), novelty
        (N,) or None where the checkpoint has no novelty data)."""
        out = self._forward(self._torch.from_numpy(np.ascontiguousarray(batch)))
        if self.unknown_threshold is None:
            return self._torch.softmax(out, dim=1).numpy(), None
        return self._torch.softmax(out[:, :-1], dim=1).numpy(), out[:, -1].numpy()


class OnnxPredictor:
    """A model file from export.py, run by ONNX Runtime: the same interface as TorchPredictor,
    and no torch import (the softmax is inside the model; classes and preprocessing are in its
    metadata)."""

    def __init__(self, path, gpu=None, precision="auto", threads=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"model {path}: an ONNX model needs onnxruntime: "
                            f"pip install -e '.[export]'") from None
        if not os.path.isfile(path):
            raise UserError(f"model {path}: no such file; give the .onnx file written by "
                            f"export.py")
        providers = ["CPUExecutionProvider"]
        if gpu is not None and gpu != "cpu":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError(f"--gpu {gpu}: this onnxruntime has no CUDA support; drop "
                                f"--gpu, or install onnxruntime-gpu")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as err:  # onnxruntime raises its own types for a damaged file
            raise UserError(f"model {path}: not a loadable ONNX model "
                            f"({str(err).strip().splitlines()[0][:160]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes = json.loads(meta["classes"])
            self.class_names = json.loads(meta.get("class_names", "null")) or self.classes
            self.preprocess = json.loads(meta["preprocess"])
        except (KeyError, ValueError):
            raise UserError(f"model {path}: has no class names and preprocessing in its "
                            f"metadata; export it with export.py") from None
        self._input = self.session.get_inputs()[0].name
        # An export with the unknown verdict has a second output, "novelty", and its threshold
        # in the metadata
        outputs = [o.name for o in self.session.get_outputs()]
        self._novelty = outputs.index("novelty") if "novelty" in outputs else None
        # An export with the heatmap (export/outputs.py) has a "heatmap" output too
        self.has_heatmap = "heatmap" in outputs
        self._heatmap = outputs.index("heatmap") if self.has_heatmap else None
        self.unknown_threshold = (float(json.loads(meta["unknown_threshold"]))
                                  if self._novelty is not None else None)
        # Unknown (None) for a file exported before export.py stored it
        self.averages_mirror = json.loads(meta.get("averages_mirror", "null"))
        quantization = meta.get("quantization", "none")
        if precision == "fp32" and not quantization.startswith("none"):
            raise UserError(f"--precision fp32: {path} is an {quantization.split()[0]} model "
                            f"(export.py --quantize); export it without --quantize for float32, "
                            f"or drop --precision")

    def probabilities(self, batch):
        """float32 array (N, 3, H, W), preprocessed -> float32 array (N, classes)."""
        return self.scores(batch)[0]

    def scores(self, batch):
        """As TorchPredictor.scores: (probabilities, novelty or None)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        outputs = self.session.run(None, {self._input: batch})
        return outputs[0], (outputs[self._novelty] if self._novelty is not None else None)

    def explain(self, batch, tta=False):
        """As TorchPredictor.explain, from the export's "heatmap" output: the top class's map,
        normalised as predict --json's (checked against the checkpoint's at export time). The
        model's map is of the photo as it predicts it: tta is refused before (check_explain)."""
        outputs = self.session.run(None, {self._input: np.ascontiguousarray(batch, np.float32)})
        return outputs[0], outputs[self._heatmap]


def load_predictor(path, gpu=None, precision="auto", threads=None):
    """The predictor for a model file: ONNX Runtime for .onnx, LiteRT for .tflite, PyTorch for
    a checkpoint;
    precision one of PRECISIONS; threads: of the computation on a CPU (None: every core)."""
    if path.lower().endswith(".onnx"):
        return OnnxPredictor(path, gpu, precision, threads)
    if path.lower().endswith(".tflite"):
        from .litert_predictor import LiteRTPredictor
        return LiteRTPredictor(path, gpu, precision, threads)
    try:
        return TorchPredictor(path, gpu, precision, threads)
    except ModuleNotFoundError as err:
        if err.name != "torch":
            raise
        raise UserError(f"checkpoint {path}: needs PyTorch, which is not installed here; "
                        f"install torch, or predict with the .onnx file that export.py "
                        f"makes of it") from None


def display_names(classes, stored_names, category_names=None):
    if category_names:
        names = read_category_names(category_names)
        return list(check_category_names(names, classes, category_names).values())
    return list(stored_names or classes)


# ---------------------------------------------------------------------------------------------
# Reading images in batches
# ---------------------------------------------------------------------------------------------
@dataclass
class Item:
    path: str
    found: bool = False  # found in a folder, not named: a file that is not an image is litter


@dataclass
class Result:
    path: str
    probs: np.ndarray = None
    error: str = None
    heatmap: np.ndarray = None  # the top class's evidence map (h, w), with explain=True
    novelty: float = None  # where the model has the unknown verdict


def read_image(item, preprocess):
    """(preprocessed array, None), or (None, a one-line error), or (None, None) for litter."""
    path = item.path
    if not os.path.exists(path):
        return None, f"image {path}: no such file; give the path of a photo"
    if os.path.isdir(path):
        return None, f"image {path}: is a folder; give the path of a photo"
    if not os.path.isfile(path):  # a pipe or a device: reading it would block or never end
        return None, f"image {path}: not a regular file; give the path of a photo"
    try:
        array = decode.load_eval_array(path, preprocess)
    except UnidentifiedImageError:
        if item.found and not path.lower().endswith(scanning.IMAGE_EXTENSIONS):
            return None, None  # a stray file in a folder of photos, as in training
        return None, f"image {path}: cannot be read: not an image (unknown format); {IMAGE_FIX}"
    except decode.IMAGE_ERRORS as err:
        return None, (f"image {path}: cannot be read: {decode.describe_image_error(err)}; "
                      f"{IMAGE_FIX}")
    return array, None


def load_image(path, preprocess):
    """One photo, preprocessed; a UserError if it cannot be read."""
    array, error = read_image(Item(path), preprocess)
    if error:
        raise UserError(error)
    return array


def read_batches(items, preprocess, batch_size, threads=DECODE_THREADS):
    """Yield (items, [(array, error)]) batch by batch, in order. Threads decode the next
    batches while the caller runs the model on this one (PIL and numpy release the GIL)."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if len(chunks) <= 1 or threads <= 0:
        for chunk in chunks:
            yield chunk, [read_image(item, preprocess) for item in chunk]
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(threads) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append((chunk, [pool.submit(read_image, item, preprocess) for item in chunk]))
            if len(pending) > 2:  # two batches ahead: enough to hide decoding, little memory
                done, futures = pending.popleft()
                yield done, [f.result() for f in futures]
        while pending:
            done, futures = pending.popleft()
            yield done, [f.result() for f in futures]


def predict_paths(predictor, items, tta=False, threads=DECODE_THREADS, explain=False):
    """A Result per item (litter left out): probabilities, or the reason it failed; with
    explain, the top class's heatmap too (a checkpoint's predictor only)."""
    batch_size = getattr(predictor, "batch_size", 16)
    progress = Progress(len(items), "predicting") if len(items) > batch_size else None
    results = []
    for chunk, decoded in read_batches(items, predictor.preprocess, batch_size, threads):
        good = [array for array, error in decoded if array is not None]
        novelty = None
        if explain and good:
            probs, maps = predictor.explain(np.stack(good), tta)
            probs, maps = iter(probs), iter(maps)
            if getattr(predictor, "unknown_threshold", None) is not None:  # one more pass
                novelty = batch_scores(predictor, np.stack(good), tta)[1]
        else:
            probs, novelty = batch_scores(predictor, np.stack(good), tta) if good else ([], None)
            probs = iter(probs)
        novelty = iter([None] * len(good) if novelty is None else novelty.tolist())
        for item, (array, error) in zip(chunk, decoded):
            if array is not None:
                results.append(Result(item.path, next(probs),
                                      heatmap=next(maps) if explain else None,
                                      novelty=next(novelty)))
            elif error:
                results.append(Result(item.path, error=error))
        if progress:
            progress.update(len(chunk))
    if progress:
        progress.close()
    return results


def batch_probabilities(predictor, batch, tta=False):
    return batch_scores(predictor, batch, tta)[0]


def batch_scores(predictor, batch, tta=False):
    """(probabilities, novelty or None) of a batch; with tta both averaged with the mirror
    image's."""
    scores = getattr(predictor, "scores", None)
    probs, novelty = scores(batch) if scores else (predictor.probabilities(batch), None)
    if tta:  # the mirror image: flowers, animals and most objects look the same mirrored
        mirrored = np.ascontiguousarray(batch[..., ::-1])
        other, other_novelty = scores(mirrored) if scores else \
            (predictor.probabilities(mirrored), None)
        probs = (probs + other) / 2
        if novelty is not None:
            novelty = (novelty + other_novelty) / 2
    return probs, novelty


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
def top_k(probs, k):
    top = np.argsort(-probs, kind="stable")[:k]
    return top.tolist(), probs[top].tolist()


def prediction_object(image, probs, k, classes, names, heatmap=None, novelty=None,
                      threshold=None):
    """The JSON object of one image's prediction, as predict.py --json and serve.py give it;
    with a heatmap (predict.py --explain), "heatmap": its grid (models/explain.heatmap_grid);
    with a novelty and the threshold it is judged by, "unknown" and "novelty"."""
    obj = {"image": image, "predictions": [
        {"class": classes[i], "name": names[i], "probability": round(float(p), 4)}
        for i, p in zip(*top_k(probs, k))]}
    if novelty is not None and threshold is not None:
        obj["unknown"] = is_unknown(novelty, threshold)
        obj["novelty"] = round(float(novelty), 4)
    if heatmap is not None:
        from ..models.explain import heatmap_grid
        obj["heatmap"] = heatmap_grid(heatmap)
    return obj


def is_unknown(novelty, threshold):
    """The verdict: unlike the training photos of every class (novelty above the threshold)."""
    return bool(novelty > threshold)


def verdict_line(novelty, threshold):
    """The verdict in plain words, as predict.py prints it under the top K."""
    if is_unknown(novelty, threshold):
        return (f"verdict: unknown - unlike the training photos of every class (novelty "
                f"{novelty:.2f} > threshold {threshold:.2f}); the classes above are only the "
                f"nearest")
    return (f"verdict: one of the known classes (novelty {novelty:.2f} <= threshold "
            f"{threshold:.2f})")
