"""The project's one exception for user mistakes, below every module that raises it, and the
main() that predict.py, serve.py and export.py share: parse, run, a mistake as one line."""
import sys


class UserError(Exception):
    """A mistake the user can fix; its message is one line naming the thing and the fix."""
    exit_status = 2


def run_main(build_parser, run, argv=None, one_line=(UserError,)):
    """A script's main(): parse argv (None: the command line), run(args) -> exit status, and
    an exception of the one_line types (each with its exit_status) printed as one line
    "error: ..." on stderr instead of a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except one_line as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_status
