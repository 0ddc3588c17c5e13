"""Plain-torch forwards of Mamba1/Mamba2 checkpoints: fp, observed (calibration) and simulated.

``Mamba2Reference`` / ``MambaReference`` run the fp model from transformers-named tensors; an
observer callback sees every activation the W8A8 recipe quantizes, which is how calibration
gathers statistics. ``QuantizedMamba2Reference`` / ``QuantizedMambaReference`` run a written
quamba checkpoint of any recipe with exactly the runtime's numerics, each layer at its own
precision: the linears as stored (int8 or 4-bit, static input scales), then in W8A8/W4A8 layers
the shared SSM path of ``kernels.quamba2_ssm`` / ``kernels.quamba_ssm`` with int8 decode
states, in W4A16 layers the fp SSM (Mamba2: fp16 SSM state; Mamba1: fp32 states). They are the references the vLLM plugin is tested against, token by token (prefill,
then one decode step per generated token). The embedding / residual blocks / final norm /
lm_head backbone and the prefill/decode/generate driver are shared by both architectures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..format import (
    MambaShapes,
    Mamba2Shapes,
    layer_precision,
    mamba1_ssm_params,
    mamba2_ssm_params,
    mixer_prefix,
    online_hadamard,
    quamba_section,
)
from ..kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from ..kernels.gated_rmsnorm import gated_rmsnorm_ref
from ..kernels.hadamard import hadamard_transform_ref
from ..kernels.mamba2_ssm import FP_SSM_STATE_DTYPE, Mamba2SSMParams, mamba2_ssm_decode_ref
from ..kernels.quamba2_ssm import quamba2_ssm_decode_ref, quamba2_ssm_prefill_ref
from ..kernels.quamba_ssm import (
    quamba_conv_decode_ref,
    quamba_conv_prefill_ref,
    quamba_scan_decode_ref,
    quamba_scan_prefill_ref,
)
from ..kernels.quant import dequantize_int8, quantize_int8
from ..kernels.w4_linear import w4a8_linear_ref, w4a16_linear_ref
from ..kernels.selective_scan import mamba1_state_update_ref, selective_scan_ref
from ..kernels.ssd_chunk_scan import ssd_chunk_scan_ref

# observer(layer, point, tensor): points are "in_proj_input", "z", "x_in", "B_in", "C_in",
# "dt" (in_proj outputs), "x", "B", "C" (conv outputs), "ssm_state" and "out_proj_input".
# Mamba1 points: "in_proj_input", "x", "z" (in_proj outputs), "u" (conv output = x_proj input),
# "x_proj_output", "dt" (dt_proj output, before dt_bias), "ssm_state" and "out_proj_input".
# The head's input is seen as point "lm_head_input" of layer HEAD_LAYER.
Observer = Callable[[int, str, torch.Tensor], None]
HEAD_LAYER = -1


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


class _Backbone:
    """Embedding, residual blocks, final norm and lm_head around a per-layer mixer.

    Architecture-agnostic: ``shapes`` only needs ``num_layers``.
    """

    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], shapes):
        self.config = config
        self.shapes = shapes
        self.eps = config.get("layer_norm_epsilon", 1e-5)
        self.tensors = tensors

    def layer_tensor(self, layer: int, name: str) -> torch.Tensor:
        return self.tensors[mixer_prefix(layer) + name]

    def _linear(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """A mixer linear without its bias (Mamba1's dt_proj bias is the scan's delta bias), at
        the precision the tensors hold it (``linear``)."""
        return linear(x, self.tensors, mixer_prefix(layer) + name + ".")

    def _run(self, ids: torch.Tensor, mixer: Callable[[int, torch.Tensor], torch.Tensor]):
        h = embedding(ids, self.tensors, "backbone.embeddings.")
        for layer in range(self.shapes.num_layers):
            norm_w = self.tensors[f"backbone.layers.{layer}.norm.weight"]
            h = h + mixer(layer, rms_norm(h, norm_w, self.eps))
        h = rms_norm(h, self.tensors["backbone.norm_f.weight"], self.eps)
        observer = getattr(self, "observer", None)
        if observer is not None:
            observer(HEAD_LAYER, "lm_head_input", h)
        return linear(h, self.tensors, "lm_head.")


class Mamba2Reference(_Backbone):
    """fp32 forward of one sequence; ``online_hadamard`` rotates out_proj's input at runtime."""

    def __init__(self, config, tensors, online_hadamard: bool = False, observer: Observer | None = None):
        super().__init__(config, tensors, Mamba2Shapes.from_config(config))
        self.chunk_size = config.get("chunk_size", 256)
        self.online_hadamard = online_hadamard
        self.observer = observer or (lambda layer, point, t: None)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> logits [T, vocab]."""
        return self._run(ids, self._mixer)

    def _mixer(self, layer: int, u: torch.Tensor) -> torch.Tensor:
        s, see = self.shapes, self.observer
        see(layer, "in_proj_input", u)
        zxbcdt = linear(u, self.tensors, mixer_prefix(layer) + "in_proj.")
        z, xbc, dt = torch.split(zxbcdt, [s.intermediate_size, s.conv_dim, s.num_heads], dim=-1)
        see(layer, "z", z)
        see(layer, "dt", dt)
        gs = s.n_groups * s.state_size
        for point, part in zip(("x_in", "B_in", "C_in"), torch.split(xbc, [s.intermediate_size, gs, gs], dim=-1)):
            see(layer, point, part)
        conv_w = self.layer_tensor(layer, "conv1d.weight").reshape(s.conv_dim, -1)
        xbc, _ = causal_conv1d_ref(xbc, conv_w, self.tensors.get(mixer_prefix(layer) + "conv1d.bias"))
        x, B, C = torch.split(xbc, [s.intermediate_size, gs, gs], dim=-1)
        see(layer, "x", x)
        see(layer, "B", B)
        see(layer, "C", C)
        T = u.shape[0]
        y, state = ssd_chunk_scan_ref(
            x.reshape(T, s.num_heads, s.head_dim), dt,
            -torch.exp(self.layer_tensor(layer, "A_log")),
            B.reshape(T, s.n_groups, s.state_size), C.reshape(T, s.n_groups, s.state_size),
            self.chunk_size, D=self.layer_tensor(layer, "D"),
            dt_bias=self.layer_tensor(layer, "dt_bias"), dt_softplus=True,
        )
        see(layer, "ssm_state", state)
        y = gated_rmsnorm_ref(
            y.reshape(T, -1), z, self.layer_tensor(layer, "norm.weight"),
            s.intermediate_size // s.n_groups, self.eps,
        )
        if self.online_hadamard:
            y = hadamard_transform_ref(y)
        see(layer, "out_proj_input", y)
        return linear(y, self.tensors, mixer_prefix(layer) + "out_proj.")


def embedding(ids: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The embedding rows of ``ids`` stored under ``prefix``: fp ``weight``, or per-row ints
    (``weight_packed``, 8 or 4 bits) of which only the gathered rows are unpacked."""
    if prefix + "weight_packed" not in tensors:
        return F.embedding(ids, tensors[prefix + "weight"])
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # slow import

    packed, scale, shape = (tensors[prefix + n] for n in ("weight_packed", "weight_scale", "weight_shape"))
    width = int(shape[1])
    bits = 32 * packed.shape[1] // width
    flat = ids.reshape(-1)
    rows = unpack_from_int32(packed[flat], bits, torch.Size((flat.numel(), width)))
    return (rows.float() * scale[flat].float()).reshape(*ids.shape, width)


def linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The linear stored under ``prefix``, at whatever precision the checkpoint holds it:
    fp ``weight``; W8A8 (int8 ``weight`` + ``input_scale``); W4A8 / W4A16 (``weight_packed``,
    with or without ``input_scale``)."""
    if prefix + "weight_packed" in tensors:
        packed = [tensors[prefix + n] for n in ("weight_packed", "weight_scale", "weight_shape")]
        group_size = int(packed[2][1]) // packed[1].shape[1]
        if prefix + "input_scale" in tensors:
            return w4a8_linear_ref(x, packed[0], packed[1], group_size, packed[2], tensors[prefix + "input_scale"])
        return w4a16_linear_ref(x, packed[0], packed[1], group_size, packed[2])
    if tensors[prefix + "weight"].dtype == torch.int8:
        return int8_linear(x, tensors, prefix)
    return x @ tensors[prefix + "weight"].t()


def int8_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """W8A8 linear: static per-tensor int8 input, int8 weight with per-channel scales."""
    input_scale = tensors[prefix + "input_scale"]
    x_q = quantize_int8(x, input_scale)
    acc = x_q.float() @ tensors[prefix + "weight"].float().t()
    return acc * (input_scale * tensors[prefix + "weight_scale"].t())


class _QuantizedBackbone(_Backbone):
    """Loading, per-layer state bookkeeping and greedy generation of a simulated W8A8 model.

    Subclasses give ``_mixer(layer, h, state, decode)``, returning (mixer output, new per-layer
    int8 (conv_state, ssm_state)): a prefill of one sequence, or one decode step per sequence.
    """

    @classmethod
    def from_checkpoint(cls, directory: str | Path):
        import json

        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        return cls(config, load_file(directory / "model.safetensors"))

    def _mixer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = mixer_prefix(layer)
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, states: list, decode: bool):
        states = list(states)

        def mixer(layer, h):
            out, states[layer] = self._mixer(layer, h, states[layer], decode)
            return out

        return self._run(ids, mixer), states

    def prefill(self, ids: torch.Tensor, states: list | None = None):
        """ids [T] -> (logits [T, vocab], per-layer int8 (conv_state, ssm_state))."""
        return self._forward(ids, states or [(None, None)] * self.shapes.num_layers, decode=False)

    def decode(self, ids: torch.Tensor, states: list):
        """One token per sequence: ids [B] -> (logits [B, vocab], new states)."""
        return self._forward(ids, states, decode=True)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.prefill(ids)[0]

    @torch.no_grad()
    def generate_greedy(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and the logits that chose each, prefill then one decode per token."""
        logits, states = self.prefill(torch.tensor(prompt))
        step_logits = [logits[-1]]
        tokens = [int(logits[-1].argmax())]
        states = [(c.unsqueeze(0), s.unsqueeze(0)) for c, s in states]
        while len(tokens) < max_new_tokens:
            logits, states = self.decode(torch.tensor(tokens[-1:]), states)
            step_logits.append(logits[0])
            tokens.append(int(logits[0].argmax()))
        return tokens, torch.stack(step_logits)


