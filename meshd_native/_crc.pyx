# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled CRC32C (Castagnoli): AVX-512 folding, SSE4.2 crc32, or slice-by-8.

The path is picked once at import from CPUID. The C lives in this file
(verbatim block below) rather than in a header so the extension builds from
the .pyx alone, including from an sdist. ``_framing`` reaches the C function
through ``CRC32C_CAPSULE`` rather than a .pxd, for the same reason.
"""

import operator

from libc.stdint cimport uint32_t
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.pycapsule cimport PyCapsule_New

from .errors import KernelError

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <string.h>
    #if defined(__GNUC__) && defined(__x86_64__)
    #  include <cpuid.h>
    #  include <immintrin.h>
    #  define MT_X86_CRC 1
    #elif defined(__ARM_FEATURE_CRC32)
    #  include <arm_acle.h>
    #  define MT_ARM_CRC 1
    #endif

    #define MT_POLY 0x82f63b78u
    #define MT_LONG 8192
    #define MT_SHORT 256

    static uint32_t mt_sb8[8][256];
    static uint32_t mt_long[4][256];
    static uint32_t mt_short[4][256];
    static int mt_hw = 0;      /* crc32 instructions usable */
    static int mt_fold512 = 0; /* AVX-512 VPCLMULQDQ folding usable */
    /* Folding constants: mt_k[i] folds a 16-byte block forward by
       mt_k_dist[i] bytes (low qword multiplier, high qword multiplier). */
    static const unsigned mt_k_dist[5] = {16, 32, 48, 64, 256};
    static uint64_t mt_k[5][2];

    static inline uint64_t mt_le64(const unsigned char *p) {
        return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16)
             | ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40)
             | ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
    }

    /* GF(2) matrix helpers (after Mark Adler's crc32c.c): a matrix is the 32
       column images of a linear map on the CRC register. */
    static uint32_t mt_gf2_times(const uint32_t *mat, uint32_t vec) {
        uint32_t sum = 0;
        while (vec) { if (vec & 1) sum ^= *mat; vec >>= 1; mat++; }
        return sum;
    }
    static void mt_gf2_square(uint32_t *square, const uint32_t *mat) {
        for (int n = 0; n < 32; n++) square[n] = mt_gf2_times(mat, mat[n]);
    }
    /* Operator appending len zero bytes; len must be a power of two. */
    static void mt_zeros_op(uint32_t *even, size_t len) {
        uint32_t odd[32], row = 1;
        odd[0] = MT_POLY;
        for (int n = 1; n < 32; n++) { odd[n] = row; row <<= 1; }
        mt_gf2_square(even, odd);
        mt_gf2_square(odd, even);
        do {
            mt_gf2_square(even, odd);
            len >>= 1;
            if (len == 0) return;
            mt_gf2_square(odd, even);
            len >>= 1;
        } while (len);
        for (int n = 0; n < 32; n++) even[n] = odd[n];
    }
    static void mt_zeros(uint32_t zeros[][256], size_t len) {
        uint32_t op[32];
        mt_zeros_op(op, len);
        for (uint32_t n = 0; n < 256; n++) {
            zeros[0][n] = mt_gf2_times(op, n);
            zeros[1][n] = mt_gf2_times(op, n << 8);
            zeros[2][n] = mt_gf2_times(op, n << 16);
            zeros[3][n] = mt_gf2_times(op, n << 24);
        }
    }
    static inline uint32_t mt_shift(uint32_t zeros[][256], uint32_t crc) {
        return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff]
             ^ zeros[2][(crc >> 16) & 0xff] ^ zeros[3][crc >> 24];
    }

    /* x^n mod P in normal (non-reflected) bit order. */
    static uint32_t mt_xpow_mod(uint64_t n) {
        uint64_t result = 1, base = 2;
        while (n) {
            if (n & 1) {
                uint64_t a = result, b = base, r = 0;
                while (b) { if (b & 1) r ^= a; b >>= 1; a <<= 1; if (a >> 32) a ^= 0x11EDC6F41ull; }
                result = r;
            }
            {
                uint64_t a = base, b = base, r = 0;
                while (b) { if (b & 1) r ^= a; b >>= 1; a <<= 1; if (a >> 32) a ^= 0x11EDC6F41ull; }
                base = r;
            }
            n >>= 1;
        }
        return (uint32_t)result;
    }
    /* A degree<32 polynomial as a reflected 64-bit pclmul operand. */
    static uint64_t mt_refl64(uint32_t f) {
        uint64_t v = 0;
        for (int e = 0; e < 32; e++) if ((f >> e) & 1) v |= 1ull << (63 - e);
        return v;
    }

    static void mt_crc_init(void) {
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t crc = n;
            for (int k = 0; k < 8; k++) crc = crc & 1 ? (crc >> 1) ^ MT_POLY : crc >> 1;
            mt_sb8[0][n] = crc;
        }
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t crc = mt_sb8[0][n];
            for (int k = 1; k < 8; k++) {
                crc = mt_sb8[0][crc & 0xff] ^ (crc >> 8);
                mt_sb8[k][n] = crc;
            }
        }
        mt_zeros(mt_long, MT_LONG);
        mt_zeros(mt_short, MT_SHORT);
        for (int i = 0; i < 5; i++) {
            /* reflected clmul yields x*A*B, hence the -1 in both exponents */
            mt_k[i][0] = mt_refl64(mt_xpow_mod(8ull * mt_k_dist[i] + 63));
            mt_k[i][1] = mt_refl64(mt_xpow_mod(8ull * mt_k_dist[i] - 1));
        }
    #if defined(MT_X86_CRC)
        unsigned a, b, c, d;
        if (__get_cpuid(1, &a, &b, &c, &d)) {
            mt_hw = (c & bit_SSE4_2) != 0;
            int osxsave = (c & (1u << 27)) != 0, pclmul = (c & (1u << 1)) != 0;
            if (mt_hw && osxsave && pclmul && __get_cpuid_count(7, 0, &a, &b, &c, &d)) {
                int avx512f = (b & (1u << 16)) != 0, vpclmul = (c & (1u << 10)) != 0;
                unsigned lo, hi;
                __asm__ volatile ("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
                /* XMM, YMM, opmask and both ZMM state components enabled by the OS */
                mt_fold512 = avx512f && vpclmul && (lo & 0xE6) == 0xE6;
            }
        }
    #elif defined(MT_ARM_CRC)
        mt_hw = 1;
    #endif
    }

    /* Portable slice-by-8 on the raw (pre-inverted) register. */
    static uint32_t mt_crc_sw(uint32_t crc, const unsigned char *p, size_t len) {
        while (len && ((uintptr_t)p & 7)) { crc = mt_sb8[0][(crc ^ *p++) & 0xff] ^ (crc >> 8); len--; }
        while (len >= 8) {
            uint64_t w = mt_le64(p) ^ crc;
            crc = mt_sb8[7][w & 0xff] ^ mt_sb8[6][(w >> 8) & 0xff]
                ^ mt_sb8[5][(w >> 16) & 0xff] ^ mt_sb8[4][(w >> 24) & 0xff]
                ^ mt_sb8[3][(w >> 32) & 0xff] ^ mt_sb8[2][(w >> 40) & 0xff]
                ^ mt_sb8[1][(w >> 48) & 0xff] ^ mt_sb8[0][w >> 56];
            p += 8; len -= 8;
        }
        while (len--) crc = mt_sb8[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        return crc;
    }

    #if defined(MT_X86_CRC)
    /* SSE4.2 crc32 has 3-cycle latency and 1-cycle throughput: run three
       independent streams and fold them with the zeros operators. */
    __attribute__((target("sse4.2")))
    static uint32_t mt_crc_hw(uint32_t crc, const unsigned char *next, size_t len) {
        uint64_t crc0 = crc, crc1, crc2, w0, w1, w2;
        while (len && ((uintptr_t)next & 7)) { crc0 = _mm_crc32_u8((uint32_t)crc0, *next++); len--; }
        while (len >= MT_LONG * 3) {
            const unsigned char *end = next + MT_LONG;
            crc1 = crc2 = 0;
            do {
                memcpy(&w0, next, 8); memcpy(&w1, next + MT_LONG, 8); memcpy(&w2, next + 2 * MT_LONG, 8);
                crc0 = _mm_crc32_u64(crc0, w0);
                crc1 = _mm_crc32_u64(crc1, w1);
                crc2 = _mm_crc32_u64(crc2, w2);
                next += 8;
            } while (next < end);
            crc0 = mt_shift(mt_long, (uint32_t)crc0) ^ (uint32_t)crc1;
            crc0 = mt_shift(mt_long, (uint32_t)crc0) ^ (uint32_t)crc2;
            next += MT_LONG * 2;
            len -= MT_LONG * 3;
        }
        while (len >= MT_SHORT * 3) {
            const unsigned char *end = next + MT_SHORT;
            crc1 = crc2 = 0;
            do {
                memcpy(&w0, next, 8); memcpy(&w1, next + MT_SHORT, 8); memcpy(&w2, next + 2 * MT_SHORT, 8);
                crc0 = _mm_crc32_u64(crc0, w0);
                crc1 = _mm_crc32_u64(crc1, w1);
                crc2 = _mm_crc32_u64(crc2, w2);
                next += 8;
            } while (next < end);
            crc0 = mt_shift(mt_short, (uint32_t)crc0) ^ (uint32_t)crc1;
            crc0 = mt_shift(mt_short, (uint32_t)crc0) ^ (uint32_t)crc2;
            next += MT_SHORT * 2;
            len -= MT_SHORT * 3;
        }
        while (len >= 8) { memcpy(&w0, next, 8); crc0 = _mm_crc32_u64(crc0, w0); next += 8; len -= 8; }
        while (len) { crc0 = _mm_crc32_u8((uint32_t)crc0, *next++); len--; }
        return (uint32_t)crc0;
    }
    #define MT_FOLD512(x, k, b) _mm512_ternarylogic_epi64( \
        _mm512_clmulepi64_epi128((x), (k), 0x00), _mm512_clmulepi64_epi128((x), (k), 0x11), (b), 0x96)

    /* Carry-less-multiply folding (Intel's "Fast CRC computation using
       PCLMULQDQ", widened to AVX-512): 16 independent 16-byte lanes are folded
       forward 256 bytes at a time, merged, and the last 16 bytes handed to the
       crc32 instruction. Several times faster than crc32 alone. */
    __attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2")))
    static uint32_t mt_crc_fold512(uint32_t crc, const unsigned char *p, size_t len) {
        if (len < 256) return mt_crc_hw(crc, p, len);
        __m512i k256 = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)mt_k[4][1], (long long)mt_k[4][0]));
        __m512i k64 = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)mt_k[3][1], (long long)mt_k[3][0]));
        __m512i x0 = _mm512_loadu_si512((const void *)p);
        __m512i x1 = _mm512_loadu_si512((const void *)(p + 64));
        __m512i x2 = _mm512_loadu_si512((const void *)(p + 128));
        __m512i x3 = _mm512_loadu_si512((const void *)(p + 192));
        /* The initial register is equivalent to XORing it into the first 4 bytes. */
        x0 = _mm512_xor_si512(x0, _mm512_inserti32x4(_mm512_setzero_si512(), _mm_cvtsi32_si128((int)crc), 0));
        p += 256; len -= 256;
        while (len >= 256) {
            x0 = MT_FOLD512(x0, k256, _mm512_loadu_si512((const void *)p));
            x1 = MT_FOLD512(x1, k256, _mm512_loadu_si512((const void *)(p + 64)));
            x2 = MT_FOLD512(x2, k256, _mm512_loadu_si512((const void *)(p + 128)));
            x3 = MT_FOLD512(x3, k256, _mm512_loadu_si512((const void *)(p + 192)));
            p += 256; len -= 256;
        }
        x1 = MT_FOLD512(x0, k64, x1);
        x2 = MT_FOLD512(x1, k64, x2);
        x3 = MT_FOLD512(x2, k64, x3);
        while (len >= 64) { x3 = MT_FOLD512(x3, k64, _mm512_loadu_si512((const void *)p)); p += 64; len -= 64; }
        /* Lanes 0..2 fold forward by 48, 32 and 16 bytes onto lane 3. */
        __m512i kl = _mm512_set_epi64(0, 0, (long long)mt_k[0][1], (long long)mt_k[0][0],
                                      (long long)mt_k[1][1], (long long)mt_k[1][0],
                                      (long long)mt_k[2][1], (long long)mt_k[2][0]);
        __m512i prod = _mm512_xor_si512(_mm512_clmulepi64_epi128(x3, kl, 0x00),
                                        _mm512_clmulepi64_epi128(x3, kl, 0x11));
        __m128i s = _mm_xor_si128(_mm512_extracti32x4_epi32(x3, 3), _mm512_extracti32x4_epi32(prod, 0));
        s = _mm_xor_si128(s, _mm_xor_si128(_mm512_extracti32x4_epi32(prod, 1), _mm512_extracti32x4_epi32(prod, 2)));
        __m128i k16 = _mm_set_epi64x((long long)mt_k[0][1], (long long)mt_k[0][0]);
        while (len >= 16) {
            __m128i b = _mm_loadu_si128((const __m128i *)p);
            s = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(s, k16, 0x00), _mm_clmulepi64_si128(s, k16, 0x11)), b);
            p += 16; len -= 16;
        }
        uint64_t r = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(s));
        r = _mm_crc32_u64(r, (uint64_t)_mm_extract_epi64(s, 1));
        return mt_crc_hw((uint32_t)r, p, len);
    }
    #elif defined(MT_ARM_CRC)
    static uint32_t mt_crc_hw(uint32_t crc, const unsigned char *next, size_t len) {
        while (len && ((uintptr_t)next & 7)) { crc = __crc32cb(crc, *next++); len--; }
        while (len >= 8) { crc = __crc32cd(crc, mt_le64(next)); next += 8; len -= 8; }
        while (len) { crc = __crc32cb(crc, *next++); len--; }
        return crc;
    }
    #else
    static uint32_t mt_crc_hw(uint32_t crc, const unsigned char *next, size_t len) {
        return mt_crc_sw(crc, next, len);
    }
    #endif
    #if !defined(MT_X86_CRC)
    static uint32_t mt_crc_fold512(uint32_t crc, const unsigned char *next, size_t len) {
        return mt_crc_hw(crc, next, len);
    }
    #endif

    /* path: 0 best available, 1 portable slice-by-8, 2 crc32 instructions,
       3 AVX-512 folding. Returns 0 and sets *out, or -1 if unavailable. */
    static int mt_crc32c_path(int path, uint32_t crc, const void *buf, size_t len, uint32_t *out) {
        const unsigned char *p = (const unsigned char *)buf;
        uint32_t reg = crc ^ 0xffffffffu;
        if (path == 0) path = mt_fold512 ? 3 : mt_hw ? 2 : 1;
        if (path == 1) reg = mt_crc_sw(reg, p, len);
        else if (path == 2 && mt_hw) reg = mt_crc_hw(reg, p, len);
        else if (path == 3 && mt_fold512) reg = mt_crc_fold512(reg, p, len);
        else return -1;
        *out = reg ^ 0xffffffffu;
        return 0;
    }

    static uint32_t mt_crc32c(uint32_t crc, const void *buf, size_t len) {
        uint32_t out = 0;
        mt_crc32c_path(0, crc, buf, len, &out);
        return out;
    }

    /* Copy and checksum in cache-sized steps so the copy reads hot lines. */
    static uint32_t mt_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t len) {
        const size_t step = 64 * 1024;
        unsigned char *d = (unsigned char *)dst;
        const unsigned char *s = (const unsigned char *)src;
        while (len) {
            size_t n = len < step ? len : step;
            crc = mt_crc32c(crc, s, n);
            memcpy(d, s, n);
            d += n; s += n; len -= n;
        }
        return crc;
    }
    """
    void mt_crc_init()
    int mt_hw
    int mt_fold512
    int mt_crc32c_path(int path, uint32_t crc, const void *buf, size_t len, uint32_t *out) nogil
    uint32_t mt_crc32c(uint32_t crc, const void *buf, size_t len) nogil
    uint32_t mt_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t len) nogil

