"""The embedded-default data set (issue "The harness end to end")."""
import torch

from bench.data import digits


def test_deterministic_from_seed_and_seed_matters():
    cfg = digits.DigitsConfig(n_test=50)
    a = digits.make_split(cfg, "test")
    b = digits.make_split(cfg, "test")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = digits.make_split(digits.DigitsConfig(n_test=50, seed=1), "test")
    assert not torch.equal(a[0], c[0])


def test_splits_never_share_a_source_digit():
    idx = digits.source_indices(digits.DigitsConfig())
    train, val, test = (set(idx[k].tolist()) for k in digits.SPLITS)
    assert not (train & test) and not (train & val) and not (val & test)
    assert train | val | test == set(range(1797))
    assert abs(len(train) / 1797 - 0.6) < 0.01 and abs(len(test) / 1797 - 0.2) < 0.01
    # A different seed gives a different partition.
    other = digits.source_indices(digits.DigitsConfig(seed=1))
    assert set(other["test"].tolist()) != test


def test_canvas_layout_most_patches_empty():
    cfg = digits.DigitsConfig(n_val=300)
    x, y = digits.make_split(cfg, "val")
    assert x.shape == (300, 1, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert set(y.tolist()) == set(range(10))
    share = digits.empty_patch_fraction(x)
    assert 0.6 < share < 0.85, share


def test_canvas_size_is_configurable():
    x, _ = digits.make_split(digits.DigitsConfig(canvas=48, digit_size=(12, 20), n_test=5), "test")
    assert x.shape == (5, 1, 48, 48)
