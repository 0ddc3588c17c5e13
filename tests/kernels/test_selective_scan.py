"""Mamba1 selective scan: the reference against transformers' MambaMixer, the CPU path against the reference.

The mixer is composed from our kernels as in_proj -> split (x, gate) -> causal conv (silu) ->
x_proj -> split (dt_low, B, C) -> dt_proj (weight only; its bias goes in as delta_bias, softplus on)
-> selective scan (D, z = gate) -> out_proj.

transformers (5.19) conventions matched here:
- on CPU without mamba_ssm / causal_conv1d its MambaMixer runs the torch paths of
  `mamba_selective_scan` (a token loop from a zero state: it has no initial-state input) and
  `mamba_selective_state_update` for decode;
- its cache (a DynamicCache) keeps per layer `conv_states[0]` as [batch, intermediate, conv_kernel],
  the latest K inputs channels first (one more column than our [K-1, C] state), and
  `recurrent_states[0]` as [batch, intermediate, state_size].
"""


import numba
import pytest
import torch
import torch.nn.functional as F

from tests.kernels.transformers_oracle import MixerRecorder, use_torch_paths
from vllm_quamba.kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from vllm_quamba.kernels.selective_scan import (
    mamba1_state_update_ref,
    selective_scan_ref,
    selective_scan_varlen_cpu,
)

transformers = pytest.importorskip("transformers")
modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")

torch.set_num_threads(1)
numba.set_num_threads(1)

HIDDEN, STATE_SIZE, EXPAND, KERNEL, DT_RANK, VOCAB = 64, 8, 2, 4, 4, 100
# Both sides run fp32 but sum in different orders: F.conv1d vs our window sums, the 64/128-term
# projections, and the 8-term state . C dot. Each stage contributes ~1e-6 relative on O(1) values and
# the scan carries it over up to 70 tokens, so the expected gap is ~1e-5: 1e-4 abs/rel leaves margin
# without hiding a wrong term (a missing D, gate or bias term moves outputs by O(0.1)).
MIXER_TOL = dict(rtol=1e-4, atol=1e-4)
# The CPU path runs the reference's operations in the same order per state entry; only libm's expf /
# log1p vs torch's and the order of the N-term state . C sum differ: a few ulps of O(10) values.
SCAN_TOL = dict(rtol=1e-5, atol=1e-5)

_TORCH_PATHS = ("causal_conv1d_fn", "causal_conv1d_update", "mamba_selective_scan", "mamba_selective_state_update")


@pytest.fixture(autouse=True)
def _transformers_torch_paths(monkeypatch):
    use_torch_paths(monkeypatch, modeling_mamba, _TORCH_PATHS)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(4321)
    config = transformers.MambaConfig(
        hidden_size=HIDDEN,
        state_size=STATE_SIZE,
        expand=EXPAND,
        conv_kernel=KERNEL,
        time_step_rank=DT_RANK,
        num_hidden_layers=1,
        vocab_size=VOCAB,
        use_mambapy=False,
        use_associative_scan=False,
    )
    model = transformers.MambaForCausalLM(config).eval()
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        # The default init leaves D = 1, conv bias = 0 and A[d, n] = -(n + 1) for every channel;
        # randomize them (and the dt bias) so every term of the mixer shows up in the comparison.
        mixer.A_log.uniform_(-1.0, 1.5)
        mixer.D.normal_()
        mixer.conv1d.bias.normal_(std=0.2)
        mixer.dt_proj.bias.uniform_(-2.5, 0.5)
    return model


def _mixer(model):
    return model.backbone.layers[0].mixer


def _ssm_inputs(mixer, x):
    """Post-conv x[T, Dm] -> (delta[T, Dm] without bias, B[T, N], C[T, N])."""
    dt_low, B, C = F.linear(x, mixer.x_proj.weight).split([DT_RANK, STATE_SIZE, STATE_SIZE], dim=-1)
    return F.linear(dt_low, mixer.dt_proj.weight), B, C


@torch.no_grad()
def mixer_prefill_ref(mixer, hidden, conv_state=None, ssm_state=None):
    """hidden[T, hidden] -> (out[T, hidden], conv_state[K-1, Dm], ssm_state[Dm, N])."""
    x, gate = F.linear(hidden, mixer.in_proj.weight, mixer.in_proj.bias).chunk(2, dim=-1)
    x, conv_state = causal_conv1d_ref(x, mixer.conv1d.weight[:, 0, :], mixer.conv1d.bias, conv_state, "silu")
    delta, B, C = _ssm_inputs(mixer, x)
    A = -torch.exp(mixer.A_log.float())
    y, ssm_state = selective_scan_ref(
        x, delta, A, B, C, D=mixer.D, z=gate, delta_bias=mixer.dt_proj.bias, delta_softplus=True,
        initial_state=ssm_state,
    )  # fmt: skip
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias), conv_state, ssm_state


