"""The report's pictures: the confusion matrix, the mistakes (with their heatmaps), the
data issues, the curves and predict.py --plot's grid; matplotlib is imported only here."""
import math
import os
import textwrap

import numpy as np

from ..data import decode
from ..utils import atomic
from . import heatmaps


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, dpi=100):
    """Write the figure atomically, with everything drawn kept inside it."""
    plt = pyplot()
    try:
        with atomic.AtomicFile(path) as f:
            fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)


def _wrap(text, width):
    return "\n".join(textwrap.wrap(str(text), width, break_long_words=True)[:2]) or str(text)


def _shorten(text, width):
    """At most width characters, cut in the middle: both ends of a path say the most."""
    if len(text) <= width:
        return text
    head = (width - 3) // 2
    return text[:head] + "..." + text[-(width - 3 - head):]


def _tail(path):
    """The file name and its folder: in a folder of class folders, the folder says a lot."""
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def _picture(path, square=None):
    """An RGB array of the photo, reduced for drawing (a square centre crop if asked);
    a grey tile if the file cannot be read any more."""
    from PIL import ImageOps
    try:
        img = decode.load_rgb(path, 2 * (square or 320))  # twice the drawn size: sharp
    except decode.IMAGE_ERRORS:
        return np.full((64, 64, 3), 200, dtype=np.uint8)
    if square:
        img = ImageOps.fit(img, (square, square))
    else:
        img.thumbnail((320, 320))
    return np.asarray(img)


def plot_confusion(path, confusion, names):
    """Rows are true classes, shaded by the share of each row; sizes and fonts grow with the
    number of classes so 102 names stay readable."""
    plt = pyplot()
    from matplotlib.colors import PowerNorm
    n = len(names)
    cell = 0.55 if n <= 10 else 0.4 if n <= 30 else 0.2  # inches per class
    font = 10 if n <= 30 else 8 if n <= 60 else 7
    side = max(4.0, n * cell)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    rows = confusion.sum(1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    # A square-root scale: a few confused images in a large class still show.
    image = ax.imshow(share, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1),
                      interpolation="nearest")
    labels = [_shorten(str(name), 30) for name in names]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="#d0d0d0", linewidth=0.4 if n > 30 else 0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("predicted class", fontsize=font + 2)
    ax.set_ylabel("true class", fontsize=font + 2)
    total, right = int(confusion.sum()), int(np.trace(confusion))
    numbers = n <= 30  # beyond that, a number per cell is too small to read
    ax.set_title(f"Confusion matrix: {right} of {total} right ({100 * right / max(total, 1):.1f}%)"
                 f"\ncolour: share of the true class{'; numbers: images' if numbers else ''}",
                 fontsize=font + 3)
    if numbers:
        for t, p in zip(*np.nonzero(confusion)):
            ax.text(p, t, str(confusion[t, p]), ha="center", va="center", fontsize=font - 1,
                    color="white" if share[t, p] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.035, pad=0.02, shrink=0.8)
    save(fig, path, dpi=130 if n > 60 else 100)  # small names get more pixels


