"""A software prefetch for numba kernels (imported by them only, so numba loads lazily).

A decode-sized linear reads every weight byte once, from DRAM. The 4-bit GEMV does enough
arithmetic per byte (two nibbles unpacked and converted per byte) that the hardware prefetcher
alone leaves it waiting: asking for the weight rows two blocks ahead took the 49 linears of a
mamba2-130m decode step at batch 1 from 18.2 to 15.1 ms on the 2-core Xeon VM (quiet, medians).
The int8 GEMV and the int8 SSM state update measured no faster with it (within noise), so they
do without.
"""

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

CACHE_LINE = 64  # bytes; x86-64

_I32 = ir.IntType(32)
_READ, _HIGH_LOCALITY, _DATA_CACHE = ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)


@intrinsic
def prefetch(typingctx, array, index):
    """Hint the CPU to load the cache line holding ``array[index]`` (a C-contiguous 1-D array);
    no effect on results, and never a fault (prefetches of any address are allowed)."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte_ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        fn_type = ir.FunctionType(ir.VoidType(), [byte_ptr.type, _I32, _I32, _I32])
        llvm_prefetch = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0")
        builder.call(llvm_prefetch, [byte_ptr, _READ, _HIGH_LOCALITY, _DATA_CACHE])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@njit(cache=True, inline="always")
def prefetch_rows(matrix_bytes, row_bytes, first, stop):
    """Prefetch rows [first, stop) of a C-contiguous matrix of bytes (int8 or uint8) given as
    ``matrix.reshape(-1)``; rows past the end are skipped."""
    end = min(stop * row_bytes, matrix_bytes.shape[0])
    for index in range(first * row_bytes, end, CACHE_LINE):
        prefetch(matrix_bytes, index)
