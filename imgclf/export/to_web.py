"""--format web: a folder with a page that classifies photos in the browser (web_page.py says
what is in it), the model being the ONNX export, checked as --format onnx checks it. Then the
page itself runs in headless Chromium on the check photos, where chromium, chromium-driver and
selenium are installed: it must name the same top class as PyTorch on every photo and give its
probabilities within checks.PARITY_ATOL (with --quantize: those of the int8 model in ONNX
Runtime, which the page runs). Only then is the folder moved to --out.
"""
import os
import tempfile

from . import to_onnx, web_page
from .checks import batched, check_parity, parity_line, write_folder_atomic


def write(job):
    onnx, ort = to_onnx.require_onnx()
    runtime = (web_page.find_runtime(job.args.web_runtime) if job.args.web_runtime
               else None)
    job.check  # noqa: B018 (the photos first: a wrong --check_images fails before the export)
    out = job.out_path("web")
    web_page.refuse_other_folder(out)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        to_onnx.export_and_check(job, path, ort)
        reference, what = job.reference, "PyTorch"
        if job.args.quantize:  # the page runs the int8 model: its answers are the reference
            path = to_onnx.quantize_and_report(ort, job, path)
            reference = batched(to_onnx.onnx_runner(ort, path), job.check.arrays)
            what = "int8 ONNX Runtime"
        to_onnx.add_metadata(onnx, path, job.ckpt, quantized=job.args.quantize)
        folder = os.path.join(tmp, "web")
        os.mkdir(folder)
        web_page.write_files(folder, web_page.page_files(path, job.ckpt, runtime))
        check_page(folder, job, reference, what)
        write_folder_atomic(folder, out)
    print(f"the page: {os.path.join(out, 'index.html')} (serve the folder from any static "
          f"host{'' if runtime else '; it loads the runtime from jsDelivr'})")
    return out


def check_page(folder, job, reference, what):
    """The page in headless Chromium on the check photos, against the reference's answers."""
    check = job.check
    try:
        probs, median_ms = web_page.run_in_browser(folder, check.paths or check.files,
                                                   job.ckpt["preprocess"])
    except web_page.PageNotRun as why:
        print(f"not checked in a browser ({why}): ONNX Runtime was, above; the page was not")
        return
    print(parity_line(f"the page in headless Chromium vs {what}", probs, reference, check)
          + f"; median answer {median_ms:.0f} ms")
    check_parity(probs, reference, runtime="The page", than=what)
