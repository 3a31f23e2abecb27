"""The data report: counts, balance, leaks and near-duplicates across splits, as lines."""
import os
from collections import defaultdict

import numpy as np

from ..utils.text import plural

# Two photos whose perceptual hashes differ in at most this many of 64 bits are near-duplicates:
# the smallest that names 95% of planted copies (docs/data_issues.md).
NEAR_DUPLICATE_BITS = 4


# ---------------------------------------------------------------------------------------------
# The data report
# ---------------------------------------------------------------------------------------------
def find_leaks(scan):
    """Groups of identical files that sit in more than one split."""
    by_digest = defaultdict(list)
    for split, samples in scan.samples.items():
        for path, _ in samples:
            by_digest[scan.digests[path]].append((split, path))
    return [group for group in by_digest.values() if len({s for s, _ in group}) > 1]


def find_near_duplicates(scan, max_bits=NEAR_DUPLICATE_BITS):
    """[(earlier path, later path, differing bits)], fewest bits first: each valid and test
    photo with its nearest photo of an earlier split (train; for test also valid) by
    perceptual hash, where at most max_bits bits differ. Byte-identical files are left out
    (find_leaks names them), and flat pictures, which have no hash."""
    pairs, earlier = [], []
    for split in ("train", "valid", "test"):
        hashed = [p for p, _ in scan.samples.get(split, []) if scan.phashes.get(p)]
        if earlier:
            references = [int(scan.phashes[p], 16) for p in earlier]
            queries = [int(scan.phashes[p], 16) for p in hashed]
            for path, h, close in zip(hashed, queries, close_hashes(queries, references,
                                                                    max_bits)):
                close = [j for j in close if scan.digests[earlier[j]] != scan.digests[path]]
                if close:
                    j = min(close, key=lambda j: ((h ^ references[j]).bit_count(), j))
                    pairs.append((earlier[j], path, (h ^ references[j]).bit_count()))
        earlier += hashed
    return sorted(pairs, key=lambda pair: pair[2])


def close_hashes(queries, references, max_bits):
    """For each query (a 64-bit int), the indices of the references at most max_bits bits
    away, ascending. Multi-index hashing, so that no query meets every reference: split the
    bits into max_bits + 1 bands; two hashes that close agree on at least one whole band, so
    only references sharing a band's value with the query are compared."""
    edges = [64 * k // (max_bits + 1) for k in range(max_bits + 2)]
    spans = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
    buckets = defaultdict(list)
    for j, h in enumerate(references):
        for band, (lo, mask) in enumerate(spans):
            buckets[band, (h >> lo) & mask].append(j)
    found = []
    for h in queries:
        candidates = {j for band, (lo, mask) in enumerate(spans)
                      for j in buckets.get((band, (h >> lo) & mask), ())}
        found.append(sorted(j for j in candidates
                            if (h ^ references[j]).bit_count() <= max_bits))
    return found


def imbalance(scan):
    counts = scan.counts("train")
    sizes = [counts.get(i, 0) for i in range(len(scan.classes))]
    return max(sizes) / max(min(sizes), 1)


def summary_lines(scan, max_listed=10):
    """The short report that starts every training run."""
    splits = ", ".join(f"{s} {len(v)}" for s, v in scan.samples.items())
    lines = [f"data: {scan.root}: {len(scan.classes)} classes; {splits} images"]
    lines += [f"note: {n}" for n in scan.notes]
    left_out = []
    if scan.skipped:
        left_out.append(plural(len(scan.skipped), "unusable image"))
    if scan.litter:
        left_out.append(plural(sum(scan.litter.values()), "file") + " that are not images")
    if left_out:
        lines.append("left out: " + " and ".join(left_out) + " (--check lists them)")
        for path, reason in scan.skipped[:max_listed]:
            lines.append(f"  skipped {_rel(scan, path)}: {reason}")
        if len(scan.skipped) > max_listed:
            lines.append(f"  ... and {len(scan.skipped) - max_listed} more")
    ratio = imbalance(scan)
    if ratio > 3:
        lines.append(f"warning: classes are imbalanced: the largest has {ratio:.1f}x the images "
                     f"of the smallest; consider --balance")
    leaks = find_leaks(scan)
    if leaks:
        lines.append(f"warning: {plural(len(leaks), 'file')} found in more than one split "
                     f"(identical content); --check lists them")
    near = find_near_duplicates(scan)
    if near:
        lines.append(f"warning: near-duplicates across splits (perceptual hash): {len(near)}; "
                     f"--check lists them")
    lines += [f"warning: {w}" for w in scan.warnings]
    return lines


def report_lines(scan, class_names=None):
    """The full data report of --check."""
    lines = [f"data: {scan.root}", f"layout: {_layout(scan)}"]
    lines += [f"note: {n}" for n in scan.notes]
    lines += [""] + _count_table(scan, class_names) + [""]
    lines += _balance_lines(scan, class_names)
    lines += _size_lines(scan)
    lines += _left_out_lines(scan)
    lines += _leak_lines(scan, class_names)
    lines += _near_duplicate_lines(scan)
    lines += [f"warning: {w}" for w in scan.warnings]
    return lines


def _layout(scan):
    if scan.layout == "single":
        return "one folder of class folders (no train/ valid/ folders)"
    named = [f"{os.path.basename(scan.folders[s])}/" +
             ("" if os.path.basename(scan.folders[s]) == s else f" (as {s})")
             for s in ("train", "valid", "test") if s in scan.folders]
    return "split folders " + ", ".join(named)


def _count_table(scan, class_names):
    splits = list(scan.samples)
    labels = [_display(c, class_names) for c in scan.classes]
    width = max([len(x) for x in labels] + [len("total")])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in splits)]
    counts = {s: scan.counts(s) for s in splits}
    for i, label in enumerate(labels):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{counts[s].get(i, 0):>6}" for s in splits))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{len(scan.samples[s]):>6}" for s in splits))
    return lines


