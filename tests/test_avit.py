"""A-ViT (`avit`): checks AVIT-1 to AVIT-8 (docs/methods/avit.md#checks), plus mode equivalence and training.

Random-weight digits backbones (6 blocks, width 96, 65 tokens) keep this file fast; checks AVIT-3 and AVIT-4
also drive the halting bookkeeping directly with the 12 layers the checks describe.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import methods
from methods import avit
from methods.backbones import create_digits_vit
from methods.training import validate

DEPTH = 6
TOKENS = 65


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_digits_vit().eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(6, 1, 64, 64)


def run(model, x):
    with torch.no_grad():
        logits = model(x)
    return logits, methods.trace(model)


def block_outputs(vit, x):
    """Residual stream after every block of the plain timm model: list of (B, N, C)."""
    outs = []
    with torch.no_grad():
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for blk in vit.blocks:
            t = blk(t)
            outs.append(t)
    return outs


def head_of_cls(vit, feats):
    with torch.no_grad():
        return vit.forward_head(vit.norm(feats[:, :1]))


# -- registration and API ------------------------------------------------------------------------


def test_registered_with_knobs_and_loads_timm_state_dict(vit):
    spec = methods.get("avit")
    assert spec.arxiv == "2112.07658" and spec.modes == ("compact", "reference")
    assert spec.primary_knob == "gate_center" and len(spec.default_budgets) >= 4
    assert {"gate_center", "gate_scale", "eps", "prior", "target_depth", "official_prior_quirk"} <= {k.name for k in spec.knobs}
    assert spec.train is avit.train and "gate_center" not in spec.train_knobs and "prior" in spec.train_knobs
    model = methods.build("avit", vit)
    assert list(model.state_dict()) == list(vit.state_dict())  # no new parameters
    model.load_state_dict(vit.state_dict(), strict=True)
    with pytest.raises(ValueError, match="prior"):
        methods.build("avit", vit, prior="cauchy")


# -- Check AVIT-1: gate off equals the dense model (docs/methods/avit.md#check-avit-1-gate-off-equals-dense) ---


@pytest.mark.parametrize("mode", ["compact", "reference"])
def test_gate_off_equals_dense(vit, images, mode):
    dense = vit(images).detach()
    logits, tr = run(methods.build("avit", vit, mode=mode, gate_center=1e4), images)
    assert (logits - dense).abs().max() < 1e-4
    assert (tr.depths == DEPTH).all()
    assert torch.allclose(tr.ponder, torch.full((len(images),), DEPTH + 1.0), atol=1e-5)  # 6 blocks + R = 1
    assert (tr.tokens == TOKENS).all()
    _, dense_trace = run(methods.build("deit", vit), images)
    # Same blocks as the dense model; only the final norm runs on the CLS token alone.
    assert torch.allclose(tr.gmacs, dense_trace.gmacs, rtol=1e-3) and (tr.gmacs < dense_trace.gmacs).all()


# -- Check AVIT-2: saturated gate halts after block 1 (docs/methods/avit.md#check-avit-2-saturated-gate-halts-after-block-1) ---


@pytest.mark.parametrize("mode", ["compact", "reference"])
def test_gate_saturated_halts_after_block_one(vit, images, mode):
    expected = head_of_cls(vit, block_outputs(vit, images)[0])
    logits, tr = run(methods.build("avit", vit, mode=mode, gate_center=-1e4), images)
    assert (logits - expected).abs().max() < 1e-4
    assert (tr.depths == 1).all()
    assert torch.allclose(tr.ponder, torch.full((len(images),), 2.0))
    assert tr.tokens[:, 0].eq(TOKENS).all() and tr.tokens[:, 1:].eq(0).all()
    shape = methods.vit_shape(vit)
    one_block = (shape.embed_macs + shape.block(TOKENS) + shape.final(1)) / 1e9
    assert torch.allclose(tr.gmacs, torch.full_like(tr.gmacs, one_block))


# -- Check AVIT-3: last-block forcing, weights sum to one (docs/methods/avit.md#check-avit-3-last-block-forcing) ---


def drive(h_per_layer, eps=avit.EPS):
    """Run the bookkeeping over len(h) layers for one token with x_l = e_l (one-hot), the last
    layer forced, as the model does; returns the output weights, the depth and rho."""
    layers = len(h_per_layer)
    cum, rem = torch.zeros(1), torch.ones(1)
    out = torch.zeros(1, layers)
    active = torch.ones(1, dtype=torch.bool)
    depth, rho = torch.ones(1, dtype=torch.int64), torch.zeros(1)
    for l, h in enumerate(h_per_layer):
        h = torch.ones(1) if l == layers - 1 else torch.tensor([float(h)])
        x = F.one_hot(torch.tensor([l]), layers).float()
        rho = rho + active.float()
        cum, rem, out, reached, go_on = avit.halting_update(cum, rem, out, h, x, active, eps)
        rho = rho + torch.where(reached, rem, torch.zeros(()))
        depth = depth + go_on.long()
        active = go_on
    return out[0], int(depth), float(rho)


def test_last_layer_forcing_weights_sum_to_one():
    weights, depth, rho = drive([0.05] * 12)
    expected = torch.tensor([0.05] * 11 + [0.45])
    assert torch.allclose(weights, expected, atol=1e-6)
    assert abs(float(weights.sum()) - 1.0) < 1e-6
    assert depth == 12 and abs(rho - 12.45) < 1e-5


def test_constant_gate_in_the_model_weights_blocks(vit, images):
    # gamma = 0 makes h = sigmoid(-beta) = 0.05 for every token and block (check AVIT-3 on 6 blocks):
    # o = 0.05 * (x1 + ... + x5) + 0.75 * x6.
    beta = math.log(0.95 / 0.05)
    outs = block_outputs(vit, images)
    mix = sum(0.05 * o for o in outs[:-1]) + 0.75 * outs[-1]
    expected = head_of_cls(vit, mix)
    for mode in ("compact", "reference"):
        logits, tr = run(methods.build("avit", vit, mode=mode, gate_scale=0.0, gate_center=beta), images)
        assert (logits - expected).abs().max() < 1e-4
        assert (tr.depths == DEPTH).all()
        assert torch.allclose(tr.ponder, torch.full((len(images),), 6.75), atol=1e-5)


# -- Check AVIT-4: threshold cases (docs/methods/avit.md#check-avit-4-halting-threshold) ---------


def test_threshold_halts_strictly_above_one_minus_eps():
    weights, depth, _ = drive([0.6, 0.395] + [0.0] * 10)  # c = 0.995 > 0.99 at block 2
    assert depth == 2
    assert torch.allclose(weights[:2], torch.tensor([0.6, 0.4]), atol=1e-6) and weights[2:].abs().max() == 0
    weights, depth, _ = drive([0.5, 0.48, 0.0] + [0.0] * 9)  # c = 0.98: still active after block 2
    assert depth == 12
    assert torch.allclose(weights[:2], torch.tensor([0.5, 0.48]), atol=1e-6)
    assert abs(float(weights[-1]) - 0.02) < 1e-6


# -- Check AVIT-5: masked execution equals physical removal (docs/methods/avit.md#check-avit-5-masked-equals-removed) ---


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_gmacs_lookup_table_equals_the_closed_form(images, pool):
    """Per-sample gmacs come from a per-token-count table; with more tokens than the table holds
    (a dynamic image size) the closed form is used instead: both must give the same numbers,
    for a CLS head and for average pooling (where the final norm sees every token)."""
    torch.manual_seed(0)
    model = methods.build("avit", create_digits_vit(global_pool=pool, fc_norm=False).eval(), gate_scale=3.0, gate_center=0.5)
    _, table = run(model, images)
    model.__dict__["_avit_gmacs_table"] = (model._gmacs_table()[0][:2], model._gmacs_table()[1])  # force the fallback
    _, closed = run(model, images)
    assert 1.0 < float(table.depths.float().mean()) < DEPTH
    assert torch.allclose(table.gmacs, closed.gmacs, rtol=1e-12)


@pytest.mark.parametrize("gate_center", [-0.5, 0.5, 1.5])
def test_masked_equals_compact(vit, images, gate_center):
    knobs = {"gate_scale": 3.0, "gate_center": gate_center}
    ref_logits, ref = run(methods.build("avit", vit, mode="reference", **knobs), images)
    compact = methods.build("avit", vit, mode="compact", **knobs)
    logits, tr = run(compact, images)
    assert 1.0 < float(tr.depths.float().mean()) < DEPTH  # tokens really halt at mixed depths
    assert (logits - ref_logits).abs().max() < 1e-4
    assert torch.equal(tr.depths, ref.depths) and torch.equal(tr.tokens, ref.tokens)
    assert torch.allclose(tr.gmacs, ref.gmacs) and torch.allclose(tr.ponder, ref.ponder, atol=1e-5)
    assert tr.gmacs.max() < methods.vit_shape(vit).dense_gmacs()
    # Each sample alone (batch 1: no padding at all) gives the same as inside the padded batch.
    for i in range(len(images)):
        one, tr1 = run(compact, images[i : i + 1])
        assert tr1.padding_waste == 0.0
        assert (one - logits[i : i + 1]).abs().max() < 1e-4
        assert torch.equal(tr1.depths[0], tr.depths[i])


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_masked_equals_compact_when_the_cls_token_halts_first(images, pool):
    """Compact keeps o for the CLS rows only when the head reads CLS alone, and for every token
    under average pooling; both must follow tokens (CLS included) that halt before the others."""
    torch.manual_seed(1)
    vit = create_digits_vit(global_pool=pool, fc_norm=False).eval()
    knobs = {"gate_scale": 3.0, "gate_center": 0.5}
    ref_logits, ref = run(methods.build("avit", vit, mode="reference", **knobs), images)
    compact = methods.build("avit", vit, mode="compact", **knobs)
    logits, tr = run(compact, images)
    cls_first = tr.depths[:, 0] < tr.depths[:, 1:].max(dim=1).values
    assert cls_first.any()  # the CLS row leaves the packed rows while patch tokens go on
    assert (logits - ref_logits).abs().max() < 1e-4
    assert torch.equal(tr.depths, ref.depths) and torch.allclose(tr.ponder, ref.ponder, atol=1e-5)
    for i in range(len(images)):  # batch 1 has its own CLS bookkeeping
        one, tr1 = run(compact, images[i : i + 1])
        assert (one - ref_logits[i : i + 1]).abs().max() < 1e-4 and torch.equal(tr1.depths[0], ref.depths[i])


@pytest.mark.parametrize("diagonal_max_rows", [0, 10**6])
def test_compact_batch_records_padding_waste(vit, images, monkeypatch, diagonal_max_rows):
    """Waste = attention MACs over padding (padded buffer) or other samples' keys (block-diagonal
    product) against the executed block MACs; the linear layers run on packed rows only."""
    from methods import attention

    monkeypatch.setattr(attention, "DIAGONAL_MAX_ROWS", diagonal_max_rows)
    monkeypatch.setattr(attention, "SPLIT_GAIN", 0.0)  # one padded buffer per block, no length groups
    monkeypatch.setattr(methods.avit, "DEFER_SHARE", 0.0)  # halted rows leave at once
    model = methods.build("avit", vit, gate_scale=3.0, gate_center=0.5)
    _, tr = run(model, images)
    n = tr.tokens.to(torch.float64)  # (B, depth): tokens entering each block
    shape = methods.vit_shape(vit)
    useful = float(shape.block(n).sum())
    even = (n == n[:1]).all(dim=0)  # blocks where every sample has the same count: no padding at all
    assert not even.all()
    padded = len(images) * n.max(dim=0).values.pow(2)
    pairs = float(torch.where(even, padded, n.sum(0).pow(2) if diagonal_max_rows else padded).sum())
    extra = 2 * shape.attn_dim * (pairs - float(n.pow(2).sum()))
    assert extra > 0 and tr.padding_waste == pytest.approx(extra / (useful + extra), rel=1e-9)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_deferred_compaction_equals_reference(vit, images, monkeypatch, pool):
    """Halted rows left in place (masked keys, frozen bookkeeping) give the reference's logits,
    depths and ponder, and their computation is counted as waste."""
    from methods import attention

    torch.manual_seed(1)
    net = vit if pool == "token" else create_digits_vit(global_pool=pool, fc_norm=False).eval()
    knobs = {"gate_scale": 3.0, "gate_center": 1.5}
    ref_logits, ref = run(methods.build("avit", net, mode="reference", **knobs), images)
    layouts = []
    real_layout = attention.packed_layout
    monkeypatch.setattr(methods.avit, "packed_layout", lambda *a, **k: layouts.append(1) or real_layout(*a, **k))
    monkeypatch.setattr(methods.avit, "DEFER_SHARE", 1.0)  # defer for as long as every sample keeps a live row
    logits, tr = run(methods.build("avit", net, mode="compact", **knobs), images)
    n = tr.tokens
    alive = n.min(dim=0).values > 0  # blocks where every sample still had a token
    assert (n[:, 1:] < TOKENS).any() and alive.all()  # tokens halted, and no sample ran out
    assert not layouts  # never compacted: every block ran on the (B, N) buffer
    assert (logits - ref_logits).abs().max() < 1e-4
    assert torch.equal(tr.depths, ref.depths) and torch.allclose(tr.ponder, ref.ponder, atol=1e-5)
    shape = methods.vit_shape(net)
    rows = len(images) * TOKENS * DEPTH
    executed = (float(shape.block(1)) - 2 * shape.attn_dim) * rows + 2 * shape.attn_dim * TOKENS * rows
    useful = float(shape.block(n.to(torch.float64)).sum())
    assert tr.padding_waste == pytest.approx(1 - useful / executed, rel=1e-9) and tr.padding_waste > 0


def test_compact_on_deit_tiny_with_bf16_autocast():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    knobs = {"gate_scale": 2.0, "gate_center": 1.0}
    ref_logits, ref = run(methods.build("avit", vit, mode="reference", **knobs), x)
    logits, tr = run(methods.build("avit", vit, **knobs), x)
    assert (logits - ref_logits).abs().max() < 1e-4 and torch.equal(tr.depths, ref.depths)
    assert tr.depths.shape == (2, 197) and tr.tokens.shape == (2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, tr16 = run(methods.build("avit", vit, **knobs), x)
    assert torch.isfinite(low).all() and low.shape == (2, 1000) and tr16.depths.shape == (2, 197)


# -- Check AVIT-6: the official prior target and KL (docs/methods/avit.md#check-avit-6-prior-target-and-kl) ---

OFFICIAL_TARGET = [0, 0, 0, 0, 0.0004, 0.0145, 0.1761, 0.789, 1.3009, 0.789, 0.1761, 0.0145]


def test_prior_target_vector_for_twelve_layers():
    assert avit.default_target_depth(12) == 9.0 and avit.default_target_depth(6) == 5.0
    p = avit.prior_target(12, 9.0, "gaussian")
    assert torch.allclose(p, torch.tensor(OFFICIAL_TARGET, dtype=torch.float64), atol=5e-5)
    assert abs(float(p[:8].sum()) - 0.98) < 1e-9 and abs(float(p.sum()) - 3.26) < 0.005
    p6 = avit.prior_target(6, 5.0, "gaussian")  # the scaled default: peak at block 5 of 6
    assert int(p6.argmax()) == 4 and abs(float(p6[:4].sum()) - 0.98) < 1e-9


def test_prior_loss_is_official_kl():
    p = avit.prior_target(12, 9.0)
    q = torch.rand(12, dtype=torch.float64) + 0.1
    qn = (q / q.sum()).clamp(0.01, 0.99)
    by_hand = float((p * (torch.log(p.clamp_min(1e-300)) - torch.log(qn))).sum() / 12)
    assert abs(float(avit.prior_loss(q, p)) - by_hand) < 1e-9
    torch_kl = F.kl_div(torch.log(qn), p, reduction="batchmean")  # what the official code calls
    assert abs(float(avit.prior_loss(q, p)) - float(torch_kl)) < 1e-9


def test_halting_distribution_quirk_versus_corrected():
    scores = torch.rand(3, 4, 5)  # (layers, batch, tokens)
    active = torch.rand(3, 4, 5) > 0.3
    quirk = avit.halting_distribution(scores, active, 1, official_quirk=True)
    assert torch.allclose(quirk, scores[:, 1:, :].mean(dim=(1, 2)))  # batch entries 1.., CLS and halted in
    fixed = avit.halting_distribution(scores, active, 1, official_quirk=False)
    assert torch.allclose(fixed, (scores * active)[:, :, 1:].sum(dim=(1, 2)) / (4 * 4))


# -- Check AVIT-7: ponder loss value and gradient path (docs/methods/avit.md#check-avit-7-ponder-loss) ---


def test_ponder_loss_value_and_gradient_only_through_remainders(vit, images, monkeypatch):
    captured = []
    plain = avit.halting_scores

    def keep_scores(x, gamma, beta):
        h = plain(x, gamma, beta)
        h.retain_grad()
        captured.append(h)
        return h

    monkeypatch.setattr(avit, "halting_scores", keep_scores)
    model = methods.build("avit", vit, mode="reference", gate_scale=3.0, gate_center=0.5)
    model.train()
    model(images)
    aux = model._avit_aux
    depths = methods.trace(model).depths  # (B, N)
    loss = avit.ponder_loss(aux["ponder"])
    loss.backward()
    h = torch.stack([c.detach().view(depths.shape) for c in captured])  # (L, B, N)
    layer = torch.arange(DEPTH).view(-1, 1, 1)
    spent = (layer < depths - 1).float()  # blocks before the halting block: R = 1 - their scores
    rho = depths.float() + 1.0 - (h * spent).sum(0)
    assert torch.allclose(aux["ponder"].detach(), rho, atol=1e-5)
    assert abs(float(loss.detach()) - float(rho.mean())) < 1e-5
    # d rho / d h = -1 for the blocks before a token halts, 0 at and after its halting block and
    # for halted tokens' scores: the only path from the gate to the ponder loss is R.
    assert captured[-1].grad is None  # the last block's score is replaced by 1
    grads = torch.stack([c.grad.view(depths.shape) for c in captured[:-1]] + [torch.zeros(depths.shape)])
    assert torch.allclose(grads, -spent / depths.numel(), atol=1e-9)
    assert model.head.weight.grad is None  # the classifier is not on the ponder path


def test_training_gradients_equal_in_both_modes(vit, images):
    """Training runs compact (token zipping) unless the official prior quirk needs the masked rows;
    the losses and every parameter gradient must equal the reference execution's."""
    labels = torch.arange(len(images)) % 10
    target = avit.prior_target(DEPTH, 3.0)
    grads, losses = {}, {}
    for mode in ("reference", "compact"):
        model = methods.build("avit", vit, mode=mode, gate_scale=3.0, gate_center=0.5)
        model.train()
        aux_logits = model(images)
        aux = model._avit_aux
        loss = F.cross_entropy(aux_logits, labels) + 0.1 * aux["ponder_mean"] + avit.prior_loss(aux["halting_mass"], target)
        loss.backward()
        losses[mode] = float(loss.detach())
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert abs(losses["reference"] - losses["compact"]) < 1e-5
    assert grads["reference"].keys() == grads["compact"].keys() and len(grads["compact"]) > 10
    for name, g in grads["reference"].items():
        assert (g - grads["compact"][name]).abs().max() <= 1e-4 * (g.abs().max() + 1e-6), name
    quirky = methods.build("avit", vit, gate_scale=3.0, gate_center=0.5, official_prior_quirk=True).train()
    with pytest.raises(RuntimeError, match="reference"):
        quirky(images)


