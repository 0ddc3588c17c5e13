"""``vllm-quamba``: the command line of the converter."""

from __future__ import annotations

import argparse
import logging
import sys

from ..format import RECIPES
from .calibration import DEFAULT_CALIBRATION

# Kept equal to quantize.DEFAULT_PERCENTILE_ALPHA (not imported: --help must stay light).
DEFAULT_PERCENTILE_ALPHA = 0.9995


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-quamba",
        description="Quantize Mamba language models with the Quamba/Quamba2 recipes for vLLM.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser(
        "quantize",
        help="calibrate and convert a checkpoint into a quamba checkpoint",
        description=(
            "Calibrate MODEL on text, rotate, reorder and quantize it, and write a checkpoint "
            "that `vllm serve OUT` (with vllm-quamba installed) loads as quantization 'quamba'. "
            "MODEL is a local directory or a hub id, in transformers format (Mamba2ForCausalLM "
            "or MambaForCausalLM) or mamba_ssm format (config.json with d_model/n_layer/ssm_cfg + pytorch_model.bin)."
        ),
    )
    q.add_argument("model", help="source checkpoint: local directory or hub id")
    q.add_argument("--recipe", required=True, choices=RECIPES, help="quantization recipe (all four for Mamba1 and Mamba2)")
    q.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    q.add_argument(
        "--calib",
        default=DEFAULT_CALIBRATION,
        help="calibration text: 'embedded' (default, ships with the package), a .txt file "
        "(documents separated by blank lines), a .jsonl file with a 'text' field, or a dataset id (online)",
    )
    q.add_argument("--calib-samples", type=int, default=64, help="number of calibration samples (default 64)")
    q.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration sample (default 512)")
    q.add_argument("--tokenizer", help="tokenizer directory or hub id, when MODEL ships none")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--seed", type=int, default=0, help="random seed (the output is deterministic per seed)")
    head_to_toe = q.add_argument_group(
        "head to toe (Mamba2)",
        "Quantize the embedding and the lm_head too (the lm_head is stored untied). Bits follow "
        "the recipe: w8a8 -> per-row int8 embedding, W8A8 lm_head; 4-bit recipes -> per-row 4-bit "
        "embedding, GPTQ lm_head at the recipe's precision (W4A8 for w4ax).",
    )
    head_to_toe.add_argument("--quantize-embedding", action="store_true", help="quantize the token embedding")
    head_to_toe.add_argument("--quantize-lm-head", action="store_true", help="quantize the lm_head")
    mixed = q.add_argument_group(
        "W4AX (--recipe w4ax): per-layer W4A8 or W4A16, exactly one of",
    )
    mixed.add_argument(
        "--layer-precision", metavar="FILE",
        help='JSON list with one of "w4a8"/"w4a16" per decoder layer',
    )
    mixed.add_argument(
        "--auto-precision", type=float, metavar="F",
        help="keep the fraction F (0..1) of layers most hurt by 8-bit activations (measured on "
        "calibration text) at W4A16, the rest W4A8 (int8 SSM and states: faster, 4x smaller state)",
    )
    naive = q.add_argument_group(
        "naive baselines",
        "Switch off parts of the Quamba recipe to get the naive baselines of the Quamba papers: "
        "per-tensor absmax W8A8 without Hadamard rotations or percentile clipping (Mamba1: each "
        "switch alone or both; Mamba2, recipe w8a8: --no-hadamard --no-percentile together, "
        "which also drops sort-and-cluster), round-to-nearest 4-bit weights (4-bit recipes).",
    )
    naive.add_argument(
        "--no-hadamard", action="store_true",
        help="naive baseline: no residual-stream Hadamard rotation and no online Hadamard before out_proj",
    )
    naive.add_argument(
        "--no-percentile", action="store_true",
        help="naive baseline: absmax scales for the SSM input (x_proj input) and SSM state instead of percentile clipping",
    )
    naive.add_argument(
        "--percentile-alpha", type=float, default=None, metavar="A",
        help=f"percentile of |activation| that sets the SSM input and state scales, 0.5 < A <= 1 "
        f"(default {DEFAULT_PERCENTILE_ALPHA}; 1 = absmax per sample)",
    )
    naive.add_argument(
        "--rtn", action="store_true",
        help="naive 4-bit baseline (4-bit recipes): round weights to nearest instead of GPTQ",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.no_percentile and args.percentile_alpha is not None:
        parser.error("--no-percentile and --percentile-alpha exclude each other")
    if args.percentile_alpha is not None and not 0.5 < args.percentile_alpha <= 1:
        parser.error(f"--percentile-alpha must be in (0.5, 1], got {args.percentile_alpha}")
    alpha = None if args.no_percentile else (args.percentile_alpha or DEFAULT_PERCENTILE_ALPHA)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .quantize import quantize
    from .recipe_w4ax import read_layer_precision

    try:
        layer_precision = read_layer_precision(args.layer_precision) if args.layer_precision else None
        out = quantize(
            args.model, args.out, recipe=args.recipe, calib=args.calib,
            calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
            tokenizer=args.tokenizer, overwrite=args.overwrite, seed=args.seed,
            hadamard=not args.no_hadamard, percentile_alpha=alpha, gptq=not args.rtn,
            layer_precision=layer_precision, auto_precision=args.auto_precision,
            quantize_embedding=args.quantize_embedding, quantize_lm_head=args.quantize_lm_head,
        )
    except ValueError as exc:  # every input error of the converter is a ValueError subclass
        print(f"vllm-quamba: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
