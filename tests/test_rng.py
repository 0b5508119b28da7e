"""lora_fast.rng: the numpy oracle of the kernels' dropout mask is Philox-4x32-10 (known-answer vectors) and a fair
keep/drop draw. The kernels are compared with it bit for bit in tests/test_kernels.py."""

from __future__ import annotations

import numpy as np
import pytest

from lora_fast.rng import keep_mask_numpy, philox4x32

# Known-answer vectors of Philox-4x32-10 from the Random123 distribution (kat_vectors): (key, counter) -> output.
KAT = [
    ((0x0, 0x0), (0x0, 0x0, 0x0, 0x0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("key, counter, expected", KAT)
def test_philox_known_answers(key, counter, expected):
    seed = key[0] | (key[1] << 32)  # the kernels' key words are the seed's low and high halves
    assert tuple(int(w) for w in philox4x32(seed, *counter)) == expected


def test_keep_mask_rate_and_independence():
    """Keep-rate within 4σ of 1 − p; different seeds and neighbouring rows/columns are not correlated."""
    p, rows, cols = 0.1, 512, 768
    m = keep_mask_numpy(3, rows, cols, p)
    sigma = (p * (1 - p) / m.size) ** 0.5
    assert abs(m.mean() - (1 - p)) < 4 * sigma
    other = keep_mask_numpy(4, rows, cols, p)
    assert abs((m != other).mean() - 2 * p * (1 - p)) < 0.01  # independent draws disagree with prob 2p(1−p)
    for a, b in ((m[:, :-1], m[:, 1:]), (m[:-1], m[1:])):  # adjacent columns (within a Philox word) and rows
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02
