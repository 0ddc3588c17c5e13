/* What the CPU running the process supports, for kernels/_simd.py to pick kernels by. */
#define _GNU_SOURCE /* syscall() */
#include <sys/syscall.h>
#include <unistd.h>

#include "simd.h"

/* Linux (5.16+) hands out the 8 KiB AMX tile state only to processes that ask for it. */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int quamba_cpu_has_avx512_vnni(void) {
    /* libgcc's checks include the OS saving the ZMM registers (XCR0). */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni");
}

int quamba_cpu_has_amx_int8(void) {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl")))
        return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
