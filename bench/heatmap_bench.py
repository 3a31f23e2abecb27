"""Does the heatmap point at the object? (issue 26's goal: >= 80% of photos.)

    python bench/heatmap_bench.py --set flowers5 RUN/checkpoint.pth FLOWERS5/test \\
                                  --set digits DIGITS_RUN/checkpoint.pth DIGITS/test

Each photo of a set (a folder, searched recursively; the class folder is its label) is fitted
to a square and pasted into one quadrant of a grey square canvas twice its side (the photo a
quarter of the canvas area; photo i goes to quadrant i mod 4, so each quadrant gets a quarter of
them). The canvas is predicted with --explain's code (app/inference.TorchPredictor.explain) on a
checkpoint trained on the plain photos, and the heatmap's peak (the map upsampled bilinearly to
the network's input, as --plot draws it) is looked up: a hit when it falls in the photo's
quadrant. Printed per set: the hit rate (chance: 25%), beside it the hit rate among canvases
whose top class is right, and the top-1 accuracy on the canvases.
"""
import argparse
import os
import sys
import time

import numpy as np
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GREY = (128, 128, 128)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def build_parser():
    p = argparse.ArgumentParser(description="How often the heatmap's peak falls on the photo.")
    p.add_argument("--set", nargs=3, action="append", required=True,
                   metavar=("NAME", "CHECKPOINT", "FOLDER"),
                   help="a set: its name, a checkpoint trained on its photos, and a folder of "
                        "class folders of test photos (repeat for more sets)")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="photos per set, spread evenly over the sorted list; 0 for all "
                        "(default: 0)")
    p.add_argument("--picture", metavar="FILE.png",
                   help="also draw the first 4 canvases of each set with their heatmaps "
                        "(default: none)")
    p.add_argument("--gpu", nargs="?", const="cuda", metavar="DEVICE",
                   help="run on an accelerator (default: the CPU)")
    return p


def labelled_photos(folder):
    photos = []
    for cls in sorted(os.listdir(folder)):
        sub = os.path.join(folder, cls)
        if os.path.isdir(sub):
            photos += [(os.path.join(sub, f), cls) for f in sorted(os.listdir(sub))
                       if not f.startswith(".")]
    return photos


def canvas_with(photo, quadrant, side):
    """A grey square of 2 x side with the photo, fitted to side x side, in the quadrant."""
    canvas = Image.new("RGB", (2 * side, 2 * side), GREY)
    row, col = divmod(quadrant, 2)
    canvas.paste(ImageOps.fit(photo, (side, side), Image.BICUBIC), (col * side, row * side))
    return canvas


def quadrant_of(heatmap, size):
    """The quadrant of the heatmap's peak. The network's input is the canvas's centre crop,
    so the crop's centre is the canvas's."""
    from imgclf.models.explain import peak_position
    row, col = peak_position(heatmap, size)
    return 2 * (row >= 0.5) + (col >= 0.5)


def run_set(name, checkpoint, folder, limit, gpu, drawn):
    from imgclf.app import inference
    from imgclf.data import decode
    predictor = inference.load_predictor(checkpoint, gpu)
    photos = labelled_photos(folder)
    if limit and limit < len(photos):
        photos = [photos[i] for i in np.linspace(0, len(photos) - 1, limit).round().astype(int)]
    pre, index = predictor.preprocess, {c: i for i, c in enumerate(predictor.classes)}
    side = decode.eval_side(pre) // 2  # the canvas is the size the network resizes to
    hits, right, hits_right, started = 0, 0, 0, time.perf_counter()
    for start in range(0, len(photos), predictor.batch_size):
        chunk = photos[start:start + predictor.batch_size]
        quadrants = [(start + i) % 4 for i in range(len(chunk))]
        batch = np.stack([decode.eval_array(canvas_with(decode.load_rgb(path), q, side), pre)
                          for (path, _), q in zip(chunk, quadrants)])
        probs, maps = predictor.explain(batch)
        if start == 0:  # the first canvases, for --picture
            drawn += [(name, batch[i], maps[i], pre) for i in range(min(4, len(chunk)))]
        for (path, cls), q, p, m in zip(chunk, quadrants, probs, maps):
            hit, correct = quadrant_of(m, pre["size"]) == q, int(p.argmax()) == index[cls]
            hits, right, hits_right = hits + hit, right + correct, hits_right + (hit and correct)
    n = len(photos)
    print(f"{name:<10} {n:>6}  {100 * hits / n:8.1f}%  {100 * hits_right / max(right, 1):13.1f}%"
          f"  {100 * right / n:12.1f}%  {time.perf_counter() - started:6.0f}s", flush=True)
    return hits / n


def draw(path, drawn):
    """Each canvas as the network saw it, its heatmap over it, the peak marked."""
    from imgclf.analysis import heatmaps, plots
    from imgclf.models.explain import peak_position
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(drawn), figsize=(2.2 * len(drawn), 2.5), squeeze=False)
    for ax, (name, array, heatmap, pre) in zip(axes[0], drawn):
        std, mean = np.asarray(pre["std"])[:, None, None], np.asarray(pre["mean"])[:, None, None]
        picture = np.clip((array * std + mean).transpose(1, 2, 0), 0, 1)
        heatmaps.draw_heatmap(ax, picture, heatmap, 1.0)  # already the network's crop
        row, col = peak_position(heatmap, pre["size"])
        ax.plot(col * pre["size"], row * pre["size"], "w+", ms=14, mew=2)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle("photo in one quadrant of a grey canvas: heatmap of the top class, + its peak",
                 fontsize=10)
    plots.save(fig, path)
    print(f"wrote {path}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    print(f"{'set':<10} {'photos':>6}  {'peak in':>9}  {'peak in, top':>14}  {'top-1 acc':>13}"
          f"  {'time':>7}")
    print(f"{'':<10} {'':>6}  {'quadrant':>9}  {'class right':>14}  {'on canvases':>13}")
    drawn = []
    for name, checkpoint, folder in args.set:
        run_set(name, checkpoint, folder, args.limit, args.gpu, drawn)
    print("chance: 25% (4 quadrants); goal: >= 80%")
    if args.picture:
        draw(args.picture, drawn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
