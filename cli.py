"""The console commands of the installed package: imgclf-train, imgclf-predict, imgclf-export
and imgclf-serve.

The scripts live flat in one folder and import one another by their plain names (`import
data_utils`), as `python train.py` does in the project folder. Installed, that folder is the
package imgclf (pyproject.toml maps the project folder to it, so nothing named train or report
lands at the top of site-packages). Each command puts the package folder first on sys.path, for
its own process only, imports the script by its plain name and runs its main().
"""
import importlib
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _stop_while_starting(signum, frame):
    # As `python train.py` does: a Ctrl-C while torch is imported ends quietly, nothing written.
    os.write(2, f"\n{signal.Signals(signum).name}: stopped\n".encode())
    os._exit(128 + signum)


def run_script(name):
    if sys.path[:1] != [HERE]:
        sys.path.insert(0, HERE)
    before = {s: signal.signal(s, _stop_while_starting) for s in (signal.SIGINT, signal.SIGTERM)}
    module = importlib.import_module(name)
    for signum, handler in before.items():
        signal.signal(signum, handler)
    sys.exit(module.main())


def train():
    run_script("train")


def predict():
    run_script("predict")


def export():
    run_script("export")


def serve():
    run_script("serve")
