"""Opens a report in headless Chromium (Debian's, through Playwright) and says what it saw.

For the report's tests and benchmark; needs the dev extra (playwright) and a Chromium binary
(``tests/install_chromium.sh`` installs Debian's). Playwright's own browser downloads are never
used: the machines that run this reach package registries only.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    """The Chromium binary: $CHROMIUM, else the first of CANDIDATES on PATH."""
    path = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, CANDIDATES)), None)
    if not path:
        raise FileNotFoundError(
            "no Chromium found (set CHROMIUM, or run tests/install_chromium.sh to install "
            "Debian's chromium)"
        )
    return path


@dataclasses.dataclass
class Visit:
    """What loading the page showed: console errors, uncaught exceptions, render time."""

    errors: list[str]
    rendered_ms: float | None  # from navigation to every plot drawn, by the page's clock
    load_s: float
    phases: dict[str, float] | None = None  # when each part of the page was done (ms)


class Browser:
    """One headless Chromium; ``visit`` loads report files in fresh pages."""

    def __init__(self, playwright: Any):
        self._browser = playwright.chromium.launch(
            executable_path=chromium_path(), args=["--no-sandbox", "--disable-dev-shm-usage"]
        )

    @contextmanager
    def visit(
        self, path: str, *, width: int = 1500, height: int = 1100
    ) -> Iterator[tuple[Any, Visit]]:
        """Loads the file at ``path`` and waits until every plot has rendered (the page sets
        ``body[data-ready]``); yields the Playwright page and what the visit saw."""
        page = self._browser.new_page(viewport={"width": width, "height": height})
        try:
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            start = time.perf_counter()
            page.goto("file://" + os.path.abspath(path))
            deadline = time.perf_counter() + 60
            # Poll, so that a page that broke says how at once instead of timing out.
            while not page.query_selector("body[data-ready='1']"):
                if errors or time.perf_counter() > deadline:
                    raise RuntimeError(f"the report never became ready; page errors: {errors}")
                page.wait_for_timeout(20)
            load_s = time.perf_counter() - start
            rendered = page.evaluate("window.reportRenderedMs")
            yield page, Visit(errors, rendered, load_s, page.evaluate("window.reportPhases"))
        finally:
            page.close()

    def close(self) -> None:
        self._browser.close()


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for the length of the block."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = Browser(playwright)
        try:
            yield browser
        finally:
            browser.close()


def drawn(page: Any, plot: str, renderer: str) -> int:
    """How many glyphs BokehJS laid out to draw for the renderers named ``renderer`` ("nodes",
    "failed") of the plot in element ``plot``: read from its views, not from the page's data."""
    return page.evaluate(
        """([id, name]) => Object.values(Bokeh.index)
            .filter((view) => view.renderer_views && view.el.parentNode
                    && view.el.parentNode.id === id && view._render_count > 0)
            .flatMap((view) => [...view.renderer_views.values()])
            .filter((r) => r.model.name === name)
            .reduce((n, r) => n + r.glyph.data_size, 0)""",
        [plot, renderer],
    )
