"""AdaViT (Meng et al., arXiv 2111.15668): docs/methods/adavit.md#overview, checks ADAVIT-1 to ADAVIT-4 (docs/methods/adavit.md#checks)."""
import math

import pytest
import timm
import torch
from torch import nn

import methods
from methods import adavit
from methods.backbones import create_digits_vit

DEPTH, N = 6, 65  # the digits backbone: 6 blocks, 64 patches + CLS


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_digits_vit().eval()


def _inputs(b: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, b).view(-1, 1, 1, 1)  # very different inputs -> different decisions
    return torch.randn(b, 1, 64, 64, generator=g) * scale


def _randomise_gates(model: nn.Module, seed: int = 0, block_bias: float = 0.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gates in model.adavit_gates:
            gates.patch.weight.normal_(0, 1.0, generator=g)
            gates.patch.bias.fill_(0.4)
            if gates.head is not None:
                gates.head.weight.normal_(0, 0.5, generator=g)
                gates.head.bias.normal_(-0.5, 1.0, generator=g)
                gates.block.weight.normal_(0, 0.5, generator=g)
                gates.block.bias.fill_(block_bias)


def _pair(vit, **knobs):
    ref = methods.build("adavit", vit, mode="reference", **knobs).eval()
    _randomise_gates(ref)
    comp = methods.build("adavit", vit, mode="compact", **knobs).eval()
    comp.load_state_dict(ref.state_dict())
    return ref, comp


# ---- Check ADAVIT-4: the closed form of the shipped lookup tables (docs/methods/adavit.md#the-shipped-lookup-table) -----------


def test_official_table_formula_values():
    deit_s = adavit.official_block_macs(384, 6, 1536, 197, 6, 197, 1, 1) / 1e9
    assert deit_s == pytest.approx(0.379148, abs=1e-6)
    # pieces of check MACS-2 (docs/counting.md#check-macs-2-deit-s-block-breakdown): MSA 0.146001 + FFN 0.232391 + two LayerNorms 2 x 0.000378
    msa = adavit.official_block_macs(384, 6, 1536, 197, 6, 197, 1, 0) / 1e9 - 2 * 5 * 197 * 384 / 1e9
    assert msa == pytest.approx(0.146001, abs=1e-6)
    assert 12 * deit_s + 0.06 == pytest.approx(4.61, abs=5e-3)
    t2t = adavit.official_block_macs(448, 7, 3 * 448, 197, 7, 197, 1, 1) / 1e9
    assert t2t == pytest.approx(0.431042, abs=1.5e-6)  # formula gives 0.4310431
    assert 19 * t2t + 0.33 == pytest.approx(8.52, abs=5e-3)
    # h = 0 entries are 0 even with the FFN on; sub-layers off leave the one LayerNorm term
    assert adavit.official_block_macs(384, 6, 1536, 197, 0, 197, 1, 1) == 0
    assert adavit.official_block_macs(384, 6, 1536, 197, 3, 100, 0, 0) == 5 * 197 * 384
    # element-wise on tensors, including the h = 0 rule
    t = adavit.official_block_macs(384, 6, 1536, 197, torch.tensor([6.0, 0.0]), torch.tensor([197.0, 50.0]), 1.0, 1.0)
    assert t[0] == pytest.approx(0.379148e9, rel=1e-6) and t[1] == 0


def test_official_table_truncation_rule():
    shifted = [t for t in range(1, 198) if adavit.official_table_tokens(t, 197) != t]
    assert shifted == [13, 26, 51, 52, 53, 102, 104, 106, 117, 119, 121]
    assert all(adavit.official_table_tokens(t, 197) == t - 1 for t in shifted)
    e13 = adavit.official_table_entry(384, 6, 1536, 197, 6, 13, 1, 1)
    assert e13 == pytest.approx(adavit.official_block_macs(384, 6, 1536, 197, 6, 12, 1, 1) / 1e9, abs=1e-12)


def test_deit_small_all_kept_is_4_61():
    vit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    model = methods.build("adavit", vit, copy=False)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    tr = methods.trace(model)
    official = float(tr.gmacs[0] - tr.policy_gmacs[0])
    assert official == pytest.approx(12 * 0.379148 + 0.0586, abs=2e-4)
    assert round(official, 2) == 4.61
    assert official == pytest.approx(methods.vit_shape(model).dense_gmacs(), rel=1e-9)
    # decision network: 12 patch gates on 196 tokens + 11 x (head 6 + block 2 outputs) on CLS
    assert float(tr.policy_gmacs[0]) == pytest.approx((12 * 196 * 384 + 11 * 8 * 384) / 1e9, rel=1e-9)
    assert torch.equal(tr.tokens, torch.full((1, 12), 197)) and int(tr.heads.min()) == 6


# ---- Check ADAVIT-1: everything kept == the backbone (docs/methods/adavit.md#check-adavit-1-all-gates-open-equals-the-backbone) ---


@pytest.mark.parametrize("mode", ["compact", "reference"])
@pytest.mark.parametrize("variant", adavit.HEAD_VARIANTS)
def test_fresh_gates_keep_everything_and_match_backbone(vit, mode, variant):
    model = methods.build("adavit", vit, mode=mode, head_variant=variant).eval()
    x = _inputs()
    with torch.no_grad():
        assert (model(x) - vit(x)).abs().max() < 1e-4
    tr = methods.trace(model)
    assert torch.equal(tr.tokens, torch.full((6, DEPTH), N))
    assert int(tr.heads.min()) == 3 and bool(tr.sublayers.all()) and bool(tr.patch_keep.all())
    dense = methods.vit_shape(vit).dense_gmacs()
    assert torch.allclose(tr.gmacs - tr.policy_gmacs, torch.full((6,), dense, dtype=torch.float64), rtol=1e-9)
    assert tr.padding_waste == 0.0


def test_forced_open_gates_with_random_weights_match_backbone(vit):
    model = methods.build("adavit", vit, mode="reference").eval()
    _randomise_gates(model)
    with torch.no_grad():
        for gates in model.adavit_gates:
            for lin in (gates.patch, gates.head, gates.block):
                if lin is not None:
                    lin.weight.mul_(1e-3)
                    lin.bias.fill_(20.0)
        x = _inputs()
        assert (model(x) - vit(x)).abs().max() < 1e-4


def test_state_dict_is_timm_keys_plus_gates(vit):
    model = methods.build("adavit", vit)
    own = set(model.state_dict())
    timm_keys = set(vit.state_dict())
    assert timm_keys < own
    extra = own - timm_keys
    assert all(k.startswith("adavit_gates.") for k in extra)
    assert "adavit_gates.0.patch.weight" in extra and "adavit_gates.0.head.weight" not in extra
    assert {"adavit_gates.1.head.weight", "adavit_gates.1.block.bias"} <= extra
    # a plain timm state dict loads into the backbone part; only gate keys are missing
    other = create_digits_vit()
    fresh = methods.build("adavit", create_digits_vit())
    adavit.load_backbone_state_dict(fresh, other.state_dict())
    assert torch.equal(fresh.blocks[2].mlp.fc1.weight, other.blocks[2].mlp.fc1.weight)
    with pytest.raises(ValueError, match="does not fit"):
        adavit.load_backbone_state_dict(fresh, {**other.state_dict(), "bogus": torch.zeros(1)})


# ---- Check ADAVIT-2: evaluation binarisation (docs/methods/adavit.md#check-adavit-2-evaluation-binarisation) ---


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("mode", ["compact", "reference"])
def test_eval_thresholds_and_cls_always_kept(vit, mode):
    model = methods.build("adavit", vit, mode=mode).eval()
    x = _inputs(3)
    with torch.no_grad():
        g = model.adavit_gates
        g[0].patch.bias.fill_(_logit(0.59))  # below 0.6: every patch of block 0 dropped
        g[1].patch.bias.fill_(_logit(0.61))  # above 0.6: kept
        g[1].head.bias.copy_(torch.tensor([_logit(0.49), _logit(0.51), _logit(0.51)]))
        g[2].block.bias.copy_(torch.tensor([_logit(0.51), _logit(0.49)]))  # MSA on, FFN off
        g[3].block.bias.fill_(_logit(0.49))  # whole block skipped
        model(x)
        tr = methods.trace(model)
        assert tr.tokens[:, 0].tolist() == [1, 1, 1]  # only CLS
        assert bool(tr.patch_keep[:, 0, 0].all()) and not bool(tr.patch_keep[:, 0, 1:].any())
        assert tr.tokens[:, 1].tolist() == [N] * 3
        assert tr.heads[:, 1].tolist() == [2, 2, 2] and tr.heads[:, 0].tolist() == [3, 3, 3]
        assert tr.sublayers[:, 2].tolist() == [[True, False]] * 3
        assert tr.sublayers[:, 3].tolist() == [[False, False]] * 3 and tr.tokens[:, 3].tolist() == [0, 0, 0]
        # the thresholds are inference knobs
        model.bench_knobs["patch_threshold"] = 0.58
        model(x)
        assert methods.trace(model).tokens[:, 0].tolist() == [N] * 3


def test_evaluation_is_deterministic_and_training_is_not(vit):
    ref, comp = _pair(vit)
    x = _inputs()
    with torch.no_grad():
        for model in (ref, comp):
            a = model(x)
            ta = methods.trace(model)
            b = model(x)
            tb = methods.trace(model)
            assert torch.equal(a, b) and torch.equal(ta.tokens, tb.tokens) and torch.equal(ta.heads, tb.heads)
        ref.train()
        torch.manual_seed(1)
        ref(x)
        t1 = methods.trace(ref).patch_keep.clone()
        torch.manual_seed(2)
        ref(x)
        assert not torch.equal(t1, methods.trace(ref).patch_keep)  # Gumbel noise in training


# ---- Check ADAVIT-3: what a dropped token, sub-layer and head do (docs/methods/adavit.md#check-adavit-3-dropped-token-sub-layer-and-head) ----------


def _block_io(model, i, x):
    rec = {
        "tokens": torch.zeros(x.shape[0], DEPTH, dtype=torch.int64),
        "heads": torch.zeros(x.shape[0], DEPTH, dtype=torch.int64),
        "sublayers": torch.ones(x.shape[0], DEPTH, 2, dtype=torch.bool),
        "patch_keep": torch.zeros(x.shape[0], DEPTH, x.shape[1], dtype=torch.bool),
        "padded_macs": 0,
    }
    out = model._masked_block(i, model.blocks[i], model.adavit_gates[i], x, rec, {"heads": [], "sublayers": [], "patches": []})
    return out, rec


def test_dropped_token_is_carried_unchanged(vit):
    model = methods.build("adavit", vit, mode="reference").eval()
    _randomise_gates(model)
    x = torch.randn(4, N, 96)
    with torch.no_grad():
        out, rec = _block_io(model, 2, x)
    keep = rec["patch_keep"][:, 2]
    assert rec["sublayers"][:, 2].any(1).all()
    dropped = ~keep
    assert dropped.any() and keep[:, 1:].any()
    assert torch.equal(out[dropped], x[dropped])  # exact
    assert not torch.allclose(out[keep], x[keep])


def test_dropped_sublayer_contributes_exactly_zero(vit):
    model = methods.build("adavit", vit, mode="reference").eval()
    x = torch.randn(2, N, 96)
    with torch.no_grad():
        model.adavit_gates[1].block.bias.copy_(torch.tensor([-10.0, 10.0]))  # MSA off
        out, _ = _block_io(model, 1, x)
        blk = model.blocks[1]
        expected = x + blk.mlp(blk.norm2(x))
        assert torch.equal(out, expected)
        model.adavit_gates[1].block.bias.copy_(torch.tensor([10.0, -10.0]))  # FFN off
        out, _ = _block_io(model, 1, x)
        assert torch.equal(out, x + blk.attn(blk.norm1(x)))


@pytest.mark.parametrize("variant", adavit.HEAD_VARIANTS)
def test_dropped_head_semantics(vit, variant):
    """zero_channels: the block equals a timm block whose q/k/v rows (weights and bias) of the
    dropped head and the same channel indices of fc1's input are zeroed. identity_attn: the head's
    attention map is the identity, i.e. its output is its own V."""
    model = methods.build("adavit", vit, mode="reference", head_variant=variant).eval()
    x = torch.randn(2, N, 96)
    drop, d = 1, 32
    with torch.no_grad():
        model.adavit_gates[3].head.bias.copy_(torch.tensor([10.0, -10.0, 10.0]))
        out, rec = _block_io(model, 3, x)
        assert rec["heads"][:, 3].tolist() == [2, 2]
        blk = model.blocks[3]
        if variant == "zero_channels":
            import copy

            plain = copy.deepcopy(blk)
            for part in range(3):
                rows = slice(part * 96 + drop * d, part * 96 + (drop + 1) * d)
                plain.attn.qkv.weight[rows] = 0
                plain.attn.qkv.bias[rows] = 0
            plain.mlp.fc1.weight[:, drop * d : (drop + 1) * d] = 0
            expected = plain(x)
        else:
            attn = blk.attn
            y = blk.norm1(x)
            q, k, v = attn.qkv(y).reshape(2, N, 3, 3, d).permute(2, 0, 3, 1, 4).unbind(0)
            o = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, -1) @ v
            o[:, drop] = v[:, drop]
            h = x + attn.proj(o.transpose(1, 2).reshape(2, N, 96))
            expected = h + blk.mlp(blk.norm2(h))
        assert (out - expected).abs().max() < 1e-5


