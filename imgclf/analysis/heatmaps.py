"""Heatmaps drawn over photos: predict.py --plot --explain, and the report's mistakes.png.

The heatmap covers what the network saw: the photo's centre crop (crop_pct of its shorter side,
see data/decode.resize_and_crop), so that is what is drawn under it. The maps themselves come
from models/explain.py; this module only draws (and imports torch only through predict_paths).
"""
import numpy as np

from ..errors import UserError

# Opacity of the heatmap over the photo, from no evidence to the most: the photo stays visible
# where the model found nothing, the colours readable where it found the most.
HEAT_ALPHA = (0.15, 0.6)
HEAT_CMAP = "jet"
HEAT_NOTE = "heatmap: where the model found the predicted class (red: most)"


def mistake_heatmaps(predictor, paths, tta=False):
    """The top class's heatmap of each photo in paths (None where one cannot be made), or
    None where the predictor cannot explain (an .onnx model, a transformer backbone): the
    report is drawn without them then."""
    if not paths or not hasattr(predictor, "explain"):
        return None
    from ..app import inference
    try:
        results = inference.predict_paths(predictor, [inference.Item(p) for p in paths], tta,
                                          explain=True)
    except UserError:  # a backbone without a feature map to draw
        return None
    by_path = {r.path: r.heatmap for r in results if r.error is None}
    return [by_path.get(p) for p in paths]


def network_view(picture, crop_pct):
    """The centre of a square picture (the photo fitted to a square) that the network saw."""
    side = min(picture.shape[:2])
    cut = int(round(side * (1 - crop_pct) / 2))
    return picture[cut:picture.shape[0] - cut, cut:picture.shape[1] - cut] if cut else picture


def scaled_heat(heatmap, height, width):
    """The map's positive part, 0..1, resized bilinearly to height x width."""
    from PIL import Image
    grid = np.maximum(np.asarray(heatmap, dtype=np.float32), 0)
    peak = grid.max() if grid.size else 0
    grid = grid / peak if peak > 0 else grid
    return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BILINEAR))


def draw_heatmap(ax, picture, heatmap, crop_pct):
    """The network's view of the picture (an RGB array fitted to a square), the heatmap over
    it."""
    import matplotlib
    view = network_view(picture, crop_pct)
    heat = scaled_heat(heatmap, *view.shape[:2])
    colours = matplotlib.colormaps[HEAT_CMAP](heat)
    colours[..., 3] = HEAT_ALPHA[0] + (HEAT_ALPHA[1] - HEAT_ALPHA[0]) * heat
    ax.imshow(view)
    ax.imshow(colours, interpolation="nearest")
