"""--format tflite: a LiteRT (TensorFlow Lite) model for Android, converted from PyTorch by
litert-torch (no TensorFlow needed), int8 by ai-edge-quantizer, checked with LiteRT's interpreter.

  input  float32 (1, SIZE, SIZE, 3): one photo, channels last (as an Android Bitmap's pixels),
         preprocessed as predict.py does: resize, centre crop, (pixel / 255 - mean) / std
  output float32 (1, classes): probabilities (softmax applied), in the order of "classes"
  output float32 (1, h, w): the heatmap, where the network can carry it exactly (outputs.py):
         the top class's evidence map, 0..1, as predict.py --json's "heatmap" (checked
         against predict --explain's within outputs.HEATMAP_ATOL).
  output float32 (1,): the unknown verdict's novelty, where the checkpoint has its data
         (heads/novelty.py; its bank of features is inside the model): a photo is unknown above
         the metadata's "unknown_threshold". Its k-th nearest neighbour is computed without a
         sort (novelty.kth_largest: torch.topk converts to STABLEHLO_SORT, which LiteRT's
         interpreter does not run), checked against PyTorch's topk within NOVELTY_ATOL.
The outputs are told apart by rank (2, 1, 3), as app/litert_predictor.py picks them.
The flatbuffer's metadata entry "imgclf" (METADATA_NAME; app/litert_predictor.read_metadata
reads it) holds a JSON object with what prediction needs besides the weights: classes,
class_names, preprocess, layout, quantization, averages_mirror, outputs (the outputs' roles in
order), unknown_threshold (with the novelty output). predict.py and serve.py read it, so the
file alone is enough.

Needs the optional packages of the mobile extra: pip install -e '.[mobile]'.
"""
import copy
import itertools
import json
import os
import tempfile
import time

import numpy as np

from ..app.litert_predictor import METADATA_NAME
from ..errors import UserError
from . import outputs
from .checks import (batched, check_int8, check_novelty_values, check_parity,
                     load_calibration_images, mb, parity_line, write_file_atomic)

TFLITE_FORMAT = "image-classifier-tflite"
TFLITE_FORMAT_VERSION = 1
INSTALL_HINT = "pip install -e '.[mobile]'"
# LiteRT's float32 kernels (XNNPACK) sum in another order than PyTorch's: measured up to 3e-6
# on flowers5 (docs/export.md); the ONNX export's tolerance holds.
PARITY_ATOL = 1e-4
# The largest |novelty difference| (a z-score, mostly within -3..10), as the ONNX export's
NOVELTY_ATOL = 1e-3


def write(job):
    """Convert, check against PyTorch, quantize where asked, add the metadata, write --out."""
    require_converter()
    job.check  # noqa: B018 (the photos first: a wrong --check_images fails before converting)
    out = job.out_path("model.int8.tflite" if job.args.quantize else "model.tflite")
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        path = os.path.join(tmp, "model.tflite")
        heatmap = outputs.carries_heatmap(job.model)
        scorer = job.scorer
        convert(job.model, job.image_size(), path, heatmap=heatmap, scorer=scorer)
        probs = predict_arrays(path, job.check.arrays)
        print(parity_line("LiteRT (float32) vs PyTorch", probs, job.reference, job.check))
        check_parity(probs, job.reference, runtime="LiteRT", atol=PARITY_ATOL)
        if scorer is not None:
            check_novelty(path, job.model, scorer, job.check.arrays)
        if heatmap:
            outputs.check_heatmaps(predict_heatmaps(path, job.check.arrays),
                                   outputs.reference_heatmaps(job.model, job.check.arrays),
                                   "LiteRT")
        if job.args.quantize:
            path = quantize_and_check(job, path, scorer)
        add_metadata(path, job.ckpt, quantized=job.args.quantize, heatmap=heatmap,
                     novelty=scorer is not None)
        write_file_atomic(path, out)
    return out


def require_converter():
    """litert-torch, ai-edge-litert and ai-edge-quantizer are optional: say how to get them."""
    for module in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"):
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"--format tflite needs the optional package "
                            f"{module.replace('_', '-')}: {INSTALL_HINT}") from None


def check_novelty(path, model, scorer, arrays, runtime="LiteRT", atol=NOVELTY_ATOL):
    """LiteRT's novelty (sort-free) against PyTorch's float32 one (topk): CheckFailed beyond
    atol; prints the largest difference and how many verdicts agree. Returns the difference."""
    import torch

    from ..heads import novelty
    scored = novelty.ScoredClassifier(model, scorer).eval()
    with torch.inference_mode():
        reference = batched(lambda x: scored(torch.from_numpy(x))[:, -1].numpy(), arrays)
    return check_novelty_values(
        predict_novelty(path, arrays), reference, scorer.threshold,
        f"{runtime} novelty (the unknown verdict's score) vs PyTorch", f"{runtime}'s", atol)


