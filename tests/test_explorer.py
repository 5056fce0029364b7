"""The run explorer (nslens.explorer): a self-contained HTML page, opened from a real run in headless Chromium
(Debian's ``chromium`` and ``chromium-driver``, driven by Selenium; CI installs them in .ci/run). The checks read
the run's own files and compare them with what the browser shows."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy.stats import gaussian_kde, norm

from nslens.analysis import bound_samples
from nslens.config import SideEffectsConfig
from nslens.errors import NsLensError
from nslens.explorer import explorer_data, render, write_explorer
from nslens.pipeline import RunConfig, run_pipeline
from nslens.ranges import load_masks
from nslens.stats import ConceptStats

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SECTIONS = ("erasure", "side-effects", "neurons", "overlap", "bounds")
#: what a self-contained page must not hold: external URLs, loaded resources, network calls
EXTERNAL = [r"https?:", r"\bwww\.", r"""["'(=]\s*//""", r"<script[^>]*\bsrc\b", r"<link\b", r"<img\b", r"<iframe\b",
            r"\bsrc\s*=", r"\bhref\s*=", r"@import", r"url\(", r"\bfetch\s*\(", r"XMLHttpRequest", r"WebSocket",
            r"EventSource", r"sendBeacon", r"\bimport\s*\("]


@pytest.fixture(scope="module")
def run_dir(embedded, tmp_path_factory):
    """The cheapest run with every section: 24 samples per concept, one operator, analyses, side effects on 6
    documents of the offline tasks."""
    cfg = RunConfig(fraction=0.5, operators=["zero"], n_per_class=24, batch_size=32, method="max",
                    side_effects=SideEffectsConfig(enabled=True, limit=6))
    run = run_pipeline(cfg, tmp_path_factory.mktemp("explorer") / "run", model=embedded)
    return Path(run)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
                    "apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,2400"):
        opts.add_argument(arg)
    opts.binary_location = str(CHROMIUM)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    yield driver
    driver.quit()


def open_page(browser, path: Path):
    browser.get_log("browser")  # drained: each page's errors are its own
    browser.get(path.resolve().as_uri())
    return browser


