"""bench.toml validation and flag layering."""
import pytest

from bench import config
from bench.errors import UsageError


def write(tmp_path, text):
    p = tmp_path / "bench.toml"
    p.write_text(text)
    return p


def test_project_file_is_valid_and_has_default():
    data, path = config.load_file(config.PACKAGE_ROOT / "bench.toml")
    assert "default" in data["profiles"]
    cfg = config.resolve("default", path)
    assert cfg.dataset == "digits" and cfg.methods == ["all"] and cfg.batch_sizes == [1, 32]


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "[profiles.default]\nbatchsizes = [1]\n")
    with pytest.raises(UsageError) as e:
        config.load_file(p)
    assert str(p) in str(e.value) and "'profiles.default.batchsizes'" in str(e.value)


def test_unknown_nested_key(tmp_path):
    p = write(tmp_path, "[profiles.default.timing]\nwarmup = 3\n")
    with pytest.raises(UsageError, match=r"unknown key 'profiles\.default\.timing\.warmup'"):
        config.load_file(p)


@pytest.mark.parametrize(
    "text, key",
    [
        ("[profiles.default]\nbatch_sizes = 32\n", "profiles.default.batch_sizes"),
        ("[profiles.default]\nseed = 'zero'\n", "profiles.default.seed"),
        ("[profiles.default]\nbatch_sizes = [1, 'x']\n", "profiles.default.batch_sizes"),
        ("[profiles.default.train]\nlr = true\n", "profiles.default.train.lr"),
        ("[profiles.default.budgets]\nats = 0.5\n", "profiles.default.budgets.ats"),
    ],
)
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(UsageError) as e:
        config.load_file(p)
    assert f"'{key}' must be" in str(e.value) and str(p) in str(e.value)


def test_extends_and_flags_override(tmp_path):
    p = write(
        tmp_path,
        "[profiles.default]\nbatch_sizes = [1, 32]\nseed = 3\n[profiles.default.timing]\nmin_iters = 7\n"
        "[profiles.small]\nextends = 'default'\nbatch_sizes = [4]\n",
    )
    cfg = config.resolve("small", p)
    assert cfg.batch_sizes == [4] and cfg.seed == 3 and cfg.timing.min_iters == 7
    cfg = config.resolve("small", p, seed=9, batch_sizes=[2, 8], methods="deit,ats")
    assert cfg.seed == 9 and cfg.batch_sizes == [2, 8] and cfg.methods == ["deit", "ats"]


def test_unknown_profile_and_loops(tmp_path):
    p = write(tmp_path, "[profiles.a]\nextends = 'b'\n[profiles.b]\nextends = 'a'\n")
    with pytest.raises(UsageError, match="unknown profile 'zzz'"):
        config.resolve("zzz", p)
    with pytest.raises(UsageError, match="loop"):
        config.resolve("a", p)


def test_bad_toml_syntax(tmp_path):
    p = write(tmp_path, "[profiles.default\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        config.load_file(p)


def test_repeated_values_are_measured_once():
    """--batch-sizes 1,1 or --device cpu,cpu used to plan a cell twice, the second overwriting the first."""
    import methods

    from bench import budgets, runner

    cfg = config.resolve("smoke", batch_sizes=[1, 8, 1], device="cpu,cpu", precision="fp32,fp32", methods="deit,ats,deit",
                         budgets={"ats": ["0.5", 0.5, "0.25"]})
    assert (cfg.batch_sizes, cfg.devices, cfg.precisions, cfg.methods) == ([1, 8], ["cpu"], ["fp32"], ["deit", "ats"])
    assert budgets.for_method("ats", cfg.budgets) == ["0.5", "0.25"]
    ids, devices = runner.validate(cfg)
    groups = runner.plan(cfg, ids, devices)
    cells = [tuple(g.identity(b).values()) for g in groups for b in cfg.batch_sizes]
    assert len(cells) == len(set(cells)) == 6  # deit full + ats 0.5, 0.25; batch 1 and 8
    assert methods.get("ats")  # the registry the plan used


def test_config_that_is_not_utf8_or_is_a_folder(tmp_path):
    p = tmp_path / "bench.toml"
    p.write_bytes(b"[profiles.default]\ndescription = '\xff\xfe'\n")
    with pytest.raises(UsageError, match="not UTF-8 text"):
        config.load_file(p)
    with pytest.raises(UsageError, match="is a folder; pass --config the bench.toml file itself"):
        config.load_file(tmp_path)
