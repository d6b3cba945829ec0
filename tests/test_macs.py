"""Closed-form GMACs (docs/counting.md#closed-forms; checks MACS-1 and MACS-2, docs/counting.md#checks) against fvcore."""
import warnings

import pytest
import timm
import torch

import methods
from methods.macs import _first_conv_in_channels


def fvcore_gmacs(vit) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from fvcore.nn import FlopCountAnalysis
    for m in vit.modules():  # fvcore cannot see fused SDPA (docs/counting.md#what-fvcore-counts)
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    h, w = vit.patch_embed.img_size
    x = torch.randn(2, _first_conv_in_channels(vit.patch_embed), h, w)
    fca = FlopCountAnalysis(vit.eval(), x)
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    return fca.total() / 2 / 1e9


@pytest.mark.parametrize(
    "name, expected",
    [("deit_tiny_patch16_224", 1.258), ("deit_small_patch16_224", 4.608), ("deit_base_patch16_224", 17.582)],
)
def test_closed_form_matches_papers_and_fvcore(name, expected):
    vit = timm.create_model(name, pretrained=False)
    ours = methods.vit_shape(vit).dense_gmacs()
    assert ours == pytest.approx(expected, abs=0.005)
    assert ours == pytest.approx(fvcore_gmacs(vit), rel=1e-9)


def test_closed_form_matches_fvcore_on_digits_backbone():
    vit = timm.create_model("digits_vit")
    ours = methods.vit_shape(vit).dense_gmacs()
    assert ours == pytest.approx(fvcore_gmacs(vit), rel=1e-9)
    # And the trace of the dense method reports it for every sample.
    model = methods.build("deit", vit)
    with torch.no_grad():
        model(torch.randn(3, 1, 64, 64))
    assert torch.allclose(methods.trace(model).gmacs, torch.full((3,), ours, dtype=torch.float64))


def test_deit_small_block_breakdown():
    """Check MACS-2 (docs/counting.md#check-macs-2-deit-s-block-breakdown): 0.379148 G per block = MSA 0.146001 + FFN 0.232391 + 2 LN 0.000378."""
    s = methods.vit_shape(timm.create_model("deit_small_patch16_224"))
    n, c = 197, 384
    assert s.block(n) / 1e9 == pytest.approx(0.379148, abs=5e-7)
    msa = (n * c * 3 * c + 2 * n * n * c + n * c * c) / 1e9
    ffn = (2 * n * c * 4 * c) / 1e9
    ln = 5 * n * c / 1e9
    assert msa == pytest.approx(0.146001, abs=5e-7)
    assert ffn == pytest.approx(0.232391, abs=5e-7)
    assert ln == pytest.approx(0.000378, abs=5e-7)
    assert s.block(n) / 1e9 == pytest.approx(msa + ffn + 2 * ln, abs=1e-9)


def test_fewer_tokens_cost_less_per_sample():
    s = methods.vit_shape(timm.create_model("digits_vit"))
    tokens = torch.tensor([[65] * 6, [65, 65, 33, 33, 17, 17]])
    g = s.gmacs_from_tokens(tokens)
    assert g[0] == pytest.approx(s.dense_gmacs())
    assert g[1] < g[0]
    expected = (s.embed_macs + sum(s.block(n) for n in [65, 65, 33, 33, 17, 17]) + s.final(17)) / 1e9
    assert float(g[1]) == pytest.approx(expected)