def convert(model, size, path, heatmap=False, scorer=None):
    """The whole network, softmax included, taking channels-last input, as a .tflite file;
    with scorer (model an ImageClassifier) the novelty as an output, computed sort-free, and
    with heatmap the heatmap."""
    import litert_torch
    import torch

    class ChannelsLast(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image):
            out = self.net(image.permute(0, 3, 1, 2))
            return out if extras else torch.softmax(out, dim=1)

    t0 = time.perf_counter()
    example = (torch.zeros(1, size, size, 3),)
    net = contiguous_copy(model)
    extras = heatmap or scorer is not None
    if extras:
        if scorer is not None:
            scorer = copy.deepcopy(scorer)
            scorer.sort_free = True  # LiteRT's interpreter runs no sort (STABLEHLO_SORT)
        net = outputs.build(net, scorer, heatmap=heatmap)
    edge_model = litert_torch.convert(ChannelsLast(net).eval(), example)
    edge_model.export(path)
    print(f"converted to LiteRT in {time.perf_counter() - t0:.1f}s")


def contiguous_copy(model):
    """A copy of the model whose weights are contiguous in memory.

    EfficientNet-Lite's convolution weights are permuted views (strides (1, out, ...), from
    TensorFlow's layout). litert-torch 0.10 converted the whole network with them to wrong
    numbers (flowers5: top-1 as PyTorch on 193 of 868 photos; features off by 5.8 on a
    magnitude of 5.5), though each block alone converted right; with contiguous copies of the
    same weights the features agree to 8e-6 (docs/export.md)."""
    import torch
    model = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.data = tensor.data.contiguous()
    return model


# int8 choices, made on the valid splits of flowers5 and the digits (held out; docs/export.md):
CALIBRATION_COUNT = 256  # training photos, spread over the (class-sorted) list
# The head stays float32: a logistic head's weights span up to 75x their mean (digits: max
# 137, mean 1.8), so int8 rows round most of them to a step of about 1, and the pooled
# features it weighs feed it with int8 steps of 0.02. It is 1280 x classes weights: a few KB.
FLOAT_OPS = ("INPUT", "OUTPUT", "MEAN", "FULLY_CONNECTED")
# The stem and the first two MBConv blocks stay float32 too: int8 weights there alone (per
# channel, in PyTorch) cost the digits 2.2 points (block 1) of the 5.6 that int8 weights
# everywhere cost; float there, the int8 model agrees with PyTorch on 180/180 digits and
# 424/430 flowers5 valid photos (before 174, 420). They hold 0.2% of the weights
# (docs/export.md). Regexes on the converted ops' tensor names (litert-torch's module paths).
FLOAT_LAYERS = (r".*__conv_stem.*", r".*MBConvBlock_0(?![0-9]).*", r".*MBConvBlock_1(?![0-9]).*")
# The unknown verdict's novelty stays float32 too: cosines a few hundredths apart, divided by
# their spread, in int8 steps moved the novelty by up to 2.9 and changed 192 of 200 verdicts on
# flowers5 (docs/export.md). Its ops carry the scorer's module name; the MAXIMUM of the two
# z-scores is named after the graph's output, hence the op (the heatmap's clamp is one too).
# Only the stored features it compares with (the bank, a row per training photo, and its
# projection) are int8 weights, one scale per row, computed in float32: 4x smaller (flowers5:
# 4.9 -> 1.2 MB), and the same verdicts as with them float32 (855/868 of flowers5's test photos
# agree with PyTorch's either way; docs/export.md).
NOVELTY_LAYERS = (r".*NoveltyScorer_scorer.*",)
NOVELTY_OPS = ("MAXIMUM",)
QUANTIZATION = ("int8 static (int8 weights per channel and activations; float32 input, "
                "output, head, stem and first two blocks; the unknown verdict's stored "
                "features int8, computed in float32)")


def quantize_and_check(job, float_path, scorer=None):
    """Static int8 (weights and activations; the head, stem and first two blocks float),
    calibrated on training photos; refused where it loses more than checks.INT8_MAX_DROP
    points of accuracy on the check photos."""
    from ai_edge_quantizer import qtyping, quantizer, recipe
    calibration = load_calibration_images(job.ckpt, job.check, count=CALIBRATION_COUNT)
    print(f"quantizing to int8, calibrated on {calibration.describe()}")
    q = quantizer.Quantizer(float_path)
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    keep_float(q, qtyping)
    result = q.quantize(calibrate_min_max(q, float_path, calibration.arrays))
    path = float_path.replace(".tflite", ".int8.tflite")
    result.export_model(path, overwrite=True)
    probs = predict_arrays(path, job.check.arrays)
    print(parity_line("LiteRT int8 vs PyTorch", probs, job.reference, job.check))
    print(f"size: float32 {mb(float_path)}, int8 {mb(path)} "
          f"({os.path.getsize(float_path) / os.path.getsize(path):.1f}x smaller)")
    check_int8(probs, job.reference, job.check, runtime="LiteRT")
    if scorer is not None:  # reported, not gated: int8 moves it as it moves the probabilities
        check_novelty(path, job.model, scorer, job.check.arrays, "LiteRT int8", float("inf"))
    return path