def _balance_lines(scan, class_names):
    counts = scan.counts("train")
    small = min(range(len(scan.classes)), key=lambda i: counts.get(i, 0))
    large = max(range(len(scan.classes)), key=lambda i: counts.get(i, 0))
    line = (f"class balance (train): largest {_display(scan.classes[large], class_names)} "
            f"{counts.get(large, 0)}, smallest {_display(scan.classes[small], class_names)} "
            f"{counts.get(small, 0)} ({imbalance(scan):.1f}x)")
    if imbalance(scan) > 3:
        line += "; consider --balance"
    return [line]


def _size_lines(scan):
    if not scan.sizes:
        return []
    ws = [w for w, _ in scan.sizes]
    hs = [h for _, h in scan.sizes]
    if min(ws) == max(ws) and min(hs) == max(hs):
        return [f"image sizes: all {ws[0]}x{hs[0]} px"]
    return [f"image sizes: width {min(ws)}-{max(ws)} px, height {min(hs)}-{max(hs)} px, "
            f"median {int(np.median(ws))}x{int(np.median(hs))}"]


def _left_out_lines(scan):
    lines = []
    if scan.litter:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(scan.litter.items()))
        lines.append(f"ignored, not images: {plural(sum(scan.litter.values()), 'file')} "
                     f"({kinds})")
        lines += [f"  {_rel(scan, path)}: {reason}" for path, reason in scan.not_images]
    lines.append(f"skipped, unusable images: {len(scan.skipped)}")
    lines += [f"  {_rel(scan, path)}: {reason}" for path, reason in scan.skipped]
    return lines


def _leak_lines(scan, class_names):
    leaks = find_leaks(scan)
    lines = [f"identical files in more than one split (leakage): {len(leaks)}" +
             ("; keep one copy of each, or valid and test scores are too optimistic"
              if leaks else "")]
    labels = {path: label for samples in scan.samples.values() for path, label in samples}
    for group in leaks[:20]:
        names = {_display(scan.classes[labels[p]], class_names) for _, p in group}
        lines.append("  " + " = ".join(_rel(scan, p, s) for s, p in group) +
                     (f"  (labelled {' and '.join(sorted(names))})" if len(names) > 1 else ""))
    if len(leaks) > 20:
        lines.append(f"  ... and {len(leaks) - 20} more")
    return lines


def _near_duplicate_lines(scan, max_listed=20):
    near = find_near_duplicates(scan)
    lines = [f"near-duplicates across splits (perceptual hash): {len(near)}" +
             ("; the same picture resized or recompressed: keep it in one split" if near else "")]
    split_of = {path: split for split, samples in scan.samples.items() for path, _ in samples}
    lines += [f"  {_rel(scan, a, split_of[a])} ~ {_rel(scan, b, split_of[b])}  "
              f"(differ in {bits} of 64 bits)" for a, b, bits in near[:max_listed]]
    if len(near) > max_listed:
        lines.append(f"  ... and {len(near) - max_listed} more")
    return lines


def _rel(scan, path, split=None):
    """A path as shown in reports: relative to the data folder, with its split when the folder
    names no split (automatic splits)."""
    rel = os.path.relpath(path, scan.root)
    if split and scan.layout != "splits" and not rel.startswith(
            os.path.basename(scan.folders.get(split, "\0")) + os.sep):
        return f"{rel} ({split})"
    return rel


def _display(cls, class_names):
    if class_names and cls in class_names and class_names[cls] != cls:
        return f"{cls} ({class_names[cls]})"
    return cls