mt_crc_init()

# The raw C entry point for other extensions of this package (see _framing).
CRC32C_CAPSULE = PyCapsule_New(<void *>mt_crc32c, b"meshd_native._crc.crc32c", NULL)

_CRC_PATHS = {"auto": 0, "portable": 1, "sse4.2": 2, "avx512-vpclmulqdq": 3}


def features():
    """Which hardware paths this build selected at import."""
    return {"crc32c_sse42": bool(mt_hw), "crc32c_avx512_fold": bool(mt_fold512)}


def crc32c_paths():
    """Names of the CRC32C code paths usable on this CPU (for tests and benchmarks)."""
    return [name for name, code in _CRC_PATHS.items()
            if code == 0 or code == 1 or (code == 2 and mt_hw) or (code == 3 and mt_fold512)]


def crc32c_with_path(data, value=0, path="auto"):
    """``crc32c`` forced through one code path; KernelError if the CPU lacks it."""
    cdef Py_buffer view
    cdef uint32_t crc = _crc_value(value)
    cdef uint32_t out = 0
    cdef int rc
    cdef int code = _CRC_PATHS.get(path, -1)
    if code < 0:
        raise KernelError(f"unknown crc32c path {path!r}")
    _acquire(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            rc = mt_crc32c_path(code, crc, view.buf, <size_t>view.len, &out)
    finally:
        PyBuffer_Release(&view)
    if rc != 0:
        raise KernelError(f"crc32c path {path!r} is not available on this CPU")
    return out


cdef int _acquire(object obj, Py_buffer *view, int flags) except -1:
    try:
        PyObject_GetBuffer(obj, view, flags)
    except (BufferError, TypeError, ValueError) as exc:
        raise KernelError(f"expected a C-contiguous buffer: {exc}") from exc
    return 0


cdef uint32_t _crc_value(object value) except? 0xFFFFFFFF:
    cdef object v = operator.index(value)
    if not 0 <= v <= 0xFFFFFFFF:
        raise KernelError("crc32c value must fit in 32 bits")
    return <uint32_t>v


def crc32c(data, value=0):
    """CRC32C (Castagnoli) of ``data``, continuing from the CRC ``value``."""
    cdef Py_buffer view
    cdef uint32_t crc = _crc_value(value)
    _acquire(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            crc = mt_crc32c(crc, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return crc


def crc32c_copy(dst, src, value=0):
    """Copy ``src`` into the start of ``dst`` and return the CRC32C of ``src``."""
    cdef Py_buffer s, d
    cdef uint32_t crc = _crc_value(value)
    _acquire(src, &s, PyBUF_SIMPLE)
    try:
        _acquire(dst, &d, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if d.len < s.len:
                raise KernelError("destination buffer is smaller than the source")
            with nogil:
                crc = mt_crc32c_copy(crc, d.buf, s.buf, <size_t>s.len)
        finally:
            PyBuffer_Release(&d)
    finally:
        PyBuffer_Release(&s)
    return crc
