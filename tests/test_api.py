"""The public Python API (docs/design.md#python-api)."""
import pytest
import timm
import torch

import methods


def test_dense_keeps_timm_state_dict_and_logits():
    vit = timm.create_model("digits_vit").eval()
    model = methods.build("deit", vit)
    assert list(model.state_dict()) == list(vit.state_dict())
    assert isinstance(model, type(vit))  # still a timm VisionTransformer
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), vit(x))
    t = methods.trace(model)
    assert t.tokens.shape == (2, 6) and int(t.tokens.min()) == 65
    assert t.gmacs.shape == (2,)


def test_build_copies_the_backbone_unless_asked():
    vit = timm.create_model("digits_vit")
    model = methods.build("deit", vit)
    assert model is not vit and type(vit).__name__ == "VisionTransformer"
    same = methods.build("deit", vit, copy=False)
    assert same is vit


def test_errors_are_clear():
    vit = timm.create_model("digits_vit")
    with pytest.raises(ValueError, match="unknown method 'nope'.*deit"):
        methods.build("nope", vit)
    with pytest.raises(ValueError, match="has no knob 'tokens'"):
        methods.build("deit", vit, tokens=3)
    with pytest.raises(ValueError, match="no mode 'reference'"):
        methods.build("deit", vit, mode="reference")
    model = methods.build("deit", vit)
    with pytest.raises(RuntimeError, match="no forward pass"):
        methods.trace(model)
    with pytest.raises(TypeError, match="not built by methods.build"):
        methods.trace(vit)
    with pytest.raises(TypeError, match="already adapted"):
        methods.build("deit", model)


def test_available_lists_ids_with_arxiv():
    specs = {s.id: s for s in methods.available()}
    assert "deit" in specs
    for s in specs.values():
        assert s.paper and s.modes
