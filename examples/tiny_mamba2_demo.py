"""The main job on the embedded default: quantize the bundled tiny Mamba2 with the Quamba2
W8A8 recipe, then run vLLM on the fp and the quantized model side by side.

Prints each model's generations for a few prompts, output tokens/s and held-out perplexity
(computed by vLLM itself from prompt log-probabilities). Each engine runs in its own process,
as vLLM on the CPU expects.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
PROMPTS = [
    "The Python interpreter",
    "A module is a file containing",
    "Exceptions are raised when",
    "The license grants you",
]
ENGINE_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}


def heldout_windows(tokenizer, text: str, window: int, count: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i * window:(i + 1) * window] for i in range(min(count, len(ids) // window))]


def run_engine(model_dir: str, max_tokens: int, windows: int) -> dict:
    """Runs inside a fresh process: one vLLM engine, generations, speed and perplexity."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", max_model_len=512, max_num_seqs=8, enforce_eager=True, seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, greedy)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    text = (ASSETS / "heldout.txt").read_text()
    scored = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    nll, count = 0.0, 0
    prompts = [{"prompt_token_ids": w} for w in heldout_windows(llm.get_tokenizer(), text, 256, windows)]
    for out in llm.generate(prompts, scored):
        for token, logprobs in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
            nll -= logprobs[token].logprob
            count += 1
    llm.llm_engine.engine_core.shutdown()  # a clean stop: left to exit, the engine aborts
    return {
        "generations": [o.outputs[0].text for o in outputs],
        "tokens_per_s": generated / seconds,
        "perplexity": math.exp(nll / count),
        "scored_tokens": count,
    }


def in_subprocess(model_dir: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--engine", str(model_dir), "--result", str(result),
               "--max-tokens", str(args.max_tokens), "--windows", str(args.windows)]
        done = subprocess.run(cmd, env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"engine for {model_dir} failed:\n{done.stderr[-4000:]}")
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ASSETS / "tiny-mamba2"), help="fp Mamba2 checkpoint")
    parser.add_argument("--out", default=str(ROOT / "out" / "tiny-mamba2-w8a8"), help="where the quantized checkpoint goes")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--windows", type=int, default=24, help="held-out windows of 256 tokens")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        Path(args.result).write_text(json.dumps(run_engine(args.engine, args.max_tokens, args.windows)))
        # vLLM-CPU 0.32 sometimes aborts in interpreter teardown ("terminate called without an
        # active exception") after a clean engine shutdown; the work is done and saved by now.
        os._exit(0)
    from vllm_quamba.converters.quantize import quantize

    quantized = quantize(args.model, args.out, recipe="w8a8", overwrite=True)
    results = {"fp32": in_subprocess(Path(args.model), args), "quamba w8a8": in_subprocess(quantized, args)}
    for i, prompt in enumerate(PROMPTS):
        print(f"\n>>> {prompt!r}")
        for name, result in results.items():
            print(f"  [{name:>11}] {result['generations'][i]!r}")
    print(f"\n{'model':<12} {'output tok/s':>12} {'held-out ppl':>13}")
    for name, result in results.items():
        print(f"{name:<12} {result['tokens_per_s']:>12.1f} {result['perplexity']:>13.3f}")
    fp, q = results["fp32"]["perplexity"], results["quamba w8a8"]["perplexity"]
    print(f"perplexity change: {100 * (q / fp - 1):+.2f}% over {results['fp32']['scored_tokens']} held-out tokens")


if __name__ == "__main__":
    main()
