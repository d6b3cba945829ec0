"""tools/ceiling.py: the replay of the dense model's own kernels on the work a method kept, used
by tools/avit_speed.py and tools/adavit_speed.py to report the attainable speedup. Its timings
mean something only if it computes what the dense model computes on that work."""
import sys
from pathlib import Path

import pytest
import torch

import methods
from methods.backbones import create_digits_vit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import ceiling  # noqa: E402

DEPTH, N, H = 6, 65, 3


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_digits_vit().eval()


def _inputs(b: int = 4) -> torch.Tensor:
    return torch.randn(b, 1, 64, 64, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_avit_replay_without_halting_is_the_dense_model(vit):
    compact = methods.build("avit", vit, mode="compact", gate_center=1e4).eval()  # nothing halts before the last block
    x = _inputs()
    replay = ceiling.avit(vit, compact, x, 2)
    assert replay.schedules[x[:2].data_ptr()] == [N] * DEPTH
    for b in (x[:2], x[2:]):
        assert torch.allclose(replay(b), vit(b), atol=1e-5)


@torch.no_grad()
def test_avit_replay_follows_the_halting_schedule(vit):
    compact = methods.build("avit", vit, mode="compact", gate_scale=3.0, gate_center=-1.0).eval()
    x = _inputs()
    replay = ceiling.avit(vit, compact, x, 4)
    compact(x)
    mean = methods.trace(compact).tokens.float().mean(0)
    schedule = replay.schedules[x.data_ptr()]
    assert schedule == [max(1, round(float(t))) for t in mean]
    assert schedule[-1] < N  # tokens did halt: the replay runs fewer rows
    out = replay(x)
    assert out.shape == (4, vit.num_classes) and bool(out.isfinite().all())


@torch.no_grad()
def test_adavit_replay_with_everything_kept_is_the_dense_model(vit):
    compact = methods.build("adavit", vit, mode="compact").eval()  # fresh gates keep everything
    x = _inputs()
    replay = ceiling.adavit(vit, compact, x, 4)
    assert replay.schedules[x.data_ptr()] == [(l, N, H, True, True) for l in range(DEPTH)]
    assert torch.allclose(replay(x), vit(x), atol=1e-5)


@torch.no_grad()
def test_adavit_replay_slices_heads_as_the_method_drops_them(vit):
    """Every sample keeps heads 0 and 1 of blocks 1.. and every token: the replay's pre-sliced
    q/k/v, proj and fc1 weights must give AdaViT's own output (default head variant)."""
    compact = methods.build("adavit", vit, mode="compact").eval()
    for gates in compact.adavit_gates:
        if gates.head is not None:
            gates.head.weight.zero_()
            gates.head.bias.copy_(torch.tensor([5.0, 5.0, -5.0]))
    x = _inputs()
    replay = ceiling.adavit(vit, compact, x, 4)
    assert replay.schedules[x.data_ptr()] == [(0, N, H, True, True)] + [(l, N, 2, True, True) for l in range(1, DEPTH)]
    expected = compact(x)
    assert not torch.allclose(expected, vit(x), atol=1e-3)  # dropping the head changed the output
    assert torch.allclose(replay(x), expected, atol=1e-5)


@torch.no_grad()
def test_ats_replay_block_is_timms_block_on_the_kept_queries(vit):
    """An ATS step (n_in, n_out) computes, for its first n_out rows, what timm's Block computes for
    them over all n_in tokens (queries are independent rows), and nothing for the rest."""
    compact = methods.build("ats", vit, mode="compact", keep=0.25).eval()
    x = _inputs()
    replay = ceiling.ats(vit, compact, x, 4)
    blk = vit.blocks[3]
    stream = torch.randn(4, N, vit.embed_dim, generator=torch.Generator().manual_seed(1))
    out = replay.block_fn((40, 17), blk, stream)
    assert out.shape == (4, 17, vit.embed_dim)
    assert torch.allclose(out, blk(stream[:, :40])[:, :17], atol=1e-5)
    assert torch.equal(replay.block_fn((N, N), blk, stream), blk(stream))


@torch.no_grad()
def test_ats_replay_follows_the_sampled_token_counts(vit):
    compact = methods.build("ats", vit, mode="compact", keep=0.25).eval()
    x = _inputs()
    replay = ceiling.ats(vit, compact, x, 4)
    compact(x)
    tr = methods.trace(compact)
    expected = [(max(1, round(float(i))), max(1, round(float(o)))) for i, o in
                zip(tr.tokens.float().mean(0), tr.tokens_kept.float().mean(0))]
    schedule = replay.schedules[x.data_ptr()]
    assert schedule == expected
    assert schedule[:3] == [(N, N)] * 3 and all(o < i for i, o in schedule[3:4])  # sampling starts at block 3
    out = replay(x)
    assert out.shape == (4, vit.num_classes) and bool(out.isfinite().all())
