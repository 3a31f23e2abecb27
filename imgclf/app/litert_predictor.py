"""A .tflite model from export.py --format tflite, run by LiteRT's interpreter (ai-edge-litert):
the same interface as inference.TorchPredictor, and no torch import. Classes and preprocessing
are in the flatbuffer's metadata entry METADATA_NAME (JSON), the softmax is inside the model,
the input is one photo, channels last."""
import json
import os

import numpy as np

from ..errors import UserError

METADATA_NAME = "imgclf"
INSTALL_HINT = "pip install ai-edge-litert, or pip install -e '.[mobile]'"


class LiteRTPredictor:
    def __init__(self, path, gpu=None, precision="auto", threads=None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise UserError(f"model {path}: a .tflite model needs ai-edge-litert: "
                            f"{INSTALL_HINT}") from None
        if not os.path.isfile(path):
            raise UserError(f"model {path}: no such file; give the .tflite file written by "
                            f"export.py --format tflite")
        if gpu is not None and gpu != "cpu":
            raise UserError(f"--gpu {gpu}: a .tflite model runs on the CPU here; drop --gpu")
        try:
            meta = read_metadata(path)
            self.interpreter = Interpreter(model_path=path, num_threads=threads)
            self.interpreter.allocate_tensors()
        except Exception as err:  # the flatbuffer reader and LiteRT raise their own types
            why = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UserError(f"model {path}: not a loadable LiteRT model ({why})") from None
        if not meta or "classes" not in meta or "preprocess" not in meta:
            raise UserError(f"model {path}: has no class names and preprocessing in its "
                            f"metadata; export it with export.py --format tflite")
        self.classes = meta["classes"]
        self.class_names = meta.get("class_names") or self.classes
        self.preprocess = meta["preprocess"]
        self.averages_mirror = meta.get("averages_mirror")
        self.batch_size = 16  # photos decoded at a time; the model itself takes one
        quantization = meta.get("quantization", "none")
        if precision == "fp32" and not quantization.startswith("none"):
            raise UserError(f"--precision fp32: {path} is an {quantization.split()[0]} model "
                            f"(export.py --quantize); export it without --quantize for float32, "
                            f"or drop --precision")
        self._input = self.interpreter.get_input_details()[0]["index"]
        # The probabilities: the (1, classes) output (an export with the unknown verdict has
        # a (1,) novelty one too, with the heatmap a (1, h, w) one)
        outputs = self.interpreter.get_output_details()
        self._output = next(d["index"] for d in outputs if len(d["shape"]) == 2)
        self._novelty = next((d["index"] for d in outputs if len(d["shape"]) == 1), None)
        self._heatmap = next((d["index"] for d in outputs if len(d["shape"]) == 3), None)
        self.has_heatmap = self._heatmap is not None
        threshold = meta.get("unknown_threshold")
        if self._novelty is not None and threshold is None:
            raise UserError(f"model {path}: has a novelty output but no unknown_threshold in "
                            f"its metadata; export it again with export.py --format tflite")
        self.unknown_threshold = float(threshold) if self._novelty is not None else None

    def probabilities(self, batch):
        """float32 array (N, 3, H, W), preprocessed -> float32 array (N, classes)."""
        return self._run(batch, [self._output])[0]

    def scores(self, batch):
        """As inference.OnnxPredictor.scores: (probabilities, novelty (N,) or None where the
        model has no novelty output)."""
        if self._novelty is None:
            return self.probabilities(batch), None
        probs, novelty = self._run(batch, [self._output, self._novelty])
        return probs, novelty.reshape(-1)

    def explain(self, batch, tta=False):
        """As inference.OnnxPredictor.explain: (probabilities, the "heatmap" output)."""
        return self._run(batch, [self._output, self._heatmap])

    def _run(self, batch, outputs):
        """The given outputs for each photo, stacked over the batch."""
        results = [[] for _ in outputs]
        for array in batch:  # the model was converted for one photo at a time, as on a phone
            self.interpreter.set_tensor(self._input, np.ascontiguousarray(
                array.transpose(1, 2, 0)[None], dtype=np.float32))
            self.interpreter.invoke()
            for kept, index in zip(results, outputs):
                kept.append(self.interpreter.get_tensor(index)[0].copy())
        return [np.stack(kept) for kept in results]


def read_metadata(path):
    """The JSON object export.py stored in a .tflite file, or None where there is none. Reads
    the flatbuffer with the schema module ai-edge-litert ships (no converter, no torch)."""
    from ai_edge_litert import schema_py_generated as schema
    with open(path, "rb") as f:
        content = f.read()
    model = schema.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return None
