"""Reports: leaderboards, the self-contained HTML page, the plots, and the token maps behind plot 5."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import methods
from bench import plots, report, tokenmap
from bench.errors import UsageError
from bench.store import Run
from benchrun import smoke_run

PLOTS = ("accuracy_vs_gmacs", "accuracy_vs_speed", "speedup_vs_gmacs", "compute_profile", "token_overlays")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return smoke_run(tmp_path_factory)


@pytest.fixture(scope="module")
def report_dir(run_dir) -> Path:
    # `bench run` wrote the report of the run it measured, next to its results folder.
    folder = run_dir.parent.parent / "reports" / run_dir.name
    assert folder.is_dir()
    return folder


# ---------------------------------------------------------------------------------------------
# token maps (plot 5): what each method's trace says about every token


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("digits_vit").eval()


@pytest.mark.parametrize("method,knobs", [
    ("deit", {}),
    ("ats", {"keep": 0.3}),
    ("ats", {"blocks": "1/3/5", "tokens": "40/20/10"}),
    ("avit", {"gate_center": 0.0, "gate_scale": 5.0}),
    ("adavit", {}),
])
def test_token_maps_agree_with_the_trace(method, knobs):
    vit = _tiny_vit()
    model = methods.build(method, vit, **knobs).eval()
    if method == "adavit":  # random decisions instead of the all-keep initial gates
        g = torch.Generator().manual_seed(1)
        for gates in model.adavit_gates:
            for lin in (gates.patch, gates.head, gates.block):
                if lin is not None:
                    lin.weight.data = torch.randn(lin.weight.shape, generator=g)
                    lin.bias.data.zero_()
    x = torch.randn(5, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(x)
    trace = methods.trace(model)
    mask = model.tokens_entered(trace)
    depth = len(vit.blocks)
    assert mask.shape == (5, depth, 65)
    # Summed over tokens, the per-token record gives back the trace's tokens entering each block.
    assert torch.equal(mask.sum(dim=2), trace.tokens.cpu())
    blocks = tokenmap.token_blocks(model, x, "fp32")
    assert blocks.shape == (5, 65) and blocks.min() >= 0 and blocks.max() <= depth
    if method == "deit":
        assert (blocks == depth).all()
    elif method in ("ats", "avit"):
        assert (blocks < depth).any(), "the knobs chosen must drop or halt some tokens"
        if method == "ats":
            assert (blocks[:, 0] == depth).all()  # CLS is never dropped


def test_token_maps_out_of_memory_is_no_map_and_other_errors_propagate():
    model = methods.build("deit", _tiny_vit()).eval()
    x = torch.randn(2, 1, 64, 64)
    for error, expect_none in ((torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), True),
                               (RuntimeError("shape mismatch"), False)):
        def fail(*_a, error=error):
            raise error
        model.forward = fail
        if expect_none:
            assert tokenmap.token_blocks(model, x, "fp32") is None
        else:
            with pytest.raises(RuntimeError, match="shape mismatch"):
                tokenmap.token_blocks(model, x, "fp32")


def test_overlay_images_record():
    vit = _tiny_vit()
    x = torch.randn(3, 1, 64, 64)
    rec = tokenmap.image_record(vit, x)
    assert rec["images"].dtype == np.uint8 and rec["images"].shape == (3, 64, 64, 1)
    assert rec["images"].min() == 0 and rec["images"].max() == 255
    assert tuple(rec["grid"]) == (8, 8) and int(rec["prefix_tokens"]) == 1 and int(rec["depth"]) == 6


# ---------------------------------------------------------------------------------------------
# what a run stores for the report, and what the report writes


def test_run_stores_token_maps_and_images(run_dir):
    run = Run(run_dir)
    with np.load(run_dir / tokenmap.IMAGES_FILE) as f:
        assert f["images"].shape[0] == tokenmap.N_IMAGES
    for rec in run.records():
        raw = run.raw(rec)
        assert raw["token_blocks"].shape == (tokenmap.N_IMAGES, 65)
        if rec["method"] == "deit":
            assert (raw["token_blocks"] == 6).all()
        # the maps agree with the run's own mean tokens per block only loosely (6 images vs the test
        # list), but no token can be computed by more blocks than the model has
        assert raw["token_blocks"].max() <= 6


def test_report_writes_every_format(report_dir, run_dir):
    records = Run(run_dir).records()
    csv = pd.read_csv(report_dir / "leaderboard.csv", dtype={"arxiv": str, "budget": str})
    assert len(csv) == len(records) == 6
    for col in ("method", "arxiv", "backbone", "checkpoint", "mode", "budget", "device", "precision", "batch_size",
                "top1", "gmacs", "img_per_s", "latency_ms_p90", "speedup"):
        assert col in csv.columns
    assert set(csv.loc[csv["method"] == "ats", "arxiv"]) == {"2111.15667"}
    for name in PLOTS:
        png, svg = report_dir / "plots" / f"{name}.png", report_dir / "plots" / f"{name}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert b"<svg" in svg.read_bytes()[:2000], name
    page = (report_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS)
    # self-contained: nothing is fetched from anywhere
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert "<script src" not in page and "<link" not in page
    assert page.count("<tr") == len(records) + 1


def test_report_of_two_runs(run_dir, tmp_path):
    other = tmp_path / "results" / (run_dir.name + "-copy")
    shutil.copytree(run_dir, other)
    folder = report.write([Run(run_dir), Run(other)], tmp_path / "rep")
    assert folder.name == f"{run_dir.name}+{other.name}"
    csv = pd.read_csv(folder / "leaderboard.csv", dtype=str)
    assert len(csv) == 12 and csv.columns[0] == "run"
    assert sorted(csv["run"].value_counts().items()) == sorted([(run_dir.name, 6), (other.name, 6)])
    table = (folder / "leaderboard.md").read_text().split("\n| run ", 1)[1]  # the Markdown table has the column too
    assert table.count(f"| {other.name} ") == 6
    assert (folder / "report.html").is_file() and (folder / "plots" / "accuracy_vs_gmacs.svg").is_file()


def _figures(df: pd.DataFrame, runs: list, folder: Path, monkeypatch) -> dict:
    """Every figure draw_all makes, kept open (draw_all closes them once saved)."""
    import matplotlib.pyplot as plt

    kept = {}
    real_save = plots._save
    monkeypatch.setattr(plt, "close", lambda *_: None)

    def keep(fig, folder, name, *args, **kwargs):
        saved = real_save(fig, folder, name, *args, **kwargs)  # laid out and drawn as in the file
        kept[name] = fig
        return saved

    monkeypatch.setattr(plots, "_save", keep)
    plots.draw_all(df, runs, folder)
    return kept


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_plots_read_on_their_own(run_dir, tmp_path, monkeypatch):
    """Titles name data set and backbone; legends lie over no axes; the dense model is a star; the
    speedup legend has a title and the 1.0 line a label; budgets label the points; runs differ by
    marker and line style while colours stay methods; compute_profile rows are in method order."""
    other = tmp_path / "results" / "other"
    shutil.copytree(run_dir, other)
    runs = [Run(run_dir), Run(other)]
    df = report.load(runs)
    figs = _figures(df, runs, tmp_path / "plots", monkeypatch)
    assert set(figs) == set(PLOTS)
    for name, fig in figs.items():
        assert "digits on digits_vit" in fig._suptitle.get_text(), name
        for legend in [fig.legends[0]] if fig.legends else [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
            box = legend.get_window_extent()
            assert not any(_overlaps(box, ax.get_window_extent()) for ax in fig.axes), name
    gm = figs["accuracy_vs_gmacs"].axes[0]
    styles = {line.get_label(): (line.get_marker(), line.get_linestyle(), line.get_color()) for line in gm.get_lines()}
    first = {m: styles[f"{m} ({run_dir.name})"] for m in ("deit", "ats")}
    assert first["deit"][0] == styles["deit (other)"][0] == "*"
    assert first["ats"][0] != styles["ats (other)"][0] and first["ats"][1] != styles["ats (other)"][1]
    assert first["ats"][2] == styles["ats (other)"][2] != first["deit"][2]  # colour: the method
    assert {"0.25", "blocks:-2/-1"} <= {t.get_text() for t in gm.texts}
    speed = figs["accuracy_vs_speed"].axes
    assert any(line.get_marker() == "*" for line in speed[0].get_lines())
    assert any(line.get_label() == "dense model" for line in speed[0].get_lines())
    sp = figs["speedup_vs_gmacs"]
    assert sp.axes[-1].get_legend().get_title().get_text() == "method, batch size"
    assert "1.0: as fast as dense" in [t.get_text() for t in sp.axes[-1].get_legend().get_texts()]
    assert [ax.get_title() for ax in sp.axes] == [f"{run_dir.name}: cpu fp32", "other: cpu fp32"]
    rows = [t.get_text() for t in figs["compute_profile"].axes[1].get_yticklabels()]
    assert rows == [f"deit ({run_dir.name}) full", "deit (other) full", f"ats ({run_dir.name}) blocks:-2/-1",
                    "ats (other) blocks:-2/-1", f"ats ({run_dir.name}) 0.25", "ats (other) 0.25"]
    overlay = figs["token_overlays"]
    assert [ax.get_title() for ax in overlay.axes if ax.get_title().startswith("test image")] == [
        f"test image {i}" for i in range(1, 7)]


def test_overlay_colour_bar_shows_the_blended_colours():
    import matplotlib
    import matplotlib.pyplot as plt

    fig, cax = plt.subplots()
    plots._blended_colour_bar(fig, cax, 6)
    strip = cax.get_images()[0].get_array()
    pure = matplotlib.colormaps["magma"](np.arange(7) / 6)[:, :3]
    a = plots.OVERLAY_ALPHA
    assert np.allclose(strip[0], a * pure) and np.allclose(strip[1], a * pure + (1 - a))
    plt.close(fig)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_report_of_non_finite_values(run_dir, tmp_path, value):
    """Cells whose numbers are NaN (out of memory) or inf still make a report: the plots leave them out."""
    import json

    copy = tmp_path / "results" / run_dir.name
    shutil.copytree(run_dir, copy)
    records = [json.loads(line) for line in (copy / "records.jsonl").read_text().splitlines()]
    for r in records[2:]:  # every number of the adaptive cells
        r.update({k: value for k, v in r.items() if isinstance(v, float)})
    (copy / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    folder = report.write([Run(copy)], tmp_path / "rep")
    assert len(pd.read_csv(folder / "leaderboard.csv")) == len(records)
    assert (folder / "report.html").is_file() and (folder / "plots" / "speedup_vs_gmacs.png").is_file()


def test_a_report_cut_short_leaves_the_previous_one_whole(run_dir, tmp_path, monkeypatch):
    """A kill while the report is written (here: Ctrl-C while plotting) leaves the previous report
    as it was and no partial folder; leftovers of a SIGKILLed write are removed by the next one."""
    folder = report.write([Run(run_dir)], tmp_path / "rep")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(plots, "draw_all", killed)
        with pytest.raises(KeyboardInterrupt):
            report.write([Run(run_dir)], tmp_path / "rep")
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [folder.name]
    leftover = tmp_path / "rep" / f".{folder.name}.new-killed"  # what a SIGKILL mid-write leaves
    (leftover / "plots").mkdir(parents=True)
    report.write([Run(run_dir)], tmp_path / "rep")
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [folder.name]


def test_pareto_front():
    pts = pd.DataFrame({"gmacs": [1.0, 2.0, 2.0, 3.0, 0.5], "top1": [80.0, 85.0, 70.0, 84.0, 60.0]})
    front = plots.pareto(pts)
    assert list(zip(front["gmacs"], front["top1"])) == [(0.5, 60.0), (1.0, 80.0), (2.0, 85.0)]


def test_report_of_unfinished_run_is_an_error(run_dir, tmp_path):
    empty = tmp_path / "r" / "empty"
    empty.mkdir(parents=True)
    shutil.copy(run_dir / "manifest.json", empty / "manifest.json")
    with pytest.raises(UsageError, match="no finished cells"):
        report.write([Run(empty)], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


# ---------------------------------------------------------------------------------------------
# the page in a real browser


def _chromium(width: int = 1400, height: int = 3000):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless Chromium not installed (Debian packages chromium and chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_html_renders_in_headless_chromium(report_dir, run_dir, tmp_path):
    records = Run(run_dir).records()
    browser = _chromium()
    try:
        browser.get((report_dir / "report.html").resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
        assert len(images) == len(PLOTS)
        for complete, width, height, alt in images:
            assert complete and width > 300 and height > 200, (alt, width, height)
        rows = browser.execute_script("return document.querySelectorAll('#leaderboard tbody tr').length")
        assert rows == len(records)
        # the sort script works: clicking the gmacs header sorts rows by it, twice reverses
        col = browser.execute_script(
            "return Array.from(document.querySelectorAll('#leaderboard thead th')).findIndex(t => t.textContent === 'gmacs')")
        read = ("return Array.from(document.querySelectorAll('#leaderboard tbody tr'))"
                f".map(r => parseFloat(r.cells[{col}].getAttribute('data-v')))")
        header = browser.find_elements("css selector", "#leaderboard thead th")[col]
        header.click()
        values = browser.execute_script(read)
        assert values == sorted(values)
        header.click()
        assert browser.execute_script(read) == sorted(values, reverse=True)
        shot = tmp_path / "report.png"
        assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    # something was painted: not a blank page (plots and table have many distinct colours)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1])[:, :3].round(2), axis=0)) > 50


# Where the pinned cells and the header are, relative to the scroll box, after scrolling it.
PLACES = """
const box = document.querySelector('.scroll'), table = document.getElementById('leaderboard');
box.scrollLeft = box.scrollWidth; box.scrollTop = arguments[0];
const b = box.getBoundingClientRect(), row = table.tBodies[0].rows[arguments[1]];
const cols = Array.from(table.tHead.rows[0].cells).map(c => c.textContent);
const at = el => { const r = el.getBoundingClientRect(); return [r.left - b.left, r.top - b.top, r.width]; };
return {cols: cols, method: at(row.cells[cols.indexOf('method')]), budget: at(row.cells[cols.indexOf('budget')]),
        head: at(table.tHead.rows[0].cells[0]), wide: box.scrollWidth > box.clientWidth,
        constants: document.querySelector('.constants') ? document.querySelector('.constants').textContent : ''};
