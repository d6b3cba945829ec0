"""The A-ViT design study's digits ViT variants (methods/variants.py, docs/avit_study.md): closed-form
GMACs against fvcore, halting off = dense, reference = compact, refusals, the checkpoint cache and
the study report. Random-weight variants keep this file fast."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import methods
from bench import cache, config, runner, study
from bench.errors import UsageError
from methods.convert import load_checkpoint
from methods.variants import NAMED
from test_macs import fvcore_gmacs

VARIANTS = list(NAMED)
COMPACT = ["digits_vit_sincos", "digits_vit_instnorm", "digits_vit_cosine"]  # every method, both modes
NEVER_HALT = {"gate_scale": 1.0, "gate_center": 1e6}  # h = sigmoid(x0 - 1e6) = 0: no token halts before the last block
HALTING = {"gate_scale": 5.0, "gate_center": 0.0}  # on these random weights, tokens halt after 2 to 6 blocks


def variant(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(4, 1, 64, 64)


def forward(model, x):
    with torch.no_grad():
        return model(x), methods.trace(model) if isinstance(model, methods.TracedViT) else None


def allowed_modes(vit, method_id):
    return [m for m in methods.get(method_id).modes if not vit.unsupported_reason(method_id, m)]


@pytest.mark.parametrize("name", VARIANTS)
def test_closed_form_matches_fvcore(name):
    vit = variant(name)
    ours = methods.vit_shape(vit).dense_gmacs()
    assert ours == pytest.approx(fvcore_gmacs(vit), rel=1e-9)
    model = methods.build("deit", vit)
    _, tr = forward(model, torch.randn(2, 1, 64, 64))
    assert tr.gmacs.tolist() == pytest.approx([ours, ours], rel=1e-12)


def test_variants_differ_where_they_should():
    base = methods.vit_shape(variant("digits_vit")).dense_gmacs()
    assert methods.vit_shape(variant("digits_vit_instnorm")).dense_gmacs() < base  # norms without scale and shift: 4 per element, not 5
    assert methods.vit_shape(variant("digits_vit_mixer")).dense_gmacs() < base  # 65x48 token MLP instead of qkv, attention and proj
    assert not variant("digits_vit_sincos").pos_embed.requires_grad
    assert variant("digits_vit_rope").pos_embed is None


@pytest.mark.parametrize("name", VARIANTS)
def test_avit_with_halting_off_equals_dense(name, images):
    vit = variant(name)
    dense, _ = forward(vit, images)
    modes = allowed_modes(vit, "avit")
    assert modes == (["reference"] if name in ("digits_vit_rope", "digits_vit_mixer") else ["compact", "reference"])
    for mode in modes:
        logits, tr = forward(methods.build("avit", vit, mode=mode, **NEVER_HALT), images)
        torch.testing.assert_close(logits, dense, rtol=1e-4, atol=1e-5)
        assert bool((tr.depths == len(vit.blocks)).all())


@pytest.mark.parametrize("name", ["digits_vit_rope", "digits_vit_mixer"])
def test_avit_reference_halts_on_fixed_position_variants(name, images):
    """Halting is defined where compact is refused: halted tokens are masked in place."""
    vit = variant(name)
    logits, tr = forward(methods.build("avit", vit, mode="reference", **HALTING), images)
    assert torch.isfinite(logits).all()
    assert 1 < len(tr.depths.unique()) and float(tr.gmacs.mean()) < methods.vit_shape(vit).dense_gmacs()


@pytest.mark.parametrize("name", COMPACT)
@pytest.mark.parametrize("method_id, knobs", [("avit", HALTING), ("ats", {}), ("adavit", {})])
def test_reference_equals_compact(name, method_id, knobs, images):
    vit = variant(name)
    outs = [forward(methods.build(method_id, vit, mode=mode, **knobs), images) for mode in ("reference", "compact")]
    (ref, tr_ref), (comp, tr_comp) = outs
    torch.testing.assert_close(comp, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tr_comp.gmacs, tr_ref.gmacs)
    if method_id == "avit":
        assert torch.equal(tr_comp.depths, tr_ref.depths) and 1 < len(tr_ref.depths.unique())


@pytest.mark.parametrize("name, method_id, mode, words", [
    ("digits_vit_mixer", "avit", "compact", "halted tokens cannot leave it"),
    ("digits_vit_mixer", "ats", "reference", "no attention"),
    ("digits_vit_mixer", "adavit", "compact", "no attention"),
    ("digits_vit_rope", "ats", "reference", "grid positions"),
    ("digits_vit_rope", "avit", "compact", "grid positions"),
    ("digits_vit_rope", "adavit", "compact", "grid positions"),
])
def test_refusals_name_the_reason(name, method_id, mode, words):
    with pytest.raises(ValueError, match=words):
        methods.build(method_id, variant(name), mode=mode)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="pos='spiral'"):
        timm.create_model("digits_vit", pos="spiral")
    with pytest.raises(ValueError, match="block=mixer has no queries"):
        timm.create_model("digits_vit_mixer", attn="cosine")
    assert timm.create_model("digits_vit", norm="instance").options["norm"] == "instance"


def test_variants_save_and_load_through_the_checkpoint_cache(images):
    cfg = config.resolve("avit-study")
    keys = set()
    for name in VARIANTS:
        sub = study.variant_config(cfg, name)
        vit = variant(name)
        key = cache.config_key(runner.backbone_key(sub))
        keys.add(key)
        path = cache.save(vit.state_dict(), name, key, {"key": runner.backbone_key(sub)})
        loaded, info = runner.prepare_backbone(sub, runner.create_backbone(sub), runner_reporter())
        assert info["checkpoint"] == str(path)
        torch.testing.assert_close(forward(loaded, images)[0], forward(vit, images)[0], rtol=0, atol=0)
        fresh = runner.create_backbone(sub)
        load_checkpoint(fresh, path)  # strict: the same keys, the rotary tables and the sin-cos table included
    assert len(keys) == len(VARIANTS)


def runner_reporter():
    from bench.progress import QUIET

    return QUIET


def test_study_modes_fall_back_where_refused():
    cfg = config.resolve("avit-study")
    assert study.variant_config(cfg, "digits_vit_cosine").modes.get("avit", "compact") == "compact"
    assert study.variant_config(cfg, "digits_vit_mixer").modes["avit"] == "reference"
    assert study.variant_config(cfg, "digits_vit_rope").modes["avit"] == "reference"
    cfg.methods = ["ats"]
    with pytest.raises(UsageError, match="refuses method 'ats' in every mode"):
        study.variant_config(cfg, "digits_vit_mixer")


class FakeRun:
    def __init__(self, path: Path, backbone: str, records: list[dict]):
        self.path, self._backbone, self._records = path, backbone, records

    def manifest(self):
        return {"config": {"backbone": self._backbone, "model": {}}}

    def records(self):
        return self._records


def record(backbone, method, budget, mode, top1, gmacs, tokens, bs, speedup):
    return {"backbone": backbone, "method": method, "budget": budget, "mode": mode, "top1": top1, "top1_ci_low": top1 - 1,
            "top1_ci_high": top1 + 1, "gmacs": gmacs, "gmacs_ratio": gmacs / 0.054, "tokens_per_block": tokens,
            "speedup": speedup, "batch_size": bs}


def test_study_report_has_one_row_per_variant_and_model(tmp_path):
    runs = [FakeRun(tmp_path / "a", "digits_vit", [
                record("digits_vit", "deit", "full", "compact", 90.0, 0.054, [65.0] * 6, 1, 1.0),
                record("digits_vit", "avit", "prior:gaussian", "compact", 85.0, 0.03, [65.0, 30.0, 10.0, 5.0, 2.0, 2.0], 1, 1.2),
                record("digits_vit", "avit", "prior:gaussian", "compact", 85.0, 0.03, [65.0, 30.0, 10.0, 5.0, 2.0, 2.0], 8, 1.6)]),
            FakeRun(tmp_path / "b", "digits_vit_mixer", [
                record("digits_vit_mixer", "deit", "full", "compact", 80.0, 0.038, [65.0] * 6, 8, 1.0)])]
    folder = study.write_report(runs, tmp_path / "reports", "avit-study")
    df = study.study_rows(runs)
    assert list(df["variant"]) == ["digits_vit", "digits_vit", "digits_vit_mixer"]
    avit = df[df["method"] == "avit"].iloc[0]
    assert avit["batch_size"] == 8 and avit["speedup"] == 1.6
    assert avit["mean_depth"] == pytest.approx(114 / 65)
    assert df[df["variant"] == "digits_vit_mixer"]["options"].item() == "block=mixer"
    text = (folder / "study.md").read_text()
    assert "digits_vit_mixer" in text and (folder / "accuracy_vs_gmacs.png").stat().st_size > 0


def test_cli_refuses_with_one_line(monkeypatch, capsys, tmp_path):
    from conftest import run_main

    code, _, err = run_main(monkeypatch, capsys, "run", "--backbone", "digits_vit_mixer", "--methods", "ats", "--checkpoint", "random",
                            "--out", str(tmp_path), "--no-report", "-q")
    assert code == 2 and "a Mixer block has no attention" in err and "Traceback" not in err
    bad = tmp_path / "bench.toml"
    bad.write_text('[profiles.x]\ndescription = "bad option"\n[profiles.x.model]\npos = "spiral"\n')
    code, _, err = run_main(monkeypatch, capsys, "run", "--profile", "x", "--config", str(bad), "--checkpoint", "random",
                            "--out", str(tmp_path), "--no-report", "-q")
    assert code == 2 and err.strip().startswith("error:") and "pos='spiral'" in err and len(err.strip().splitlines()) == 1


class _Progress:
    def advance(self, n):
        pass

    def note(self, text):
        pass


@pytest.mark.parametrize("name", ["digits_vit_rope", "digits_vit_mixer"])
def test_avit_fine_tunes_in_reference_where_compact_is_refused(name):
    from methods import avit

    vit = variant(name)
    mode = runner.training_mode(methods.get("avit"), vit)
    assert mode == "reference" and runner.training_mode(methods.get("avit"), variant("digits_vit_cosine")) == "compact"
    torch.manual_seed(3)
    batch = [(torch.randn(8, 1, 64, 64), torch.randint(0, 10, (8,)))]
    data = methods.TrainData(batches=lambda e: iter(batch), steps_per_epoch=1, val_batches=lambda: iter(batch), num_classes=10)
    model = methods.build("avit", vit, mode=mode, **HALTING, train_gate_center=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = avit.train(model, data, {"epochs": 1, "lr": 1e-2}, _Progress())
    assert model.bench_mode == "reference" and 1 <= result["val_mean_depth"] <= len(vit.blocks)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(".attn." in k for k in moved)  # the token mixing, or the attention around the rotations, learned
