"""Where a W8A8 Mamba2 decode step spends its time on the CPU, piece by piece.

    python benchmarks/profile_decode.py --model mamba2-130m --batch-sizes 1,16

Builds (or reuses, from ``--work-dir``) the random-weight checkpoint and its W8A8 quantization
with ``benchmarks/throughput.py``'s own functions, loads every layer's tensors, and times each
piece of a decode step over all layers in turn (so weights come from memory, not from a warm
cache, as in a real step): in_proj, the SSM step (the torch reference and the CPU fast path),
the online Hadamard, out_proj, and the fp32 lm_head; beside them the fp32 linears that stock
vLLM runs for the same shapes. Numbers are medians of ``--repeats`` steps with one torch/numba
thread (vLLM-CPU runs one OpenMP thread on a 2-core machine). What a piece-wise profile cannot
see (the residual norms, vLLM's scheduler, sampling) is the step time of
``benchmarks/throughput.py`` minus the sum printed here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the checkpoint cache lives there)


def _load_layers(checkpoint: Path) -> tuple[list[dict], torch.Tensor]:
    """Per layer: its SSM params and int8 linears; and the fp32 lm_head weight."""
    from safetensors.torch import load_file

    from vllm_quamba.format import Mamba2Shapes, mamba2_ssm_params

    config = json.loads((checkpoint / "config.json").read_text())
    shapes = Mamba2Shapes(
        hidden_size=config["hidden_size"],
        intermediate_size=config["expand"] * config["hidden_size"],
        n_groups=config["n_groups"],
        state_size=config["state_size"],
        num_heads=config["num_heads"],
        head_dim=config["head_dim"],
        conv_kernel=config["conv_kernel"],
        num_layers=config["num_hidden_layers"],
    )
    tensors = load_file(str(next(checkpoint.glob("*.safetensors"))))
    layers = []
    for index in range(shapes.num_layers):
        prefix = f"backbone.layers.{index}.mixer."
        mixer = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        layers.append({
            "params": mamba2_ssm_params(mixer, shapes, norm_eps=config["layer_norm_epsilon"], chunk_size=config["chunk_size"]),
            **{name: _linear(mixer, name) for name in ("in_proj", "out_proj")},
        })  # fmt: skip
    return layers, tensors["lm_head.weight"].float()


def _linear(mixer: dict, name: str) -> dict:
    weight = mixer[f"{name}.weight"]
    scale = mixer[f"{name}.weight_scale"].reshape(-1).float()
    return {
        "weight": weight.contiguous(),
        "weight_scale": scale,
        "input_scale": mixer[f"{name}.input_scale"].float(),
        "fp32_weight": (weight.float() * scale[:, None]).contiguous(),
    }


def _median_ms(step, repeats: int) -> float:
    step()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def profile_batch(layers: list[dict], lm_head: torch.Tensor, batch: int, repeats: int) -> dict[str, float]:
    """Milliseconds per decode step (all layers) of each piece at this batch size."""
    from vllm_quamba.kernels.hadamard import hadamard_transform_ref
    from vllm_quamba.kernels.int8_linear import w8a8_linear_cpu
    from vllm_quamba.kernels.quamba2_ssm import (
        quamba2_ssm_decode_cpu,
        quamba2_ssm_decode_ref,
        quamba2_ssm_decode_state_shapes,
    )

    generator = torch.Generator().manual_seed(0)
    p0 = layers[0]["params"]
    hidden = torch.randn(batch, lm_head.shape[1], generator=generator)
    zxbcdt = torch.randn(batch, layers[0]["in_proj"]["weight"].shape[0], generator=generator)
    y = torch.randn(batch, p0.intermediate_size, generator=generator)
    conv_shape, ssm_shape = quamba2_ssm_decode_state_shapes(p0)
    # One state per sequence and layer, as in vLLM's cache.
    conv = [torch.randint(-128, 128, (batch, *conv_shape), dtype=torch.int8) for _ in layers]
    ssm = [torch.randint(-128, 128, (batch, *ssm_shape), dtype=torch.int8) for _ in layers]
    slots = torch.arange(batch)

    def each_layer(piece):
        return lambda: [piece(i, layer) for i, layer in enumerate(layers)]

    def int8_linear(name, x):
        return each_layer(lambda i, l: w8a8_linear_cpu(x, l[name]["weight"], l[name]["weight_scale"], l[name]["input_scale"]))

    def fp32_linear(name, x):
        return each_layer(lambda i, l: F.linear(x, l[name]["fp32_weight"]))

    pieces = {
        "in_proj w8a8": int8_linear("in_proj", hidden),
        "ssm step ref": each_layer(lambda i, l: quamba2_ssm_decode_ref(zxbcdt, l["params"], conv[i], ssm[i])),
        "ssm step + hadamard cpu": each_layer(
            lambda i, l: quamba2_ssm_decode_cpu(zxbcdt, l["params"], conv[i], ssm[i], slots)
        ),
        "hadamard ref": each_layer(lambda i, l: hadamard_transform_ref(y)),
        "out_proj w8a8": int8_linear("out_proj", y),
        "lm_head fp32": lambda: F.linear(hidden, lm_head),
        "in_proj fp32": fp32_linear("in_proj", hidden),
        "out_proj fp32": fp32_linear("out_proj", y),
    }
    return {name: _median_ms(step, repeats) for name, step in pieces.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mamba2-130m")
    parser.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/vllm-quamba/benchmarks")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    source, key = throughput.source_checkpoint(args.model, args.work_dir, args.seed)
    checkpoint = throughput.quantized_checkpoint(source, key, "w8a8", args)
    layers, lm_head = _load_layers(checkpoint)
    print(f"{args.model} W8A8, {len(layers)} layers, ms per decode step (medians of {args.repeats})")
    results = {batch: profile_batch(layers, lm_head, batch, args.repeats) for batch in args.batch_sizes}
    print(f"{'piece':<26}" + "".join(f"{f'batch {b}':>12}" for b in args.batch_sizes))
    for name in results[args.batch_sizes[0]]:
        print(f"{name:<26}" + "".join(f"{results[b][name]:>12.2f}" for b in args.batch_sizes))


if __name__ == "__main__":
    main()
