"""Plain-torch forwards of a Mamba2 checkpoint: fp, observed (calibration) and W8A8 simulated.

``Mamba2Reference`` runs the fp model from transformers-named tensors; an observer callback
sees every activation the W8A8 recipe quantizes, which is how calibration gathers statistics.
``QuantizedMamba2Reference`` runs a written quamba W8A8 checkpoint with exactly the runtime's
numerics: int8 GEMMs with static input scales, the shared SSM path of
``kernels.quamba2_ssm`` and int8 decode states. It is the reference the vLLM plugin is tested
against, token by token (prefill, then one decode step per generated token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..format import Mamba2Shapes, mamba2_ssm_params, mixer_prefix
from ..kernels.causal_conv1d import causal_conv1d_ref
from ..kernels.gated_rmsnorm import gated_rmsnorm_ref
from ..kernels.hadamard import hadamard_transform_ref
from ..kernels.quamba2_ssm import quamba2_ssm_decode_ref, quamba2_ssm_prefill_ref
from ..kernels.quant import quantize_int8
from ..kernels.ssd_chunk_scan import ssd_chunk_scan_ref

# observer(layer, point, tensor): points are "in_proj_input", "z", "x_in", "B_in", "C_in",
# "dt" (in_proj outputs), "x", "B", "C" (conv outputs), "ssm_state" and "out_proj_input".
Observer = Callable[[int, str, torch.Tensor], None]


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


class _Mamba2Backbone:
    """Embedding, residual blocks, final norm and lm_head around a per-layer mixer."""

    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
        self.config = config
        self.shapes = Mamba2Shapes.from_config(config)
        self.eps = config.get("layer_norm_epsilon", 1e-5)
        self.chunk_size = config.get("chunk_size", 256)
        self.tensors = tensors

    def layer_tensor(self, layer: int, name: str) -> torch.Tensor:
        return self.tensors[mixer_prefix(layer) + name]

    def _run(self, ids: torch.Tensor, mixer: Callable[[int, torch.Tensor], torch.Tensor]):
        h = F.embedding(ids, self.tensors["backbone.embeddings.weight"])
        for layer in range(self.shapes.num_layers):
            norm_w = self.tensors[f"backbone.layers.{layer}.norm.weight"]
            h = h + mixer(layer, rms_norm(h, norm_w, self.eps))
        h = rms_norm(h, self.tensors["backbone.norm_f.weight"], self.eps)
        return h @ self.tensors["lm_head.weight"].t()


class Mamba2Reference(_Mamba2Backbone):
    """fp32 forward of one sequence; ``online_hadamard`` rotates out_proj's input at runtime."""

    def __init__(self, config, tensors, online_hadamard: bool = False, observer: Observer | None = None):
        super().__init__(config, tensors)
        self.online_hadamard = online_hadamard
        self.observer = observer or (lambda layer, point, t: None)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> logits [T, vocab]."""
        return self._run(ids, self._mixer)

    def _mixer(self, layer: int, u: torch.Tensor) -> torch.Tensor:
        s, see = self.shapes, self.observer
        see(layer, "in_proj_input", u)
        zxbcdt = u @ self.layer_tensor(layer, "in_proj.weight").t()
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
        return y @ self.layer_tensor(layer, "out_proj.weight").t()


def int8_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """W8A8 linear: static per-tensor int8 input, int8 weight with per-channel scales."""
    input_scale = tensors[prefix + "input_scale"]
    x_q = quantize_int8(x, input_scale)
    acc = x_q.float() @ tensors[prefix + "weight"].float().t()
    return acc * (input_scale * tensors[prefix + "weight_scale"].t())


class QuantizedMamba2Reference(_Mamba2Backbone):
    """The simulated W8A8 forward of a quamba checkpoint: the runtime's numerics spec."""

    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
        super().__init__(config, tensors)
        self.ssm = [
            mamba2_ssm_params(self._mixer_tensors(i), self.shapes, self.eps, self.chunk_size)
            for i in range(self.shapes.num_layers)
        ]

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> "QuantizedMamba2Reference":
        import json

        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        return cls(config, load_file(directory / "model.safetensors"))

    def _mixer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = mixer_prefix(layer)
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def _out_proj(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        return int8_linear(hadamard_transform_ref(y), self.tensors, mixer_prefix(layer) + "out_proj.")

    def _in_proj(self, layer: int, u: torch.Tensor) -> torch.Tensor:
        return int8_linear(u, self.tensors, mixer_prefix(layer) + "in_proj.")

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, states: list | None = None):
        """ids [T] -> (logits [T, vocab], per-layer int8 (conv_state, ssm_state))."""
        states = list(states) if states is not None else [(None, None)] * self.shapes.num_layers

        def mixer(layer, u):
            y, conv, ssm = quamba2_ssm_prefill_ref(self._in_proj(layer, u), self.ssm[layer], *states[layer])
            states[layer] = (conv, ssm)
            return self._out_proj(layer, y)

        return self._run(ids, mixer), states

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, states: list):
        """One token per sequence: ids [B] -> (logits [B, vocab], new states)."""
        states = list(states)

        def mixer(layer, u):
            y, conv, ssm = quamba2_ssm_decode_ref(self._in_proj(layer, u), self.ssm[layer], *states[layer])
            states[layer] = (conv, ssm)
            return self._out_proj(layer, y)

        return self._run(ids, mixer), states

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
