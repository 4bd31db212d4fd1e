"""The HTML report in a real browser: Debian's Chromium, headless, driven through Playwright.

Chromium must be installed (tests/install_chromium.sh, which the README's test command runs);
without it these tests fail rather than skip. Screenshots land in $TEST_ARTIFACTS (default
test-artifacts/)."""

import os
import re

import pytest

from evolve_jax import storage
from evolve_jax.memory.history import History
from evolve_jax.report import data, page
from evolve_jax.report.browser import chromium, drawn
from tests.test_report_page import _append, toy_search

ARTIFACTS = os.environ.get("TEST_ARTIFACTS", "test-artifacts")
# The lineage plot's BokehJS view, as a JavaScript expression.
TREE_VIEW = (
    "Object.values(Bokeh.index).find((v) => v.renderer_views && v.el.parentNode.id === 'tree-plot')"
)


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("browser") / "run")
    summary = toy_search(workdir)
    return workdir, summary


def test_the_report_renders_and_selects_nodes(searched, browser, monkeypatch):
    workdir, summary = searched
    monkeypatch.setattr(page, "DETAIL_CHUNK", 4)  # the nodes selected below are in two chunks
    nodes = summary.nodes
    failed = [n for n in nodes if not n.ok]
    promoted = [n for n in nodes if 1 in n.stages]
    assert failed and len(promoted) >= 2  # the toy search exercises both paths
    path = storage.local_path(page.write(workdir, live=False))
    with browser.visit(path) as (p, visit):
        assert visit.errors == []
        # Every node is drawn: in the stage-0 fitness plot (ok or failed), and in the tree.
        assert drawn(p, "fitness-0", "nodes") + drawn(p, "fitness-0", "failed") == len(nodes)
        assert drawn(p, "fitness-0", "failed") == len(failed)
        assert drawn(p, "tree-plot", "nodes") + drawn(p, "tree-plot", "failed") == len(nodes)
        assert drawn(p, "fitness-1", "nodes") + drawn(p, "fitness-1", "failed") == len(promoted)
        assert drawn(p, "corr-1", "nodes") == len(promoted)
        assert p.locator("#board tr.row").count() == len(nodes)
        assert re.search(r"written \d{4}-\d\d-\d\d \d\d:\d\d", p.locator("#header").inner_text())
        assert (
            p.locator("#stages p")
            .first.inner_text()
            .endswith(data.collect(workdir, live=False)["correlations"][0]["text"] + ".")
        )
        # Selecting the leaderboard's first row shows the best node whole.
        best = summary.best
        p.click("#board tr.row >> nth=0")
        panel = p.locator("#detail")
        assert panel.locator("h2").inner_text() == f"#{best.id} {best.name}"
        assert best.motivation in panel.inner_text()
        assert best.analysis in panel.inner_text()
        assert '"shape": "' + best.candidate["shape"] in panel.locator("pre").inner_text()
        # Clicking a point of the tree selects its node: find its pixel through the plot's
        # own coordinate mapping, then click there like a person would.
        target = next(n for n in nodes if n.ok and n.parents and n.id != best.id)
        p.locator("#tree-plot").scroll_into_view_if_needed()
        x, y = p.evaluate(
            f"""([x, y]) => {{ const view = {TREE_VIEW};
               const {{ x_scale, y_scale }} = view.frame, box = view.el.getBoundingClientRect();
               return [box.left + x_scale.compute(x), box.top + y_scale.compute(y)]; }}""",
            [target.id, data.collect(workdir, live=False)["tree"]["row"][target.id]],
        )
        # Hovering it first shows its label (made by the page when hovered).
        p.mouse.move(x, y)
        tooltip = p.get_by_text(f"#{target.id} {target.name} · score ")
        tooltip.wait_for(timeout=5000)
        assert tooltip.is_visible()
        p.mouse.click(x, y)
        p.wait_for_function(f"location.hash === '#node={target.id}'", timeout=5000)
        assert panel.locator("h2").inner_text() == f"#{target.id} {target.name}"
        assert "changed" in panel.inner_text()
        os.makedirs(ARTIFACTS, exist_ok=True)
        p.screenshot(path=os.path.join(ARTIFACTS, "report_toy.png"), full_page=True)
        assert visit.errors == []


RELOAD = 3  # seconds: time enough to set the page up before it reloads, on a slow machine
TREE_RANGES = f"""() => {{ const plot = {TREE_VIEW}.model;
  return [plot.x_range.start, plot.x_range.end, plot.y_range.start, plot.y_range.end]; }}"""


