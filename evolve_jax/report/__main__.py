"""Writes a workdir's HTML report: ``python -m evolve_jax.report --workdir=W [--out=PATH]``.

The page is self-contained (open it offline). It reloads itself while a live process holds a
run's lease in the history, and stops once none does. A workdir without a history gets no
page: one line says so (exit 2) and nothing is created.
"""

from __future__ import annotations

import sys

from absl import app, flags

from evolve_jax import storage
from evolve_jax.cli import parse_flags
from evolve_jax.memory.history import CorruptRecordError, History, HistoryError
from evolve_jax.report import page

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (a path or gs:// URL).")
_OUT = flags.DEFINE_string(
    "out", None, "Where to write the page (a file path or gs:// URL); default WORKDIR/report.html."
)


def main(argv: list[str]) -> None:
    del argv
    if not _WORKDIR.value:
        print("error: --workdir is required", file=sys.stderr)
        sys.exit(2)
    try:
        storage.check_workdir(_WORKDIR.value)
        for location in filter(None, (_WORKDIR.value, _OUT.value)):
            storage.check_credentials(location)
        # A workdir without a history (a mistyped one) gets no page: nothing is created there.
        try:
            _ = History(_WORKDIR.value, create=False).meta  # HistoryError when there is none
        except CorruptRecordError:
            pass  # the page says which record it cannot read
        except HistoryError as e:
            print(f"error: {e}; no report written", file=sys.stderr)
            sys.exit(2)
        url = page.write(_WORKDIR.value, _OUT.value)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(url)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
