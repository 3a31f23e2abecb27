"""--format coreml: a Core ML classifier (.mlpackage, an ML program) for iOS and macOS, converted
from PyTorch by coremltools.

  input  "image": a colour image (RGB) of SIZE x SIZE pixels; the normalisation ((pixel / 255 -
         mean) / std) is inside the model (the image input's scale and bias where the three
         std are equal, as for EfficientNet-Lite; otherwise operations after it), so Xcode's
         preview and Vision feed it a photo as it is; the resize and centre crop are the app's
         (docs/export.md: Vision's regionOfInterest)
  output "classLabel" (the top class's name) and "classLabel_probs" (name -> probability)
  output "heatmap" (1, h, w), where the network can carry it exactly (outputs.py): the top
         class's evidence map, 0..1, as predict.py --json's "heatmap"; its numbers checked
         as the probabilities are, against predict --explain's within outputs.HEATMAP_ATOL.
  output "novelty" (1,), where the checkpoint has the unknown verdict's data (heads/novelty.py;
         its bank inside the model; MIL has topk): a photo is unknown above the metadata's
         "unknown_threshold"; checked as the probabilities are, within NOVELTY_ATOL.
The model's metadata has the class folder names and the preprocessing as JSON (key "imgclf").
Core ML predicts only on Apple's systems: here the saved program is read back and computed
with PyTorch (mil_check.py) and must match PyTorch within checks.PARITY_ATOL, same top class;
its shapes, labels and metadata are checked too.

Needs the optional package coremltools (the mobile extra): pip install -e '.[mobile]'.
"""
import contextlib
import io
import json
import os
import tempfile
import time
import warnings

import numpy as np

from ..errors import UserError
from .checks import (CheckFailed, PARITY_ATOL, batched, check_novelty_values, check_parity,
                     parity_line)
from .checks import write_folder_atomic
from . import mil_check, outputs

INSTALL_HINT = "pip install -e '.[mobile]'"
METADATA_KEY = "imgclf"
# iOS 15 / macOS 12: the first systems that run ML programs (.mlpackage).
DEPLOYMENT_TARGET = "iOS15"
NOVELTY_ATOL = 1e-3  # the largest |novelty difference| (a z-score), as the ONNX export's


def write(job):
    """Convert, check the saved package's spec and numbers, then write --out (a folder)."""
    ct = require_coremltools()
    if job.args.quantize:
        raise UserError("--quantize: not offered for --format coreml (its int8 could not be "
                        "checked here); drop --quantize")
    job.check  # noqa: B018 (the photos first: a wrong --check_images fails before converting)
    out = job.out_path("model.mlpackage")
    if not out.endswith(".mlpackage"):
        raise UserError(f"--out {out}: a Core ML model is a folder named *.mlpackage; give a "
                        f"name ending in .mlpackage")
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        path = os.path.join(tmp, "model.mlpackage")
        heatmap, scorer = outputs.carries_heatmap(job.model), job.scorer
        convert(ct, job, path, heatmap=heatmap, scorer=scorer)
        with quiet():
            function = mil_check.load_program(path)
        check_spec(ct, path, job.ckpt, function)
        check_numbers(function, job, scorer)
        write_folder_atomic(path, out)
    return out


def require_coremltools():
    try:
        with quiet():
            import coremltools
    except ImportError:
        raise UserError(f"--format coreml needs the optional package coremltools: "
                        f"{INSTALL_HINT}") from None
    return coremltools


