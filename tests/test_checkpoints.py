"""Checkpoints users bring: timm / DeiT .pth and .safetensors, wrappers and prefixes, the official
A-ViT (gate in the file name) and AdaViT (separate q, k, v and gate layers) layouts, refused pickles,
and strict loading that lists what does not fit (docs/methods/avit.md#checkpoints, docs/methods/adavit.md#checkpoints, docs/methods/README.md#weights-and-checkpoints)."""
import argparse

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import methods
from conftest import ROOT, run_main
from methods.convert import CheckpointError
from methods.convert import avit_gate_from_name, convert, implied_budgets, load_backbone, load_strict, read_state_dict


class NotAWeight:
    """Pickled by a test to stand for a checkpoint that needs arbitrary code to load."""

    def __init__(self):
        self.payload = [1, 2, 3]


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=24, depth=3, num_heads=2, **kw).eval()


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_deit_pth_with_wrappers_prefix_and_args_loads(tmp_path):
    src = tiny_vit(1).state_dict()
    path = tmp_path / "deit_tiny.pth"
    # DeiT/A-ViT training scripts save {'model', 'optimizer', 'epoch', 'args': Namespace}; DDP adds 'module.'
    torch.save({"model": {f"module.{k}": v for k, v in src.items()}, "epoch": 3, "args": argparse.Namespace(lr=5e-4, model="x")}, path)
    vit = tiny_vit(2)
    conv = load_backbone(vit, path)
    assert conv.layout == "timm" and conv.method_states == {}
    same(vit.state_dict(), src)


def test_ema_weights_are_preferred_and_safetensors_load(tmp_path):
    raw, ema = tiny_vit(1).state_dict(), tiny_vit(3).state_dict()
    torch.save({"state_dict": raw, "state_dict_ema": ema}, tmp_path / "ck.pth.tar")
    same(read_state_dict(tmp_path / "ck.pth.tar"), ema)
    save_file({k: v.contiguous() for k, v in raw.items()}, str(tmp_path / "ck.safetensors"))
    vit = tiny_vit(2)
    load_backbone(vit, tmp_path / "ck.safetensors")
    same(vit.state_dict(), raw)


def test_pickle_needing_code_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_vit().state_dict(), "extra": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match=r"needs arbitrary code to unpickle.*NotAWeight.*refused"):
        read_state_dict(path)


def test_cli_refuses_unsafe_checkpoint_in_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"x": NotAWeight()}, path)
    code, _, err = run_main(monkeypatch, capsys, "run", "--config", str(ROOT / "bench.toml"), "--profile", "smoke",
                            "--checkpoint", str(path), "--out", str(tmp_path / "r"))
    assert code == 2, err
    assert "refused" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "r").glob("*/manifest.json"))  # refused before any run was started


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    state = tiny_vit().state_dict()
    del state["blocks.2.mlp.fc2.bias"]
    state["head_dist.weight"] = torch.zeros(10, 24)
    state["dist_token"] = torch.zeros(1, 1, 24)
    state["pos_embed"] = torch.zeros(1, 5, 24)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_backbone(tiny_vit(), tmp_path / "bad.pth")
    msg = str(e.value)
    assert "missing keys: blocks.2.mlp.fc2.bias" in msg
    assert "unexpected keys: head_dist.weight, dist_token" in msg
    assert "pos_embed (1, 5, 24) vs (1, 17, 24)" in msg
    assert "distilled" in msg


def test_official_avit_checkpoint_loads_with_gate_from_file_name(tmp_path):
    """A-ViT's releases use timm's key layout (docs/methods/avit.md#checkpoints) and name the gate: tiny-10-30."""
    src = tiny_vit(4).state_dict()
    path = tmp_path / "tiny-10-30.pth"
    torch.save({"model": src, "args": argparse.Namespace(gate_scale=10.0, gate_center=30.0)}, path)
    assert avit_gate_from_name(path) == (10.0, 30.0)
    assert avit_gate_from_name("a-vit-weights/small-10-75.pth") == (10.0, 75.0)
    assert avit_gate_from_name("visualization-tiny.pth") == (5.0, 50.0)
    assert avit_gate_from_name("deit_small_patch16_224-cd65a155.pth") is None
    assert implied_budgets(path) == {"avit": ["gate_scale:10+gate_center:30"]}
    vit = tiny_vit(0)
    load_backbone(vit, path)
    model = methods.build("avit", vit, gate_scale=10.0, gate_center=30.0)
    same({k: v for k, v in model.state_dict().items()}, src)  # A-ViT adds no parameters
    assert model.bench_knobs["gate_scale"] == 10.0 and model.bench_knobs["gate_center"] == 30.0


