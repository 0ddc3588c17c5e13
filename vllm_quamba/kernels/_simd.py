"""The package's compiled x86 SIMD kernels (csrc/*.c, built by setup.py), called through ctypes.

Why C: numba's LLVM never emits the instructions that make int8 fast on x86 (vpdpbusd, the
VNNI u8 x s8 dot product, and AMX's tile products), and on Intel it prefers 256-bit vectors; its int8 GEMV streamed
weights at ~5.4 GB/s where fp32 oneDNN streamed 12.6 (benchmarks/results/profile-decode-*).
Why ctypes and plain C: the build then needs a C compiler only, no torch headers (building
against torch would pull a CUDA torch into pip's isolated build environment).

Every kernel is optional: ``function`` returns None where the library was not built or the
CPU lacks the kernel's instructions, and callers keep their numba kernels for that case.
"""

import ctypes
import functools
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

POINTER = ctypes.c_void_p  # a tensor's data_ptr(), or None for NULL
INT64 = ctypes.c_int64
FLOAT = ctypes.c_float

_LIBRARY_STEM = "_simd_kernels"
# What each instruction-set name requires of the CPU, by the library's own check.
_FEATURE_CHECKS = {"avx512_vnni": "quamba_cpu_has_avx512_vnni", "amx_int8": "quamba_cpu_has_amx_int8"}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library, or None where setup.py did not build it (not x86-64, no compiler)."""
    for suffix in EXTENSION_SUFFIXES:
        path = Path(__file__).with_name(_LIBRARY_STEM + suffix)
        if path.exists():
            return ctypes.CDLL(str(path))
    return None


@functools.cache
def cpu_has(feature: str) -> bool:
    lib = library()
    return lib is not None and bool(getattr(lib, _FEATURE_CHECKS[feature])())


def function(name: str, feature: str, *argtypes) -> ctypes._CFuncPtr | None:
    """The library's C function ``name`` (returning int) with its argument types, or None
    where this CPU does not run ``feature``."""
    if not cpu_has(feature):
        return None
    kernel = getattr(library(), name)
    kernel.argtypes, kernel.restype = argtypes, ctypes.c_int
    return kernel


def functions(argtypes: tuple, by_candidate: dict[str, tuple[str, str]]) -> dict[str, ctypes._CFuncPtr]:
    """The C functions this CPU runs, by candidate name; ``by_candidate`` maps each name to
    (C function, feature), all of one signature."""
    found = {name: function(c_name, feature, *argtypes) for name, (c_name, feature) in by_candidate.items()}
    return {name: kernel for name, kernel in found.items() if kernel is not None}
