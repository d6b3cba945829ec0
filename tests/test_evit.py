"""EViT (`evit`, Liang et al., arXiv 2202.07800): docs/methods/evit.md#checks.

Random weights with sharpened attention, so that the CLS attention ranks tokens differently per sample."""
from __future__ import annotations

import pytest
import timm
import torch

import methods
from methods.evit import keep_attentive, reduction_blocks, tokens_kept

from conftest import fvcore_gmacs_of, sharpened_digits


@pytest.fixture(scope="module")
def vit():
    return sharpened_digits()


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 1, 64, 64, generator=torch.Generator().manual_seed(4))


def run(model, x):
    with torch.inference_mode():
        return model.eval()(x), methods.trace(model)


@pytest.mark.parametrize("mode", ["compact", "reference"])
def test_keep_1_equals_the_dense_model(vit, images, mode):
    dense, _ = run(methods.build("deit", vit), images)
    out, t = run(methods.build("evit", vit, mode=mode, keep=1.0), images)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-5)
    assert (t.tokens == 65).all() and t.gmacs == pytest.approx(methods.vit_shape(vit).dense_gmacs())


@pytest.mark.parametrize("knobs", [{"keep": 0.7}, {"keep": 0.5, "fuse": False}, {"keep": 0.3, "blocks": "0/2"}])
def test_reference_equals_compact_with_the_same_kept_tokens(vit, images, knobs):
    ref, t_ref = run(methods.build("evit", vit, mode="reference", **knobs), images)
    out, t = run(methods.build("evit", vit, mode="compact", **knobs), images)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.equal(t.tokens, t_ref.tokens) and torch.equal(t.gmacs, t_ref.gmacs)
    assert all(torch.equal(a, b) for a, b in zip(t.kept_index, t_ref.kept_index))
    assert any(not torch.equal(k[0], k[1]) for k in t.kept_index if k.shape[1] < 65)  # decisions differ per sample


def test_token_counts_follow_the_keep_rate_at_the_reduction_blocks(vit, images):
    _, t = run(methods.build("evit", vit, keep=0.5), images)
    stages = reduction_blocks(6)
    assert stages == [1, 3, 4]
    n, expected = 65, []
    for i in range(6):
        expected.append(n)
        if i in stages:
            n = 1 + tokens_kept(n, 0.5) + 1  # CLS, the kept patches, the fused token
    assert t.tokens[0].tolist() == expected
    assert reduction_blocks(12) == [3, 6, 9]  # the released 4th, 7th and 10th of 12
    _, t = run(methods.build("evit", vit, keep=0.5, fuse=False), images)
    assert t.tokens[0, 2] == 1 + tokens_kept(65, 0.5)  # Top-K: no fused token


def test_the_fused_token_is_the_attention_weighted_sum_of_the_dropped_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=g)
    attention = torch.softmax(torch.randn(2, 8, generator=g), dim=-1)
    out, top = keep_attentive(x, attention, 3, fuse=True)
    assert out.shape == (2, 5, 4) and torch.equal(out[:, 0], x[:, 0])
    for b in range(2):
        order = attention[b].argsort(descending=True)
        assert top[b].tolist() == order[:3].tolist()  # most attended first
        assert torch.equal(out[b, 1:4], x[b, 1 + order[:3]])
        dropped = order[3:]
        torch.testing.assert_close(out[b, 4], (x[b, 1 + dropped] * attention[b, dropped, None]).sum(dim=0))
    out, _ = keep_attentive(x, attention, 3, fuse=False)
    assert out.shape == (2, 4, 4)


def test_a_sample_keeps_the_same_tokens_alone_and_in_a_batch(vit, images):
    model = methods.build("evit", vit, keep=0.5)
    batch, t = run(model, images)
    alone, t1 = run(model, images[4:5])
    torch.testing.assert_close(alone[0], batch[4], rtol=0, atol=1e-5)
    assert all(torch.equal(a[4], b[0]) for a, b in zip(t.kept_index, t1.kept_index))


@pytest.mark.parametrize("name", ["digits_vit", "deit_tiny_patch16_224"])
def test_closed_form_gmacs_equal_fvcore(name):
    vit = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 1 if name == "digits_vit" else 3, *vit.patch_embed.img_size)
    model = methods.build("evit", vit, mode="reference", keep=0.5)
    _, t = run(model, x)
    assert float(t.gmacs[0]) == pytest.approx(fvcore_gmacs_of(model, x), rel=1e-6)
    assert float(t.gmacs[0]) < methods.vit_shape(vit).dense_gmacs()


def test_token_overlay_leaves_out_only_the_fused_token(vit, images):
    model = methods.build("evit", vit, keep=0.5)
    _, t = run(model, images)
    mask = model.tokens_entered(t)
    fused = torch.tensor([[int((k[b] < 0).sum()) for k in t.kept_index] for b in range(6)])  # an earlier fused token can be kept
    assert torch.equal(mask.sum(dim=2) + fused, t.tokens) and mask[:, :, 0].all()


@pytest.mark.parametrize("knobs, needle", [({"keep": 0.0}, "'keep'"), ({"keep": 0.5, "blocks": "7"}, "'blocks'"), ({"blocks": "1/1"}, "'blocks'")])
def test_bad_knobs_are_refused_with_the_knob_named(vit, knobs, needle):
    with pytest.raises(ValueError, match=needle):
        methods.build("evit", vit, **knobs)
