"""--format onnx: the whole network, softmax included, for ONNX Runtime.

  input  "image":         float32 (N, 3, SIZE, SIZE), preprocessed exactly as predict.py does
                          (decode.eval_array: resize, centre crop, normalise); N is free
  output "probabilities": float32 (N, classes), each row sums to 1, columns in class order
  output "novelty":       float32 (N,), where the checkpoint has the unknown verdict's data
                          (heads/novelty.py: its bank of features is inside the model); a
                          photo is unknown above metadata "unknown_threshold"
  output "heatmap":       float32 (N, h, w), where the network can carry it exactly (a linear
                          head on pooled features: outputs.py): the top class's evidence map,
                          normalised as predict.py --json's "heatmap" (0..1, rows top down)
Its metadata_props carry, as JSON strings, what prediction needs besides the weights: "classes"
(folder names, output order), "class_names", "preprocess" {size, crop_pct, upscale, mean, std},
"arch", and "unknown_threshold" with the novelty output. predict.py and serve.py read them, so
the .onnx file alone is enough to predict. ONNX Runtime's probabilities must match PyTorch's
within checks.PARITY_ATOL and name the same top class on every check photo, its novelty
PyTorch's within NOVELTY_ATOL, and its heatmap predict.py --explain's within
outputs.HEATMAP_ATOL.

Needs the optional packages of the export extra (onnx, onnxruntime): pip install -e '.[export]'.
"""
import json
import os
import tempfile
import time
import warnings

from ..errors import UserError
from .checks import batched, check_parity, mb, parity_line, write_file_atomic

ONNX_FORMAT = "image-classifier-onnx"
ONNX_FORMAT_VERSION = 1
OPSET = 17
INSTALL_HINT = "pip install -e '.[export]'"
NOVELTY_ATOL = 1e-3  # the largest |novelty difference| (a z-score, mostly within -3..10)


def write(job):
    """Export, check against PyTorch, quantize where asked, then write --out."""
    onnx, ort = require_onnx()
    job.check  # noqa: B018 (the photos first: a wrong --check_images fails before the export)
    out = job.out_path("model.int8.onnx" if job.args.quantize else "model.onnx")
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        names = export_and_check(job, path, ort)
        if job.args.quantize:
            path = quantize_and_report(ort, job, path)
        add_metadata(onnx, path, job.ckpt, quantized=job.args.quantize, outputs=names)
        write_file_atomic(path, out)
    return out


def export_and_check(job, path, ort):
    """Export, then compare with PyTorch on the check images: the probabilities, and the
    novelty and the heatmap where the model carries them (outputs.py). Returns the output
    names."""
    from . import outputs
    scorer, heatmap = job.scorer, outputs.carries_heatmap(job.model)
    names = ["probabilities"] + ["novelty"] * (scorer is not None) + ["heatmap"] * heatmap
    t0 = time.perf_counter()
    export_onnx(outputs.build(job.model, scorer, heatmap), job.image_size(), path, names)
    print(f"exported to ONNX in {time.perf_counter() - t0:.1f}s")
    probs = batched(onnx_runner(ort, path), job.check.arrays)
    print(parity_line("ONNX Runtime (float32) vs PyTorch", probs, job.reference, job.check))
    check_parity(probs, job.reference)
    if scorer is not None:
        from ..heads import novelty
        check_novelty_parity(novelty.ScoredClassifier(job.model, scorer).eval(), ort, path,
                             job.check.arrays)
    if heatmap:
        maps = batched(onnx_runner(ort, path, output=names.index("heatmap")), job.check.arrays)
        outputs.check_heatmaps(maps, outputs.reference_heatmaps(job.model, job.check.arrays),
                               "ONNX Runtime")
    return names


def check_novelty_parity(model, ort, path, arrays):
    """ONNX Runtime's novelty against PyTorch's float32 one: within NOVELTY_ATOL (CheckFailed
    beyond), and how many verdicts agree."""
    import torch

    from .checks import check_novelty_values
    with torch.inference_mode():
        reference = batched(lambda x: model(torch.from_numpy(x))[:, -1].numpy(), arrays)
    values = batched(onnx_runner(ort, path, output=1), arrays)
    check_novelty_values(values, reference, model.scorer.threshold,
                         "novelty (the unknown verdict's score)", "ONNX Runtime's", NOVELTY_ATOL)


