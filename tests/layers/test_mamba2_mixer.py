"""QuambaMixer2 outside an engine: parameters, loading checks, state dtypes, and the batch logic
of conv_ssm_forward (decodes first, then prefills, chunked-prefill continuation) against direct
calls of the kernels' references."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch

pytest.importorskip("vllm")

from safetensors.torch import load_file  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (  # noqa: E402
    CompressedTensorsW8A8Int8,
)

import vllm_quamba.layers.mamba2_mixer as mixer_mod  # noqa: E402
import vllm_quamba.layers.checkpoint_tensors as batch_mod  # noqa: E402  (where the mixers read the forward context)
from vllm_quamba.config import QuambaConfig  # noqa: E402
from vllm_quamba.format import QuambaFormatError, mamba2_mixer_tensors, mixer_prefix  # noqa: E402
from vllm_quamba.kernels.hadamard import hadamard_transform_ref  # noqa: E402
from vllm_quamba.kernels.quamba2_ssm import quamba2_ssm_decode_ref, quamba2_ssm_prefill_ref  # noqa: E402
from vllm_quamba.layers.checkpoint_tensors import vllm_relative_name  # noqa: E402
from vllm_quamba.layers.mamba2_mixer import QuambaMixer2  # noqa: E402

from tests.tiny_models import TINY_MAMBA2  # noqa: E402

PREFIX = "backbone.layers.0.mixer"


@pytest.fixture(scope="module", autouse=True)
def single_rank_vllm(tmp_path_factory):
    """vLLM's tensor-parallel group of size 1, which the linear layers need to be built."""
    from vllm.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized():
        yield
        return
    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"file://{tmp_path_factory.mktemp('dist')}/init",
        )
        ps.initialize_model_parallel(1, 1)
    yield
    ps.destroy_model_parallel()
    ps.destroy_distributed_environment()


@pytest.fixture(scope="module")
def checkpoint(quamba_ckpt):
    cfg = json.loads((quamba_ckpt / "config.json").read_text())
    return cfg, load_file(str(quamba_ckpt / "model.safetensors"))


def build_mixer(quant_cfg: dict | None, prefix: str = PREFIX, model: dict = TINY_MAMBA2) -> QuambaMixer2:
    """The mixer of ``model`` (a Mamba2 config's shape keys) under the quantization config."""
    qc = QuambaConfig.from_config(copy.deepcopy(quant_cfg)) if quant_cfg is not None else None
    t = model
    with set_current_vllm_config(VllmConfig()):  # a fresh layer-name registry per mixer
        return QuambaMixer2(
            hidden_size=t["hidden_size"], ssm_state_size=t["state_size"], conv_kernel_size=t["conv_kernel"],
            intermediate_size=t["expand"] * t["hidden_size"], use_conv_bias=True, use_bias=False,
            n_groups=t["n_groups"], num_heads=t["num_heads"], head_dim=t["head_dim"],
            quant_config=qc, prefix=prefix,
        )


def load_ssm_tensors(mixer: QuambaMixer2, tensors: dict, layer: int = 0) -> None:
    prefix = mixer_prefix(layer)
    for rel in mixer._ssm_tensor_specs:
        param = mixer.ssm_tensor(rel)
        param.weight_loader(param, tensors[prefix + rel])


@pytest.fixture(scope="module")
def loaded_mixer(checkpoint):
    cfg, tensors = checkpoint
    mixer = build_mixer(cfg["quantization_config"])
    load_ssm_tensors(mixer, tensors)
    mixer.process_weights_after_loading(torch.float32)
    return mixer


def test_parameters_follow_the_format_table(checkpoint):
    cfg, _ = checkpoint
    mixer = build_mixer(cfg["quantization_config"])
    params = {name: (tuple(p.shape), p.dtype) for name, p in mixer.named_parameters()}
    expected = {vllm_relative_name(rel): spec for rel, spec in mamba2_mixer_tensors(mixer.shapes).items()}
    assert params == expected
    # in_proj/out_proj are compressed-tensors' static W8A8 int8 scheme, channel-wise weights
    for linear in (mixer.in_proj, mixer.out_proj):
        assert isinstance(linear.scheme, CompressedTensorsW8A8Int8)
        assert linear.scheme.is_static_input_scheme and linear.scheme.input_symmetric


