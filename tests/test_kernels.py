"""GPU code paths exercised on the CPU: attention kernel choice, torch.compile, out-of-memory
back-off along timm's ladder recorded as rows (the OOM is raised by a wrapped forward)."""
import pytest
import torch
from timm.models.vision_transformer import Attention, VisionTransformer

import methods
from bench import config, kernels, runner
from bench.errors import UsageError
from bench.progress import Reporter
from conftest import ROOT


def smoke(tmp_path, **flags):
    cfg = config.resolve("smoke", ROOT / "bench.toml", methods="deit", out=str(tmp_path / "results"), **flags)
    cfg.timing.timing_samples = 8
    return cfg


def test_attention_choice_switches_timm_kernels_with_the_same_logits():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=24, depth=2, num_heads=2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = vit(x)
        kernels.set_attention(vit, "unfused")
        assert not any(m.fused_attn for m in vit.modules() if isinstance(m, Attention))
        unfused = vit(x)
        kernels.set_attention(vit, "math")
        assert all(m.fused_attn for m in vit.modules() if isinstance(m, Attention))
        with kernels.attention_context("math"):
            math = vit(x)
    assert torch.allclose(ref, unfused, atol=1e-5) and torch.allclose(ref, math, atol=1e-5)
    with pytest.raises(UsageError, match="unknown attention kernel 'flashy'"):
        kernels.check_attention("flashy", torch.device("cpu"))
    with pytest.raises(UsageError, match="needs a CUDA device"):
        kernels.check_attention("efficient", torch.device("cpu"))


def test_compile_and_attention_are_applied_and_recorded(tmp_path):
    # batch 100 = the evaluation batch: one input shape, so dynamo captures the graph once
    plain = runner.execute(smoke(tmp_path, batch_sizes=[100]), Reporter(quiet=True)).records()[0]
    cfg = smoke(tmp_path, batch_sizes=[100], compile=True, attention="unfused")
    cfg.compile_backend = "eager"  # dynamo's graph capture without codegen: the path, in seconds
    rec = runner.execute(cfg, Reporter(quiet=True)).records()[0]
    assert (rec["compile"], rec["attention"], plain["compile"], plain["attention"]) == ("eager", "unfused", "off", "default")
    assert rec["gmacs"] == plain["gmacs"] and abs(rec["top1"] - plain["top1"]) <= 1.0
    assert rec["iters"] >= 3 and rec["img_per_s"] > 0


def test_out_of_memory_backs_off_along_timms_ladder_and_is_a_row(tmp_path, monkeypatch):
    """The forward raises torch.OutOfMemoryError unless the batch is 100 (evaluation) or 4."""
    real_build = methods.build

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward = model.forward

        def limited(x):
            if x.shape[0] not in (100, 4):
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} GiB")
            return forward(x)

        model.forward = limited
        return model

    monkeypatch.setattr(runner.methods, "build", build)
    run = runner.execute(smoke(tmp_path, batch_sizes=[1, 8]), Reporter(quiet=True))
    recs = {r["batch_size"]: r for r in run.records()}
    assert recs[8]["status"] == "oom_backoff" and recs[8]["batch_size_run"] == 4 and recs[8]["oom_backoff"] == [8, 6]
    assert recs[8]["img_per_s"] > 0 and recs[8]["top1"] > 50
    assert recs[1]["status"] == "oom" and recs[1]["batch_size_run"] == 0 and recs[1]["oom_backoff"] == [1]
    assert recs[1]["img_per_s"] != recs[1]["img_per_s"]  # NaN: nothing was timed
    assert run.manifest()["status"] == "complete"


def test_other_runtime_errors_are_not_mistaken_for_oom():
    def boom(bs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        kernels.with_backoff(boom, 8, torch.device("cpu"))
    seen = []

    def fits_at_2(bs):
        seen.append(bs)
        if bs > 2:
            raise torch.OutOfMemoryError("out of memory")
        return "ok"

    assert kernels.with_backoff(fits_at_2, 16, torch.device("cpu")) == ("ok", 2, [16, 12, 8, 6, 4, 3])


def test_a_failed_cpu_allocation_is_an_out_of_memory():
    """c10's CPU allocator reports failure as a plain RuntimeError; the back-off must see an OOM."""
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**55, dtype=torch.uint8)  # 32 PiB: refused at once, nothing is touched
    assert not isinstance(failed.value, torch.OutOfMemoryError)
    assert kernels.is_oom(failed.value)


def test_memory_cap_on_the_cpu_fails_large_tensors_backs_off_and_lifts():
    cpu = torch.device("cpu")
    with kernels.memory_cap(1, cpu):  # 1 MiB per tensor
        assert torch.zeros(1024, 256).numel() == 2**18  # exactly 1 MiB: fits
        with pytest.raises(torch.OutOfMemoryError, match="over the cap of 1.0 MiB") as over:
            torch.zeros(1025, 256)
        assert kernels.is_oom(over.value)
        # bs x 256 KiB: timm's ladder from 16 stops at 4
        assert kernels.with_backoff(lambda bs: torch.zeros(bs, 1024, 64).shape[0], 16, cpu) == (4, 4, [16, 12, 8, 6])
    assert torch.zeros(4096, 256).numel() == 2**20  # lifted on exit
    with kernels.memory_cap(None, cpu):
        assert torch.zeros(4096, 256).numel() == 2**20
    with pytest.raises(UsageError, match="memory_cap_mb must be a positive"):
        with kernels.memory_cap(0, cpu):
            pass


def test_memory_cap_on_cuda_sets_the_allocator_fraction_of_the_current_device_and_restores_it(monkeypatch):
    """No GPU here: torch.cuda's calls are recorded instead. The cap is a fraction of the device's
    memory, given with an explicit device index (torch refuses a bare 'cuda'), and lifted on exit."""
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 8 * 2**30})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: calls.append((f, i)))
    with kernels.memory_cap(2048, torch.device("cuda")):
        assert calls == [(0.25, 3)]
    with pytest.raises(RuntimeError, match="boom"), kernels.memory_cap(16 * 1024, torch.device("cuda", 1)):
        raise RuntimeError("boom")
    assert calls == [(0.25, 3), (1.0, 3), (1.0, 1), (1.0, 1)]  # capped at the whole device, restored after an error


def test_cpu_allocation_failure_backs_off_like_an_oom():
    from bench.kernels import with_backoff

    def fn(bs):
        if bs > 16:
            raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {bs * 10**12} bytes.")
        return bs

    result, ran, failed = with_backoff(fn, 64, torch.device("cpu"))
    assert result == ran <= 16 and failed and failed[0] == 64
