"""Export a checkpoint from train.py for other runtimes, checked against it before writing.

    python export.py CHECKPOINT [--format onnx|tflite|coreml|web] [--out PATH] [--quantize]
                     [--no_verdict] [--check_images DIR] [--check_count N] [--web_runtime PATH]

Each format is one module of imgclf/export/ with a write(job) function, listed in FORMATS:
  onnx    model.onnx, the whole network with its softmax, ONNX Runtime (imgclf/export/to_onnx.py)
  tflite  model.tflite, LiteRT (TensorFlow Lite) for Android (imgclf/export/to_tflite.py)
  coreml  model.mlpackage, Core ML for iOS and macOS (imgclf/export/to_coreml.py)
  web     web/, a page that classifies photos in the browser, offline once loaded
          (imgclf/export/to_web.py)
Every export predicts the check photos (the test images of the data the checkpoint was trained
on, or --check_images DIR; generated images where neither is there) where its runtime runs here,
and nothing is written where it differs from PyTorch by more than the format's tolerance
(docs/export.md). The converters are optional extras; a missing one is a one-line error naming
the command that installs it.
"""
import argparse
import sys

from .. import errors
from ..errors import UserError
from ..export.checks import (CHECK_COUNT, PARITY_ATOL, CheckFailed,  # noqa: F401 (tests, API)
                             Job, mb)
from ..export.to_onnx import ONNX_FORMAT  # noqa: F401 (tests)
from ..version import __version__

DEFAULT_FORMAT = "onnx"


def onnx_writer(job):
    from ..export import to_onnx
    return to_onnx.write(job)


def tflite_writer(job):
    from ..export import to_tflite
    return to_tflite.write(job)


def coreml_writer(job):
    from ..export import to_coreml
    return to_coreml.write(job)


def web_writer(job):
    from ..export import to_web
    return to_web.write(job)


# --format -> the function that checks and writes it: writer(job) -> the path written. Each
# imports its converter only when chosen.
FORMATS = {
    "onnx": onnx_writer,
    "tflite": tflite_writer,
    "coreml": coreml_writer,
    "web": web_writer,
}


def build_parser():
    p = argparse.ArgumentParser(
        description="Export a checkpoint from train.py for other runtimes (class names and "
                    "preprocessing inside), checked against PyTorch before it is written.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pth written by train.py")
    p.add_argument("--format", choices=sorted(FORMATS), default=DEFAULT_FORMAT,
                   metavar="|".join(FORMATS),
                   help=f"onnx: ONNX Runtime (servers, predict.py); tflite: LiteRT for Android; "
                        f"coreml: Core ML for iOS; web: a folder with a page that classifies "
                        f"photos in the browser (default: {DEFAULT_FORMAT})")
    p.add_argument("--out", metavar="PATH",
                   help="the file (or folder) to write (default: beside the checkpoint, "
                        "model.onnx, model.tflite, model.mlpackage or web/; model.int8.onnx or "
                        "model.int8.tflite with --quantize)")
    p.add_argument("--quantize", action="store_true",
                   help="write an 8-bit model (onnx, tflite, web): about 4x smaller, slightly less "
                        "exact; static int8 calibrated on training images (default: float32)")
    p.add_argument("--no_verdict", action="store_true",
                   help="leave the unknown verdict out: no novelty output, and none of the "
                        "training photos' features it compares with (in int8 LiteRT 256 "
                        "bytes a photo and 0.3 MB; float32 4x that), for the smallest file; "
                        "every photo is then named as one of the classes (default: the "
                        "verdict goes where the checkpoint has it)")
    p.add_argument("--check_images", metavar="DIR",
                   help="photos to check the export on: a folder of class folders, a data "
                        "folder with test/ or valid/, or a folder of photos (default: the test "
                        "images of the data the checkpoint was trained on)")
    p.add_argument("--check_count", type=int, metavar="N",
                   help=f"how many of those photos to check, spread over the classes; 0 for "
                        f"all of them (default: {CHECK_COUNT})")
    p.add_argument("--web_runtime", metavar="PATH",
                   help="web: copy ONNX Runtime Web into the folder from its npm package (the "
                        ".tgz of npm pack, or its folder) (default: the page loads it from "
                        "jsDelivr)")
    return p


def main(argv=None):
    return errors.run_main(build_parser, run, argv, one_line=(UserError, CheckFailed))


def run(args):
    if (args.check_count or 0) < 0:
        raise UserError(f"--check_count {args.check_count}: must be 0 (all) or more")
    if args.web_runtime and args.format != "web":
        raise UserError(f"--web_runtime {args.web_runtime}: only for --format web; drop it")
    out = FORMATS[args.format](Job(args))
    print(f"wrote {out} ({mb(out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