def keep_float(q, qtyping):
    """FLOAT_OPS, FLOAT_LAYERS and the novelty's ops left float32 in q's recipe, but for the
    novelty's stored features: int8 weights, dequantized before use. (The
    recipe's ".*" also quantizes the graph's input and output: int8 tensors an app would have
    to scale itself.)"""
    for op in FLOAT_OPS + NOVELTY_OPS:
        q.update_quantization_recipe(regex=".*", operation_name=getattr(
            qtyping.TFLOperationName, op), algorithm_key="no_quantize")
    for regex in FLOAT_LAYERS + NOVELTY_LAYERS:
        q.update_quantization_recipe(regex=regex, operation_name=qtyping.TFLOperationName.
                                     ALL_SUPPORTED, algorithm_key="no_quantize")
    for regex in NOVELTY_LAYERS:  # the latest matching rule wins: the bank's weights int8
        q.add_weight_only_config(regex=regex, num_bits=8, operation_name=qtyping.
                                 TFLOperationName.FULLY_CONNECTED)


def calibrate_min_max(q, float_path, arrays):
    """Each tensor's range: the min and max over all calibration photos.

    Quantizer.calibrate keeps a moving average (0.95) of each photo's min and max instead,
    which is mostly the last ~20 photos': of the class-sorted training photos, the last
    class's. On flowers5's valid photos that lost 1.9-2.8 points; min/max over all 0.0-0.5
    (docs/export.md). Calibrator is the quantizer's own class; the recipe is q's (private,
    ai-edge-quantizer 0.10)."""
    from ai_edge_quantizer import calibrator
    from ai_edge_quantizer.utils import qsv_utils
    signature, input_name = signature_input(float_path)
    calib = calibrator.Calibrator(float_path, num_threads=1,
                                  qsv_update_func=qsv_utils.min_max_update)
    calib.calibrate({signature: [{input_name: channels_last(a)} for a in arrays]},
                    q._recipe_manager)  # noqa: SLF001
    return calib.get_model_qsvs()


def signature_input(path):
    """(signature name, its input's name) of a converted model with one signature."""
    from ai_edge_litert.interpreter import Interpreter
    [(name, signature)] = Interpreter(model_path=path).get_signature_list().items()
    return name, signature["inputs"][0]


def channels_last(array):
    """One preprocessed (3, H, W) photo -> the model's (1, H, W, 3) input."""
    return np.ascontiguousarray(array.transpose(1, 2, 0)[None], dtype=np.float32)


def predict_arrays(path, arrays):
    """LiteRT's probabilities for preprocessed (3, H, W) photos, one at a time (batch 1)."""
    return run_output(path, arrays, rank=2)


def predict_heatmaps(path, arrays):
    """LiteRT's heatmaps (N, h, w) for preprocessed (3, H, W) photos."""
    return run_output(path, arrays, rank=3)


def predict_novelty(path, arrays):
    """LiteRT's novelty (N, 1) for preprocessed (3, H, W) photos."""
    return run_output(path, arrays, rank=1)


def run_output(path, arrays, rank):
    """The model's output of that rank (probabilities 2, novelty 1, the heatmap 3) for each
    photo."""
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    image = interpreter.get_input_details()[0]["index"]
    output = next(d["index"] for d in interpreter.get_output_details()
                  if len(d["shape"]) == rank)
    values = []
    for array in arrays:
        interpreter.set_tensor(image, channels_last(array))
        interpreter.invoke()
        values.append(interpreter.get_tensor(output)[0].copy())
    return np.stack(values)


def metadata(ckpt, quantized, heatmap=False, novelty=False):
    meta = {
        "format": TFLITE_FORMAT,
        "format_version": TFLITE_FORMAT_VERSION,
        "classes": list(ckpt["classes"]),
        "class_names": list(ckpt.get("class_names") or ckpt["classes"]),
        "preprocess": dict(ckpt["preprocess"]),
        "arch": str(ckpt["model_args"].get("arch", "")),
        "layout": "NHWC",
        "output": "probabilities (softmax applied)" + (
            "; heatmap (1, h, w): where the model found the evidence for its top class, 0..1 "
            "(1: the most), over the centre crop it sees" if heatmap else ""),
        "quantization": QUANTIZATION if quantized else "none (float32)",
        "averages_mirror": bool(ckpt["model_args"].get("flip_tta", False)),
        "outputs": ["probabilities"] + ["novelty"] * novelty + ["heatmap"] * heatmap,
    }
    if novelty:
        meta["unknown_threshold"] = float(ckpt["novelty"]["threshold"])
        meta["output"] += ("; novelty (1,): the unknown verdict's score, a photo is unknown "
                           "(none of the classes) above unknown_threshold")
    return meta


def add_metadata(path, ckpt, quantized, heatmap=False, novelty=False):
    """Store metadata(...) as JSON in the flatbuffer's metadata list, under METADATA_NAME."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    model = flatbuffer_utils.read_model(path)
    buffer = schema.BufferT()
    meta = metadata(ckpt, quantized, heatmap, novelty)
    buffer.data = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or [])  # names read back are bytes
                      if m.name not in (METADATA_NAME, METADATA_NAME.encode())]
    model.metadata.append(entry)
    flatbuffer_utils.write_model(model, path)
