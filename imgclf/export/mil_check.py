"""Run a saved Core ML program (.mlpackage) on Linux, where Core ML itself does not run: the
program is read back from the package by coremltools (its MIL proto and weight file), and each
operation is computed with PyTorch's functions. Only the operations our networks convert to
are known; another one raises NotEvaluated, and the export says the numbers were not checked.

This checks what the converter wrote (the graph, the weights, the image scale and bias), not
Core ML's own kernels, which run only on Apple's systems (docs/export.md says so)."""
import numpy as np


class NotEvaluated(Exception):
    """The program uses an operation this module does not compute."""


def load_program(package):
    """The MIL program of a saved .mlpackage, and its main function."""
    import coremltools as ct
    # A protobuf reader (no pickle): the package's program as coremltools wrote it.
    from coremltools.converters.mil.frontend.milproto.load import load as read_milproto
    model = ct.models.MLModel(package, skip_model_load=True)
    spec = model.get_spec()
    program = read_milproto(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    return program.functions["main"]


def run(function, image, heatmaps=None, novelties=None):
    """Probabilities for one image batch fed as the program's input (pixels 0-255, N x 3 x H x
    W float): the value that reaches the classify operation, or the last output. heatmaps: a
    list to which the program's (N, h, w) output, where it has one, is appended; novelties:
    the same for its (N,) output (the unknown verdict's novelty)."""
    import torch
    values = {}
    [name] = function.inputs
    values[name] = torch.from_numpy(np.asarray(image, np.float32))
    probabilities = None
    for op in function.operations:
        if op.op_type == "classify":
            probabilities = values[op.inputs["probabilities"].name]
            continue
        result = evaluate(op, {k: value_of(v, values) for k, v in op.inputs.items()})
        results = result if isinstance(result, tuple) else (result,)  # topk: values, indices
        for var, value in zip(op.outputs, results):
            values[var.name] = value
    if probabilities is None:
        probabilities = values[function.outputs[0].name]
    if heatmaps is not None:
        heatmaps += [values[v.name].float().numpy() for v in function.outputs
                     if v.name in values and values[v.name].ndim == 3]
    if novelties is not None:
        novelties += [values[v.name].float().numpy() for v in function.outputs
                      if v.name in values and values[v.name].ndim == 1]
    return probabilities.float().numpy()


def value_of(var, values):
    if isinstance(var, (list, tuple)):
        return [value_of(v, values) for v in var]
    if var.name in values:
        return values[var.name]
    if var.val is not None:  # a constant the loader folded in
        return as_tensor(var.val)
    raise NotEvaluated(f"no value for {var.name}")


def as_tensor(val):
    import torch
    array = np.asarray(val)
    if array.dtype.kind in "USO":  # names: the class labels, dtype names
        return val
    if array.dtype == np.float16:
        array = array.astype(np.float32)  # fp16 weights, computed in float32
    return torch.from_numpy(np.array(array))


def evaluate(op, a):
    """One operation, its inputs a (name -> tensor or constant)."""
    import torch
    import torch.nn.functional as F
    kind = op.op_type
    if kind == "const":
        return as_tensor(op.outputs[0].val)
    if kind in ("add", "mul", "sub", "real_div"):
        fn = {"add": torch.add, "mul": torch.mul, "sub": torch.sub, "real_div": torch.div}[kind]
        return fn(a["x"], a["y"])
    if kind == "relu6":
        return a["x"].clamp(0, 6)
    if kind == "relu":
        return a["x"].clamp_min(0)
    if kind == "cast":
        return a["x"].float() if str(a["dtype"]).startswith("fp") else a["x"].long()
    if kind == "softmax":
        return torch.softmax(a["x"], int(a["axis"]))
    if kind == "reduce_mean":
        return a["x"].mean([int(i) for i in a["axes"]], keepdim=bool(a["keep_dims"]))
    if kind == "reverse":
        return a["x"].flip([int(i) for i in a["axes"]])
    if kind == "linear":
        return F.linear(a["x"], a["weight"], a.get("bias"))
    if kind in SHAPES:
        return SHAPES[kind](a)
    if kind == "pad":
        return pad(a)
    if kind == "conv":
        return conv(a)
    raise NotEvaluated(f"operation {kind}")


def axis_of(a):
    return int(a["axis"])


def gather(a):
    import torch
    axis = int(a.get("axis", 0))
    return torch.index_select(a["x"], axis, a["indices"].long().flatten()).reshape(
        *a["x"].shape[:axis], *a["indices"].shape, *a["x"].shape[axis + 1:])


# The operations of the heatmap (export/outputs.class_map): the top class's weight row, a
# matrix product with the feature map, its positive part over its peak.
SHAPES = {
    "reshape": lambda a: reshape(a["x"], [int(d) for d in a["shape"]]),
    "expand_dims": lambda a: a["x"].reshape(expanded_shape(a["x"], a["axes"])),
    "matmul": lambda a: matmul(a),
    "gather": gather,
    "reduce_argmax": lambda a: a["x"].argmax(axis_of(a),
                                             keepdim=bool(a.get("keep_dims", False))),
    "reduce_max": lambda a: a["x"].amax([int(i) for i in a["axes"]],
                                        keepdim=bool(a["keep_dims"])),
    "clip": lambda a: a["x"].clamp(float(a["alpha"]), float(a["beta"])),
    # The unknown verdict's novelty (heads/novelty.NoveltyScorer): energy, unit rows, the
    # cosines with the bank, the other classes' masked, the k-th largest
    "reduce_log_sum_exp": lambda a: a["x"].logsumexp([int(i) for i in a["axes"]],
                                                     keepdim=bool(a["keep_dims"])),
    "reduce_l2_norm": lambda a: a["x"].norm(dim=[int(i) for i in a["axes"]],
                                            keepdim=bool(a["keep_dims"])),
    "maximum": lambda a: a["x"].maximum(a["y"]),
    "equal": lambda a: a["x"] == a["y"],
    "select": lambda a: a["a"].where(a["cond"].bool(), a["b"]),
    "topk": lambda a: a["x"].topk(int(a["k"]), dim=axis_of(a),
                                  largest=not bool(a.get("ascending", False))),
    "slice_by_index": lambda a: slice_by_index(a),
}


def slice_by_index(a):
    """x[begin:end:stride] per axis (a mask's axis taken whole; a squeezed one dropped)."""
    x = a["x"]
    count = x.ndim
    begin, end = [int(i) for i in a["begin"]], [int(i) for i in a["end"]]
    stride = [int(i) for i in a.get("stride", [1] * count)] if "stride" in a else [1] * count
    masks = {name: [bool(m) for m in a[name]] if name in a else [False] * count
             for name in ("begin_mask", "end_mask", "squeeze_mask")}
    index = []
    for axis in range(count):
        start = None if masks["begin_mask"][axis] else begin[axis]
        stop = None if masks["end_mask"][axis] else end[axis]
        if axis == 0 and x.shape[0] != 1 and start in (0, None) and stop == 1:
            stop = None  # converted for one photo, run on a few: the batch axis whole
        if masks["squeeze_mask"][axis]:
            index.append(start)
        else:
            index.append(slice(start, stop, stride[axis]))
    return x[tuple(index)]


def reshape(x, shape):
    """The program was converted for one photo and is run here a few at a time: a shape's
    leading 1 is the batch."""
    if shape and shape[0] == 1 and x.shape[0] != 1:
        shape = [x.shape[0], *shape[1:]]
    return x.reshape(shape)


def expanded_shape(x, axes):
    shape = list(x.shape)
    for axis in sorted(int(i) % (x.ndim + len(axes)) for i in axes):
        shape.insert(axis, 1)
    return shape


def matmul(a):
    x, y = a["x"], a["y"]
    if bool(a.get("transpose_x", False)):
        x = x.transpose(-1, -2)
    if bool(a.get("transpose_y", False)):
        y = y.transpose(-1, -2)
    return x.float() @ y.float()


def pad(a):
    import torch.nn.functional as F
    if str(a.get("mode", "constant")) != "constant":
        raise NotEvaluated(f"pad mode {a['mode']}")
    widths = [int(w) for w in a["pad"]]  # (before, after) per padded axis, outermost first
    pairs = [widths[i:i + 2] for i in range(0, len(widths), 2)]
    torch_order = [w for pair in reversed(pairs) for w in pair]  # innermost axis first
    return F.pad(a["x"], torch_order, value=float(a.get("constant_val", 0.0)))


def conv(a):
    import torch.nn.functional as F
    x, kind = a["x"], str(a.get("pad_type", "valid"))
    if kind == "custom":
        top, bottom, left, right = (int(p) for p in a["pad"])
        x = F.pad(x, [left, right, top, bottom])
    elif kind != "valid":
        raise NotEvaluated(f"conv pad_type {kind}")
    return F.conv2d(x, a["weight"], a.get("bias"), [int(s) for s in a["strides"]], 0,
                    [int(d) for d in a["dilations"]], int(a["groups"]))
