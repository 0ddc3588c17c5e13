"""Installing the plugin changes nothing for models it does not quantize.

Each model runs twice, each time in its own engine process (tests/vllm_runner.py): once as
installed (the plugin loads through its entry point) and once with ``VLLM_PLUGINS=""`` (an
allow-list naming no plugin). Greedy tokens must be identical, top-5 logprobs equal to a few
fp32 ulps. Both runs' logs are read to prove the plugin was loaded in the first and not in the
second, so the comparison cannot pass because the plugin never ran.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.test_plugin import prompts_for
from tests.tiny_models import make_byte_tokenizer
from tests.vllm_runner import greedy_in_subprocess

pytestmark = pytest.mark.vllm

MAX_TOKENS = 24
TOP_LOGPROBS = 5

# Each engine run writes two of vLLM's loggers to its own file, whatever the process, as
# "<vLLM process name>: <message>". The model registry says (at DEBUG) when our register()
# replaces a model class; VLLM_LOG_MODEL_INSPECTION=1 makes the model loader log the built
# model, root class first. "Worker" processes build and run the model.
EVIDENCE_LOGGERS = {
    "vllm.model_executor.models.registry": "DEBUG",
    "vllm.model_executor.model_loader.base_loader": "INFO",
}
PLUGIN_REGISTERED_IN_WORKER = re.compile(
    r"^\w*Worker[-\w]*: Model architecture \w+ is already registered, and will be overwritten "
    r"by the new model class vllm_quamba\.",
    re.MULTILINE,
)
MODEL_STRUCTURE = re.compile(r"^\w*Worker[-\w]*: vLLM model structure:\n(\w+)\(", re.MULTILINE)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random-weight 2-layer LlamaForCausalLM with the byte tokenizer.

    Two heads of 32: vLLM's CPU attention supports head sizes from 32 up. initializer_range 0.2
    spreads the logits (std ~1.6) so greedy choices are not near-ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama") / "model"
    tok = make_byte_tokenizer(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).float().eval().save_pretrained(out, safe_serialization=True)
    return out


def logging_config(evidence_file: Path) -> dict:
    """vLLM's usual INFO log on stdout, plus EVIDENCE_LOGGERS into ``evidence_file``.

    A separate file, not stdout: the runner reads its result from stdout, where a flood of
    DEBUG lines from the engine processes could interleave with it.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "console": {"format": "(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(message)s"},
            "evidence": {"format": "%(vllm_process_name)s: %(message)s"},
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "console", "level": "INFO",
                        "stream": "ext://sys.stdout"},
            "evidence": {"class": "logging.FileHandler", "formatter": "evidence", "filename": str(evidence_file)},
        },
        "loggers": {
            "vllm": {"handlers": ["console"], "level": "INFO", "propagate": False},
            **{name: {"handlers": ["evidence"], "level": level} for name, level in EVIDENCE_LOGGERS.items()},
        },
    }


def run_engine(model: Path, prompts: list[list[int]], plugins_enabled: bool, work_dir: Path) -> tuple[list[dict], str]:
    """Greedy outputs of one engine process, and the evidence its process tree logged."""
    config_file, evidence_file = work_dir / "logging.json", work_dir / "evidence.log"
    config_file.write_text(json.dumps(logging_config(evidence_file)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_LOGGING_CONFIG_PATH", str(config_file))
        patch.setenv("VLLM_LOG_MODEL_INSPECTION", "1")
        if plugins_enabled:
            patch.delenv("VLLM_PLUGINS", raising=False)
        else:
            patch.setenv("VLLM_PLUGINS", "")  # an allow-list that names no plugin
        outputs = greedy_in_subprocess(model, prompts, MAX_TOKENS, logprobs=TOP_LOGPROBS)
    return outputs, evidence_file.read_text()


@pytest.fixture(scope="module", params=["mamba2", "llama"])
def runs(request, tmp_path_factory) -> dict:
    """Both runs of one stock model: {"model": name, "enabled"/"disabled": (outputs, evidence log)}."""
    model = request.getfixturevalue("trained_tiny_mamba2" if request.param == "mamba2" else "tiny_llama")
    prompts = prompts_for(model)
    return {
        "model": request.param,
        **{
            state: run_engine(model, prompts, state == "enabled", tmp_path_factory.mktemp(f"{request.param}-{state}"))
            for state in ("enabled", "disabled")
        },
    }


def built_model_class(log: str) -> str:
    found = MODEL_STRUCTURE.search(log)
    assert found, f"no model structure logged by a worker in:\n{log[-3000:]}"
    return found.group(1)


def test_the_plugin_is_loaded_only_when_enabled(runs):
    enabled_log, disabled_log = runs["enabled"][1], runs["disabled"][1]
    assert PLUGIN_REGISTERED_IN_WORKER.search(enabled_log)
    assert not PLUGIN_REGISTERED_IN_WORKER.search(disabled_log)
    if runs["model"] == "mamba2":
        assert built_model_class(enabled_log) == "QuambaMamba2ForCausalLM"
        assert built_model_class(disabled_log) == "Mamba2ForCausalLM"
    else:
        assert built_model_class(enabled_log) == built_model_class(disabled_log) == "LlamaForCausalLM"


def test_greedy_tokens_are_identical(runs):
    enabled, disabled = runs["enabled"][0], runs["disabled"][0]
    assert all(len(out["token_ids"]) == MAX_TOKENS for out in enabled)
    assert [out["token_ids"] for out in enabled] == [out["token_ids"] for out in disabled]


# Measured on the tiny Mamba2 (the Llama was bit-identical in every run): in 4 of 5
# enabled/disabled pairs the logprobs were bit-identical; in one, the first step's differed by
# up to 4.8e-7, and one CI run under heavy load (load average 9 on 2 cores) saw 1.9e-6 (16
# fp32 ulps at |value| 1.7). Cause not established: the plugin's class runs the stock Mamba2
# code, and fp32 GEMM kernels may take another summation path for another buffer alignment.
# A real change of numerics (another kernel, a changed weight, a different state) moves them
# by 1e-3 or more: logprobs must agree to 1e-5; tokens and top-5 ids exactly.
LOGPROB_ATOL = 1e-5


def test_top5_logprobs_are_equal(runs):
    enabled, disabled = runs["enabled"][0], runs["disabled"][0]
    for with_plugin, without_plugin in zip(enabled, disabled):
        assert len(with_plugin["logprobs"]) == MAX_TOKENS
        for step_with, step_without in zip(with_plugin["logprobs"], without_plugin["logprobs"]):
            assert len(step_with) >= TOP_LOGPROBS
            assert step_with.keys() == step_without.keys()
            for token, value in step_with.items():
                assert abs(value - step_without[token]) <= LOGPROB_ATOL