def test_state_cache_is_int8_with_stock_shapes(checkpoint):
    mixer = build_mixer(checkpoint[0]["quantization_config"])
    s = mixer.shapes
    assert mixer.get_state_dtype() == (torch.int8, torch.int8)
    assert tuple(mixer.get_state_shape()) == (
        (s.conv_kernel - 1, s.conv_dim), (s.num_heads, s.head_dim, s.state_size)
    )


def test_mixer_linear_without_w8a8_scheme_is_rejected(checkpoint):
    cfg = copy.deepcopy(checkpoint[0]["quantization_config"])
    cfg["config_groups"]["group_0"]["targets"] = [r"re:.*mixer\.out_proj$"]
    with pytest.raises(QuambaFormatError, match="'backbone.layers.0.mixer.in_proj'"):
        build_mixer(cfg)


def test_tensor_parallel_is_rejected(checkpoint, monkeypatch):
    monkeypatch.setattr(mixer_mod, "get_tensor_model_parallel_world_size", lambda: 2)
    with pytest.raises(NotImplementedError, match="tensor_parallel_size=1"):
        build_mixer(checkpoint[0]["quantization_config"])


def test_loader_names_a_wrong_shape(checkpoint):
    cfg, tensors = checkpoint
    mixer = build_mixer(cfg["quantization_config"])
    param = mixer.ssm_tensor("x_scales")
    with pytest.raises(QuambaFormatError, match="'backbone.layers.0.mixer.x_scales' has shape"):
        param.weight_loader(param, tensors[mixer_prefix(0) + "x_scales"][..., :-1])
    param = mixer.ssm_tensor("A_log")  # loaded under vLLM's name "A"; errors use the checkpoint's
    with pytest.raises(QuambaFormatError, match="'backbone.layers.0.mixer.A_log' has dtype"):
        param.weight_loader(param, tensors[mixer_prefix(0) + "A_log"].float())


@pytest.mark.parametrize(
    "name, corrupt, message",
    [
        ("D_scale", lambda t: t.fill_(float("nan")), "'backbone.layers.0.mixer.D_scale' contains NaN"),
        ("x_dim_group_range", lambda t: t.mul_(2), "'backbone.layers.0.mixer.x_dim_group_range' is not"),
    ],
)
def test_post_load_check_names_a_bad_value(checkpoint, name, corrupt, message):
    cfg, tensors = checkpoint
    mixer = build_mixer(cfg["quantization_config"])
    load_ssm_tensors(mixer, tensors)
    corrupt(mixer.ssm_tensor(name).data)
    with pytest.raises(QuambaFormatError, match=message):
        mixer.process_weights_after_loading(torch.float32)


def _metadata(decode_slots, prefills):
    """Mamba2 metadata as vLLM builds it: decodes first; prefills as (slot, length, has_initial)."""
    lengths = [n for _, n, _ in prefills]
    return types.SimpleNamespace(
        num_decodes=len(decode_slots), num_decode_tokens=len(decode_slots),
        num_prefills=len(prefills), num_prefill_tokens=sum(lengths),
        state_indices_tensor_d=torch.tensor(decode_slots, dtype=torch.int32).reshape(-1, 1),
        state_indices_tensor_p=torch.tensor([s for s, _, _ in prefills], dtype=torch.int32),
        query_start_loc_p=torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32),
        has_initial_states_p=torch.tensor([h for _, _, h in prefills]),
    )


def _random_int8(shape, gen):
    return torch.randint(-60, 61, shape, generator=gen, dtype=torch.int32).to(torch.int8)


def _assert_output_matches(output, y):
    """On the CPU, conv_ssm_forward runs the numba kernels, which end with the online Hadamard
    transform (forward skips it) and sum in another fp32 order than the references: 1e-5
    (tests/kernels/test_quamba2_ssm_cpu.py states the kernels' tolerances)."""
    torch.testing.assert_close(output, hadamard_transform_ref(y), rtol=1e-5, atol=1e-5)


