"""ToMe (`tome`, Bolya et al., arXiv 2210.09461): docs/methods/tome.md#checks.

Random weights (sharpened attention so that keys differ between tokens, as in a trained model)."""
from __future__ import annotations

import pytest
import timm
import torch

import methods
from methods.tome import bipartite_matching, merge, merge_schedule, merge_weighted, representatives

from conftest import fvcore_gmacs_of, sharpened_digits


@pytest.fixture(scope="module")
def vit():
    return sharpened_digits()


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 1, 64, 64, generator=torch.Generator().manual_seed(3))


def run(model, x):
    with torch.inference_mode():
        return model.eval()(x), methods.trace(model)


@pytest.mark.parametrize("mode", ["compact", "reference"])
def test_r0_equals_the_dense_model(vit, images, mode):
    dense, _ = run(methods.build("deit", vit), images)
    out, t = run(methods.build("tome", vit, mode=mode, r=0), images)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-5)
    assert (t.tokens == 65).all() and t.gmacs == pytest.approx(methods.vit_shape(vit).dense_gmacs())


@pytest.mark.parametrize("knobs", [{"r": 4}, {"r": 8, "inflect": -1.0}, {"r": 3, "inflect": 1.0}, {"r": 5, "proportional": False}])
def test_reference_equals_compact_and_counts_follow_the_schedule(vit, images, knobs):
    ref, t_ref = run(methods.build("tome", vit, mode="reference", **knobs), images)
    out, t = run(methods.build("tome", vit, mode="compact", **knobs), images)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.equal(t.tokens, t_ref.tokens) and torch.equal(t.gmacs, t_ref.gmacs)
    for a, b in zip(t.merged_index, t_ref.merged_index):
        assert torch.equal(a, b)
    expected, n = [], 65
    for r in merge_schedule(6, knobs["r"], knobs.get("inflect", 0.0)):
        expected.append(n)
        n -= min(r, (n - 1) // 2)
    assert t.tokens[0].tolist() == expected and t.tokens_kept[0, -1] == n


def test_schedules_keep_the_total_and_their_shape():
    assert merge_schedule(12, 13) == [13] * 12
    dec = merge_schedule(12, 8, -1.0)
    assert dec[0] == 16 and dec[-1] == 0 and dec == sorted(dec, reverse=True)
    inc = merge_schedule(12, 8, 1.0)
    assert inc[0] == 0 and inc[-1] == 16 and inc == sorted(inc)


def test_merging_keeps_sizes_summing_to_the_token_count_and_cls_unmerged():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 65, 8, generator=g)
    size = torch.ones(3, 65, 1)
    origin = torch.arange(65).expand(3, 65)
    for r in (10, 10, 10, 10, 10):
        m = bipartite_matching(torch.randn(3, x.shape[1], 4, generator=g), r)
        x, size = merge_weighted(x, size, m)
        origin = representatives(origin, m)
        assert size.sum(dim=(1, 2)).tolist() == [65.0] * 3
        assert (origin[:, 0] == 0).all() and (size[:, 0] == 1).all()  # CLS: first, never merged into
        assert x.shape[1] == origin.shape[1]


def test_a_merged_token_is_the_size_weighted_mean_of_its_parts():
    keys = torch.tensor([[[1.0, 0], [0, 1], [1, 0.1], [0.1, 1], [0, 1]]])  # A: tokens 0, 2, 4; B: tokens 1, 3
    m = bipartite_matching(keys, 1)
    assert m.src.tolist() == [[2]] and m.dst.tolist() == [[0]]  # token 4 has B's token 1 as twin (cosine 1)
    x = torch.arange(10.0).view(1, 5, 2)
    size = torch.tensor([[[1.0], [2.0], [3.0], [1.0], [1.0]]])
    merged, new_size = merge_weighted(x, size, m)
    assert torch.equal(merged[0, :2], x[0, [0, 2]]) and torch.equal(merged[0, 3], x[0, 3])
    torch.testing.assert_close(merged[0, 2], (2 * x[0, 1] + 1 * x[0, 4]) / 3)
    assert new_size.view(-1).tolist() == [1.0, 3.0, 3.0, 1.0]
    assert torch.equal(merge(torch.ones(1, 5, 1), m).view(-1), torch.tensor([1.0, 1.0, 2.0, 1.0]))
    assert bipartite_matching(keys, 0) is None and bipartite_matching(keys, 5).src.shape == (1, 2)  # at most (5 - 1) // 2


def test_proportional_attention_matters_only_once_sizes_differ(vit, images):
    on, _ = run(methods.build("tome", vit, r=0, proportional=True), images)
    off, _ = run(methods.build("tome", vit, r=0, proportional=False), images)
    assert torch.equal(on, off)  # every size is 1: log 1 = 0
    on, _ = run(methods.build("tome", vit, r=6, proportional=True), images)
    off, _ = run(methods.build("tome", vit, r=6, proportional=False), images)
    assert not torch.allclose(on, off, atol=1e-4)


def test_a_sample_merges_the_same_alone_and_in_a_batch(vit, images):
    model = methods.build("tome", vit, r=6)
    batch, t = run(model, images)
    alone, t1 = run(model, images[2:3])
    torch.testing.assert_close(alone[0], batch[2], rtol=0, atol=1e-5)
    assert all(torch.equal(a[2], b[0]) for a, b in zip(t.merged_index, t1.merged_index))


@pytest.mark.parametrize("name", ["digits_vit", "deit_tiny_patch16_224"])
def test_closed_form_gmacs_equal_fvcore(name):
    vit = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 1 if name == "digits_vit" else 3, *vit.patch_embed.img_size)
    model = methods.build("tome", vit, mode="reference", r=8, inflect=-1.0)
    _, t = run(model, x)
    assert float(t.gmacs[0]) == pytest.approx(fvcore_gmacs_of(model, x), rel=1e-6)
    assert float(t.gmacs[0]) < methods.vit_shape(vit).dense_gmacs()


def test_token_overlay_counts_each_merged_token_once(vit, images):
    model = methods.build("tome", vit, r=6)
    _, t = run(model, images)
    mask = model.tokens_entered(t)
    assert torch.equal(mask.sum(dim=2), t.tokens) and mask[:, :, 0].all()


@pytest.mark.parametrize("knobs, needle", [({"r": -1}, "'r'"), ({"inflect": 2.0}, "'inflect'")])
def test_bad_knobs_are_refused_with_the_knob_named(vit, knobs, needle):
    with pytest.raises(ValueError, match=needle):
        methods.build("tome", vit, **knobs)


def test_video_backbone_without_cls_token_merges_any_token():
    """VideoMAE (no CLS, average pooling): r = 0 is the dense model, both modes agree, and the
    counts follow min(r, n // 2) per block."""
    vit = timm.create_model("videomae_vit_small_patch16_224", pretrained=False, num_frames=4, img_size=64).eval()
    x = torch.randn(2, 3, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    dense, _ = run(methods.build("deit", vit), x)
    same, _ = run(methods.build("tome", vit, r=0), x)
    torch.testing.assert_close(same, dense, rtol=0, atol=1e-5)
    ref, t_ref = run(methods.build("tome", vit, mode="reference", r=3), x)
    out, t = run(methods.build("tome", vit, r=3), x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert t.tokens[0].tolist() == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 3, 2] and torch.equal(t.tokens, t_ref.tokens)