@torch.no_grad()
def mixer_decode_ref(mixer, hidden, conv_state, ssm_state):
    """hidden[B, hidden], conv_state[B, K-1, Dm], ssm_state[B, Dm, N] -> (out[B, hidden], states)."""
    x, gate = F.linear(hidden, mixer.in_proj.weight, mixer.in_proj.bias).chunk(2, dim=-1)
    x, conv_state = causal_conv1d_update_ref(x, conv_state, mixer.conv1d.weight[:, 0, :], mixer.conv1d.bias)
    delta, B, C = _ssm_inputs(mixer, x)
    A = -torch.exp(mixer.A_log.float())
    y, ssm_state = mamba1_state_update_ref(ssm_state, x, delta, A, B, C, mixer.D, gate, mixer.dt_proj.bias)
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias), conv_state, ssm_state


@torch.no_grad()
def _hf_prefill(model, prompt):
    """Run the model on prompt[1, T]: (mixer input[T, hidden], output[T, hidden], cache)."""
    recorder = MixerRecorder(_mixer(model))
    try:
        cache = model(prompt, use_cache=True).cache_params
    finally:
        recorder.remove()
    return recorder.inputs[0], recorder.output[0], cache


@pytest.mark.parametrize("seq_len", [1, 5, 33, 70])
def test_mixer_prefill_output(model, seq_len):
    mixer = _mixer(model)
    hidden = torch.randn(1, seq_len, HIDDEN, generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        expected = mixer(hidden)
    out, _, _ = mixer_prefill_ref(mixer, hidden[0])
    torch.testing.assert_close(out, expected[0], **MIXER_TOL)


@pytest.mark.parametrize("prompt_len", [1, 2, 5, 33, 70])
def test_cached_states_and_decode_step(model, prompt_len):
    mixer = _mixer(model)
    g = torch.Generator().manual_seed(100 + prompt_len)
    prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=g)
    next_token = torch.randint(0, VOCAB, (1, 1), generator=g)
    hidden, expected, cache = _hf_prefill(model, prompt)
    layer_cache = cache.layers[0]
    hf_conv = layer_cache.conv_states[0].clone()
    hf_ssm = layer_cache.recurrent_states[0].clone()
    assert hf_conv.shape == (1, mixer.intermediate_size, KERNEL)
    assert hf_ssm.shape == (1, mixer.intermediate_size, STATE_SIZE)

    out, conv_state, ssm_state = mixer_prefill_ref(mixer, hidden)
    torch.testing.assert_close(out, expected, **MIXER_TOL)
    torch.testing.assert_close(conv_state, hf_conv[0, :, 1:].T, **MIXER_TOL)
    torch.testing.assert_close(ssm_state, hf_ssm[0], **MIXER_TOL)

    recorder = MixerRecorder(mixer)
    try:
        with torch.no_grad():
            model(next_token, cache_params=cache, use_cache=True)
    finally:
        recorder.remove()
    step_out, step_conv, step_ssm = mixer_decode_ref(mixer, recorder.inputs[:, 0], conv_state[None], ssm_state[None])
    torch.testing.assert_close(step_out, recorder.output[:, 0], **MIXER_TOL)
    torch.testing.assert_close(step_conv, layer_cache.conv_states[0][:, :, 1:].transpose(1, 2), **MIXER_TOL)
    torch.testing.assert_close(step_ssm, layer_cache.recurrent_states[0], **MIXER_TOL)


@pytest.mark.parametrize("split", [1, 3, 33, 69])
def test_split_prefill_continues_from_states(model, split):
    # transformers' scan has no initial-state input: it runs the whole 70 tokens at once. Our two
    # calls, the second started from the first's conv and ssm states, must reproduce it.
    mixer = _mixer(model)
    prompt = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(7))
    hidden, expected, cache = _hf_prefill(model, prompt)
    first, conv_state, ssm_state = mixer_prefill_ref(mixer, hidden[:split])
    second, conv_state, ssm_state = mixer_prefill_ref(mixer, hidden[split:], conv_state, ssm_state)
    torch.testing.assert_close(torch.cat([first, second]), expected, **MIXER_TOL)
    torch.testing.assert_close(conv_state, cache.layers[0].conv_states[0][0, :, 1:].T, **MIXER_TOL)
    torch.testing.assert_close(ssm_state, cache.layers[0].recurrent_states[0][0], **MIXER_TOL)