def _assert_ssm_state_matches(state, expected):
    """int8 states: one step apart at most, where the reference sits on a rounding tie."""
    assert (state.int() - expected.int()).abs().max() <= 1


def test_conv_ssm_forward_mixed_batch_matches_references(loaded_mixer, monkeypatch):
    mixer, p = loaded_mixer, loaded_mixer.ssm_params
    s = mixer.shapes
    gen = torch.Generator().manual_seed(0)
    slots = 6
    conv_cache = _random_int8((slots, s.conv_kernel - 1, s.conv_dim), gen)
    ssm_cache = _random_int8((slots, s.num_heads, s.head_dim, s.state_size), gen)
    before = (conv_cache.clone(), ssm_cache.clone())
    mixer.kv_cache = (conv_cache, ssm_cache)

    decode_slots = [4, 1]
    prefills = [(0, 5, False), (2, 7, True), (5, 1, False)]  # fresh, continued chunk, 1-token prompt
    meta = _metadata(decode_slots, prefills)
    n_tokens = len(decode_slots) + sum(n for _, n, _ in prefills)
    padded = n_tokens + 3  # trailing padding rows must come back as zeros
    projected = torch.randn(padded, s.in_proj_dim, generator=gen) * 2.0
    output = torch.full((padded, s.intermediate_size), 7.0)
    monkeypatch.setattr(
        batch_mod, "get_forward_context",
        lambda: types.SimpleNamespace(attn_metadata={PREFIX: meta}),
    )
    mixer.conv_ssm_forward(projected, output)

    nd = len(decode_slots)
    y, conv, ssm = quamba2_ssm_decode_ref(
        projected[:nd], p, before[0][decode_slots], before[1][decode_slots]
    )
    _assert_output_matches(output[:nd], y)
    torch.testing.assert_close(conv_cache[decode_slots], conv, rtol=0, atol=0)
    _assert_ssm_state_matches(ssm_cache[decode_slots], ssm)
    start = nd
    for slot, length, has_initial in prefills:
        init = (before[0][slot], before[1][slot]) if has_initial else (None, None)
        y, conv, ssm = quamba2_ssm_prefill_ref(projected[start:start + length], p, *init)
        _assert_output_matches(output[start:start + length], y)
        torch.testing.assert_close(conv_cache[slot], conv, rtol=0, atol=0)
        _assert_ssm_state_matches(ssm_cache[slot], ssm)
        start += length
    assert torch.equal(output[n_tokens:], torch.zeros_like(output[n_tokens:]))
    untouched = [3]
    assert torch.equal(conv_cache[untouched], before[0][untouched])
    assert torch.equal(ssm_cache[untouched], before[1][untouched])


def test_continued_prefill_equals_one_long_prefill(loaded_mixer, monkeypatch):
    """Chunked prefill: two chunks through the cache give the states of one 12-token prefill."""
    mixer, p = loaded_mixer, loaded_mixer.ssm_params
    s = mixer.shapes
    gen = torch.Generator().manual_seed(1)
    mixer.kv_cache = (
        torch.zeros(2, s.conv_kernel - 1, s.conv_dim, dtype=torch.int8),
        torch.zeros(2, s.num_heads, s.head_dim, s.state_size, dtype=torch.int8),
    )
    projected = torch.randn(12, s.in_proj_dim, generator=gen) * 2.0
    out = torch.empty(12, s.intermediate_size)
    for lo, hi, has_initial in ((0, 5, False), (5, 12, True)):
        meta = _metadata([], [(1, hi - lo, has_initial)])
        monkeypatch.setattr(
            batch_mod, "get_forward_context",
            lambda meta=meta: types.SimpleNamespace(attn_metadata={PREFIX: meta}),
        )
        mixer.conv_ssm_forward(projected[lo:hi], out[lo:hi])
    _, conv_once, _ = quamba2_ssm_prefill_ref(projected, p, None, None)
    # the conv state holds the last K-1 int8 inputs, whatever the chunking
    assert torch.equal(mixer.kv_cache[0][1], conv_once)
    y_first, _, _ = quamba2_ssm_prefill_ref(projected[:5], p, None, None)
    _assert_output_matches(out[:5], y_first)


