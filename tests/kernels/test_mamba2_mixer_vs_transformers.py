"""The reference kernels, composed into the Mamba2 mixer, reproduce transformers' Mamba2Mixer.

in_proj -> split (z, xBC, dt) -> causal conv (silu) -> split (x, B, C) -> SSD scan (D, dt_bias,
softplus) -> gated RMSNorm -> out_proj, for prefill, for the cached states, and for one decode step.

transformers conventions matched here:
- its MambaRMSNormGated normalizes over the whole intermediate size whatever n_groups is, so the
  norm runs with group_size = intermediate_size (mamba_ssm and vLLM use intermediate_size // n_groups;
  the two agree only for n_groups == 1);
- its cache (a DynamicCache) keeps per layer `conv_states[0]` as [batch, conv_dim, conv_kernel]: the
  latest K inputs, channels first, one more column than our [K-1, conv_dim] state (the oldest column
  is never read again), and `recurrent_states[0]` as [batch, heads, head_dim, state_size].
"""


import pytest
import torch
import torch.nn.functional as F

from tests.kernels.transformers_oracle import MixerRecorder, use_torch_paths
from vllm_quamba.kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from vllm_quamba.kernels.gated_rmsnorm import gated_rmsnorm_ref
from vllm_quamba.kernels.selective_state_update import mamba2_state_update_ref
from vllm_quamba.kernels.ssd_chunk_scan import ssd_chunk_scan_ref

transformers = pytest.importorskip("transformers")
modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")

torch.set_num_threads(1)

HIDDEN, HEADS, HEAD_DIM, STATE_SIZE, CHUNK, KERNEL, VOCAB = 64, 8, 16, 16, 16, 4, 100
# Both sides run fp32 but sum in different orders: F.conv1d vs our window sums, transformers'
# all-chunks segment-sum einsums vs our chunk loop, and the 64/128-term in_proj/out_proj dots.
# Each stage contributes ~1e-6 relative on O(1) values and the scan compounds it over up to 70
# tokens, so the expected gap is ~1e-5: 1e-4 abs/rel leaves margin without hiding a wrong term.
MIXER_TOL = dict(rtol=1e-4, atol=1e-4)

_TORCH_PATHS = ("causal_conv1d_fn", "causal_conv1d_update", "mamba2_selective_state_update", "mamba2_chunk_scan")


@pytest.fixture(autouse=True)
def _transformers_torch_paths(monkeypatch):
    use_torch_paths(monkeypatch, modeling_mamba2, _TORCH_PATHS)


@pytest.fixture(scope="module", params=[1, 2], ids=lambda g: f"n_groups={g}")
def model(request):
    torch.manual_seed(1234 + request.param)
    config = transformers.Mamba2Config(
        hidden_size=HIDDEN,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        state_size=STATE_SIZE,
        n_groups=request.param,
        expand=2,
        chunk_size=CHUNK,
        conv_kernel=KERNEL,
        num_hidden_layers=1,
        vocab_size=VOCAB,
    )
    model = transformers.Mamba2ForCausalLM(config).eval()
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        # The default init leaves D = 1, conv bias = 0 and norm weight = 1; randomize them (and A,
        # dt_bias) so every term of the mixer shows up in the comparison.
        mixer.A_log.uniform_(-1.0, 1.0)
        mixer.dt_bias.uniform_(-2.5, 0.5)
        mixer.D.normal_()
        mixer.conv1d.bias.normal_(std=0.2)
        mixer.norm.weight.normal_(1.0, 0.3)
    return model


def _mixer(model):
    return model.backbone.layers[0].mixer


def _project(mixer, hidden):
    projected = F.linear(hidden, mixer.in_proj.weight, mixer.in_proj.bias)
    return projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)


def _split_xbc(mixer, xbc):
    groups_width = mixer.n_groups * mixer.ssm_state_size
    x, B, C = xbc.split([mixer.intermediate_size, groups_width, groups_width], dim=-1)
    grouped = (*B.shape[:-1], mixer.n_groups, mixer.ssm_state_size)
    return x.reshape(*x.shape[:-1], mixer.num_heads, mixer.head_dim), B.reshape(grouped), C.reshape(grouped)


def _norm_and_out_proj(mixer, y, gate):
    y = y.reshape(*y.shape[:-2], mixer.intermediate_size)
    # transformers' convention: one RMS over the full intermediate size (see module docstring).
    y = gated_rmsnorm_ref(y, gate, mixer.norm.weight, mixer.intermediate_size, mixer.norm.variance_epsilon)
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias)


