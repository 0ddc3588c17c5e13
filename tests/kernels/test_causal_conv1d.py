import pytest
import torch
import torch.nn.functional as F

from vllm_quamba.kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref

torch.set_num_threads(1)

CHANNELS = 24
# fp32 sums of K (<= 4) products of O(1) values, in a different order than F.conv1d:
# a few ulps, so 1e-6 absolute and relative.
FP32_TOL = dict(rtol=1e-6, atol=1e-6)


def _random_conv(kernel_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(CHANNELS, kernel_size, generator=g)
    bias = torch.randn(CHANNELS, generator=g)
    return weight, bias, g


def _conv1d_oracle(xpad: torch.Tensor, weight: torch.Tensor, bias, activation):
    """F.conv1d over an already left-padded [K-1+T, C] sequence (no extra padding)."""
    y = F.conv1d(xpad.T[None], weight[:, None, :], bias, groups=xpad.shape[1])[0].T
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("seq_len", [1, 2, 3, 4, 17])
@pytest.mark.parametrize("activation", ["silu", None])
def test_prefill_matches_conv1d_with_zero_state(seq_len, activation):
    weight, bias, g = _random_conv(4)
    x = torch.randn(seq_len, CHANNELS, generator=g)
    y, final_state = causal_conv1d_ref(x, weight, bias, activation=activation)
    expected = F.conv1d(x.T[None], weight[:, None, :], bias, padding=3, groups=CHANNELS)[0, :, :seq_len].T
    if activation == "silu":
        expected = F.silu(expected)
    torch.testing.assert_close(y, expected, **FP32_TOL)
    # The latest K-1 = 3 inputs, left-padded with zeros when T < 3: pure copies, exact.
    expected_state = torch.cat([torch.zeros(3, CHANNELS), x])[-3:]
    assert torch.equal(final_state, expected_state)


@pytest.mark.parametrize("seq_len", [1, 2, 9])
def test_prefill_with_initial_state(seq_len):
    weight, bias, g = _random_conv(4, seed=1)
    x = torch.randn(seq_len, CHANNELS, generator=g)
    initial_state = torch.randn(3, CHANNELS, generator=g)
    y, final_state = causal_conv1d_ref(x, weight, bias, initial_state)
    xpad = torch.cat([initial_state, x])
    torch.testing.assert_close(y, _conv1d_oracle(xpad, weight, bias, "silu"), **FP32_TOL)
    assert torch.equal(final_state, xpad[-3:])


def test_no_bias_and_kernel_size_one():
    weight, _, g = _random_conv(1, seed=2)
    x = torch.randn(5, CHANNELS, generator=g)
    y, final_state = causal_conv1d_ref(x, weight, None, activation=None)
    torch.testing.assert_close(y, x * weight[:, 0], **FP32_TOL)
    assert final_state.shape == (0, CHANNELS)


@pytest.mark.parametrize(("first_len", "second_len"), [(1, 1), (2, 7), (5, 1), (8, 8)])
def test_split_sequence_equals_whole(first_len, second_len):
    weight, bias, g = _random_conv(4, seed=3)
    x = torch.randn(first_len + second_len, CHANNELS, generator=g)
    y_whole, state_whole = causal_conv1d_ref(x, weight, bias)
    y_first, state_first = causal_conv1d_ref(x[:first_len], weight, bias)
    y_second, state_second = causal_conv1d_ref(x[first_len:], weight, bias, state_first)
    # Same windows summed in the same order: expected bit-exact; 1e-7 only guards against that
    # changing with the backend.
    torch.testing.assert_close(torch.cat([y_first, y_second]), y_whole, rtol=1e-7, atol=1e-7)
    assert torch.equal(state_second, state_whole)


@pytest.mark.parametrize("prompt_len", [0, 1, 2, 6])
def test_update_steps_equal_prefill(prompt_len):
    weight, bias, g = _random_conv(4, seed=4)
    batch, decode_steps = 3, 5
    x = torch.randn(batch, prompt_len + decode_steps, CHANNELS, generator=g)

    states, decoded = [], []
    for b in range(batch):
        _, state = causal_conv1d_ref(x[b, :prompt_len], weight, bias)
        states.append(state)
    conv_state = torch.stack(states)
    for t in range(prompt_len, prompt_len + decode_steps):
        before = conv_state.clone()
        y_t, new_state = causal_conv1d_update_ref(x[:, t], conv_state, weight, bias)
        assert torch.equal(conv_state, before)  # functional: the input state is untouched
        decoded.append(y_t)
        conv_state = new_state

    for b in range(batch):
        y_full, state_full = causal_conv1d_ref(x[b], weight, bias)
        decoded_b = torch.stack([y_t[b] for y_t in decoded])
        # Same windows, same product-and-sum order as prefill: bit-exact in practice; 1e-7 of slack.
        torch.testing.assert_close(decoded_b, y_full[prompt_len:], rtol=1e-7, atol=1e-7)
        assert torch.equal(conv_state[b], state_full)


def test_dtypes_follow_inputs():
    weight, bias, g = _random_conv(4, seed=5)
    x = torch.randn(6, CHANNELS, generator=g).to(torch.bfloat16)
    y, state = causal_conv1d_ref(x, weight, bias)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    y_t, new_state = causal_conv1d_update_ref(x[:2], state[None].expand(2, -1, -1).float(), weight, bias)
    assert y_t.dtype == torch.bfloat16 and new_state.dtype == torch.float32


def test_unknown_activation_raises():
    weight, bias, g = _random_conv(4)
    with pytest.raises(ValueError, match="gelu"):
        causal_conv1d_ref(torch.zeros(2, CHANNELS), weight, bias, activation="gelu")
