"""The command line: train, predict, export and serve, each a module with build_parser() and
main(argv=None). The console commands (imgclf-train -> train_command(), ...) and the scripts at the top of the
repository (python train.py, ...) start them through run(), which keeps a Ctrl-C during the
seconds torch takes to import from printing a traceback."""
import importlib
import signal
import sys

from ..utils import stopping


def run(name, argv=None):
    """Import imgclf.cli.NAME, then return its main(argv). A stop signal while torch is imported
    ends the program quietly; train keeps that until its own handlers take over (nothing is
    written before), the other commands get the handlers they had back."""
    signums = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, stopping.stop_while_starting) for s in signums}
    module = importlib.import_module(f"{__name__}.{name}")
    if name != "train":
        for signum, handler in before.items():
            signal.signal(signum, handler)
    return module.main(argv)


def train_command():
    sys.exit(run("train"))


def predict_command():
    sys.exit(run("predict"))


def export_command():
    sys.exit(run("export"))


def serve_command():
    sys.exit(run("serve"))