class QuantizedMamba2Reference(_QuantizedBackbone):
    """The simulated forward of a Mamba2 quamba checkpoint: the runtime's numerics spec.

    W8A8 and W4A8 layers run the int8 SSM path with int8 states; W4A16 layers the fp SSM of
    the stock mixer with an fp16 SSM state (fp32 conv state). The linears run at whatever precision they are stored.
    out_proj's input gets the online Hadamard unless ``quamba.hadamard`` is null (the naive
    baseline).
    """

    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
        super().__init__(config, tensors, Mamba2Shapes.from_config(config))
        self.chunk_size = config.get("chunk_size", 256)
        section = quamba_section(config["quantization_config"])
        self.online_hadamard = online_hadamard(section)
        self.ssm = [
            None
            if layer_precision(section, i) == "w4a16"
            else mamba2_ssm_params(self._mixer_tensors(i), self.shapes, self.eps, self.chunk_size)
            for i in range(self.shapes.num_layers)
        ]

    def _out_proj(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        return self._linear(layer, "out_proj", hadamard_transform_ref(y) if self.online_hadamard else y)

    def _mixer(self, layer, h, state, decode):
        zxbcdt = self._linear(layer, "in_proj", h)
        if self.ssm[layer] is None:
            y, state = self._fp_ssm(layer, zxbcdt, state, decode)
        else:
            ssm_path = quamba2_ssm_decode_ref if decode else quamba2_ssm_prefill_ref
            y, conv, ssm = ssm_path(zxbcdt, self.ssm[layer], *state)
            state = (conv, ssm)
        return self._out_proj(layer, y), state

    def _fp_ssm_params(self, layer: int) -> Mamba2SSMParams:
        s, t = self.shapes, lambda name: self.layer_tensor(layer, name)  # noqa: E731
        return Mamba2SSMParams(
            conv_weight=t("conv1d.weight").reshape(s.conv_dim, -1), conv_bias=t("conv1d.bias"),
            A=-torch.exp(t("A_log")), D=t("D"), dt_bias=t("dt_bias"), norm_weight=t("norm.weight"),
            norm_eps=self.eps, n_groups=s.n_groups, state_size=s.state_size, head_dim=s.head_dim,
        )  # fmt: skip

    def _fp_ssm(self, layer: int, zxbcdt: torch.Tensor, state, decode: bool):
        """A W4A16 layer's fp SSM: in_proj output -> gated-norm output, (fp32 conv, fp16 SSM)
        states (kernels.mamba2_ssm)."""
        p = self._fp_ssm_params(layer)
        if decode:
            y, conv_state, ssm_state = mamba2_ssm_decode_ref(zxbcdt, p, *state)
            return y, (conv_state, ssm_state)
        s = self.shapes
        gs = s.n_groups * s.state_size
        z, xbc, dt = torch.split(zxbcdt, [s.intermediate_size, s.conv_dim, s.num_heads], dim=-1)
        conv_state, ssm_state = state
        xbc, conv_state = causal_conv1d_ref(xbc, p.conv_weight, p.conv_bias, conv_state)
        x, B, C = torch.split(xbc, [s.intermediate_size, gs, gs], dim=-1)
        T = x.shape[0]
        y, ssm_state = ssd_chunk_scan_ref(
            x.reshape(T, s.num_heads, s.head_dim), dt, p.A, B.reshape(T, s.n_groups, s.state_size),
            C.reshape(T, s.n_groups, s.state_size), self.chunk_size, D=p.D, dt_bias=p.dt_bias, dt_softplus=True,
            initial_state=ssm_state,
        )  # fmt: skip
        y = gated_rmsnorm_ref(y.reshape(T, -1), z, p.norm_weight, s.intermediate_size // s.n_groups, self.eps)
        return y, (conv_state, ssm_state.to(FP_SSM_STATE_DTYPE))


class _MambaFpSSM:
    """The fp Mamba1 SSM (transformers' MambaMixer math) between in_proj and the out_proj input,
    shared by the fp reference (prefill, observed) and the W4A16 layers of the simulator
    (prefill and decode, fp32 states). The linears run at the checkpoint's precision."""

    def _optional(self, layer: int, name: str) -> torch.Tensor | None:
        return self.tensors.get(mixer_prefix(layer) + name)

    def _fp_ssm(self, layer: int, xz: torch.Tensor, state, decode: bool, see: Observer = lambda *_: None):
        """in_proj output xz -> (y, fp32 (conv_state, ssm_state)); one sequence [T, 2I] when
        prefilling (state None: a fresh one), one token per sequence [B, 2I] when decoding."""
        s, w = self.shapes, lambda name: self.layer_tensor(layer, name)  # noqa: E731
        x, z = torch.split(xz, [s.intermediate_size, s.intermediate_size], dim=-1)
        see(layer, "x", x)
        see(layer, "z", z)
        conv_state, ssm_state = state
        conv_w, conv_b = w("conv1d.weight").reshape(s.intermediate_size, -1), self._optional(layer, "conv1d.bias")
        if decode:
            u, conv_state = causal_conv1d_update_ref(x, conv_state, conv_w, conv_b, "silu")
        else:
            u, conv_state = causal_conv1d_ref(x, conv_w, conv_b, conv_state, "silu")
        see(layer, "u", u)
        x_dbl = self._linear(layer, "x_proj", u)
        see(layer, "x_proj_output", x_dbl)
        dt_low, B, C = torch.split(x_dbl, [s.time_step_rank, s.state_size, s.state_size], dim=-1)
        dt = self._linear(layer, "dt_proj", dt_low)
        see(layer, "dt", dt)
        A, D, dt_bias = -torch.exp(w("A_log")), w("D"), self._optional(layer, "dt_proj.bias")
        if decode:
            y, ssm_state = mamba1_state_update_ref(ssm_state, u, dt, A, B, C, D, z, dt_bias)
        else:
            y, ssm_state = selective_scan_ref(
                u, dt, A, B, C, D=D, z=z, delta_bias=dt_bias, delta_softplus=True, initial_state=ssm_state
            )
        see(layer, "ssm_state", ssm_state)
        return y, (conv_state, ssm_state)


class MambaReference(_MambaFpSSM, _Backbone):
    """fp32 forward of one Mamba1 sequence (transformers' MambaMixer math).

    ``online_hadamard`` rotates out_proj's input at runtime (pair it with
    ``transforms.fuse_out_proj_hadamard``); the observer sees every quantization point. Every
    linear goes through ``linear``: on a W4A16 checkpoint this is its simulated forward.
    """

    def __init__(self, config, tensors, online_hadamard: bool = False, observer: Observer | None = None):
        super().__init__(config, tensors, MambaShapes.from_config(config))
        self.online_hadamard = online_hadamard
        self.observer = observer or (lambda layer, point, t: None)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> logits [T, vocab]."""
        return self._run(ids, self._mixer)

    def _mixer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        see = self.observer
        see(layer, "in_proj_input", h)
        xz = self._linear(layer, "in_proj", h)
        if self._optional(layer, "in_proj.bias") is not None:
            xz = xz + self._optional(layer, "in_proj.bias")
        y, _ = self._fp_ssm(layer, xz, (None, None), decode=False, see=see)
        if self.online_hadamard:
            y = hadamard_transform_ref(y)
        see(layer, "out_proj_input", y)
        out = self._linear(layer, "out_proj", y)
        if self._optional(layer, "out_proj.bias") is not None:
            out = out + self._optional(layer, "out_proj.bias")
        return out


class QuantizedMambaReference(_MambaFpSSM, _QuantizedBackbone):
    """The simulated forward of a Mamba1 quamba checkpoint: the runtime's numerics spec.

    W8A8 and W4A8 layers: in_proj -> ``quamba_conv_*`` -> x_proj -> dt_proj -> ``quamba_scan_*``
    with int8 states. W4A16 layers: in_proj -> the fp SSM of the stock mixer (fp dt_proj, fp32
    states). Then [online Hadamard] -> out_proj. The linears run at the checkpoint's precision
    (``linear``: all four W8A8; W4A8 but for the W8A8 dt_proj; W4A16 but for the fp dt_proj). The
    online Hadamard is applied only when the checkpoint's ``quamba.hadamard`` is not null.
    """

    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
        super().__init__(config, tensors, MambaShapes.from_config(config))
        section = quamba_section(config["quantization_config"])
        self.online_hadamard = online_hadamard(section)
        self.ssm = [
            None if layer_precision(section, i) == "w4a16" else mamba1_ssm_params(self._mixer_tensors(i), self.shapes)
            for i in range(self.shapes.num_layers)
        ]

    def _x_proj_dt_proj(self, layer: int, u_q: torch.Tensor):
        p = self.ssm[layer]
        x_dbl = self._linear(layer, "x_proj", dequantize_int8(u_q, p.u_scale))
        dt = self._linear(layer, "dt_proj", x_dbl[..., : p.time_step_rank])
        return x_dbl, dt

    def _out_proj(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        if self.online_hadamard:
            y = hadamard_transform_ref(y)
        return self._linear(layer, "out_proj", y)

    def _mixer(self, layer, h, state, decode):
        xz = self._linear(layer, "in_proj", h)
        ssm_path = self._fp_ssm if self.ssm[layer] is None else self._int8_ssm
        y, state = ssm_path(layer, xz, state, decode)
        return self._out_proj(layer, y), state

    def _int8_ssm(self, layer: int, xz: torch.Tensor, state, decode: bool):
        """A W8A8/W4A8 layer's int8 SSM: in_proj output -> (y, int8 (conv_state, ssm_state))."""
        conv_state, ssm_state = state
        p = self.ssm[layer]
        conv_path, scan_path = (
            (quamba_conv_decode_ref, quamba_scan_decode_ref) if decode
            else (quamba_conv_prefill_ref, quamba_scan_prefill_ref)
        )
        u_q, z_q, conv = conv_path(xz, p, conv_state)
        x_dbl, dt = self._x_proj_dt_proj(layer, u_q)
        y, ssm = scan_path(u_q, z_q, x_dbl, dt, p, ssm_state)
        return y, (conv, ssm)
