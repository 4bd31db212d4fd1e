"""Shared command-line plumbing for the entry points."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, but a bad flag is one clear line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.CantOpenFlagFileError as e:  # absl's text: "ERROR:: Unable to open flagfile: ..."
        cause = e.__context__
        if isinstance(cause, OSError) and cause.filename:
            print(f"error: cannot open the flagfile {cause.filename}: {cause.strerror}",
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"error: {str(e).removeprefix('ERROR:: ')}", file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