def test_profile_run_without_metadata_writes_zeros(loaded_mixer, monkeypatch):
    s = loaded_mixer.shapes
    monkeypatch.setattr(batch_mod, "get_forward_context", lambda: types.SimpleNamespace(attn_metadata=None))
    out = torch.full((4, s.intermediate_size), 3.0)
    loaded_mixer.conv_ssm_forward(torch.randn(4, s.in_proj_dim), out)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.fixture(scope="module")
def w4a16_mixer(quantized_tiny_w4a16):
    """A W4A16 mixer (stock fp SSM parameters, here random: the step's math is what is tested)."""
    cfg = json.loads((quantized_tiny_w4a16 / "config.json").read_text())
    mixer = build_mixer(cfg["quantization_config"], model=cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in (mixer.conv1d.weight, mixer.conv1d.bias, mixer.D, mixer.dt_bias, mixer.norm.weight):
            param.copy_(torch.randn(param.shape, generator=gen))
        mixer.A.copy_(-4 * torch.rand(mixer.A.shape, generator=gen))
    mixer.process_weights_after_loading(torch.float32)
    return mixer


def test_w4a16_decode_step_is_the_reference_with_rotation(w4a16_mixer, monkeypatch):
    """A decode-only step on the CPU is one call of the fp SSM decode (C where the CPU has
    AVX-512, else vLLM's ops and the norm and Hadamard after them): its output is out_proj's
    input, the gated norm already rotated; states updated in their slots, others untouched.
    Tolerances of tests/kernels/test_mamba2_ssm.py."""
    from tests.kernels.test_mamba2_ssm import ATOL, RTOL, assert_fp16_states_close
    from vllm_quamba.kernels.mamba2_ssm import mamba2_ssm_decode_ref
    from vllm_quamba.layers.checkpoint_tensors import is_conv_state_dim_first

    if not mixer_mod.simd_decode_runs(torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.float16)):
        pytest.skip("no AVX-512: decodes take vLLM's ops, which need the full vLLM metadata (engine tests)")
    mixer, s = w4a16_mixer, w4a16_mixer.shapes
    gen = torch.Generator().manual_seed(4)
    conv = torch.randn(5, s.conv_kernel - 1, s.conv_dim, generator=gen)
    ssm = torch.randn(5, s.num_heads, s.head_dim, s.state_size, generator=gen).to(torch.float16)
    before = (conv.clone(), ssm.clone())
    # vLLM's own layout of the conv cache, which batch_state_caches views as (K-1, dim)
    mixer.kv_cache = (conv.transpose(1, 2) if is_conv_state_dim_first() else conv, ssm)
    decode_slots = [3, 0]
    meta = _metadata(decode_slots, [])
    projected = torch.randn(3, s.in_proj_dim, generator=gen)  # one padding row
    output = torch.full((3, s.intermediate_size), 7.0)
    monkeypatch.setattr(batch_mod, "get_forward_context", lambda: types.SimpleNamespace(attn_metadata={PREFIX: meta}))
    mixer.conv_ssm_forward(projected, output)

    assert mixer.online_hadamard
    want, conv_want, ssm_want = mamba2_ssm_decode_ref(
        projected[:2], mixer.ssm_params, before[0][decode_slots], before[1][decode_slots], rotate_output=True
    )
    torch.testing.assert_close(output[:2], want, rtol=RTOL, atol=ATOL)
    assert torch.equal(output[2], torch.zeros_like(output[2]))
    assert torch.equal(conv[decode_slots], conv_want)
    assert_fp16_states_close(ssm[decode_slots], ssm_want)
    assert torch.equal(ssm[[1, 2, 4]], before[1][[1, 2, 4]])
