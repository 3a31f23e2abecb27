"""--format web: a folder with a page that classifies photos in the browser (web_page.py says
what is in it), the model being the ONNX export, checked as --format onnx checks it. Then the
page itself runs in headless Chromium on the check photos, where chromium, chromium-driver and
selenium are installed: it must name the same top class as PyTorch on every photo and give its
probabilities within checks.PARITY_ATOL (and its heatmap, where the model has one, predict.py
--explain's within outputs.HEATMAP_ATOL); with --quantize it is judged as the int8 model is
(checks.check_int8: ONNX Runtime Web's int8 kernels round otherwise than ONNX Runtime's, by up
to 1e-2 on flowers5). Only then is the folder moved to --out.
"""
import os
import tempfile

import numpy as np

from . import outputs, to_onnx, web_page
from .checks import batched, check_int8, check_parity, parity_line, write_folder_atomic


def write(job):
    onnx, ort = to_onnx.require_onnx()
    runtime = (web_page.find_runtime(job.args.web_runtime) if job.args.web_runtime
               else None)
    job.check  # noqa: B018 (the photos first: a wrong --check_images fails before the export)
    out = job.out_path("web")
    web_page.refuse_other_folder(out)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        names = to_onnx.export_and_check(job, path, ort)
        int8 = None
        if job.args.quantize:
            path = to_onnx.quantize_and_report(ort, job, path)
            int8 = batched(to_onnx.onnx_runner(ort, path), job.check.arrays)
        to_onnx.add_metadata(onnx, path, job.ckpt, quantized=job.args.quantize, outputs=names)
        folder = os.path.join(tmp, "web")
        os.mkdir(folder)
        web_page.write_files(folder, web_page.page_files(path, job.ckpt, runtime))
        check_page(folder, job, int8)
        write_folder_atomic(folder, out)
    print(f"the page: {os.path.join(out, 'index.html')} (serve the folder from any static "
          f"host{'' if runtime else '; it loads the runtime from jsDelivr'})")
    return out


def check_page(folder, job, int8=None):
    """The page in headless Chromium on the check photos, against PyTorch's answers (and
    those of ONNX Runtime on the int8 model, int8, where it is one)."""
    check = job.check
    try:
        probs, median_ms, heatmaps = web_page.run_in_browser(folder, check.paths or check.files,
                                                   job.ckpt["preprocess"])
    except web_page.PageNotRun as why:
        print(f"not checked in a browser ({why}): ONNX Runtime was, above; the page was not")
        return
    print(parity_line("the page in headless Chromium vs PyTorch", probs, job.reference, check)
          + f"; median answer {median_ms:.0f} ms")
    if int8 is None:
        check_parity(probs, job.reference, runtime="The page")
        if heatmaps is not None:
            outputs.check_heatmaps(heatmaps, outputs.reference_heatmaps(job.model, check.arrays),
                                   "The page")
        return
    same = int((probs.argmax(1) == int8.argmax(1)).sum())
    print(f"the page vs the int8 model in ONNX Runtime: max |probability difference| "
          f"{np.abs(probs - int8).max():.2e}, top-1 same on {same}/{len(probs)}")
    check_int8(probs, job.reference, check, "The page")
