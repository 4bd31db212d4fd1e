"""Where a run's files live: one layer for local paths, ``file://`` and ``gs://`` URLs.

A workdir is named as a path (``runs/quickstart``) or a URL (``file:///data/run``,
``gs://bucket/run``). Everything under it is reached through this module: the history and the
report through TensorStore key-value stores, checkpoints through Orbax on an ``etils.epath``
path. Local paths become ``file://`` URLs first, so a ``file://`` workdir runs the same code as
a ``gs://`` one; only the storage driver underneath differs.
"""

from __future__ import annotations

import importlib.util
import os

import tensorstore as ts

_SCHEMES = ("file://", "gs://")


# Small B-tree nodes: a commit rewrites only the O(log N) nodes on its path, so appending the
# 10,000th key costs what the 100th did (the 8 MiB default makes every commit rewrite one big
# leaf). Fixed when a store is created; later opens read it from the manifest.
OCDBT_CONFIG = {"max_decoded_node_bytes": 32 * 1024}
# The storage generation of a key with no value: writing with if_equal=ABSENT succeeds only if
# the key does not exist (if_equal=b"" would be unconditional).
ABSENT = ts.KvStore.open({"driver": "memory"}).result().read(b"k").result().stamp.generation


class StorageError(ValueError):
    """A workdir that cannot be used; the message says why."""


def to_url(location: str) -> str:
    """The location as a URL without a trailing slash; local paths become absolute file:// ."""
    if "://" not in location:
        return "file://" + os.path.abspath(location)
    if not location.startswith(_SCHEMES):
        scheme = location.split("://", 1)[0]
        raise StorageError(f"workdir {location!r}: unsupported scheme {scheme!r} (file://, gs://)")
    return location.rstrip("/")


def join(location: str, *parts: str) -> str:
    """``location/part/...`` as a URL."""
    return "/".join([to_url(location), *(p.strip("/") for p in parts)])


def local_path(location: str) -> str | None:
    """The local filesystem path of a location, or None for remote storage."""
    url = to_url(location)
    return url[len("file://") :] if url.startswith("file://") else None


def check_workdir(location: str) -> None:
    """Raises StorageError when ``location`` cannot hold a run (before any work is done)."""
    url = to_url(location)
    path = local_path(url)
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise StorageError(f"workdir {location!r} is a file, not a directory")


def check_credentials(location: str) -> None:
    """Raises StorageError when ``location`` is on GCS and no Google credentials are found
    (those TensorStore and gcsfs would use: GOOGLE_APPLICATION_CREDENTIALS, gcloud's
    application-default login, or the VM's service account)."""
    if not to_url(location).startswith("gs://"):
        return
    import google.auth
    import google.auth.exceptions

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise StorageError(
            f"workdir {location!r} is on GCS but no Google credentials were found: run "
            "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from e


def check_epath(location: str) -> None:
    """Raises StorageError when Orbax cannot write under ``location`` on this install."""
    # Orbax reaches gs:// through etils.epath, whose GCS backend is gcsfs.
    if to_url(location).startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
        raise StorageError(
            f"workdir {location!r} is on GCS, which needs gcsfs for checkpoints: "
            "pip install -e '.[gcs]' (the tpu extra includes it)"
        )


def kvstore(location: str) -> ts.KvStore:
    """A TensorStore key-value store rooted at ``location`` (a directory)."""
    return ts.KvStore.open(to_url(location) + "/").result()


def write_text(location: str, name: str, text: str) -> str:
    """Writes ``location/name`` whole (a reader sees the old file or the new one); its URL."""
    kvstore(location).write(name, text.encode("utf-8")).result()
    return join(location, name)


def epath(location: str):
    """An ``etils.epath.Path`` for Orbax: a local path for file:// URLs, else the URL."""
    from etils import epath as _epath

    path = local_path(location)
    return _epath.Path(path if path is not None else to_url(location))


def store_url(workdir: str, name: str) -> str:
    """The checked base URL (ending in '/') of the key-value store ``name`` under ``workdir``."""
    check_workdir(workdir)
    url = join(workdir, name)
    local = local_path(url)
    if local is not None and os.path.exists(local) and not os.path.isdir(local):
        raise StorageError(f"{local!r} is a file, not the directory of the {name} store")
    return url + "/"


def open_kvstore(url: str, what: str) -> ts.KvStore:
    """The OCDBT key-value store at ``url`` (created if absent); StorageError names ``what``."""
    try:
        return ts.KvStore.open({"driver": "ocdbt", "base": url, "config": OCDBT_CONFIG}).result()
    except ValueError as e:
        raise StorageError(f"cannot open the {what} at {url}: {e}") from e
