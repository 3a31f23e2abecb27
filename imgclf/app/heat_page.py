"""The heatmap on serve.py's page: its style, its script, and whether a model can give one.

Kept apart from serve.py, which inserts them into its page: the page draws the heatmap that
POST /predict?explain=1 answers over the network's view of the photo (its centre crop).
"""
from ..errors import UserError

HEAT_CSS = """  #heat { display: none; width: 100%; max-width: 420px; border-radius: 10px; }
  #result.heated #heat { display: block; }
  #result.heated #photo { display: none; }
  #heatnote { color: var(--muted); font-size: .85rem; margin: 6px 0 0; }"""

HEAT_SCRIPT = """// The heatmap over the network's view of the photo (its centre crop): each
// cell coloured from blue (no evidence) to red (the most), more opaque the more evidence,
// smoothed by the canvas's scaling.
async function drawHeat(grid, name) {
  await photo.decode();
  const w = photo.naturalWidth, h = photo.naturalHeight, side = Math.min(w, h) * CROP;
  const size = 420, rows = grid.length, cols = grid[0].length;
  heat.width = size; heat.height = size;
  const ctx = heat.getContext('2d');
  ctx.drawImage(photo, (w - side) / 2, (h - side) / 2, side, side, 0, 0, size, size);
  const small = document.createElement('canvas'); small.width = cols; small.height = rows;
  const sctx = small.getContext('2d');
  grid.forEach((row, r) => row.forEach((v, c) => {
    sctx.fillStyle = 'hsla(' + Math.round(240 * (1 - v)) + ', 100%, 50%, ' +
                     (0.15 + 0.45 * v).toFixed(2) + ')';
    sctx.fillRect(c, r, 1, 1);
  }));
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, size, size);
  heatnote.textContent = 'Heatmap: where the model saw ' + name + ' (red: most), over the ' +
                         'part of the photo it looks at.';
  result.classList.add('heated');
}"""


def explain_error(predictor):
    """Why ?explain=1 cannot be answered for this model, or None."""
    if not hasattr(predictor, "explain") or getattr(predictor, "has_heatmap", True) is False:
        return ("explain=1: this exported model does not carry the heatmap (exported before "
                "exports carried it, or its head has hidden layers); export it again, or serve "
                "the checkpoint.pth it was exported from")
    if hasattr(predictor, "has_heatmap"):  # an exported model with its heatmap output
        return None
    from ..models import explain
    try:
        explain.feature_module(predictor.model.backbone)
    except UserError as err:
        return str(err).replace("--explain", "explain=1", 1)
    return None
