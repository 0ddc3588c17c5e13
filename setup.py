"""Builds the package's x86 SIMD kernels (vllm_quamba/kernels/csrc) into one shared library.

Plain C, no Python or torch headers: it is loaded with ctypes (kernels/_simd.py), so the build
needs only a C compiler, never torch (a build-isolated torch would be a CUDA download). Each
kernel carries per-function target attributes and the loader checks the CPU at run time, so one
build runs on any x86-64. The extension is optional: where it does not build (no compiler, not
x86-64), the numba kernels serve alone.
"""

import platform
from pathlib import Path

from setuptools import Extension, setup

CSRC = Path("vllm_quamba/kernels/csrc")


def simd_extensions() -> list[Extension]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    return [
        Extension(
            "vllm_quamba.kernels._simd_kernels",
            sources=sorted(str(p) for p in CSRC.glob("*.c")),
            depends=sorted(str(p) for p in CSRC.glob("*.h")),
            # No FMA contraction: the epilogues must round as the torch references do.
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-Wall"],
            libraries=["m"],  # expf, log1pf: the same libm functions numba calls
            optional=True,
        )
    ]


setup(ext_modules=simd_extensions())