def plot_mistakes(path, mistakes, wrong, total, maps=None, crop_pct=None):
    """A grid of the most confident mistakes: (image path, true name, predicted name, prob);
    maps: each one's heatmap of the predicted class, drawn over the network's view."""
    plt = pyplot()
    if not mistakes:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No mistakes on {total} images", ha="center", va="center",
                fontsize=14)
        save(fig, path)
        return
    cols = min(6, len(mistakes))
    rows = math.ceil(len(mistakes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.7, rows * 3.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, (image_path, true, predicted, prob)) in enumerate(zip(axes.flat, mistakes)):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        if maps and maps[i] is not None:
            heatmaps.draw_heatmap(ax, _picture(image_path, square=240), maps[i], crop_pct)
        else:
            ax.imshow(_picture(image_path, square=240))
        ax.set_title(f"predicted: {_wrap(predicted, 24)} ({100 * prob:.0f}%)", fontsize=9,
                     color="#b00020")
        ax.set_xlabel(f"true: {_wrap(true, 24)}\n{_shorten(os.path.basename(image_path), 32)}",
                      fontsize=9, color="#1b5e20")
    fig.suptitle(f"The {len(mistakes)} most confident mistakes ({wrong} wrong of {total} "
                 f"images)" + (f"\n{heatmaps.HEAT_NOTE}" if maps else ""), fontsize=13)
    save(fig, path)


def plot_data_issues(path, findings, names, suspects=12, pairs=6):
    """The most suspect labels as thumbnails (given class against the class they look like),
    then the most similar near-duplicate pairs side by side. names maps class folders to
    display names."""
    plt = pyplot()
    shown_labels, shown_pairs = findings.labels[:suspects], findings.near_duplicates[:pairs]
    cols, pairs_a_row = 6, 3
    label_rows = math.ceil(len(shown_labels) / cols)
    pair_rows = math.ceil(len(shown_pairs) / pairs_a_row)
    fig = plt.figure(figsize=(cols * 2.5, (label_rows + pair_rows) * 3.4 + 0.4),
                     layout="constrained")
    parts = fig.subfigures(2, 1, height_ratios=[max(label_rows, 0.01), max(pair_rows, 0.01)])
    if shown_labels:
        parts[0].suptitle(f"The {len(shown_labels)} most suspect of {len(findings.labels)} "
                          f"photos that look mislabelled", fontsize=13)
        axes = parts[0].subplots(label_rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (image_path, given, suggested, confidence) in zip(axes.flat, shown_labels):
            _thumbnail(ax, image_path)
            ax.set_title(f"given: {_wrap(names.get(given, given), 22)}", fontsize=9,
                         color="#b00020")
            ax.set_xlabel(f"looks like: {_wrap(names.get(suggested, suggested), 22)}\n"
                          f"held-out p(given) {100 * confidence:.0f}%\n"
                          f"{_shorten(os.path.basename(image_path), 28)}", fontsize=8,
                          color="#1b5e20")
    if shown_pairs:
        parts[1].suptitle(f"The {len(shown_pairs)} closest of {len(findings.near_duplicates)} "
                          f"near-duplicate pairs across splits", fontsize=13)
        cells = parts[1].subfigures(pair_rows, pairs_a_row, squeeze=False).flat
        for cell, (earlier, later, score) in zip(cells, shown_pairs):
            cell.suptitle(f"similarity {score:.3f}", fontsize=9)
            for ax, image_path in zip(cell.subplots(1, 2), (earlier, later)):
                _thumbnail(ax, image_path)
                ax.set_xlabel(_shorten(_split_and_tail(image_path), 28), fontsize=8)
    save(fig, path)


def _thumbnail(ax, image_path):
    ax.axis("on")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.imshow(_picture(image_path, square=200))


def _split_and_tail(path):
    """split/class/file: which split a near-duplicate sits in is the point."""
    split = os.path.basename(os.path.dirname(os.path.dirname(path)))
    return os.path.join(split, _tail(path))


def plot_curves(history, path):
    """Train and valid loss, and valid accuracy, per epoch; the kept (best) epoch marked."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train loss")
    valid_loss = [h["valid_loss"] for h in history]
    loss_ax.plot(epochs, valid_loss, "o-", ms=3, label="valid loss")
    acc_ax.plot(epochs, [100 * h["valid_acc"] for h in history], "o-", ms=3, color="C2",
                label="valid accuracy")
    best = epochs[int(np.argmin(valid_loss))]
    for ax, ylabel in ((loss_ax, "loss"), (acc_ax, "accuracy (%)")):
        ax.axvline(best, color="grey", linestyle="--", linewidth=1,
                   label=f"lowest valid loss (epoch {best})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    loss_ax.set_title("Loss")
    acc_ax.set_title("Valid accuracy")
    save(fig, path)


def plot_predictions(path, shown, maps=None, crop_pct=None):
    """Each photo beside a horizontal bar chart of its top K; shown: [(image path, names,
    probabilities)], most likely first. Several images make one grid. maps: each photo's
    heatmap of its top class (predict.py --explain), drawn over the network's view."""
    plt = pyplot()
    n, k = len(shown), max(len(names) for _, names, _ in shown)
    pairs = 1 if n == 1 else 2 if n <= 4 else 3
    rows = math.ceil(n / pairs)
    height = max(2.8, 0.32 * k + 1.0)
    fig = plt.figure(figsize=(pairs * 7.2, rows * height), layout="constrained")
    grid = fig.add_gridspec(rows, 2 * pairs, width_ratios=[1.0, 1.3] * pairs)
    for i, (image_path, names, probs) in enumerate(shown):
        row, col = divmod(i, pairs)
        photo = fig.add_subplot(grid[row, 2 * col])
        if maps is not None:
            heatmaps.draw_heatmap(photo, _picture(image_path, square=320), maps[i], crop_pct)
        else:
            photo.imshow(_picture(image_path))
        photo.axis("off")
        photo.set_title(_shorten(_tail(image_path), 40), fontsize=10)
        _bars(fig.add_subplot(grid[row, 2 * col + 1]), names, probs)
    if maps is not None:
        fig.suptitle(heatmaps.HEAT_NOTE.replace("predicted", "top"), fontsize=10)
    save(fig, path)


def _bars(ax, names, probs):
    percents = [100 * p for p in probs]
    y = np.arange(len(names))
    ax.barh(y, percents, color=["#1f5fa8"] + ["#8fb3dc"] * (len(names) - 1))
    ax.set_yticks(y, [_wrap(name, 22) for name in names], fontsize=10)
    ax.invert_yaxis()  # the most likely on top
    ax.set_xlim(0, 100)
    ax.set_xlabel("probability (%)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    for yi, pct in zip(y, percents):
        inside = pct > 75
        ax.text(pct - 1 if inside else pct + 1, yi, f"{pct:.1f}%", va="center", fontsize=9,
                ha="right" if inside else "left", color="white" if inside else "black")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