# ---- CPU varlen path vs the reference -------------------------------------------------------------

CHANNELS = 24


def _scan_problem(total_tokens: int, num_seqs: int, seed: int, state_size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(total_tokens, CHANNELS, generator=g),
        delta=torch.randn(total_tokens, CHANNELS, generator=g) * 0.5,
        A=-torch.rand(CHANNELS, state_size, generator=g) * 4 - 0.05,
        B=torch.randn(total_tokens, state_size, generator=g),
        C=torch.randn(total_tokens, state_size, generator=g),
        D=torch.randn(CHANNELS, generator=g),
        z=torch.randn(total_tokens, CHANNELS, generator=g),
        # softplus(delta + bias) spans roughly 0.05 .. 2: from slow to fast decay.
        delta_bias=torch.rand(CHANNELS, generator=g) * 3 - 2.5,
        initial_states=torch.randn(num_seqs, CHANNELS, state_size, generator=g),
    )


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _ref_per_sequence(p, cu_seqlens, has_initial_state, delta_softplus, use_z=True, use_D=True, use_bias=True):
    ys, finals = [], []
    for s in range(cu_seqlens.shape[0] - 1):
        rows = slice(int(cu_seqlens[s]), int(cu_seqlens[s + 1]))
        y, final = selective_scan_ref(
            p["u"][rows], p["delta"][rows], p["A"], p["B"][rows], p["C"][rows],
            D=p["D"] if use_D else None, z=p["z"][rows] if use_z else None,
            delta_bias=p["delta_bias"] if use_bias else None, delta_softplus=delta_softplus,
            initial_state=p["initial_states"][s] if has_initial_state is not None and has_initial_state[s] else None,
        )  # fmt: skip
        ys.append(y)
        finals.append(final)
    return torch.cat(ys), torch.stack(finals)


def _cpu(p, cu_seqlens, has_initial_state, delta_softplus, use_z=True, use_D=True, use_bias=True, initial_states=None):
    return selective_scan_varlen_cpu(
        p["u"], p["delta"], p["A"], p["B"], p["C"], p["D"] if use_D else None, p["z"] if use_z else None,
        p["delta_bias"] if use_bias else None, delta_softplus, cu_seqlens,
        p["initial_states"] if initial_states is None else initial_states, has_initial_state,
    )  # fmt: skip


@pytest.mark.parametrize("delta_softplus", [True, False])
@pytest.mark.parametrize("optional_terms", [True, False], ids=["with_D_z_bias", "without"])
def test_varlen_matches_reference(delta_softplus, optional_terms):
    lengths = [1, 7, 33, 2, 70, 1]
    cu_seqlens = _cu_seqlens(lengths)
    p = _scan_problem(sum(lengths), len(lengths), seed=11)
    if not delta_softplus:  # a plain dt must stay positive for a decaying state
        p["delta"], p["delta_bias"] = p["delta"].abs(), p["delta_bias"].abs()
    has_initial_state = torch.tensor([True, False, True, False, True, True])
    flags = dict(use_z=optional_terms, use_D=optional_terms, use_bias=optional_terms)
    y, finals = _cpu(p, cu_seqlens, has_initial_state, delta_softplus, **flags)
    y_ref, finals_ref = _ref_per_sequence(p, cu_seqlens, has_initial_state, delta_softplus, **flags)
    assert y.dtype == torch.float32 and finals.dtype == torch.float32
    assert finals.shape == (len(lengths), CHANNELS, 16)
    torch.testing.assert_close(y, y_ref, **SCAN_TOL)
    torch.testing.assert_close(finals, finals_ref, **SCAN_TOL)


def test_varlen_reads_initial_states_only_where_flagged():
    lengths = [5, 1, 9]
    cu_seqlens = _cu_seqlens(lengths)
    p = _scan_problem(sum(lengths), len(lengths), seed=12)
    y_zero, finals_zero = _ref_per_sequence(p, cu_seqlens, None, True)
    poisoned = torch.full_like(p["initial_states"], float("nan"))
    for has_initial_state, initial_states in [(None, None), (torch.zeros(3, dtype=torch.bool), poisoned)]:
        y, finals = selective_scan_varlen_cpu(
            p["u"], p["delta"], p["A"], p["B"], p["C"], p["D"], p["z"], p["delta_bias"], True, cu_seqlens,
            initial_states, has_initial_state,
        )  # fmt: skip
        torch.testing.assert_close(y, y_zero, **SCAN_TOL)
        torch.testing.assert_close(finals, finals_zero, **SCAN_TOL)


