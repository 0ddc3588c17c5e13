"""The CPU fast paths of the Quamba2 SSM (numba, and the C decode step where the CPU has
AVX-512 VNNI) against the torch references. The decode tests run both decodes: the C kernel
(skipped on CPUs without it) and numba's, its fallback.

Tolerances. The fast path quantizes at the same points with the same fp32 scales and
reciprocals, but sums in another order (the conv taps, y = state . C, the chunked scan vs the
token recurrence, the Hadamard base matmul) and its exp may differ from torch's in the last
ulp. So:
- int8 results (states) may differ by one step where the reference's fp32 value sits within
  rounding error of a rounding tie: never by more than 1, and in at most MAX_TIE_FRACTION of
  the entries (a value within ~1e-5 quant steps of a tie: about 1e-5 of random entries);
- fp32 outputs agree to rtol = atol = 1e-4 (fp32 reassociation over at most a few hundred
  terms of unit scale is ~1e-6; 1e-4 leaves room for the exp differences compounding through
  the decays), except where an int8 intermediate (x, B, C, z) flipped at a tie: one flip of B
  or C moves a whole group's outputs by a quantization step, so up to MAX_FLIPPED_OUTPUTS of
  the outputs may miss the tolerance.
"""

import pytest
import torch

from vllm_quamba.kernels import quamba2_ssm
from vllm_quamba.kernels.hadamard import hadamard_transform_ref
from vllm_quamba.kernels.quamba2_ssm import (
    Quamba2SSMParams,
    quamba2_ssm_decode_cpu,
    quamba2_ssm_decode_ref,
    quamba2_ssm_prefill_cpu,
    quamba2_ssm_prefill_ref,
)

MAX_TIE_FRACTION = 1e-3
MAX_FLIPPED_OUTPUTS = 0.02
RTOL = ATOL = 1e-4

NUM_HEADS, HEAD_DIM, STATE_SIZE, N_GROUPS, KERNEL = 6, 8, 16, 2, 4
INTERMEDIATE = NUM_HEADS * HEAD_DIM  # 48 = 12 * 4: a Hadamard size with a non-trivial base
CONV_DIM = INTERMEDIATE + 2 * N_GROUPS * STATE_SIZE
IN_PROJ_DIM = INTERMEDIATE + CONV_DIM + NUM_HEADS
NUM_SLOTS = 7


def _params(
    g: torch.Generator,
    chunk_size: int = 8,
    num_heads: int = NUM_HEADS,
    head_dim: int = HEAD_DIM,
    state_size: int = STATE_SIZE,
    n_groups: int = N_GROUPS,
) -> Quamba2SSMParams:
    """Random layer parameters with scales that put typical values mid-range in int8."""

    def positive(*shape, low=0.5, high=1.5):
        return low + (high - low) * torch.rand(*shape, generator=g)

    intermediate = num_heads * head_dim
    conv_dim = intermediate + 2 * n_groups * state_size
    # A few distinct state-scale rows shared by many (head, dim) rows, as the checkpoint's
    # group scales expand to.
    distinct_rows = 0.02 * positive(3, state_size)
    row_choice = torch.randint(0, 3, (intermediate,), generator=g)
    return Quamba2SSMParams(
        intermediate_size=intermediate, n_groups=n_groups, state_size=state_size,
        head_dim=head_dim, chunk_size=chunk_size, norm_eps=1e-5,
        z_scale=torch.tensor([3.0 / 127]),
        dt_scale=torch.tensor([2.0 / 127]),
        xbc_in_scale=3.0 / 127 * positive(conv_dim),
        conv_weight=0.5 * torch.randn(conv_dim, KERNEL, generator=g),
        conv_bias=0.1 * torch.randn(conv_dim, generator=g),
        xbc_out_scale=2.0 / 127 * positive(conv_dim),
        A=-positive(num_heads, low=0.1, high=2.0),
        D=torch.randn(num_heads, generator=g),
        dt_bias=torch.randn(num_heads, generator=g) - 1.0,
        norm_weight=positive(intermediate),
        state_scale=distinct_rows[row_choice].reshape(num_heads, head_dim, state_size),
    )  # fmt: skip


@pytest.fixture(params=["simd", "numba"])
def decode(request, monkeypatch):
    """Which decode runs: the C kernel, or numba's (its fallback, forced by hiding the C
    kernel)."""
    if request.param == "numba":
        monkeypatch.setattr(quamba2_ssm, "_simd_decode", lambda: None)
    elif quamba2_ssm._simd_decode() is None:
        pytest.skip("no AVX-512 VNNI on this CPU (or the C kernels are not built)")
    return request.param