def test_a_live_page_reloads_until_the_run_ends(searched, browser, tmp_path):
    workdir, _ = searched
    payload = data.collect(workdir, live=True)
    path = str(tmp_path / "live.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page.render(payload, reload_seconds=RELOAD))
    with browser.visit(path) as (p, visit):
        assert p.locator("#state").inner_text().startswith("live")
        # What the reader set must survive the reloads: a selection, a filter, a panned plot,
        # the scroll position. Set within one reload period (checked below).
        p.evaluate("window.beforeReload = true")
        p.click("#board tr.row >> nth=1")
        chosen = p.locator("#detail h2").inner_text()
        p.fill("#filter", "gauss")
        rows = p.locator("#board tr.row").count()
        assert 0 < rows < len(payload["nodes"]["id"])
        p.locator("#tree-plot").scroll_into_view_if_needed()
        box = p.locator("#tree-plot").bounding_box()
        drawn_ranges = p.evaluate(TREE_RANGES)
        p.mouse.move(box["x"] + 300, box["y"] + 200)
        p.mouse.down()
        p.mouse.move(box["x"] + 200, box["y"] + 120, steps=5)
        p.mouse.up()
        panned = p.evaluate(TREE_RANGES)
        assert panned != drawn_ranges
        scrolled = p.evaluate("scrollY")
        assert scrolled > 0
        assert p.evaluate("window.beforeReload"), "the page reloaded before the test had set it up"
        with open(path, "w", encoding="utf-8") as f:
            f.write(page.render({**payload, "live": False}, reload_seconds=RELOAD))
        p.wait_for_function(
            "document.getElementById('state') && "
            "document.getElementById('state').textContent === 'ended'",
            timeout=10_000,
        )
        assert p.evaluate("window.beforeReload") is None  # it reloaded to get there
        p.wait_for_function("document.querySelector('#detail h2') !== null", timeout=5000)
        assert p.locator("#detail h2").inner_text() == chosen
        assert p.input_value("#filter") == "gauss"
        assert p.locator("#board tr.row").count() == rows
        assert p.evaluate(TREE_RANGES) == pytest.approx(panned)
        assert p.evaluate("scrollY") == pytest.approx(scrolled, abs=1)
        p.evaluate("window.afterEnd = true")
        p.wait_for_timeout(2.5 * RELOAD * 1000)
        assert p.evaluate("window.afterEnd") is True  # and stopped reloading
        assert visit.errors == []


def _bad_histories(root) -> dict[str, str]:
    """Workdirs holding the bad inputs the report must survive."""
    cases = {"no history": str(root / "empty")}
    failed = History(str(root / "failed"))
    failed.initialise("toy", "max")
    for i in range(4):
        _append(failed, status="failed", reason=f"boom {i}", score=float("-inf"), parents=[])
    cases["only failed"] = failed.workdir
    odd = History(str(root / "odd"))
    odd.initialise("toy", "max")
    seed = _append(odd, candidate={"source": "x = 0\n" * 500_000}, name="huge")
    _append(odd, name="BAD", parents=[seed.id])
    key = b"nodes/%010d" % 1
    raw = odd.kvstore.read(key).result().value.replace(b"BAD", b"B\xffD")
    odd.kvstore.write(key, raw).result()
    cases["huge and not UTF-8"] = odd.workdir
    return cases


def test_bad_inputs_render_and_say_what_they_could_not_show(browser, tmp_path):
    expected = {
        "no history": "Nothing to show",
        "only failed": "None of the 4 nodes succeeded",
        "huge and not UTF-8": "not UTF-8",
    }
    for case, workdir in _bad_histories(tmp_path).items():
        path = storage.local_path(page.write(workdir, live=False))
        with browser.visit(path) as (p, visit):
            assert visit.errors == [], case
            assert expected[case] in p.locator("#notices").inner_text(), case
            if case == "only failed":
                assert p.locator("#board tr.row").count() == 4
                assert drawn(p, "fitness-0", "failed") == 4
            if case == "huge and not UTF-8":
                assert "first 20,000" in p.locator("#notices").inner_text()
                p.click("#board tr.row >> nth=0")
                # The details are inflated after the click: wait for them (a loaded machine
                # once read the panel before they came).
                p.wait_for_function(
                    "document.querySelector('#detail').innerText.includes('first 20,000')",
                    timeout=10000,
                )
            p.screenshot(path=str(tmp_path / f"{case}.png"))