@torch.no_grad()
def mixer_prefill_ref(mixer, hidden, conv_state=None, ssm_state=None):
    """hidden[T, hidden_size] -> (out[T, hidden_size], conv_state[K-1, conv_dim], ssm_state[H, P, N])."""
    gate, xbc, dt = _project(mixer, hidden)
    xbc, conv_state = causal_conv1d_ref(xbc, mixer.conv1d.weight[:, 0, :], mixer.conv1d.bias, conv_state, "silu")
    x, B, C = _split_xbc(mixer, xbc)
    A = -torch.exp(mixer.A_log.float())
    y, ssm_state = ssd_chunk_scan_ref(
        x, dt, A, B, C, mixer.chunk_size, D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True, initial_state=ssm_state
    )
    return _norm_and_out_proj(mixer, y, gate), conv_state, ssm_state


@torch.no_grad()
def mixer_decode_ref(mixer, hidden, conv_state, ssm_state):
    """hidden[B, hidden_size], conv_state[B, K-1, conv_dim], ssm_state[B, H, P, N] -> (out, states)."""
    gate, xbc, dt = _project(mixer, hidden)
    xbc, conv_state = causal_conv1d_update_ref(xbc, conv_state, mixer.conv1d.weight[:, 0, :], mixer.conv1d.bias)
    x, B, C = _split_xbc(mixer, xbc)
    A = -torch.exp(mixer.A_log.float())
    y, ssm_state = mamba2_state_update_ref(ssm_state, x, dt, A, B, C, mixer.D, mixer.dt_bias, dt_softplus=True)
    return _norm_and_out_proj(mixer, y, gate), conv_state, ssm_state


@pytest.mark.parametrize("seq_len", [1, 5, 33, 70])
def test_mixer_prefill_output(model, seq_len):
    mixer = _mixer(model)
    hidden = torch.randn(1, seq_len, HIDDEN, generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        expected = mixer(hidden)
    out, _, _ = mixer_prefill_ref(mixer, hidden[0])
    torch.testing.assert_close(out, expected[0], **MIXER_TOL)


def test_mixer_batch_of_mixed_lengths_left_padded(model):
    # One transformers call on a left-padded batch; its padding mask zeroes the pads, which then
    # act as a zero initial state, so each row's real tokens must match that sequence on its own.
    mixer = _mixer(model)
    lengths = [1, 5, 33, 70]
    width = max(lengths)
    hidden = torch.randn(len(lengths), width, HIDDEN, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    with torch.no_grad():
        expected = mixer(hidden, attention_mask=mask)
    for row, length in enumerate(lengths):
        out, _, _ = mixer_prefill_ref(mixer, hidden[row, width - length :])
        torch.testing.assert_close(out, expected[row, width - length :], **MIXER_TOL)


@pytest.mark.parametrize("prompt_len", [1, 2, 5, 33, 70])
def test_cached_states_and_decode_step(model, prompt_len):
    mixer = _mixer(model)
    g = torch.Generator().manual_seed(100 + prompt_len)
    prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=g)
    next_token = torch.randint(0, VOCAB, (1, 1), generator=g)
    recorder = MixerRecorder(mixer)
    try:
        with torch.no_grad():
            cache = model(prompt, use_cache=True).cache_params
        layer_cache = cache.layers[0]
        hf_conv = layer_cache.conv_states[0].clone()
        hf_ssm = layer_cache.recurrent_states[0].clone()
        assert hf_conv.shape == (1, mixer.conv_dim, KERNEL)
        assert hf_ssm.shape == (1, HEADS, HEAD_DIM, STATE_SIZE)

        out, conv_state, ssm_state = mixer_prefill_ref(mixer, recorder.inputs[0])
        torch.testing.assert_close(out, recorder.output[0], **MIXER_TOL)
        torch.testing.assert_close(conv_state, hf_conv[0, :, 1:].T, **MIXER_TOL)
        torch.testing.assert_close(ssm_state, hf_ssm[0], **MIXER_TOL)

        with torch.no_grad():
            model(next_token, cache_params=cache, use_cache=True)
        step_out, step_conv, step_ssm = mixer_decode_ref(mixer, recorder.inputs[:, 0], conv_state[None], ssm_state[None])
        torch.testing.assert_close(step_out, recorder.output[:, 0], **MIXER_TOL)
        torch.testing.assert_close(step_conv, layer_cache.conv_states[0][:, :, 1:].transpose(1, 2), **MIXER_TOL)
        torch.testing.assert_close(step_ssm, layer_cache.recurrent_states[0], **MIXER_TOL)
    finally:
        recorder.remove()
