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
    assert len(pd.read_csv(folder / "leaderboard.csv")) == 12
    assert (folder / "report.html").is_file() and (folder / "plots" / "accuracy_vs_gmacs.svg").is_file()


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


def _chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless Chromium not installed (Debian packages chromium and chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,3000"):
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