def test_varlen_chunked_prefill_equals_one_call():
    # Three sequences; each is cut at its own point and the second call starts from the first's states.
    lengths = [1, 40, 17]
    cuts = [0, 13, 1]
    p = _scan_problem(sum(lengths), len(lengths), seed=13)
    cu_seqlens = _cu_seqlens(lengths)
    y_whole, finals_whole = _cpu(p, cu_seqlens, torch.ones(3, dtype=torch.bool), True)

    def rows(part):
        return torch.cat([
            torch.arange(int(cu_seqlens[s]) + (0 if part == 0 else cuts[s]),
                         int(cu_seqlens[s]) + (cuts[s] if part == 0 else lengths[s]))
            for s in range(len(lengths))
        ])  # fmt: skip

    def call(part, initial_states):
        idx = rows(part)
        sub = dict(p, **{k: p[k][idx] for k in ("u", "delta", "B", "C", "z")})
        part_lengths = [cuts[s] if part == 0 else lengths[s] - cuts[s] for s in range(len(lengths))]
        return idx, _cpu(sub, _cu_seqlens(part_lengths), torch.ones(3, dtype=torch.bool), True,
                         initial_states=initial_states)  # fmt: skip

    idx0, (y0, finals0) = call(0, p["initial_states"])
    idx1, (y1, finals1) = call(1, finals0)
    y_split = torch.empty_like(y_whole)
    y_split[idx0], y_split[idx1] = y0, y1
    torch.testing.assert_close(y_split, y_whole, **SCAN_TOL)
    torch.testing.assert_close(finals1, finals_whole, **SCAN_TOL)


def test_decode_step_is_one_more_prefill_token():
    lengths = [6, 1, 21]
    p = _scan_problem(sum(lengths) + len(lengths), len(lengths), seed=14)
    with_next = _cu_seqlens([n + 1 for n in lengths])
    last = with_next[1:] - 1  # the extra token of each sequence
    prompt_rows = torch.cat([torch.arange(int(with_next[s]), int(last[s])) for s in range(len(lengths))])
    has_initial_state = torch.tensor([True, False, True])
    y_all, finals_all = _cpu(p, with_next, has_initial_state, True)

    prompt = dict(p, **{k: p[k][prompt_rows] for k in ("u", "delta", "B", "C", "z")})
    _, states = _cpu(prompt, _cu_seqlens(lengths), has_initial_state, True)
    states_before = states.clone()
    y_step, new_states = mamba1_state_update_ref(
        states, p["u"][last], p["delta"][last], p["A"], p["B"][last], p["C"][last], p["D"], p["z"][last],
        p["delta_bias"], dt_softplus=True,
    )  # fmt: skip
    assert torch.equal(states, states_before)  # functional
    torch.testing.assert_close(y_step, y_all[last], **SCAN_TOL)
    torch.testing.assert_close(new_states, finals_all, **SCAN_TOL)


def test_decode_step_equals_one_token_reference_scan():
    p = _scan_problem(3, 3, seed=15)
    y_step, new_states = mamba1_state_update_ref(
        p["initial_states"], p["u"], p["delta"], p["A"], p["B"], p["C"], p["D"], None, None, dt_softplus=False
    )
    for b in range(3):
        y_ref, state_ref = selective_scan_ref(
            p["u"][b : b + 1], p["delta"][b : b + 1], p["A"], p["B"][b : b + 1], p["C"][b : b + 1], D=p["D"],
            initial_state=p["initial_states"][b],
        )  # fmt: skip
        torch.testing.assert_close(y_step[b], y_ref[0], **SCAN_TOL)
        torch.testing.assert_close(new_states[b], state_ref, **SCAN_TOL)


def test_varlen_low_precision_inputs_come_back_in_their_dtype():
    lengths = [4, 9]
    cu_seqlens = _cu_seqlens(lengths)
    p = _scan_problem(sum(lengths), len(lengths), seed=16)
    low = dict(p, **{k: p[k].to(torch.bfloat16) for k in ("u", "delta", "B", "C", "z")})
    has_initial_state = torch.tensor([False, True])
    y, finals = _cpu(low, cu_seqlens, has_initial_state, True)
    y_ref, finals_ref = _ref_per_sequence(low, cu_seqlens, has_initial_state, True)
    assert y.dtype == torch.bfloat16 and finals.dtype == torch.float32
    # Both compute in fp32 from the same bf16 inputs; y is then rounded to bf16 (8 bits of mantissa),
    # so the fp32 gap can flip the last bf16 bit: one bf16 ulp, 2^-7 relative.
    torch.testing.assert_close(y, y_ref, rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(finals, finals_ref, **SCAN_TOL)
