import platform
import sys

import pytest

from vllm_quamba.kernels import _simd

X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        line = next(line for line in cpuinfo if line.startswith("flags"))
    return set(line.split(":", 1)[1].split())


@pytest.mark.skipif(not X86_LINUX, reason="setup.py builds the SIMD kernels for x86-64 only")
def test_library_is_built_and_loads():
    """The install must have compiled csrc/: without it every CPU falls back to numba silently."""
    assert _simd.library() is not None


@pytest.mark.skipif(not X86_LINUX, reason="reads the Linux x86 CPU flags")
@pytest.mark.parametrize(
    ("feature", "flags"),
    [
        ("avx512_vnni", {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}),
        # Linux 5.16+ grants the tile state on request wherever the CPU has AMX.
        ("amx_int8", {"amx_tile", "amx_int8", "avx512bw", "avx512vl"}),
    ],
)
def test_feature_checks_agree_with_the_cpu_flags(feature, flags):
    assert _simd.cpu_has(feature) == flags.issubset(_cpu_flags())


def test_functions_are_withheld_where_the_cpu_lacks_their_instructions(monkeypatch):
    monkeypatch.setattr(_simd, "cpu_has", lambda feature: False)
    assert _simd.function("quamba_w8a8_linear_avx512_vnni", "avx512_vnni") is None