# -- Check AVIT-8: Laplace prior of the student repo (docs/methods/avit.md#check-avit-8-laplace-prior) ---


def test_laplace_target_log_density():
    mu, sigma = 5.0, 1.0
    b = sigma / math.sqrt(2.0)
    p = avit.prior_target(12, mu, "laplace", sigma)
    d = torch.arange(1, 13, dtype=torch.float64)
    assert torch.allclose(torch.log(p), -math.log(2 * b) - (d - mu).abs() / b)
    # the variance-matched Laplace is sharper at its peak than the normal of the same sigma
    assert float(p[4]) > 1 / math.sqrt(2 * math.pi)


# -- training ------------------------------------------------------------------------------------


class _Progress:
    def __init__(self):
        self.steps, self.notes = 0, []

    def advance(self, n=1):
        self.steps += n

    def note(self, text):
        self.notes.append(text)


def test_training_moves_mean_depth_toward_the_target(vit):
    """Ponder + prior losses pull the mean depth down to a shallow target within a few steps;
    the same steps with both weights at 0 (task loss only) leave the tokens much deeper."""
    torch.manual_seed(2)
    batches = [(torch.randn(16, 1, 64, 64), torch.randint(0, 10, (16,))) for _ in range(4)]
    data = methods.TrainData(
        batches=lambda epoch: iter(batches), steps_per_epoch=len(batches), val_batches=lambda: iter(batches[:2]), num_classes=10
    )
    knobs = {"gate_scale": 1.0, "train_gate_center": 1.0, "gate_center": 7.0, "target_depth": 2.0, "prior": "laplace"}
    settings = {"epochs": 2, "lr": 1e-3, "warmup_steps": 1, "ponder_weight": 0.1, "prior_weight": 1.0}
    depth = {}
    for name, weights in (("halting", {}), ("task only", {"ponder_weight": 0.0, "prior_weight": 0.0})):
        model = methods.build("avit", vit, **knobs)
        model.bench_knobs["gate_center"] = 1.0
        before = validate(model, data.val_batches(), avit.val_stats)["val_mean_depth"]
        model.bench_knobs["gate_center"] = 7.0
        progress = _Progress()
        result = avit.train(model, data, {**settings, **weights}, progress)
        assert progress.steps == 8 and result["history"][-1]["epoch"] == 2 and progress.notes
        assert model.bench_mode == "compact" and model.bench_knobs["gate_center"] == 7.0  # restored
        assert not model.training
        depth[name] = result["val_mean_depth"]  # measured at the training gate centre
    assert before > 4.5, before
    assert depth["halting"] < 3.0 and depth["task only"] > 3.5, depth
    for p in vit.parameters():  # the backbone given to build() is untouched (build copies it)
        assert p.grad is None


def test_training_with_the_official_quirk_runs_the_masked_execution(vit, monkeypatch):
    modes = []
    plain = avit.AViT._forward_reference

    def spy(self, x):
        modes.append(self.bench_mode)
        return plain(self, x)

    monkeypatch.setattr(avit.AViT, "_forward_reference", spy)
    batch = [(torch.randn(8, 1, 64, 64), torch.randint(0, 10, (8,)))]
    data = methods.TrainData(batches=lambda e: iter(batch), steps_per_epoch=1, val_batches=lambda: iter(batch), num_classes=10)
    model = methods.build("avit", vit, official_prior_quirk=True)
    result = avit.train(model, data, {"epochs": 1}, _Progress())
    assert modes == ["reference"] and model.bench_mode == "compact" and 0 <= result["val_top1"] <= 1
