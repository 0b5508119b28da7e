"""lora_fast.rng: the numpy oracle of the kernels' dropout mask is Philox-4x32-10 (known-answer vectors) and a fair
keep/drop draw. The kernels are compared with it bit for bit in tests/test_kernels.py; here both are checked at a
draw equal to the keep threshold, which random masks almost never hold."""

# ruff: noqa: I001  (tests.triton_interpret is imported before the kernels, see tests/conftest.py)
from __future__ import annotations

import numpy as np
import pytest

from lora_fast.rng import keep_mask_numpy, keep_threshold, philox4x32

try:  # the kernels' mask, where triton is installed (interpreter on CPU, as in tests/test_kernels.py)
    from tests.triton_interpret import DEVICE, interpret  # noqa: F401  (fixture)
    from lora_fast.kernels.dropout import dropout_keep_mask

    def _kernel_mask(seed: int, p: float) -> np.ndarray:
        return dropout_keep_mask(seed, 1, 8, p, DEVICE).cpu().numpy()[0]

    pytestmark = pytest.mark.usefixtures("interpret")
except ImportError:  # triton missing: the numpy oracle alone
    _kernel_mask = None

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


def _draws_of_row_0(seed: int) -> list[int]:
    """The 16-bit draws of elements (0, 0..7): one Philox call, counter (0, 0, 0, 0); draw j is half j % 2 (low
    first) of word j // 2 — the layout the module docstring gives, computed here from philox4x32 alone."""
    words = [int(w) for w in philox4x32(seed, 0, 0, 0, 0)]
    return [(words[j // 2] >> (16 * (j % 2))) & 0xFFFF for j in range(8)]


@pytest.mark.parametrize("seed", [0, 2**40 + 7])
def test_a_draw_equal_to_the_threshold_is_kept(seed):
    """keep ⇔ draw ≥ t: the 2¹⁶ − t draw values t .. 2¹⁶ − 1 keep, so P(keep) = 1 − t/2¹⁶ as keep_threshold
    documents (with "draw > t" one value fewer keeps). Random masks almost never hold a draw equal to t, so p is
    chosen here to make t equal the draw of one element: that element is kept, and dropped at t + 1. Checked for the
    numpy oracle and for the kernels' mask (interpreter on CPU), at a low-half and a high-half draw."""
    draws = _draws_of_row_0(seed)
    for k in (2, 7):
        for t in (draws[k], draws[k] + 1):
            p = t / 2**16  # keep_threshold(p) == t exactly: t is an integer below the cap
            assert keep_threshold(p) == t
            want = np.array([d >= t for d in draws])
            assert (keep_mask_numpy(seed, 1, 8, p)[0] == want).all(), (k, t)
            if _kernel_mask is not None:
                assert (_kernel_mask(seed, p) == want).all(), (k, t)


def test_keep_rate_is_within_half_a_step_of_one_minus_p():
    """P(keep) = 1 − t/2¹⁶ is within 2⁻¹⁷ of 1 − p below the cap (t rounds p·2¹⁶, it does not truncate it), and
    p < 1 always keeps something."""
    ps = np.random.default_rng(0).uniform(0.0, 1.0 - 2.0**-17, 10_000)
    assert max(abs(keep_threshold(p) / 2**16 - p) for p in ps) <= 2.0**-17
    assert keep_threshold(np.nextafter(1.0, 0.0)) == 2**16 - 1