# ---- compact == reference, and compact really skips ----------------------------------------


@pytest.mark.parametrize("variant", adavit.HEAD_VARIANTS)
def test_compact_matches_reference_per_sample_and_batched(vit, variant):
    ref, comp = _pair(vit, head_variant=variant)
    x = _inputs(8)
    with torch.no_grad():
        lr = ref(x)
        tr = methods.trace(ref)
        lc = comp(x)
        tc = methods.trace(comp)
    # the batch really is heterogeneous: tokens, heads and sub-layers differ between samples
    assert len({tuple(r) for r in tc.tokens.tolist()}) > 4
    assert len({tuple(r) for r in tc.heads.tolist()}) > 1
    assert len({tuple(r) for r in tc.sublayers.flatten(1).tolist()}) > 1
    assert int(tc.heads.min()) == 0 and not bool(tc.sublayers.all()) and int(tc.tokens.min()) == 0
    assert (lr - lc).abs().max() < 1e-4
    for f in ("tokens", "heads", "sublayers", "patch_keep", "gmacs", "policy_gmacs", "gmacs_executed"):
        assert torch.equal(getattr(tr, f), getattr(tc, f)), f
    assert tc.padding_waste > 0
    with torch.no_grad():
        for i in range(len(x)):
            one = comp(x[i : i + 1])
            t1 = methods.trace(comp)
            assert (one - lc[i : i + 1]).abs().max() < 1e-4
            assert torch.equal(t1.tokens[0], tc.tokens[i]) and torch.equal(t1.heads[0], tc.heads[i])
            assert t1.padding_waste == 0.0
    dense = methods.vit_shape(vit).dense_gmacs()
    assert bool((tc.gmacs < dense).all())