def quantize_and_report(ort, job, float_path):
    """The int8 model beside the float one; prints how far its answers moved and its size."""
    path = float_path.replace(".onnx", ".int8.onnx")
    print(f"quantizing to int8, calibrated on {job.calibration.describe()}")
    quantize_static_int8(ort, float_path, path, job.calibration.arrays)
    probs = batched(onnx_runner(ort, path), job.check.arrays)
    print(parity_line("int8 vs PyTorch", probs, job.reference, job.check))
    print(f"size: float32 {mb(float_path)}, int8 {mb(path)} "
          f"({os.path.getsize(float_path) / os.path.getsize(path):.1f}x smaller)")
    return path


def require_onnx():
    """onnx and onnxruntime are optional: say in one line how to get them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise UserError(f"export needs the optional package {err.name}: {INSTALL_HINT}") from None
    return onnx, onnxruntime


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def export_onnx(net, size, path, names):
    """Trace the network (outputs.build: softmax included) at the checkpoint's input size; its
    outputs named names, the batch axis free."""
    import torch
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        # Conv2dSame computes its padding from the input's height and width in Python; the
        # tracer warns that it records them as constants. That is what we want: the input size
        # is fixed by the checkpoint's preprocessing, and only the batch axis stays free.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter, on purpose: it needs no package beyond torch and onnx (the
        # newer dynamo exporter needs onnxscript too), and it traces this network (plain
        # convolutions, pads and means) exactly, as the parity check shows. Its deprecation
        # notice is for the maintainers, not for the person exporting.
        warnings.simplefilter("ignore", DeprecationWarning)
        # The exporter puts the module back in the mode it found it in: eval, for the checks.
        torch.onnx.export(net, (example,), path, dynamo=False,
                          input_names=["image"], output_names=names,
                          dynamic_axes={name: {0: "batch"} for name in ["image", *names]},
                          opset_version=OPSET, do_constant_folding=True)


def add_metadata(onnx, path, ckpt, quantized, outputs=("probabilities",)):
    """Store classes, names and preprocessing in the model file, as JSON strings (and where
    outputs has "novelty", the unknown verdict's threshold)."""
    model = onnx.load(path)
    meta = {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "classes": json.dumps(list(ckpt["classes"])),
        "class_names": json.dumps(list(ckpt.get("class_names") or ckpt["classes"])),
        "preprocess": json.dumps(dict(ckpt["preprocess"])),
        "arch": str(ckpt["model_args"].get("arch", "")),
        "output": "probabilities (softmax applied)",
        "quantization": "int8 static per-channel (QDQ)" if quantized else "none (float32)",
        "averages_mirror": json.dumps(bool(ckpt["model_args"].get("flip_tta", False))),
    }
    if "novelty" in outputs:
        meta["unknown_threshold"] = json.dumps(float(ckpt["novelty"]["threshold"]))
        meta["output"] += ("; novelty (N,): the unknown verdict's score, a photo is unknown "
                           "above metadata unknown_threshold")
    if "heatmap" in outputs:
        meta["output"] += ("; heatmap (N, h, w): where the model found the evidence for its top "
                           "class, 0..1 (1: the most), over the centre crop it sees")
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = ("Image classifier exported by export.py: input 'image' (N, 3, H, W) "
                        "preprocessed as described in metadata 'preprocess'; output "
                        "'probabilities' (N, classes) in the order of metadata 'classes'.")
    onnx.save(model, path)


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------
def quantize_static_int8(ort, src, dest, calibration_arrays):
    """Static int8, weights per channel, activations calibrated on real images.

    Why, measured on the 868 flowers5 test photos (EfficientNet-Lite0 head, float32 76.5%):
    static per-channel QDQ 77.4%, 3.5x smaller, faster than float; dynamic int8 62.4% and 4x
    slower than float (ConvInteger); static per-tensor 62.4%. The softmax stays float."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": a[None]} for a in calibration_arrays])

        def get_next(self):
            return next(self.batches, None)

    prepared = dest + ".prep.onnx"
    quant_pre_process(src, prepared, skip_symbolic_shape=True)
    quantize_static(prepared, dest, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm", "Add", "GlobalAveragePool",
                                          "ReduceMean", "Clip", "Relu"])
    os.remove(prepared)


def onnx_runner(ort, path, output=0):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x})[output]