def console_errors(browser) -> list[dict]:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def css(browser, selector):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def embedded_json(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="nslens-data">(.*?)</script>', html, re.S)
    return json.loads(m[1])


def table_values(browser, selector):
    """(concept column, [[float(data-value)]], [[float(text)]]) of a table's body rows, in page order."""
    rows = css(browser, f"{selector} tbody tr")
    names = [r.find_elements("css selector", "td")[0].text for r in rows]
    cells = [r.find_elements("css selector", "td")[1:] for r in rows]
    return (names, [[float(td.get_attribute("data-value")) for td in row] for row in cells],
            [[float(td.text) for td in row] for row in cells])


def test_explorer_in_a_browser(run_dir, browser, tmp_path):
    page = write_explorer(run_dir)
    assert page == run_dir / "explorer.html" and (run_dir / "report.md").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # written atomically, nothing left over
    open_page(browser, page)
    for sec in SECTIONS:
        node = css(browser, f"#{sec}")[0]
        assert node.is_displayed() and not css(browser, f"#{sec} .missing"), sec

    # the erasure table holds the run's numbers: base values then neuron and range deltas, trimmed mean last
    tab = json.loads((run_dir / "erasure_zero.json").read_text())
    metrics = ("acc", "conf", "cacc", "cconf")
    want = [[tab[part][i][k] for part in ("base", "neuron", "range") for k in metrics]
            for i in range(len(tab["concepts"]))]
    names, values, shown = table_values(browser, "#erasure-zero")
    assert names == tab["concepts"] and values == want
    np.testing.assert_allclose(shown, want, atol=5e-4 + 1e-9)  # three decimals
    foot = [float(td.get_attribute("data-value")) for td in css(browser, "#erasure-zero tfoot td")[1:]]
    np.testing.assert_allclose(foot, [tab["summary"][p][k] for p in ("base", "neuron", "range") for k in metrics],
                               rtol=1e-12)

    # the side-effect table: each task's main metric (token perplexity, else accuracy), deltas vs clean
    se = json.loads((run_dir / "side_effects_zero.json").read_text())
    cols = [(t, "token_perplexity" if "token_perplexity" in se["clean"][t] else "acc") for t in se["tasks"]]
    want_se = [[se[part][i][t][k] for part in ("neuron", "range") for t, k in cols]
               for i in range(len(se["concepts"]))]
    names, values, shown = table_values(browser, "#side-effects-zero")
    assert names == se["concepts"] and values == want_se
    np.testing.assert_allclose(shown, want_se, atol=5e-5 + 1e-9)

    # clicking a header sorts the rows (ties keep the run's order); a second click sorts descending
    col = 1 + 4 + 1  # neuron ΔConf
    header = css(browser, "#erasure-zero thead th")[col]
    assert header.text == "neuron ΔConf"
    v = [row[col - 1] for row in want]
    for expect_key, cls in ((lambda i: (v[i], i), "sorted-asc"), (lambda i: (-v[i], i), "sorted-desc")):
        header.click()
        order = [tab["concepts"][i] for i in sorted(range(len(v)), key=expect_key)]
        assert table_values(browser, "#erasure-zero")[0] == order
        assert cls in header.get_attribute("class")
    assert css(browser, "#erasure-zero tfoot td")[0].text.startswith("trimmed mean")

    # choose a concept, click a neuron: its id and range as in the mask file, KDE curves and the range band
    from selenium.webdriver.support.ui import Select

    masks = load_masks(run_dir / "ranges")
    c, i = 2, 3
    mask = masks[c]
    Select(css(browser, "#concept-select")[0]).select_by_visible_text(mask.concept)
    items = css(browser, "#neuron-list li")
    assert [int(li.get_attribute("data-neuron")) for li in items] == mask.neurons.tolist()
    items[i].click()
    j = int(mask.neurons[i])
    assert css(browser, "#neuron-id")[0].text == str(j)
    for name, ref in (("lo", mask.lo[i].item()), ("hi", mask.hi[i].item())):
        span = css(browser, f"#range-{name}")[0]
        assert float(span.get_attribute("data-value")) == ref and abs(float(span.text) - ref) <= 5e-5 + 1e-9
    band = css(browser, "#density-svg rect.range-band")
    assert len(band) == 1 and float(band[0].get_attribute("width")) > 1
    assert float(band[0].get_attribute("data-lo")) == mask.lo[i].item()
    assert float(band[0].get_attribute("data-hi")) == mask.hi[i].item()
    paths = css(browser, "#density-svg path.curve")
    assert [p.get_attribute("data-concept") for p in paths] == [m.concept for m in masks]
    data = embedded_json(page.read_text())
    grid = data["densities"]["grid"]
    assert all(len(re.findall(r"[ML]", p.get_attribute("d"))) == grid for p in paths)
    # the curves are scipy's gaussian_kde of the kept samples, on the page's grid
    raw = load_file(str(run_dir / "samples.safetensors"))
    d = data["densities"]["neurons"][str(j)]
    x = np.linspace(d["x0"], d["x1"], grid)
    assert data["densities"]["source"] == "kde" and "gaussian_kde" in css(browser, "#density-note")[0].text
    for k in range(len(masks)):
        ref = gaussian_kde(raw["samples"][raw["labels"] == k, j].astype(np.float64)).evaluate(x)
        np.testing.assert_allclose(d["y"][k], ref, rtol=1e-3, atol=1e-12)

    # the samples at the bounds: the texts nslens.analysis.bound_samples picks for this neuron
    train = [json.loads(line)["text"] for line in (run_dir / "train.jsonl").read_text().splitlines()]
    texts = [train[t] for t in raw["index"]]
    ref = bound_samples(raw["samples"], raw["labels"].astype(np.int64), texts, mask, j, k=3)
    for where, name in (("lower", "lo"), ("upper", "hi")):
        shown = [(li.find_element("css selector", "code").text, float(li.find_element("css selector", ".act").text))
                 for li in css(browser, f"#bounds-{name} li")]
        assert [t for t, _ in shown] == [t for t, _ in ref[where]]
        np.testing.assert_allclose([a for _, a in shown], [a for _, a in ref[where]], atol=5e-4 + 1e-9)

    # the overlap matrix is the analyses' salient-neuron overlap
    a = json.loads((run_dir / "analysis.json").read_text())["polysemanticity"]
    cells = [[float(td.get_attribute("data-value")) for td in tr.find_elements("css selector", "td")[1:]]
             for tr in css(browser, "#overlap-matrix tbody tr")]
    assert cells == a["overlap"]

    shot = tmp_path / "explorer.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert console_errors(browser) == []


def test_sections_a_run_lacks_say_so(run_dir, browser, tmp_path):
    """A run without side effects, raw samples or analyses: those sections say so, and the densities are the
    recorded statistics' Gaussians (the page says which)."""
    lean = tmp_path / "lean"
    shutil.copytree(run_dir, lean, ignore=shutil.ignore_patterns("side_effects_*", "samples.safetensors",
                                                                 "analysis.json", "explorer.html"))
    page = write_explorer(lean, tmp_path / "page.html")
    assert page == tmp_path / "page.html" and not (lean / "explorer.html").exists()
    open_page(browser, page)
    for sec in ("side-effects", "overlap"):
        assert css(browser, f"#{sec} .missing")[0].text.startswith("Not computed in this run"), sec
    assert css(browser, "#bounds .missing")[0].text.startswith("Not kept in this run")
    assert not css(browser, "#erasure .missing") and css(browser, "#erasure-zero tbody tr")
    assert "no raw samples, so no KDE" in css(browser, "#density-note")[0].text
    css(browser, "#neuron-list li")[1].click()
    masks, stats = load_masks(lean / "ranges"), ConceptStats.load(lean / "stats.safetensors")
    j = int(masks[0].neurons[1])
    assert css(browser, "#neuron-id")[0].text == str(j) and len(css(browser, "#density-svg path.curve")) == 4
    d = embedded_json(page.read_text())["densities"]
    x = np.linspace(d["neurons"][str(j)]["x0"], d["neurons"][str(j)]["x1"], d["grid"])
    for k in range(4):
        ref = norm.pdf(x, stats.mean[k, j], stats.std()[k, j])
        np.testing.assert_allclose(d["neurons"][str(j)]["y"][k], ref, rtol=1e-3, atol=1e-12)
    assert console_errors(browser) == []


def test_page_is_self_contained(run_dir, tmp_path):
    """No external reference anywhere in the file, and a text that would close the data's script tag or read as
    a URL is escaped yet comes back exactly."""
    html = write_explorer(run_dir, tmp_path / "e.html").read_text()
    for pattern in EXTERNAL:
        assert not re.search(pattern, html, re.I), pattern
    assert html.count("<script") == 2 and '<script type="application/json" id="nslens-data">' in html
    assert embedded_json(html) == explorer_data(run_dir)
    data = explorer_data(run_dir)
    planted = "</script><script>alert(1)</script> see http://example.com//x & <b>"
    data["bounds"]["texts"][0] = planted
    html = render(data)
    assert not any(re.search(p, html, re.I) for p in EXTERNAL) and html.count("</script>") == 2
    assert embedded_json(html)["bounds"]["texts"][0] == planted


def test_not_a_run_directory(tmp_path):
    with pytest.raises(NsLensError, match="is not an nslens run directory"):
        write_explorer(tmp_path)


def test_a_run_writes_its_page_and_the_command_rewrites_it(run_dir, tmp_path, capsys):
    """The run's own explorer step wrote explorer.html beside report.md; `nslens explore` writes the same page
    (elsewhere with --out), and a directory that is no run is one line, exit 1."""
    from nslens.cli import main

    page = run_dir / "explorer.html"
    assert page.exists() and (run_dir / "report.md").exists()
    assert "explorer" not in json.loads((run_dir / "summary.json").read_text()).get("failed_steps", {})
    main(["explore", str(run_dir), "--out", str(tmp_path / "x.html")])  # success returns, no SystemExit
    assert (tmp_path / "x.html").read_text() == page.read_text()
    assert "wrote" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["explore", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "not an nslens run directory" in err and len(err.strip().splitlines()) == 1


def test_the_page_replaces_only_an_earlier_page(run_dir, tmp_path):
    """`explore RUN -o RUN/summary.json` (or a user's data.csv) overwrote that file with the page: the run was
    destroyed. An existing file must be an earlier page."""
    from conftest import run_cli

    data = tmp_path / "data.csv"
    data.write_text("text,label\na,b\n")
    summary = (run_dir / "summary.json").read_text()
    for target in (data, run_dir / "summary.json"):
        r = run_cli("explore", run_dir, "-o", target)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"error: {target} exists and is not an nslens explorer page; give a new file name (the page replaces "
            "only an earlier page)"], r.stderr
    assert data.read_text() == "text,label\na,b\n" and (run_dir / "summary.json").read_text() == summary
    with pytest.raises(NsLensError, match="is not an nslens explorer page"):
        write_explorer(run_dir, data)
    assert run_cli("explore", run_dir).returncode == 0  # its own page, again
    assert run_cli("explore", run_dir, "-o", tmp_path / "p.html").returncode == 0
    assert run_cli("explore", run_dir, "-o", tmp_path / "p.html").returncode == 0  # over an earlier page
