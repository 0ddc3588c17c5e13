"""The Mamba1 CPU ops (no engine): ``_C::selective_scan_fwd`` and the 3D-state decode backend,
checked in vLLM's own calling conventions against the one-sequence reference recurrence."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.platforms import current_platform  # noqa: E402

if not current_platform.is_cpu():
    pytest.skip("the Mamba1 ops are registered on the CPU platform only", allow_module_level=True)

from vllm.config.mamba import MambaBackendEnum  # noqa: E402
from vllm.model_executor.layers.mamba.ops import ssu_dispatch  # noqa: E402
from vllm.model_executor.layers.mamba.ops.mamba_ssm import selective_scan_fn  # noqa: E402

from vllm_quamba.kernels.selective_scan import (  # noqa: E402
    mamba1_state_update_ref,
    selective_scan_ref,
)
from vllm_quamba.layers import mamba1_ops  # noqa: E402

DIM, N = 12, 4
NULL = 0  # vLLM's NULL_BLOCK_ID: slot 0 is never a real sequence's


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert mamba1_ops.register_selective_scan_op()
    assert mamba1_ops.register_selective_scan_op()  # idempotent
    assert hasattr(torch.ops._C, "selective_scan_fwd")


def _params(gen):
    A = -torch.rand(DIM, N, generator=gen) - 0.1
    D = torch.randn(DIM, generator=gen)
    dt_bias = torch.randn(DIM, generator=gen) * 0.5
    return A, D, dt_bias


def _packed_batch(seqlens, gen):
    total = sum(seqlens)
    u = torch.randn(DIM, total, generator=gen)
    delta = torch.randn(DIM, total, generator=gen) * 0.5
    z = torch.randn(DIM, total, generator=gen)
    B = torch.randn(N, total, generator=gen)
    C = torch.randn(N, total, generator=gen)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return u, delta, z, B, C, cu


@pytest.mark.parametrize("gated", [True, False], ids=["z", "no-z"])
def test_varlen_prefill_with_slots_initial_states_and_padding(gated):
    """vLLM's prefill call (selective_scan_fn, varlen): per-sequence slots, initial states for
    continued chunks, a padding row, outputs in place."""
    gen = torch.Generator().manual_seed(0)
    A, D, dt_bias = _params(gen)
    seqlens = [5, 1, 7, 3]
    slots = torch.tensor([6, 2, NULL, 4], dtype=torch.int32)  # third row is padding
    has_init = torch.tensor([True, False, True, True])
    u, delta, z, B, C, cu = _packed_batch(seqlens, gen)
    states = torch.randn(8, DIM, N, generator=gen)
    before = states.clone()
    z_in = z.clone() if gated else None
    delta_in = delta.clone()

    out = selective_scan_fn(
        u, states, delta_in, A, B, C, D, z_in, dt_bias, delta_softplus=True,
        query_start_loc=cu, cache_indices=slots, has_initial_state=has_init,
    )  # fmt: skip

    assert out is (z_in if gated else delta_in)
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        slot = int(slots[i])
        if slot == NULL:
            assert torch.equal(out[:, start:end], (z if gated else delta)[:, start:end])  # untouched
            continue
        want, final = selective_scan_ref(
            u[:, start:end].T, delta[:, start:end].T, A, B[:, start:end].T, C[:, start:end].T, D,
            z[:, start:end].T if gated else None, dt_bias, True,
            before[slot] if has_init[i] else None,
        )  # fmt: skip
        torch.testing.assert_close(out[:, start:end].T, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(states[slot], final, rtol=1e-5, atol=1e-5)
        if gated:  # delta receives the ungated y, like the CUDA kernel's `out = delta`
            ungated, _ = selective_scan_ref(
                u[:, start:end].T, delta[:, start:end].T, A, B[:, start:end].T, C[:, start:end].T,
                D, None, dt_bias, True, before[slot] if has_init[i] else None,
            )  # fmt: skip
            torch.testing.assert_close(delta_in[:, start:end].T, ungated, rtol=1e-5, atol=1e-5)
    untouched = [s for s in range(8) if s not in (6, 2, 4)]
    assert torch.equal(states[untouched], before[untouched])


def test_chunked_prefill_equals_one_pass():
    """Two chunks through the op (the second continuing from the stored state) == one pass."""
    gen = torch.Generator().manual_seed(1)
    A, D, dt_bias = _params(gen)
    u, delta, z, B, C, cu = _packed_batch([11], gen)
    slot = torch.tensor([3], dtype=torch.int32)

    whole = torch.zeros(5, DIM, N)
    y_whole = selective_scan_fn(
        u, whole, delta.clone(), A, B, C, D, z.clone(), dt_bias, delta_softplus=True,
        query_start_loc=cu, cache_indices=slot, has_initial_state=torch.tensor([False]),
    ).clone()  # fmt: skip

    chunked = torch.zeros(5, DIM, N)
    ys = []
    for (start, end), init in [((0, 4), False), ((4, 11), True)]:
        ys.append(selective_scan_fn(
            u[:, start:end], chunked, delta[:, start:end].clone(), A, B[:, start:end],
            C[:, start:end], D, z[:, start:end].clone(), dt_bias, delta_softplus=True,
            query_start_loc=torch.tensor([0, end - start], dtype=torch.int32), cache_indices=slot,
            has_initial_state=torch.tensor([init]),
        ).clone())  # fmt: skip
    torch.testing.assert_close(torch.cat(ys, dim=1), y_whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[3], whole[3], rtol=1e-5, atol=1e-5)


def test_batched_layout_without_query_start_loc():
    gen = torch.Generator().manual_seed(2)
    A, D, dt_bias = _params(gen)
    batch, seqlen = 3, 6
    u = torch.randn(batch, DIM, seqlen, generator=gen)
    delta = torch.randn(batch, DIM, seqlen, generator=gen) * 0.5
    z = torch.randn(batch, DIM, seqlen, generator=gen)
    B = torch.randn(batch, N, seqlen, generator=gen)
    C = torch.randn(batch, N, seqlen, generator=gen)
    states = torch.randn(batch, DIM, N, generator=gen)
    before = states.clone()
    out = selective_scan_fn(
        u, states, delta.clone(), A, B, C, D, z.clone(), dt_bias, delta_softplus=True,
        has_initial_state=torch.tensor([True, False, True]),
    )  # fmt: skip
    for b in range(batch):
        want, final = selective_scan_ref(
            u[b].T, delta[b].T, A, B[b].T, C[b].T, D, z[b].T, dt_bias, True,
            before[b] if b != 1 else None,
        )  # fmt: skip
        torch.testing.assert_close(out[b].T, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(states[b], final, rtol=1e-5, atol=1e-5)


def test_prefix_caching_arguments_are_refused():
    gen = torch.Generator().manual_seed(3)
    A, D, dt_bias = _params(gen)
    u, delta, z, B, C, cu = _packed_batch([4], gen)
    with pytest.raises(NotImplementedError, match="prefix caching"):
        selective_scan_fn(
            u, torch.zeros(4, DIM, N), delta, A, B, C, D, z, dt_bias, delta_softplus=True,
            query_start_loc=cu, cache_indices=torch.tensor([[1, 2]], dtype=torch.int32),
            has_initial_state=torch.tensor([False]),
            block_idx_first_scheduled_token=torch.tensor([0], dtype=torch.int32),
            block_idx_last_scheduled_token=torch.tensor([0], dtype=torch.int32),
            initial_state_idx=torch.tensor([0], dtype=torch.int32),
        )  # fmt: skip


# ----- decode --------------------------------------------------------------------------------------
def _decode_inputs(batch, gen):
    x = torch.randn(batch, DIM, generator=gen)
    dt = torch.randn(batch, DIM, generator=gen) * 0.5
    z = torch.randn(batch, DIM, generator=gen)
    B = torch.randn(batch, N, generator=gen)
    C = torch.randn(batch, N, generator=gen)
    return x, dt, z, B, C


def test_decode_backend_updates_3d_states_by_slot():
    """ssu_dispatch's CPU backend, as the Mamba1 mixer calls it: (batch, 1) slot indices, a padding row."""
    mamba1_ops.register_mamba1_ssu_backend()
    backend_cls = ssu_dispatch._BACKEND_REGISTRY[MambaBackendEnum.CPU]
    assert backend_cls is mamba1_ops.Mamba1AwareCPUSSUBackend
    backend = backend_cls.__new__(backend_cls)  # its __init__ only binds the C++ op

    gen = torch.Generator().manual_seed(4)
    A, D, dt_bias = _params(gen)
    x, dt, z, B, C = _decode_inputs(4, gen)
    slots = torch.tensor([[5], [1], [NULL], [3]], dtype=torch.int32)
    states = torch.randn(6, DIM, N, generator=gen)
    before = states.clone()
    out = torch.full((4, DIM), 7.0)
    backend(
        states, x, dt, A, B, C, D, dt_bias, z=z, dt_softplus=True,
        state_batch_indices=slots, dst_state_batch_indices=slots, out=out,
    )  # fmt: skip

    live = torch.tensor([0, 1, 3])
    src = slots[live, 0].long()
    want, new = mamba1_state_update_ref(before[src], x[live], dt[live], A, B[live], C[live], D, z[live], dt_bias)
    torch.testing.assert_close(out[live], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(states[src], new, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[2], torch.full((DIM,), 7.0))  # padding row untouched
    assert torch.equal(states[[0, 2, 4]], before[[0, 2, 4]])


def test_decode_reads_source_and_writes_destination_slots():
    gen = torch.Generator().manual_seed(5)
    A, D, dt_bias = _params(gen)
    x, dt, z, B, C = _decode_inputs(2, gen)
    states = torch.randn(5, DIM, N, generator=gen)
    before = states.clone()
    src, dst = torch.tensor([1, 2]), torch.tensor([3, 4])
    out = mamba1_ops.mamba1_selective_state_update(
        states, x, dt, A, B, C, D, dt_bias, z=z, dt_softplus=True,
        state_batch_indices=src, dst_state_batch_indices=dst,
    )  # fmt: skip
    want, new = mamba1_state_update_ref(before[src], x, dt, A, B, C, D, z, dt_bias)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(states[dst], new)
    assert torch.equal(states[:3], before[:3])


def test_prefill_then_decode_equals_a_longer_prefill():
    """The op's final state feeds the decode step: prefill(T) + decode(1) == prefill(T+1)."""
    gen = torch.Generator().manual_seed(6)
    A, D, dt_bias = _params(gen)
    u, delta, z, B, C, _ = _packed_batch([9], gen)
    slot = torch.tensor([2], dtype=torch.int32)
    states = torch.zeros(3, DIM, N)
    selective_scan_fn(
        u[:, :8], states, delta[:, :8].clone(), A, B[:, :8], C[:, :8], D, z[:, :8].clone(),
        dt_bias, delta_softplus=True, query_start_loc=torch.tensor([0, 8], dtype=torch.int32),
        cache_indices=slot, has_initial_state=torch.tensor([False]),
    )  # fmt: skip
    y_step = mamba1_ops.mamba1_selective_state_update(
        states, u[:, 8:].T, delta[:, 8:].T, A, B[:, 8:].T, C[:, 8:].T, D, dt_bias, z=z[:, 8:].T,
        dt_softplus=True, state_batch_indices=slot[:, None], dst_state_batch_indices=slot[:, None],
    )  # fmt: skip
    want, final = selective_scan_ref(u.T, delta.T, A, B.T, C.T, D, z.T, dt_bias, True)
    torch.testing.assert_close(y_step[0], want[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[2], final, rtol=1e-5, atol=1e-5)


def test_register_is_a_no_op_when_the_op_exists(monkeypatch):
    """A build that ships _C::selective_scan_fwd (CUDA) keeps its own: nothing is defined."""
    monkeypatch.setattr(mamba1_ops, "_library", None)
    monkeypatch.setattr(mamba1_ops, "_kernels_loaded_op_exists", lambda: True)
    assert mamba1_ops.register_selective_scan_op() is False
    assert mamba1_ops._library is None