def _caches(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    conv = torch.randint(-128, 128, (NUM_SLOTS, KERNEL - 1, CONV_DIM), generator=g, dtype=torch.int8)
    ssm = torch.randint(-128, 128, (NUM_SLOTS, NUM_HEADS, HEAD_DIM, STATE_SIZE), generator=g, dtype=torch.int8)
    return conv, ssm


def _assert_int8_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    diff = (actual.int() - expected.int()).abs()
    assert diff.max() <= 1, f"int8 results differ by {diff.max()} steps"
    fraction = (diff > 0).float().mean().item()
    assert fraction <= MAX_TIE_FRACTION, f"{fraction:.2%} of int8 results differ"


def _assert_mostly_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    far = ~torch.isclose(actual, expected, rtol=RTOL, atol=ATOL)
    fraction = far.float().mean().item()
    assert fraction <= MAX_FLIPPED_OUTPUTS, (
        f"{fraction:.2%} of outputs off; worst {(actual - expected).abs().max():.3g}"
    )


def _projected(g: torch.Generator, tokens: int, gain: float = 1.0) -> torch.Tensor:
    return gain * 1.5 * torch.randn(tokens, IN_PROJ_DIM, generator=g)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("gain", [1.0, 30.0], ids=["typical", "saturating"])
def test_decode_matches_reference(rotate, gain, decode):
    g = torch.Generator().manual_seed(1)
    p = _params(g)
    conv, ssm = _caches(g)
    slots = torch.tensor([5, 1, 3, 0])  # distinct, unordered, not all slots
    zxbcdt = _projected(g, len(slots), gain)
    y_ref, conv_ref, ssm_ref = quamba2_ssm_decode_ref(zxbcdt, p, conv[slots], ssm[slots])
    conv_before, ssm_before = conv.clone(), ssm.clone()

    out = quamba2_ssm_decode_cpu(zxbcdt, p, conv, ssm, slots, rotate_output=rotate)

    _assert_mostly_close(out, hadamard_transform_ref(y_ref) if rotate else y_ref)
    assert torch.equal(conv[slots], conv_ref)  # the int8 inputs themselves: exact
    _assert_int8_close(ssm[slots], ssm_ref)
    untouched = torch.tensor([s not in slots for s in range(NUM_SLOTS)])
    assert torch.equal(conv[untouched], conv_before[untouched])
    assert torch.equal(ssm[untouched], ssm_before[untouched])


def test_decode_reads_strided_cache_views(decode):
    """vLLM's caches are views into shared pages (conv possibly transposed, "DS" layout)."""
    g = torch.Generator().manual_seed(2)
    p = _params(g)
    conv, ssm = _caches(g)
    # Conv slots stored (dim, K-1), viewed as (K-1, dim); each slot padded in a page.
    pages = torch.zeros(NUM_SLOTS, CONV_DIM, KERNEL + 2, dtype=torch.int8)
    conv_view = pages[:, :, 1:KERNEL].transpose(1, 2)
    conv_view.copy_(conv)
    ssm_pages = torch.zeros(NUM_SLOTS, NUM_HEADS * HEAD_DIM * STATE_SIZE + 40, dtype=torch.int8)
    ssm_view = ssm_pages[:, 40:].view(NUM_SLOTS, NUM_HEADS, HEAD_DIM, STATE_SIZE)
    ssm_view.copy_(ssm)
    slots = torch.tensor([6, 2])
    zxbcdt = _projected(g, len(slots))

    out_plain = quamba2_ssm_decode_cpu(zxbcdt, p, conv, ssm, slots)
    out_views = quamba2_ssm_decode_cpu(zxbcdt, p, conv_view, ssm_view, slots)

    assert torch.equal(out_views, out_plain)  # same kernel, same arithmetic: bitwise
    assert torch.equal(conv_view, conv)
    assert torch.equal(ssm_view, ssm)
    assert not pages[:, :, 0].any() and not pages[:, :, KERNEL:].any()  # padding untouched
    assert not ssm_pages[:, :40].any()


def _prefill_ref_all(zxbcdt, p, starts, slots, has_initial, conv, ssm):
    ys = []
    for i, slot in enumerate(slots.tolist()):
        init = (conv[slot], ssm[slot]) if has_initial[i] else (None, None)
        y, conv_new, ssm_new = quamba2_ssm_prefill_ref(zxbcdt[starts[i] : starts[i + 1]], p, *init)
        ys.append(y)
        conv[slot], ssm[slot] = conv_new, ssm_new
    return torch.cat(ys)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("gain", [1.0, 30.0], ids=["typical", "saturating"])
def test_prefill_of_a_mixed_batch_matches_reference(rotate, gain):
    g = torch.Generator().manual_seed(3)
    p = _params(g, chunk_size=8)
    conv, ssm = _caches(g)
    # Lengths shorter than the conv window, equal to a chunk and spanning several chunks.
    lengths = [1, 2, 8, 21]
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    slots = torch.tensor([4, 0, 6, 2])
    has_initial = torch.tensor([True, False, True, False])
    zxbcdt = _projected(g, int(starts[-1]), gain)
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    y_ref = _prefill_ref_all(zxbcdt, p, starts.tolist(), slots, has_initial.tolist(), conv_ref, ssm_ref)

    out = quamba2_ssm_prefill_cpu(zxbcdt, p, conv, ssm, starts, slots, has_initial, rotate_output=rotate)

    _assert_mostly_close(out, hadamard_transform_ref(y_ref) if rotate else y_ref)
    assert torch.equal(conv, conv_ref)
    _assert_int8_close(ssm, ssm_ref)


def test_chunked_prefill_continues_from_the_cached_states(decode):
    """A prompt split over two steps (vLLM's chunked prefill), then a decode step."""
    g = torch.Generator().manual_seed(4)
    p = _params(g, chunk_size=4)
    conv, ssm = _caches(g)
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    slot = torch.tensor([3])
    zxbcdt = _projected(g, 14)
    pieces = [(zxbcdt[:9], False), (zxbcdt[9:13], True)]
    for piece, continued in pieces:
        starts = torch.tensor([0, len(piece)])
        out = quamba2_ssm_prefill_cpu(piece, p, conv, ssm, starts, slot, torch.tensor([continued]))
        y_ref = _prefill_ref_all(piece, p, [0, len(piece)], slot, [continued], conv_ref, ssm_ref)
        _assert_mostly_close(out, y_ref)
        assert torch.equal(conv, conv_ref)
        _assert_int8_close(ssm, ssm_ref)
    out = quamba2_ssm_decode_cpu(zxbcdt[13:], p, conv, ssm, slot)
    y_ref, _, _ = quamba2_ssm_decode_ref(zxbcdt[13:], p, conv_ref[slot], ssm_ref[slot])
    _assert_mostly_close(out, y_ref)


def test_decode_equals_one_token_prefill_from_the_same_states(decode):
    """Both kernels run the same arithmetic on a single token: bitwise equal states, and
    bitwise equal outputs where both sum y = state . C with numba's _dot. The C kernel sums y in
    another order: fp32 reassociation of STATE_SIZE terms, so rtol = atol = 1e-5 (its
    rounding is ~1e-7 relative, and the gated norm and Hadamard sums keep it that size)."""
    g = torch.Generator().manual_seed(5)
    p = _params(g)
    conv, ssm = _caches(g)
    conv_prefill, ssm_prefill = conv.clone(), ssm.clone()
    slot = torch.tensor([2])
    zxbcdt = _projected(g, 1)

    y_decode = quamba2_ssm_decode_cpu(zxbcdt, p, conv, ssm, slot)
    y_prefill = quamba2_ssm_prefill_cpu(
        zxbcdt, p, conv_prefill, ssm_prefill, torch.tensor([0, 1]), slot, torch.tensor([True])
    )

    if decode == "numba":
        assert torch.equal(y_decode, y_prefill)
    else:
        torch.testing.assert_close(y_decode, y_prefill, rtol=1e-5, atol=1e-5)
    assert torch.equal(conv, conv_prefill)
    assert torch.equal(ssm, ssm_prefill)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize(
    "num_heads, head_dim, state_size, n_groups",
    [(4, 8, 72, 2), (3, 4, 128, 1), (2, 4, 7, 1), (6, 64, 16, 3)],  # H * P: Hadamard sizes
    ids=["64-values-and-a-tail", "mamba2-state-size", "tail-only", "block-of-128"],
)
def test_simd_decode_equals_numba(num_heads, head_dim, state_size, n_groups, rotate):
    """The C decode step against numba's on the same inputs, from slots of strided caches: the
    same fp32 operations per element (the exp polynomial, libm's expf and log1pf, the Hadamard
    additions), so bitwise equal int8 states; the output differs in the order of two sums, y =
    state . C and the norm's sum of squares: fp32 reassociation of at most 128 terms of unit
    size, which the norm and Hadamard carry through at its size: rtol = atol = 1e-5."""
    kernel = quamba2_ssm._simd_decode()
    if kernel is None:
        pytest.skip("no AVX-512 VNNI on this CPU (or the C kernels are not built)")
    g = torch.Generator().manual_seed(7)
    p = _params(g, num_heads=num_heads, head_dim=head_dim, state_size=state_size, n_groups=n_groups)
    conv_dim = p.conv_dim
    pages = torch.randint(-128, 128, (NUM_SLOTS, conv_dim, KERNEL + 1), generator=g, dtype=torch.int8)
    conv = pages[:, :, 1:].transpose(1, 2)  # vLLM's "DS" layout: channels strided
    ssm = torch.randint(-128, 128, (NUM_SLOTS, num_heads, head_dim, state_size), generator=g, dtype=torch.int8)
    conv_numba, ssm_numba = conv.clone(), ssm.clone()
    slots = torch.tensor([4, 0, 6])
    zxbcdt = 1.5 * torch.randn(len(slots), p.intermediate_size + conv_dim + num_heads, generator=g)

    out = quamba2_ssm_decode_cpu(zxbcdt, p, conv, ssm, slots, rotate_output=rotate)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quamba2_ssm, "_simd_decode", lambda: None)
        out_numba = quamba2_ssm_decode_cpu(zxbcdt, p, conv_numba, ssm_numba, slots, rotate_output=rotate)

    assert torch.equal(conv, conv_numba)
    assert torch.equal(ssm, ssm_numba)
    torch.testing.assert_close(out, out_numba, rtol=1e-5, atol=1e-5)
