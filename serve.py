"""python serve.py --help: the command behind it is imgclf/cli/serve.py (also installed as imgclf-serve)."""
import sys

from imgclf.cli import run

if __name__ == "__main__":
    sys.exit(run("serve"))