@contextlib.contextmanager
def quiet():
    """coremltools prints, on Linux, a line for each part of Core ML it cannot load (they
    exist only on Apple's systems), and its converter warns of torch versions it has not
    tested; the parity check below is what says whether the conversion is right."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def image_normalisation(preprocess):
    """(scale, bias, mean, std left for the graph): Core ML's image input computes scale *
    pixel + bias[channel], one scale for all channels, so it holds the whole normalisation
    where the three std are equal; otherwise it only divides by 255."""
    mean, std = preprocess["mean"], preprocess["std"]
    if len(set(std)) == 1:
        return 1 / (255 * std[0]), [-m / std[0] for m in mean], None
    return 1 / 255, [0.0, 0.0, 0.0], (mean, std)


def convert(ct, job, path, heatmap=False, scorer=None):
    """The network (outputs.build: softmax, the novelty with scorer, the heatmap with heatmap)
    as a classifier ML program, its input an image with the normalisation inside."""
    import torch
    size = job.image_size()
    scale, bias, in_graph = image_normalisation(job.ckpt["preprocess"])

    class NormaliseThenSoftmax(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = outputs.build(net, scorer, heatmap) if extras else net
            mean, std = in_graph or ([0.0] * 3, [1.0] * 3)
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
            self.normalise = in_graph is not None

        def forward(self, image):
            if self.normalise:
                image = (image - self.mean) / self.std
            return self.net(image) if extras else torch.softmax(self.net(image), dim=1)

    extras = heatmap or scorer is not None
    t0 = time.perf_counter()
    # torch.export fixes the input size, so Conv2dSame's padding is a constant (the
    # TorchScript trace keeps it as arithmetic on shapes, which coremltools cannot convert).
    program = torch.export.export(NormaliseThenSoftmax(job.model).eval(),
                                  (torch.zeros(1, 3, size, size),)).run_decompositions({})
    names = list(job.ckpt.get("class_names") or job.ckpt["classes"])
    probabilities, *others = [spec.arg.name for spec in program.graph_signature.output_specs]
    with quiet():
        model = ct.convert(
            program, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
            minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
            inputs=[ct.ImageType(name="image", shape=(1, 3, size, size), scale=scale,
                                 bias=bias, color_layout=ct.colorlayout.RGB)],
            # With the heatmap, the classifier must be told which output is the probabilities
            classifier_config=ct.ClassifierConfig(names,
                                                  predicted_probabilities_output=probabilities))
    if others:
        model = named_outputs(ct, model, dict(zip(
            others, ["novelty"] * (scorer is not None) + ["heatmap"] * heatmap)))
    describe(model, job.ckpt, novelty=scorer is not None)
    model.save(path)
    print(f"converted to Core ML in {time.perf_counter() - t0:.1f}s")


def named_outputs(ct, model, names):
    """The model with its novelty and heatmap outputs, named by the converter after their last
    operations, renamed ({converter's name: ours})."""
    spec = model.get_spec()
    for name, ours in names.items():
        ct.utils.rename_feature(spec, name, ours, rename_inputs=False)
    with quiet():
        return ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)


def describe(model, ckpt, novelty=False):
    """What Xcode shows about the model, and the metadata an app may read."""
    pre = ckpt["preprocess"]
    model.short_description = (f"Image classifier ({len(ckpt['classes'])} classes) exported by "
                               f"imgclf's export.py")
    model.input_description["image"] = (
        f"A photo, {pre['size']} x {pre['size']} RGB: resize the shorter side to "
        f"{round(pre['size'] / pre['crop_pct'])} px and take the centre square")
    model.output_description["classLabel"] = "The most likely class"
    model.output_description["classLabel_probs"] = "Probability of each class"
    if "heatmap" in model.output_description:
        model.output_description["heatmap"] = (
            "Where the model found the evidence for its top class, 0..1 (1: the most), over "
            "the image (rows top down)")
    if novelty:
        model.output_description["novelty"] = (
            "The unknown verdict's score: the photo is none of the classes above the metadata's "
            "unknown_threshold")
    model.user_defined_metadata[METADATA_KEY] = json.dumps(metadata(ckpt, novelty))


def metadata(ckpt, novelty=False):
    meta = {"format": "image-classifier-coreml", "format_version": 1,
            "classes": list(ckpt["classes"]),
            "class_names": list(ckpt.get("class_names") or ckpt["classes"]),
            "preprocess": dict(ckpt["preprocess"]),
            "arch": str(ckpt["model_args"].get("arch", "")),
            "averages_mirror": bool(ckpt["model_args"].get("flip_tta", False))}
    if novelty:
        meta["unknown_threshold"] = float(ckpt["novelty"]["threshold"])
    return meta


def check_spec(ct, path, ckpt, function):
    """The saved package, read back: an image input of the checkpoint's size, the class names
    as labels in output order (the program's classify operation), the metadata."""
    with quiet():
        spec = ct.models.MLModel(path, skip_model_load=True).get_spec()
    size = ckpt["preprocess"]["size"]
    [image] = spec.description.input
    kind = image.type.WhichOneof("Type")
    if kind != "imageType" or (image.type.imageType.width, image.type.imageType.height) != (
            size, size):
        raise CheckFailed(f"Core ML's input is {kind}, not a {size} x {size} image")
    labels = [str(c) for op in function.operations if op.op_type == "classify"
              for c in op.inputs["classes"].val]
    names = list(ckpt.get("class_names") or ckpt["classes"])
    if labels != names:
        raise CheckFailed(f"Core ML's class labels {labels[:5]} are not the checkpoint's")
    stored = json.loads(spec.description.metadata.userDefined[METADATA_KEY])
    if stored["classes"] != list(ckpt["classes"]):
        raise CheckFailed("Core ML's metadata does not name the checkpoint's classes")
    print(f"Core ML spec: image {size} x {size} RGB, {len(names)} class labels, metadata ok")


def check_numbers(function, job, scorer=None):
    """The saved program computed with PyTorch on the check photos (as pixels: the program
    takes the image before its scale and bias) against the checkpoint; its novelty against
    PyTorch's with scorer."""
    pre = job.ckpt["preprocess"]
    mean = np.asarray(pre["mean"], np.float32).reshape(3, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(3, 1, 1)
    heatmaps, novelties = [], []
    try:
        # 4 photos at a time: the check keeps every intermediate value of a batch (16 at a
        # time peaked at 3.9 GB on 224 px photos)
        probs = batched(lambda x: mil_check.run(function, (x * std + mean) * 255, heatmaps,
                                                novelties), job.check.arrays, batch_size=4)
    except mil_check.NotEvaluated as why:
        print(f"Core ML numbers not checked: the program uses {why}, which this check does "
              f"not compute (its spec was checked)")
        return
    print(parity_line("Core ML program (float32, computed here) vs PyTorch", probs,
                      job.reference, job.check))
    check_parity(probs, job.reference, runtime="Core ML's program", atol=PARITY_ATOL)
    if scorer is not None:
        check_novelty(np.concatenate(novelties) if novelties else None, job, scorer)
    if heatmaps:
        outputs.check_heatmaps(np.concatenate(heatmaps),
                               outputs.reference_heatmaps(job.model, job.check.arrays),
                               "Core ML's program")


def check_novelty(values, job, scorer):
    """The program's novelty against PyTorch's float32 one: CheckFailed beyond NOVELTY_ATOL."""
    import torch

    from ..heads import novelty
    if values is None:
        raise CheckFailed("Core ML's program has no novelty output")
    scored = novelty.ScoredClassifier(job.model, scorer).eval()
    with torch.inference_mode():
        reference = batched(lambda x: scored(torch.from_numpy(x))[:, -1].numpy(),
                            job.check.arrays)
    check_novelty_values(values, reference, scorer.threshold,
                         "Core ML novelty (the unknown verdict's score) vs PyTorch",
                         "Core ML's program's", NOVELTY_ATOL)
