"""Dropout masks as a hash of (fit, epoch, layer, row, unit): the three spellings of the hash agree, the
masks keep 1-p of the units, and they differ between fits, epochs, layers, rows and units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from watcher_plugins.nn_batch import dropout as hashing


def test_array_hash_equals_the_python_hash_on_random_32_bit_values():
    values = np.random.default_rng(7).integers(0, 2**32, 5000, dtype=np.uint64).astype(np.uint32)
    values[:3] = [0, 1, 2**32 - 1]
    got = hashing.fmix32_array(values.copy()).tolist()
    assert got == [hashing.fmix32(int(v)) for v in values]


def test_draws_follow_the_documented_formula():
    key, rows, width = hashing.layer_key(hashing.fit_key(5), 3, 2), torch.tensor([0, 7, 98783]), 5
    got = hashing.draws([key], rows, width)[0]
    for i, row in enumerate(rows.tolist()):
        for unit in range(width):
            draw = hashing.fmix32((hashing.fmix32(key ^ row) + unit) & hashing.MASK32) >> 8
            assert got[i, unit].item() == draw / 2**24


def test_fmix32_matches_murmur3_reference_values():
    # MurmurHash3_x86_32 of an empty input with these seeds is fmix32(seed): published test vectors.
    assert hashing.fmix32(0) == 0
    assert hashing.fmix32(1) == 0x514E28B7
    assert hashing.fmix32(0xFFFFFFFF) == 0x81F16F39


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_masks_keep_one_minus_p_of_units_and_scale_them(p):
    rows = torch.arange(4000)
    mask = hashing.dropout_mask(hashing.fit_key(123), 3, 1, rows, 128, p)
    kept = mask > 0
    # 512,000 Bernoulli draws: the kept share is within 5 standard deviations of 1 - p
    sd = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    assert torch.all(mask[kept] == hashing.keep_factor(p))
    # neither rows nor units carry a pattern: every row and every unit keeps about 1 - p
    assert abs(kept.float().mean(0) - (1 - p)).max() < 0.1
    assert abs(kept.float().mean(1) - (1 - p)).max() < 0.2


def test_masks_differ_between_fits_epochs_layers_and_depend_only_on_the_row():
    rows = torch.arange(1000)
    base = hashing.dropout_mask(hashing.fit_key(1), 0, 0, rows, 64, 0.3)
    for other in (hashing.dropout_mask(hashing.fit_key(2), 0, 0, rows, 64, 0.3),
                  hashing.dropout_mask(hashing.fit_key(1), 1, 0, rows, 64, 0.3),
                  hashing.dropout_mask(hashing.fit_key(1), 0, 1, rows, 64, 0.3)):
        agree = (other > 0) == (base > 0)
        assert 0.5 < agree.float().mean().item() < 0.7  # independent masks agree on 0.7^2 + 0.3^2 = 58%
    # a subset of rows gets exactly those rows' masks (a row's mask does not depend on the others)
    some = torch.tensor([5, 17, 999])
    assert torch.equal(hashing.dropout_mask(hashing.fit_key(1), 0, 0, some, 64, 0.3), base[some])
    # a wider layer's first units are the narrower layer's units
    assert torch.equal(hashing.dropout_mask(hashing.fit_key(1), 0, 0, rows, 128, 0.3)[:, :64], base)


def test_p_zero_keeps_everything_and_layers_beyond_the_counter_are_refused():
    assert torch.all(hashing.dropout_mask(hashing.fit_key(9), 0, 0, torch.arange(100), 8, 0.0) == 1.0)
    with pytest.raises(ValueError, match="at most 16 hidden layers"):
        hashing.epoch_salt(0, 16)
