/* Which instruction sets this CPU runs, read from the CPU itself (CPUID) and from what the operating
 * system saves on a context switch (XGETBV): the dispatcher's input (`cpu_features` in api.h). A
 * feature counts only where the OS saves its registers, as Linux's /proc/cpuinfo shows it, whose
 * names these are; reading the CPU instead of that file works under any OS and in any container.
 * Compiled with the portable flags only, so it runs on any CPU.
 */
#include <string.h>

#include "../common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

/* Append `name` and a space to out[*len ..] if `has`; a name that does not fit marks *len -1. */
static void put(char *out, int size, int *len, int has, const char *name) {
    const int n = (int)strlen(name);
    if (!has || *len < 0) return;
    if (*len + n + 2 > size) {
        *len = -1;
        return;
    }
    memcpy(out + *len, name, n);
    out[*len + n] = ' ';
    *len += n + 1;
}

int IL(cpu_features)(void *buffer, int size, int num_threads) {
    (void)num_threads;
    char *out = buffer;
    unsigned a = 0, b = 0, c = 0, d = 0, max_leaf = 0, vendor[3] = {0};
    int len = 0;
    if (size < 14) return -1;
    __cpuid(0, max_leaf, vendor[0], vendor[2], vendor[1]); /* the name is in EBX, EDX, ECX */
    memcpy(out, vendor, 12);
    out[12] = '\n', len = 13;
    __cpuid(1, a, b, c, d);
    unsigned long long xcr0 = 0;
    if (c >> 27 & 1) { /* OSXSAVE: XGETBV is there */
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        xcr0 = (unsigned long long)hi << 32 | lo;
    }
    /* the registers the OS saves: XMM and YMM; then the mask and both halves of ZMM; then the tiles */
    const int avx_os = (xcr0 & 0x6) == 0x6, avx512_os = avx_os && (xcr0 & 0xe0) == 0xe0,
              amx_os = (xcr0 & 0x60000) == 0x60000;
    const int avx = avx_os && (c >> 28 & 1);
    put(out, size, &len, avx, "avx");
    put(out, size, &len, avx && (c >> 12 & 1), "fma");
    put(out, size, &len, avx && (c >> 29 & 1), "f16c");
    unsigned b7 = 0, c7 = 0, d7 = 0, a71 = 0;
    if (max_leaf >= 7) {
        __cpuid_count(7, 0, a, b7, c7, d7);
        if (a >= 1) __cpuid_count(7, 1, a71, b, c, d);
    }
    const int f512 = avx512_os && (b7 >> 16 & 1);
    put(out, size, &len, avx && (b7 >> 5 & 1), "avx2");
    put(out, size, &len, avx && (a71 >> 4 & 1), "avx_vnni");
    put(out, size, &len, f512, "avx512f");
    put(out, size, &len, f512 && (b7 >> 17 & 1), "avx512dq");
    put(out, size, &len, f512 && (b7 >> 30 & 1), "avx512bw");
    put(out, size, &len, f512 && (b7 >> 31 & 1), "avx512vl");
    put(out, size, &len, f512 && (c7 >> 11 & 1), "avx512_vnni");
    put(out, size, &len, f512 && (a71 >> 5 & 1), "avx512_bf16");
    put(out, size, &len, f512 && (d7 >> 23 & 1), "avx512_fp16");
    put(out, size, &len, amx_os && (d7 >> 24 & 1), "amx_tile");
    put(out, size, &len, amx_os && (d7 >> 22 & 1), "amx_bf16");
    put(out, size, &len, amx_os && (d7 >> 25 & 1), "amx_int8");
    if (len < 0) return -1;
    out[len] = 0;
    return len;
}
#else
int IL(cpu_features)(void *buffer, int size, int num_threads) { /* no x86 features: the generic kernels */
    (void)num_threads;
    if (size < 2) return -1;
    memcpy(buffer, "\n", 2);
    return 1;
}
#endif
