"""Depthwise causal conv1d, channels-last (time-major) layout.

For one sequence x[T, C], weight[C, K], optional bias[C] and a state of the K-1 previous
inputs initial_state[K-1, C] (zeros when absent):

    xpad        = concat(initial_state, x) along time                  # [K-1+T, C]
    y[t, c]     = act(bias[c] + sum_{j<K} weight[c, j] * xpad[t + j, c])
    final_state = xpad[-(K-1):]                                        # the latest K-1 inputs

The decode step is the same formula for T = 1 on a batch of states [B, K-1, C]; the
state layout matches vLLM's "SD" (state-length, dim) conv state.
Compute is float32; y comes back in x's dtype and states in the state's (or x's) dtype.
"""

import torch
import torch.nn.functional as F


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"Unsupported activation {activation!r}: use None, 'silu' or 'swish'.")


def _convolve_windows(windows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """windows[..., C, K] (oldest input first) -> pre-activation outputs [..., C]."""
    y = (windows * weight.to(torch.float32)).sum(dim=-1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill of one sequence: x[T, C] -> (y[T, C], final_state[K-1, C])."""
    seq_len, channels = x.shape
    kernel_size = weight.shape[1]
    state_len = kernel_size - 1
    if initial_state is None:
        initial_state = torch.zeros(state_len, channels, dtype=x.dtype, device=x.device)
    xpad = torch.cat([initial_state.to(torch.float32), x.to(torch.float32)], dim=0)
    windows = torch.stack([xpad[j : j + seq_len] for j in range(kernel_size)], dim=-1)  # [T, C, K]
    y = _activate(_convolve_windows(windows, weight, bias), activation)
    # Slice from an explicit start: xpad[-0:] would keep everything when K == 1.
    final_state = xpad[xpad.shape[0] - state_len :]
    return y.to(x.dtype), final_state.to(initial_state.dtype)


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step for a batch: x[B, C], conv_state[B, K-1, C] -> (y[B, C], new_state).

    Functional: conv_state is not modified.
    """
    window = torch.cat([conv_state.to(torch.float32), x.to(torch.float32)[:, None, :]], dim=1)  # [B, K, C]
    y = _activate(_convolve_windows(window.transpose(1, 2), weight, bias), activation)
    new_state = window[:, 1:]
    return y.to(x.dtype), new_state.to(conv_state.dtype)
