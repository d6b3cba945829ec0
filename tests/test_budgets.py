"""Budget strings -> method knobs."""
import pytest

import methods
from bench import budgets
from bench.cli import _normalise_argv
from bench.errors import UsageError
from methods.registry import Knob, MethodSpec, register


@pytest.fixture(scope="module")
def toy():
    if "toy-budget" not in [s.id for s in methods.available()]:
        register(MethodSpec(id="toy-budget", paper="test", arxiv="", summary="", build=lambda vit, mode, **k: vit,
                            knobs=(Knob("keep", float, 1.0, ""), Knob("tokens", int, 0, ""), Knob("blocks", list, [], ""),
                                   Knob("quirk", bool, False, "")),
                            primary_knob="keep"))
    yield "toy-budget"
    methods.registry._REGISTRY.pop("toy-budget", None)


def test_parse_forms(toy):
    assert budgets.parse(toy, "full") == {}
    assert budgets.parse(toy, 0.5) == {"keep": 0.5}
    assert budgets.parse(toy, "0.25") == {"keep": 0.25}
    assert budgets.parse(toy, 1) == {"keep": 1.0}
    assert budgets.parse(toy, "tokens:32+blocks:3/4/5+quirk:true") == {"tokens": 32, "blocks": [3, 4, 5], "quirk": True}


def test_parse_errors(toy):
    with pytest.raises(UsageError, match="no knob 'depth'"):
        budgets.parse(toy, "depth:3")
    with pytest.raises(UsageError, match="must be int"):
        budgets.parse(toy, "tokens:abc")
    with pytest.raises(UsageError, match="no budget knob"):
        budgets.parse("deit", "0.5")


def test_cli_form():
    assert budgets.parse_cli("ats=0.5,0.75;avit=20") == {"ats": ["0.5", "0.75"], "avit": ["20"]}
    with pytest.raises(UsageError, match="METHOD=B1,B2"):
        budgets.parse_cli("ats")


def test_resume_without_value_means_latest():
    assert _normalise_argv(["run", "--resume"]) == ["run", "--resume", "latest"]
    assert _normalise_argv(["run", "--resume", "--quiet"]) == ["run", "--resume", "latest", "--quiet"]
    assert _normalise_argv(["run", "--resume", "abc"]) == ["run", "--resume", "abc"]
