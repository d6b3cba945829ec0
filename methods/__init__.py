"""Adaptive vision transformers behind one small public API (docs/design.md#python-api).

    import timm, methods
    model = methods.build("deit", timm.create_model("deit_small_patch16_224"))
    logits = model(images)
    methods.trace(model).gmacs   # (B,) multiply-accumulates of each sample, in G
"""
from . import backbones  # noqa: F401  (registers the embedded-default backbones with timm)
from . import variants  # noqa: F401  (registers the A-ViT study's digits ViT variants)
from . import video  # noqa: F401  (registers the video ViTs with timm)
from . import timesformer  # noqa: F401  (registers TimeSformer with timm)
from . import dense  # noqa: F401  (registers `deit`)
from .base import TracedViT, trace
from .dense import DENSE
from .macs import ViTShape, vit_shape
from .registry import Knob, MatchedCompute, MethodSpec, TrainData, available, build, get, register
from .trace import Trace

# Method modules register themselves on import, in this order (the order `bench list methods` and
# reports use); a new method is its file plus its name here.
METHOD_MODULES = ("ats", "avit", "adavit", "tome", "evit")
for _name in METHOD_MODULES:
    try:
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # not written yet
        if _e.name != f"{__name__}.{_name}":
            raise

__all__ = [
    "DENSE",
    "Knob",
    "MatchedCompute",
    "MethodSpec",
    "Trace",
    "TrainData",
    "TracedViT",
    "ViTShape",
    "available",
    "build",
    "get",
    "register",
    "trace",
    "vit_shape",
]
