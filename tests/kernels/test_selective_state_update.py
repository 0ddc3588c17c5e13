import inspect

import pytest
import torch
import torch.nn.functional as F

from vllm_quamba.kernels.selective_state_update import mamba2_state_update_ref

BATCH, HEADS, HEAD_DIM, STATE_SIZE = 3, 4, 8, 16
# One recurrence step in fp32: a 16-term dot product per output, summed in a different order
# than the loop below. A few ulps of O(10) values: 1e-5 abs/rel.
STEP_TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        state=torch.randn(BATCH, HEADS, HEAD_DIM, STATE_SIZE, generator=g),
        x=torch.randn(BATCH, HEADS, HEAD_DIM, generator=g),
        dt=torch.randn(BATCH, HEADS, generator=g),
        A=-torch.rand(HEADS, generator=g) * 4,
        B=torch.randn(BATCH, groups, STATE_SIZE, generator=g),
        C=torch.randn(BATCH, groups, STATE_SIZE, generator=g),
        D=torch.randn(HEADS, generator=g),
        dt_bias=torch.randn(HEADS, generator=g),
    )


def _loop_oracle(state, x, dt, A, B, C, D, dt_bias, dt_softplus):
    groups = B.shape[1]
    new_state = state.clone()
    y = torch.zeros_like(x)
    for b in range(BATCH):
        for h in range(HEADS):
            group = h // (HEADS // groups)
            step = dt[b, h] + (dt_bias[h] if dt_bias is not None else 0.0)
            step = F.softplus(step) if dt_softplus else step
            new_state[b, h] = torch.exp(step * A[h]) * state[b, h] + step * torch.outer(x[b, h], B[b, group])
            y[b, h] = new_state[b, h] @ C[b, group] + (D[h] * x[b, h] if D is not None else 0.0)
    return y, new_state


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("dt_softplus", [True, False])
def test_matches_per_head_loop(groups, dt_softplus):
    args = _inputs(groups)
    if not dt_softplus:
        args["dt"] = args["dt"].abs()
        args["dt_bias"] = args["dt_bias"].abs()
    state_before = args["state"].clone()
    y, new_state = mamba2_state_update_ref(**args, dt_softplus=dt_softplus)
    assert torch.equal(args["state"], state_before)  # functional
    y_ref, state_ref = _loop_oracle(**args, dt_softplus=dt_softplus)
    torch.testing.assert_close(y, y_ref, **STEP_TOL)
    torch.testing.assert_close(new_state, state_ref, **STEP_TOL)


def test_without_skip_and_bias():
    args = _inputs(2, seed=1)
    args["D"], args["dt_bias"] = None, None
    y, new_state = mamba2_state_update_ref(**args)
    y_ref, state_ref = _loop_oracle(**args, dt_softplus=True)
    torch.testing.assert_close(y, y_ref, **STEP_TOL)
    torch.testing.assert_close(new_state, state_ref, **STEP_TOL)


def test_matches_transformers_torch_fallback():
    modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    # The undecorated torch path, whatever kernels package happens to be installed.
    hf_update = inspect.unwrap(modeling_mamba2.mamba2_selective_state_update)
    args = _inputs(2, seed=2)
    y, new_state = mamba2_state_update_ref(**args)

    # transformers takes dt, A, D, dt_bias expanded over head_dim (and A over state_size) and
    # updates the state in place.
    hf_state = args["state"].clone()
    hf_y = hf_update(
        hf_state,
        args["x"],
        args["dt"][..., None].expand(-1, -1, HEAD_DIM),
        args["A"][:, None, None].expand(-1, HEAD_DIM, STATE_SIZE),
        args["B"],
        args["C"],
        args["D"][:, None].expand(-1, HEAD_DIM),
        dt_bias=args["dt_bias"][:, None].expand(-1, HEAD_DIM),
        dt_softplus=True,
    )
    # Same fp32 formula, bmm instead of einsum for the 16-term dot product: 1e-5.
    torch.testing.assert_close(y, hf_y, **STEP_TOL)
    torch.testing.assert_close(new_state, hf_state, **STEP_TOL)


def test_dtypes_follow_inputs():
    args = _inputs(1, seed=3)
    args["x"] = args["x"].to(torch.bfloat16)
    args["state"] = args["state"].to(torch.float16)
    y, new_state = mamba2_state_update_ref(**args)
    assert y.dtype == torch.bfloat16 and new_state.dtype == torch.float16
