"""``bench flops`` (docs/counting.md#every-counter): the closed form, fvcore and ptflops agree on the
dense models; per method, each counter differs from the closed form exactly by the documented rule;
the papers' conventions. Random weights throughout (timm, pretrained=False)."""
from __future__ import annotations

import pytest
import timm
import torch

import methods
from bench import flops
from conftest import run_main
from methods.macs import _first_conv_in_channels


def sample(vit, n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = vit.patch_embed.img_size
    return torch.randn(n, _first_conv_in_channels(vit.patch_embed), h, w, generator=g) * 2


def count(method: str, vit, x, **knobs) -> flops.FlopsResult:
    model = methods.build(method, vit, **knobs).eval()
    return flops.count_model(model, methods.get(method), "b", x, flops.COUNTERS)


@pytest.fixture(scope="module")
def digits():
    """Sharpened attention (as tests/test_ats.py does), so that ATS keeps different counts per
    sample and A-ViT halts tokens, the CLS token included, before the last block."""
    torch.manual_seed(0)
    vit = timm.create_model("digits_vit").eval()
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight.normal_(0, 0.12)
        vit.pos_embed.normal_(0, 1.0)
    return vit


@pytest.mark.parametrize("name", ["digits_vit", "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"])
def test_three_counters_agree_on_dense_models(name):
    vit = timm.create_model(name, pretrained=False).eval()
    r = count("deit", vit, sample(vit, 1))
    s = r.samples[0]
    assert s["fvcore"] == pytest.approx(s["closed"], rel=1e-12)
    assert r.explained("fvcore") and r.explained("ptflops")
    # ptflops' aten backend: no LayerNorm (5 per element), one MAC per bias output (docs/counting.md#every-counter)
    shape = methods.vit_shape(vit)
    if name.startswith("deit"):
        n, c, a, h = shape.num_tokens, shape.embed_dim, shape.attn_dim, shape.mlp_hidden
        ln = (2 * shape.depth + 1) * 5 * n * c
        bias = shape.depth * n * (3 * a + c + h + c) + shape.num_patches * c + shape.num_classes
        assert s["ptflops"] * 1e9 == pytest.approx(s["closed"] * 1e9 - ln + bias, abs=0.5)
    if name == "deit_small_patch16_224":  # the README's numbers
        assert round(s["closed"], 6) == round(s["fvcore"], 6) == 4.608338
        assert round(s["ptflops"], 6) == 4.607129


@pytest.mark.parametrize("knobs", [{"keep": 0.5}, {"keep": 1.0}])
def test_ats_counters_differ_by_the_skipped_query_rows(digits, knobs):
    r = count("ats", digits, sample(digits, 3), **knobs)
    assert r.explained("fvcore") and r.explained("ptflops")
    assert all(s["fvcore"] < s["closed"] for s in r.samples)  # the rule is exercised, not 0


def test_avit_fvcore_drops_the_blocks_after_the_cls_token_halted(digits):
    model = methods.build("avit", digits, gate_center=3.0).eval()
    x = sample(digits, 3)
    with torch.no_grad():
        model(x)
    assert bool((methods.trace(model).depths[:, 0] < 6).all())  # CLS halts before the last block
    r = flops.count_model(model, methods.get("avit"), "3", x, flops.COUNTERS)
    assert r.explained("fvcore") and r.explained("ptflops")
    assert all(s["fvcore"] < s["closed"] for s in r.samples)


def adavit_with_random_gates(vit):
    model = methods.build("adavit", vit).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adavit_gates" in name:
                p.normal_(0, 0.5)
    return model


def test_adavit_fvcore_prunes_the_gates_that_only_steer_control_flow(digits):
    model = adavit_with_random_gates(digits)
    r = flops.count_model(model, methods.get("adavit"), "random gates", sample(digits, 3), flops.COUNTERS)
    assert r.explained("fvcore") and r.explained("ptflops")
    assert all(s["fvcore"] != s["closed"] for s in r.samples)


def test_a_wrong_rule_is_caught(digits):
    """The explained check compares per sample: a rule off by one MAC fails it."""
    r = count("ats", digits, sample(digits, 1), keep=0.5)
    r.samples[0]["fvcore_rule"] += 1e-9
    assert r.explained("fvcore") is False


def test_conventions(digits):
    x = sample(digits, 3)
    shape = methods.vit_shape(digits)
    ats = flops.count_model(methods.build("ats", digits, keep=0.5).eval(), methods.get("ats"), "0.5", x, ("paper",))
    padded = ats.conventions["padded batch"]
    assert all(p >= s["closed"] - 1e-12 for p, s in zip(padded, ats.samples)) and len(set(padded)) == 1
    closed = [s["closed"] for s in ats.samples]
    # --samples all: the conventions on their own batches, with our count on the same samples beside them
    whole = flops.count_model(methods.build("ats", digits, keep=0.5).eval(), methods.get("ats"), "0.5", x[:1], ("paper",),
                              convention_batches=[x[:2], x[2:]])
    assert whole.conventions[flops.OURS] == pytest.approx(closed, rel=1e-12)  # ATS is batch-invariant by default
    assert whole.conventions["padded batch"][2] == pytest.approx(closed[2], rel=1e-12)  # alone in its batch
    assert len(set(closed)) == 3 and padded[0] > min(closed)  # samples differ: the padded count charges the longest
    avit = flops.count_model(methods.build("avit", digits, gate_center=3.0).eval(), methods.get("avit"), "3", x, ("paper",))  # CLS pooling: the dense final norm adds 5 (N - 1) C
    extra = 5 * (shape.num_tokens - 1) * shape.embed_dim / 1e9
    assert avit.conventions["active tokens"] == pytest.approx([s["closed"] + extra for s in avit.samples], rel=1e-12)
    model = adavit_with_random_gates(digits)
    r = flops.count_model(model, methods.get("adavit"), "g", x, ("paper",))
    policy = methods.trace(model).policy_gmacs.tolist()
    # N = 65: no truncated table entry, so table + policy is our closed form
    assert r.conventions["table + policy"] == pytest.approx([s["closed"] for s in r.samples], rel=1e-12)
    assert r.conventions["lookup table"] == pytest.approx([s["closed"] - p for s, p in zip(r.samples, policy)], rel=1e-12)


def test_adavit_table_on_deit_small_all_kept_is_the_shipped_4_61():
    vit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    model = methods.build("adavit", vit).eval()  # fresh gates keep everything
    with torch.no_grad():
        model(sample(vit, 1))
    table = methods.get("adavit").counting.conventions[0].gmacs(model, methods.trace(model))
    assert float(table[0]) == pytest.approx(12 * 0.379148 + 0.0586, abs=5e-4)


def test_cli_prints_the_table_and_writes_it(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "flops", "--methods", "ats", "--budgets", "ats=0.5", "--samples", "2",
                              "--checkpoint", "random", "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    assert "fvcore" in out and "padded batch" in out
    md = (tmp_path / "flops.md").read_text()
    assert "| deit | full |" in md and "| ats | 0.5 |" in md and "NO" not in md
    assert (tmp_path / "flops.csv").read_text().count("\n") >= 5


@pytest.mark.parametrize("args, message", [
    (("--counters", "thop"), "unknown counter 'thop'"),
    (("--samples", "0"), "--samples '0' must be a positive integer"),
    (("--samples", "all"), "pass --counters paper with it"),
    (("--methods", "nope"), "unknown method 'nope'"),
])
def test_bad_input_is_one_error_line(monkeypatch, capsys, tmp_path, args, message):
    code, out, err = run_main(monkeypatch, capsys, "flops", "--out", str(tmp_path), "--dataset", "synthetic", "--checkpoint", "random", *args)
    assert code == 2
    assert err.startswith("error:") and message in err and "Traceback" not in err and err.count("\n") == 1


def test_a_missing_counter_is_named(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ptflops" else real(name, *a))
    code, out, err = run_main(monkeypatch, capsys, "flops", "--out", str(tmp_path))
    assert code == 2 and "counter 'ptflops' is not installed: pip install ptflops" in err
    assert flops.parse_counters("fvcore,paper") == ("fvcore", "paper")


def test_run_gets_a_counting_section_in_its_report(monkeypatch, capsys, tmp_path, tmp_path_factory):
    """`bench flops --run RUN` counts the run's own configuration; `bench report RUN` then shows it."""
    import shutil

    from benchrun import smoke_run

    results = tmp_path / "results"
    run = shutil.copytree(smoke_run(tmp_path_factory), results / smoke_run(tmp_path_factory).name)
    code, out, err = run_main(monkeypatch, capsys, "flops", "--run", run.name, "--results", str(results), "--samples", "1",
                              "--counters", "fvcore,paper", "--out", str(tmp_path / "flops"), "--quiet")
    assert code == 0, err
    assert (run / flops.SECTION).is_file() and "| ats | 0.25 |" in (tmp_path / "flops" / "flops.md").read_text()
    code, out, err = run_main(monkeypatch, capsys, "report", run.name, "--results", str(results), "--out", str(tmp_path / "reports"))
    assert code == 0, err
    board = (tmp_path / "reports" / run.name / "leaderboard.md").read_text()
    assert "## GMACs per sample as every counter counts them" in board and "| ats | blocks:-2/-1 |" in board
    assert "GMACs as every counter counts them (run" in (tmp_path / "reports" / run.name / "report.html").read_text()
    code, out, err = run_main(monkeypatch, capsys, "flops", "--run", run.name, "--results", str(results), "--budgets", "ats=0.5")
    assert code == 2 and "--run counts the run's own configuration; drop --budgets" in err
