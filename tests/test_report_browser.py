"""The HTML report in a real browser: Debian's Chromium, headless, driven through Playwright.

Chromium must be installed (tests/install_chromium.sh, which the README's test command runs);
without it these tests fail rather than skip. Screenshots land in $TEST_ARTIFACTS (default
test-artifacts/)."""

import os

import pytest

from evolve_jax import storage
from evolve_jax.memory.history import History
from evolve_jax.report import data, page
from evolve_jax.report.browser import chromium
from tests.test_report_page import _append, toy_search

ARTIFACTS = os.environ.get("TEST_ARTIFACTS", "test-artifacts")


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("browser") / "run")
    summary = toy_search(workdir)
    return workdir, summary


def _drawn(p, plot: str, trace: int) -> int:
    """How many markers Plotly drew (SVG points) for trace ``trace`` of a plot (read from the
    data d3 bound to each trace's group)."""
    return p.evaluate(
        """([id, k]) => [...document.querySelectorAll(`#${id} .scatterlayer .trace`)]
            .filter((g) => g.__data__ && g.__data__[0].trace.index === k)
            .reduce((n, g) => n + g.querySelectorAll(".point").length, 0)""",
        [plot, trace],
    )


def test_the_report_renders_and_selects_nodes(searched, browser):
    workdir, summary = searched
    nodes = summary.nodes
    failed = [n for n in nodes if not n.ok]
    promoted = [n for n in nodes if 1 in n.stages]
    assert failed and len(promoted) >= 2  # the toy search exercises both paths
    path = storage.local_path(page.write(workdir, live=False))
    with browser.visit(path) as (p, visit):
        assert visit.errors == []
        # Every node is drawn: in the stage-0 fitness plot (ok or failed), and in the tree.
        assert _drawn(p, "fitness-0", 0) + _drawn(p, "fitness-0", 2) == len(nodes)
        assert _drawn(p, "fitness-0", 2) == len(failed)
        assert _drawn(p, "tree-plot", 2) + _drawn(p, "tree-plot", 3) == len(nodes)
        assert _drawn(p, "fitness-1", 0) + _drawn(p, "fitness-1", 2) == len(promoted)
        assert _drawn(p, "corr-1", 0) == len(promoted)
        assert p.locator("#board tr.row").count() == len(nodes)
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
        # Clicking a point of the tree selects its node.
        target = next(n for n in nodes if n.ok and n.parents and n.id != best.id)
        ok_ids = [n.id for n in nodes if n.ok]
        box = p.evaluate(
            """(k) => { document.getElementById('tree-plot').scrollIntoView();
              const g = [...document.querySelectorAll('#tree-plot .scatterlayer .trace')]
                .find((g) => g.__data__[0].trace.index === 2);
              const r = g.querySelectorAll('.point')[k].getBoundingClientRect();
              return {x: r.x, y: r.y, width: r.width, height: r.height}; }""",
            ok_ids.index(target.id),
        )
        p.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        p.wait_for_function(f"location.hash === '#node={target.id}'", timeout=5000)
        assert panel.locator("h2").inner_text() == f"#{target.id} {target.name}"
        assert "changed" in panel.inner_text()
        os.makedirs(ARTIFACTS, exist_ok=True)
        p.screenshot(path=os.path.join(ARTIFACTS, "report_toy.png"), full_page=True)
        assert visit.errors == []


def test_a_live_page_reloads_until_the_run_ends(searched, browser, tmp_path):
    workdir, _ = searched
    payload = data.collect(workdir, live=True)
    path = str(tmp_path / "live.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page.render(payload, reload_seconds=0.5))
    with browser.visit(path) as (p, visit):
        assert p.locator("#state").inner_text().startswith("live")
        p.evaluate("window.beforeReload = true")
        with open(path, "w", encoding="utf-8") as f:
            f.write(page.render({**payload, "live": False}, reload_seconds=0.5))
        p.wait_for_function(
            "document.getElementById('state') && "
            "document.getElementById('state').textContent === 'ended'",
            timeout=10_000,
        )
        assert p.evaluate("window.beforeReload") is None  # it reloaded to get there
        p.evaluate("window.afterEnd = true")
        p.wait_for_timeout(2000)  # four reload periods
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
                assert _drawn(p, "fitness-0", 2) == 4
            if case == "huge and not UTF-8":
                assert "first 20,000" in p.locator("#notices").inner_text()
                p.click("#board tr.row >> nth=0")
                assert "first 20,000" in p.locator("#detail").inner_text()
            p.screenshot(path=str(tmp_path / f"{case}.png"))
