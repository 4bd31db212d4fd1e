"""The HTML report: one self-contained file (BokehJS embedded), written whole.

The page is a template, a stylesheet and a script in ``assets/``, with the payload of
``data.collect`` inlined as gzipped JSON in base64 (the per-node details in chunks, inflated
when the reader selects a node). It needs no network: open it from disk.
While the search is live the page reloads itself every ``RELOAD_SECONDS``; once the run has
ended it does not.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import os
import re
from importlib import resources
from typing import Any

from evolve_jax import storage
from evolve_jax.report import data

FILENAME = "report.html"
RELOAD_SECONDS = 10
_BOKEH_FILES = ("bokeh.min.js", "bokeh-api.min.js")
# Nodes per chunk of the per-node details, each inflated when one of its nodes is first selected:
# the first selection on a 10,000-node page took 0.6-0.75 s when they were one blob.
DETAIL_CHUNK = 256


@functools.cache
def _asset(name: str) -> str:
    return resources.files("evolve_jax.report").joinpath("assets", name).read_text("utf-8")


@functools.cache
def _bokeh_js() -> str:
    """BokehJS and its plotting API, from the bokeh package's own static files."""
    static = resources.files("bokeh").joinpath("server", "static", "js")
    return "\n".join(static.joinpath(name).read_text("utf-8") for name in _BOKEH_FILES)


def _packed(payload: Any) -> str:
    """The payload as gzipped JSON in base64: a tenth of the bytes for history text, and safe
    inside <script> (base64 has no '<'). The page inflates it with DecompressionStream."""
    text = json.dumps(payload, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return base64.b64encode(gzip.compress(text.encode("ascii"), compresslevel=6)).decode()


def _inflated(text: str) -> Any:
    return json.loads(gzip.decompress(base64.b64decode(text)))


def unpacked(html: str) -> dict[str, Any]:
    """The payload inlined in a rendered page, without its details (for tests and tools)."""
    return _inflated(re.search(r'id="report-data">([^<]*)<', html)[1])


def unpacked_details(html: str) -> list[dict[str, Any]]:
    """The per-node details inlined in a rendered page, chunks joined (for tests and tools)."""
    chunks = re.findall(r'class="report-details">([^<]*)<', html)
    return [detail for chunk in chunks for detail in _inflated(chunk)]


def _details_element(chunk: list[dict[str, Any]]) -> str:
    """One chunk in an element of its own: reading it costs the page only its own text."""
    element = '<script type="application/gzip;base64" class="report-details">'
    return f"{element}{_packed(chunk)}</script>"


def render(payload: dict[str, Any], reload_seconds: float = RELOAD_SECONDS) -> str:
    """The whole page for a payload of ``data.collect``."""
    payload = {**payload, "reload_seconds": reload_seconds, "detail_chunk": DETAIL_CHUNK}
    details = payload.pop("details", None) or []
    chunks = [details[k : k + DETAIL_CHUNK] for k in range(0, len(details), DETAIL_CHUNK)]
    html = _asset("report.html")
    for marker, value in (
        ("/*STYLE*/", _asset("report.css")),
        ("/*BOKEH*/", _bokeh_js()),
        ("/*DATA*/", _packed(payload)),
        ("/*DETAILS*/", "".join(map(_details_element, chunks))),
        ("/*APP*/", _asset("report.js")),
    ):
        before, found, after = html.partition(marker)
        if not found:
            raise RuntimeError(f"report template lacks {marker}")
        html = before + value + after
    return html


def location(workdir: str, out: str | None = None) -> tuple[str, str]:
    """The (directory, file name) the report goes to: ``out`` if given (a file path or URL),
    else the workdir's ``report.html``."""
    if not out:
        return workdir, FILENAME
    local = storage.local_path(out)
    if out.endswith("/") or (local is not None and os.path.isdir(local)):
        raise ValueError(f"--out {out!r} names a directory, not a file")
    directory, _, name = storage.to_url(out).rpartition("/")
    return directory, name


def url(workdir: str, out: str | None = None) -> str:
    """Where ``write`` puts the page, as a URL."""
    return storage.join(*location(workdir, out))


def write(workdir: str, out: str | None = None, *, live: bool | None = None, history=None) -> str:
    """Collects, renders and writes the report whole (a reader sees the old page or the new
    one, never half); returns its URL. ``history``: see ``data.collect``."""
    directory, name = location(workdir, out)
    payload = data.collect(workdir, live=live, history=history)
    return storage.write_text(directory, name, render(payload))
