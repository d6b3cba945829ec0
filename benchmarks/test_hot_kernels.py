"""Micro-benchmarks of each method's hot kernel (pytest-benchmark), at DeiT-Tiny scale (197 tokens,
width 192, 3 heads). Not part of `pytest -q` (testpaths is tests/); `.ci/run` compares them with
the committed `benchmarks/baseline.json` (README "Regression gates"). Each also checks its output,
so a benchmark of a broken kernel fails instead of timing it.

docs/methods/ats.md#sampling (ATS sampling), docs/methods/avit.md#halting (A-ViT halting), docs/methods/adavit.md#decision-network (AdaViT decisions); the dense block is
timm's own.
"""
import pytest
import torch
from timm.models.vision_transformer import Block

from methods import adavit, ats, avit

B, N, C, H = 8, 197, 192, 3


@pytest.fixture(autouse=True)
def _no_grad():
    torch.manual_seed(0)
    with torch.inference_mode():
        yield


def test_dense_block(benchmark):
    blk = Block(C, H).eval()
    x = torch.randn(B // 2, N, C)
    out = benchmark(blk, x)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("k", [197, 108])
def test_ats_sampling(benchmark, k):
    """Inverse transform sampling of K tokens from CLS-attention scores (released grid, and budgeted K < N)."""
    scores = torch.rand(B, N - 1).softmax(dim=1)
    n_in = torch.full((B,), N, dtype=torch.int64)
    sel = benchmark(ats.sample_tokens, scores, None, n_in, k, N, False)
    assert (sel.n_kept >= 2).all() and (sel.n_kept <= min(k, N)).all()
    assert (sel.rows[:, 0] == 0).all()  # CLS first


def test_avit_halting_step(benchmark):
    """One block's halting: scores from channel 0, cumulative sum, remainders, output accumulation."""
    x = torch.randn(B * N, C)
    cum = torch.rand(B * N) * 0.5
    rem = 1 - cum
    out = torch.zeros(B * N, C)

    def step():
        h = avit.halting_scores(x, 10.0, 10.0)
        return avit.halting_update(cum, rem, out, h, x, None, 0.01)

    cum2, rem2, out2, reached, go_on = benchmark(step)
    assert (cum2 >= cum).all() and not (reached & go_on).any()


def test_adavit_gating(benchmark):
    """One block's decisions: head and block gates on CLS, patch gate on every patch token, and the
    kept patch tokens gathered for the compact block."""
    gates = adavit.AdaGates(C, H, head_and_block=True).eval()
    for lin in (gates.patch, gates.head, gates.block):
        torch.nn.init.normal_(lin.weight, std=0.2)
        torch.nn.init.zeros_(lin.bias)
    x = torch.randn(B, N, C)

    def gate():
        cls = x[:, 0]
        heads = adavit._eval_decision(gates.head(cls), 0.5)
        blocks = adavit._eval_decision(gates.block(cls), 0.5)
        keep = adavit._eval_decision(gates.patch(x[:, 1:]).squeeze(-1), 0.6)
        rows = keep.nonzero()
        return heads, blocks, keep, x[:, 1:][rows[:, 0], rows[:, 1]]

    heads, blocks, keep, kept = benchmark(gate)
    assert heads.shape == (B, H) and blocks.shape == (B, 2) and kept.shape == (int(keep.sum()), C)
    assert 0 < int(keep.sum()) < keep.numel()