def test_sliced_weights_follow_new_weights(vit):
    """compact caches head-sliced weights per head set at inference; loading new weights (an
    in-place copy) must be seen by the next forward, which still equals the reference."""
    ref, comp = _pair(vit)
    x = _inputs(8)
    with torch.no_grad():
        before = comp(x)
        assert comp.__dict__.get("_adavit_slices")  # heads were dropped, so slices were cached
        state = {k: (v * 1.5 if k.endswith(("qkv.weight", "proj.weight", "fc1.weight")) else v) for k, v in ref.state_dict().items()}
        ref.load_state_dict(state)
        comp.load_state_dict(state)
        after, expected = comp(x), ref(x)
    assert (after - before).abs().max() > 1e-2
    assert (after - expected).abs().max() < 1e-4


def test_compact_executes_what_the_trace_says(vit):
    """The arithmetic compact runs (torch's FlopCounterMode: linears, convolutions, attention)
    matches the per-sample executed count, and is far below the reference's dense arithmetic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    ref, comp = _pair(vit)
    x = _inputs(8)[3:4]
    methods.vit_shape(comp), methods.vit_shape(ref)  # the shape probe runs the stem once: not the forward's work
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            comp(x)
        compact_macs = fc.get_total_flops() / 2
        # the math backend, whose matmuls the counter sees (it skips fused CPU attention kernels)
        with FlopCounterMode(display=False) as fr, sdpa_kernel(SDPBackend.MATH):
            ref(x)
        ref_macs = fr.get_total_flops() / 2
    tr = methods.trace(comp)
    shape = methods.vit_shape(comp)
    # the closed form adds LayerNorms (5 per element) and the stem's BatchNorms, which torch does not count
    assert compact_macs == pytest.approx(float(tr.gmacs_executed[0]) * 1e9, rel=0.03)
    assert compact_macs < 0.75 * ref_macs
    assert ref_macs == pytest.approx(shape.dense_gmacs() * 1e9, rel=0.03)


def test_bf16_autocast_runs_in_both_modes(vit):
    ref, comp = _pair(vit)
    x = _inputs(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x), comp(x)
    assert torch.isfinite(a.float()).all() and torch.isfinite(b.float()).all()
    assert methods.trace(comp).tokens.dtype == torch.int64


# ---- registry, knobs, training ---------------------------------------------------------------


def test_registry_and_knobs(vit):
    spec = methods.get("adavit")
    assert spec.arxiv == "2111.15668" and spec.modes == ("compact", "reference") and spec.primary_knob == "target"
    assert len(spec.default_budgets) >= 3 and spec.train is adavit.train
    assert set(spec.train_knobs) >= {"target", "patch_target", "head_target", "block_target"}
    from bench import budgets

    assert budgets.parse("adavit", "0.5") == {"target": 0.5}
    model = methods.build("adavit", vit, target=0.5, head_target=0.8)
    assert adavit._targets(model.bench_knobs) == {"patch": 0.5, "head": 0.8, "block": 0.5}
    with pytest.raises(ValueError, match="head_variant"):
        methods.build("adavit", vit, head_variant="nope")
    with pytest.raises(ValueError, match="patch_target"):
        methods.build("adavit", vit, patch_target=1.5)


def test_usage_loss_matches_official_form():
    heads = [torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])]
    subs = [torch.tensor([[1.0, 0.0], [0.0, 0.0]])]  # sample 1's block is fully off: its heads do not count
    patches = [torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])]
    policy = {"heads": heads, "sublayers": subs, "patches": patches}
    u = adavit.usage(policy)
    assert float(u["head"]) == pytest.approx(2 / 3, abs=1e-5)
    assert float(u["block"]) == pytest.approx(0.25)
    assert float(u["patch"]) == pytest.approx(3 / 8)
    loss, _ = adavit.usage_loss(policy, {"patch": 0.5, "head": 0.5, "block": 0.5})
    assert float(loss) == pytest.approx(2 * (1 / 6) + 2 * 0.25 + 2 * (1 / 8) ** 2, abs=1e-5)


def test_gumbel_sigmoid_is_hard_with_soft_gradient():
    torch.manual_seed(0)
    logits = torch.zeros(20000, requires_grad=True)
    out = adavit.gumbel_sigmoid_st(logits, 0.6)
    assert set(out.detach().unique().tolist()) <= {0.0, 1.0}
    # keep iff (logit + logistic noise) / 5 > logit(0.6): P = sigmoid(-5 * 0.405) = 0.116
    assert float(out.detach().mean()) == pytest.approx(1 / (1 + math.exp(5 * _logit(0.6))), abs=0.01)
    out.sum().backward()
    assert float(logits.grad.abs().sum()) > 0


def test_training_moves_usage_toward_targets():
    torch.manual_seed(0)
    vit = create_digits_vit(img_size=32, embed_dim=48, depth=3, num_heads=3).eval()  # small: 16 + 1 tokens
    model = methods.build("adavit", vit, target=0.3)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 1, 32, 32, generator=g) * torch.rand(64, 1, 1, 1, generator=g) * 3
    ys = torch.randint(0, 10, (64,), generator=g)

    def batches(epoch):
        for i in range(0, 64, 16):
            yield xs[i : i + 16], ys[i : i + 16]

    def val_batches():
        yield xs[:32], ys[:32]

    data = methods.TrainData(batches=batches, steps_per_epoch=4, val_batches=val_batches, num_classes=10)

    class Progress:
        steps = 0

        def advance(self, n=1):
            self.steps += n

        def note(self, text):
            pass

    progress = Progress()
    settings = {**methods.get("adavit").train_settings, "epochs": 5, "gate_lr": 0.1}
    out = adavit.train(model, data, settings, progress)
    assert progress.steps == out["steps"] == 20
    # a fresh model keeps everything (usage 1); the usage losses pull all three toward 0.3
    assert out["val_block_usage"] < 0.85 and out["val_head_usage"] < 0.85
    assert out["val_tokens_per_block"][0] < 0.85 * 17
    assert out["val_gmacs_ratio"] < 0.8
    assert not model.training


@pytest.mark.parametrize("variant", adavit.HEAD_VARIANTS)
def test_compact_block_with_full_and_partial_rows(vit, variant):
    """One sample keeps every token while the others drop some (padding up to N), heads and
    sub-layers differ per sample: compact's block output equals the masked block's."""
    model = methods.build("adavit", vit, mode="reference", head_variant=variant).eval()
    _randomise_gates(model, seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, N, 96, generator=g)
    x[0, :, 0] = 20.0  # LN1 channel 0 large and positive: every token of sample 0 is kept
    with torch.no_grad():
        gates = model.adavit_gates[2]
        gates.patch.weight.zero_()
        gates.patch.weight[0, 0] = 50.0
        gates.patch.bias.zero_()
        gates.head.weight.normal_(0, 0.5, generator=g)
        gates.block.weight.normal_(0, 2.0, generator=g)
        masked, rec_m = _block_io(model, 2, x)
        rec_c = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in rec_m.items()}
        compact = model._compact_block(2, model.blocks[2], gates, x, rec_c)
    t = rec_m["tokens"][:, 2]
    assert int(t[0]) == N and int(t[1:].max()) < N
    assert torch.equal(rec_m["tokens"], rec_c["tokens"]) and torch.equal(rec_m["heads"][:, 2], rec_c["heads"][:, 2])
    assert (masked - compact).abs().max() < 1e-5
