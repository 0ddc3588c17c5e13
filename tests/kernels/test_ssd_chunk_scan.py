import functools

import pytest
import torch

from vllm_quamba.kernels.selective_state_update import mamba2_state_update_ref
from vllm_quamba.kernels.ssd_chunk_scan import ssd_chunk_scan_ref, ssd_sequential_ref

torch.set_num_threads(1)

HEADS, HEAD_DIM, STATE_SIZE = 4, 8, 16
# Both paths are fp32. The chunked form sums up to chunk_size decayed C.B products per output
# and passes states between chunks; the oracle does T multiply-adds per state entry. Rounding
# differences grow like T * eps * |y| ~ 300 * 6e-8 ~ 2e-5 relative at worst: 1e-4 abs/rel.
SCAN_TOL = dict(rtol=1e-4, atol=1e-4)


@functools.lru_cache(maxsize=None)
def _problem(seq_len: int, groups: int, with_initial_state: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 1000 + seq_len * 10 + groups)
    return dict(
        x=torch.randn(seq_len, HEADS, HEAD_DIM, generator=g),
        dt=torch.randn(seq_len, HEADS, generator=g) * 0.5,
        A=-torch.rand(HEADS, generator=g) * 4 - 0.1,
        B=torch.randn(seq_len, groups, STATE_SIZE, generator=g),
        C=torch.randn(seq_len, groups, STATE_SIZE, generator=g),
        D=torch.randn(HEADS, generator=g),
        # softplus(dt + dt_bias) spans roughly 0.05 .. 2: from slow to fast decay.
        dt_bias=torch.rand(HEADS, generator=g) * 3 - 2.5,
        initial_state=torch.randn(HEADS, HEAD_DIM, STATE_SIZE, generator=g) if with_initial_state else None,
    )


@functools.lru_cache(maxsize=None)
def _sequential(seq_len: int, groups: int, with_initial_state: bool):
    return ssd_sequential_ref(**_problem(seq_len, groups, with_initial_state))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 64, 256])
@pytest.mark.parametrize("seq_len", [1, 7, 64, 100, 300])
def test_chunked_matches_sequential(seq_len, chunk_size, with_initial_state, groups):
    y, final_state = ssd_chunk_scan_ref(**_problem(seq_len, groups, with_initial_state), chunk_size=chunk_size)
    y_ref, final_state_ref = _sequential(seq_len, groups, with_initial_state)
    assert y.shape == (seq_len, HEADS, HEAD_DIM) and final_state.shape == (HEADS, HEAD_DIM, STATE_SIZE)
    torch.testing.assert_close(y, y_ref, **SCAN_TOL)
    torch.testing.assert_close(final_state, final_state_ref, **SCAN_TOL)


def test_sequential_oracle_matches_hand_written_recurrence():
    p = _problem(5, 2, True)
    y, state = ssd_sequential_ref(**p)
    h = p["initial_state"].clone()
    heads_per_group = HEADS // 2
    for t in range(5):
        for head in range(HEADS):
            group = head // heads_per_group
            dt = torch.nn.functional.softplus(p["dt"][t, head] + p["dt_bias"][head])
            h[head] = torch.exp(dt * p["A"][head]) * h[head] + dt * torch.outer(p["x"][t, head], p["B"][t, group])
            y_th = h[head] @ p["C"][t, group] + p["D"][head] * p["x"][t, head]
            # Same fp32 operations up to summation order of a 16-term dot product: 1e-5.
            torch.testing.assert_close(y[t, head], y_th, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_options_without_softplus_bias_or_skip(chunk_size):
    g = torch.Generator().manual_seed(7)
    seq_len = 50
    args = dict(
        x=torch.randn(seq_len, HEADS, HEAD_DIM, generator=g),
        dt=torch.rand(seq_len, HEADS, generator=g) * 0.3,  # already positive: no softplus needed
        A=-torch.rand(HEADS, generator=g) * 2,
        B=torch.randn(seq_len, 1, STATE_SIZE, generator=g),
        C=torch.randn(seq_len, 1, STATE_SIZE, generator=g),
        dt_softplus=False,
    )
    y, state = ssd_chunk_scan_ref(**args, chunk_size=chunk_size)
    y_ref, state_ref = ssd_sequential_ref(**args)
    torch.testing.assert_close(y, y_ref, **SCAN_TOL)
    torch.testing.assert_close(state, state_ref, **SCAN_TOL)


def _slice_problem(p, start, stop, initial_state):
    sliced = {k: (v[start:stop] if k in ("x", "dt", "B", "C") else v) for k, v in p.items()}
    sliced["initial_state"] = initial_state
    return sliced


@pytest.mark.parametrize("split", [1, 13, 16, 57])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_split_sequence_equals_whole(split, with_initial_state):
    p = _problem(100, 2, with_initial_state)
    y_whole, state_whole = ssd_chunk_scan_ref(**p, chunk_size=16)
    y_first, state_first = ssd_chunk_scan_ref(**_slice_problem(p, 0, split, p["initial_state"]), chunk_size=16)
    y_second, state_second = ssd_chunk_scan_ref(**_slice_problem(p, split, 100, state_first), chunk_size=16)
    # Different chunk boundaries give different fp32 summation orders: same bound as the oracle test.
    torch.testing.assert_close(torch.cat([y_first, y_second]), y_whole, **SCAN_TOL)
    torch.testing.assert_close(state_second, state_whole, **SCAN_TOL)


@pytest.mark.parametrize("prompt_len", [1, 16, 37])
@pytest.mark.parametrize("groups", [1, 2])
def test_decode_step_continues_prefill(prompt_len, groups):
    p = _problem(prompt_len + 1, groups, True, seed=3)
    _, prompt_state = ssd_chunk_scan_ref(**_slice_problem(p, 0, prompt_len, p["initial_state"]), chunk_size=16)
    y_full, state_full = ssd_chunk_scan_ref(**p, chunk_size=16)

    t = prompt_len
    y_step, state_step = mamba2_state_update_ref(
        prompt_state[None], p["x"][t][None], p["dt"][t][None], p["A"],
        p["B"][t][None], p["C"][t][None], p["D"], p["dt_bias"], dt_softplus=True,
    )  # fmt: skip
    # One recurrence step vs the chunked form over the last token: fp32 rounding only.
    torch.testing.assert_close(y_step[0], y_full[t], **SCAN_TOL)
    torch.testing.assert_close(state_step[0], state_full, **SCAN_TOL)


def test_output_dtypes():
    p = {k: (v.to(torch.bfloat16) if v is not None else v) for k, v in _problem(20, 1, True).items()}
    y, state = ssd_chunk_scan_ref(**p, chunk_size=8)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    y_seq, state_seq = ssd_sequential_ref(**p)
    assert y_seq.dtype == torch.bfloat16 and state_seq.dtype == torch.float32
    # Same bf16 inputs, fp32 compute on both sides; y is rounded to bf16 (2^-8 relative) at the end.
    torch.testing.assert_close(y, y_seq, rtol=2**-7, atol=2e-2)


def test_invalid_chunk_size_raises():
    with pytest.raises(ValueError):
        ssd_chunk_scan_ref(**_problem(7, 1, False), chunk_size=0)