def official_adavit_layout(model) -> dict:
    """Our AdaViT state dict written out the way MengLcool/AdaViT's ``ada_step_deit_*`` names it."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("adavit_gates."):
            _, block, kind, what = k.split(".")
            name = {"patch": "attn.token_select.mlp_head", "head": "head_select.mlp_head", "block": "layer_select.mlp_head"}[kind]
            out[f"blocks.{block}.{name}.{what}"] = v.clone()
        elif ".attn.qkv." in k:
            q, kk, vv = v.chunk(3, dim=0)
            for part, t in zip(("query", "key", "value"), (q, kk, vv)):
                out[k.replace("qkv", part)] = t.clone()
        else:
            out[k] = v.clone()
    return out


def test_official_adavit_checkpoint_converts_key_by_key(tmp_path):
    original = methods.build("adavit", tiny_vit(5))
    with torch.no_grad():  # gates away from their keep-everything init, so every key is distinct
        for p in original.adavit_gates.parameters():
            p.normal_()
    official = official_adavit_layout(original)
    assert "blocks.1.attn.query.weight" in official and "blocks.1.head_select.mlp_head.bias" in official
    assert not any("qkv" in k or "adavit_gates" in k for k in official)
    path = tmp_path / "ada_deit_tiny.pth.tar"
    torch.save({"state_dict": {k: torch.zeros_like(v) for k, v in official.items()}, "state_dict_ema": official,
                "args": argparse.Namespace(model="ada_step_deit_small_patch16_224")}, path)

    vit = tiny_vit(6)
    conv = load_backbone(vit, path)
    assert conv.layout == "adavit-official"
    model = methods.build("adavit", vit)
    load_strict(model, {**model.state_dict(), **conv.method_states["adavit"]}, str(path))
    same(model.state_dict(), original.state_dict())  # key by key, the EMA weights
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_adavit_checkpoint_missing_a_value_layer_is_named():
    official = official_adavit_layout(methods.build("adavit", tiny_vit()))
    del official["blocks.2.attn.value.bias"]
    with pytest.raises(CheckpointError, match=r"block 2 has no attn.value.bias"):
        convert(official)


def test_run_with_an_official_adavit_checkpoint_uses_its_gates(tmp_path):
    """`bench run --checkpoint <official AdaViT file>`: the backbone part loads into every method,
    the gates into adavit (a fresh gate keeps everything, these drop patches)."""
    from bench import config, runner
    from bench.progress import Reporter

    cfg = config.resolve("smoke", ROOT / "bench.toml", methods="adavit", budgets={"adavit": ["full"]}, batch_sizes=[2],
                         out=str(tmp_path / "results"))
    vit, _ = runner.prepare_backbone(cfg, runner.create_backbone(cfg), Reporter(quiet=True))
    model = methods.build("adavit", vit)
    with torch.no_grad():
        for gates in model.adavit_gates:
            gates.patch.bias.fill_(-3.0)  # sigmoid(-3) < 0.6: every patch dropped, CLS kept
    torch.save({"state_dict_ema": official_adavit_layout(model)}, tmp_path / "ada.pth.tar")
    cfg.checkpoint = str(tmp_path / "ada.pth.tar")
    recs = {r["method"]: r for r in runner.execute(cfg, Reporter(quiet=True)).records()}
    assert recs["adavit"]["finetuned"] is True and recs["adavit"]["method_checkpoint"] == "ada.pth.tar"  # a name, not a path
    assert recs["adavit"]["method_checkpoint_sha256"] == recs["adavit"]["checkpoint_sha256"]
    assert recs["adavit"]["tokens_per_block"] == [1.0] * len(vit.blocks)  # only CLS in every block
    assert recs["deit"]["gmacs_ratio"] == 1.0 and recs["adavit"]["gmacs_ratio"] < 0.2


def test_run_with_an_official_avit_file_name_takes_its_gate(tmp_path):
    from bench import config, runner
    from bench.progress import Reporter

    cfg = config.resolve("smoke", ROOT / "bench.toml", methods="avit", batch_sizes=[2], out=str(tmp_path / "results"))
    vit, _ = runner.prepare_backbone(cfg, runner.create_backbone(cfg), Reporter(quiet=True))
    torch.save({"model": vit.state_dict()}, tmp_path / "digits-2-15.pth")
    cfg.checkpoint = str(tmp_path / "digits-2-15.pth")
    recs = {r["method"]: r for r in runner.execute(cfg, Reporter(quiet=True)).records()}
    assert recs["avit"]["budget"] == "gate_scale:2+gate_center:15"
    assert recs["avit"]["knobs"] == {"gate_scale": 2.0, "gate_center": 15.0}


def test_non_finite_checkpoint_is_warned_about(tmp_path, capsys):
    from bench import config, runner
    from bench.progress import Reporter

    cfg = config.resolve("smoke", ROOT / "bench.toml", out=str(tmp_path / "results"))
    state = {k: v.contiguous() for k, v in runner.create_backbone(cfg).state_dict().items()}
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
              str(tmp_path / "nan.safetensors"))
    cfg.checkpoint = str(tmp_path / "nan.safetensors")
    runner.prepare_backbone(cfg, runner.create_backbone(cfg), Reporter(quiet=True))
    warned = capsys.readouterr().err
    assert "warning: checkpoint" in warned and "NaN or inf values in" in warned and "meaningless" in warned
    save_file(state, str(tmp_path / "fine.safetensors"))
    cfg.checkpoint = str(tmp_path / "fine.safetensors")
    runner.prepare_backbone(cfg, runner.create_backbone(cfg), Reporter(quiet=True))
    assert "NaN" not in capsys.readouterr().err


def test_a_folder_as_checkpoint_is_named_a_folder(tmp_path, monkeypatch, capsys):
    code, _, stderr = run_main(monkeypatch, capsys, "run", "--profile", "smoke", "--checkpoint", str(tmp_path),
                               "--out", str(tmp_path / "results"), "-q")
    assert code == 2 and f"checkpoint {tmp_path} is a folder" in stderr and "does not exist" not in stderr, stderr