"""


def test_html_table_pins_names_and_header_in_a_narrow_window(report_dir):
    """At 800 px the table scrolls sideways: method and budget stay at the left edge and the header at
    the top; the columns every row shares are said above the table; budgets sort by GMACs."""
    browser = _chromium(800, 700)
    try:
        browser.get((report_dir / "report.html").resolve().as_uri())
        rows = browser.execute_script("return document.querySelectorAll('#leaderboard tbody tr').length")
        places = browser.execute_script(PLACES, 10_000, rows - 1)
        assert places["wide"], "at 800 px the table should be wider than its box"
        assert places["cols"][:2] == ["method", "budget"]
        assert "dataset" not in places["cols"] and "backbone" not in places["cols"]
        assert "dataset digits" in places["constants"] and "backbone digits_vit" in places["constants"]
        method_left, _, method_width = places["method"]
        assert abs(method_left) <= 2 and abs(places["budget"][0] - method_width) <= 2
        assert abs(places["head"][1]) <= 2, places["head"]  # scrolled to the bottom, the header still at the top
        col = places["cols"].index("budget")
        header = browser.find_elements("css selector", "#leaderboard thead th")[col]
        header.click()
        read = ("return Array.from(document.querySelectorAll('#leaderboard tbody tr'))"
                f".map(r => [r.cells[{col}].textContent, parseFloat(r.cells[{col}].getAttribute('data-v'))])")
        order = browser.execute_script(read)
        assert [v for _, v in order] == sorted(v for _, v in order)
        assert [b for b, _ in order[:2]] == ["0.25", "0.25"] and [b for b, _ in order[-2:]] == ["full", "full"]
    finally:
        browser.quit()
