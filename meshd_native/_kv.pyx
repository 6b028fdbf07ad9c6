# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled KV-cache kernels: fp32/fp16/bf16 conversion, q8_0/q4_0, strided copy.

Arrays arrive through the buffer protocol (no numpy headers needed to build);
``kv.py`` validates dtypes and shapes and allocates outputs before calling in.
Every kernel is bit-exact with ``_twin_kv.py``, including NaN payloads.
"""

from libc.stdint cimport uint8_t
from cpython.buffer cimport (
    PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_STRIDES, PyBUF_WRITABLE,
)

from .errors import KernelError

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    #  include <cpuid.h>
    #  include <immintrin.h>
    #  define MT_X86 1
    #endif
    /* q4_0 computes x*id + 8.5 with two roundings, like numpy; an FMA would
       round once and break bit-exactness on targets where FMA is baseline. */
    #if defined(__clang__)
    #  define MT_NO_FMA_BEGIN _Pragma("clang fp contract(off)")
    #  define MT_NO_FMA_ATTR
    #elif defined(__GNUC__)
    #  define MT_NO_FMA_BEGIN
    #  define MT_NO_FMA_ATTR __attribute__((optimize("fp-contract=off")))
    #else
    #  define MT_NO_FMA_BEGIN
    #  define MT_NO_FMA_ATTR
    #endif

    enum { MT_F32 = 1, MT_F16 = 2, MT_BF16 = 3, MT_BLOCK = 512 };
    static int mt_f16c = 0;
    static int mt_avx2 = 0;

    static void mt_kv_init(void) {
    #if defined(MT_X86)
        unsigned a, b, c, d;
        /* AVX and OSXSAVE, and the OS saves YMM state */
        if (__get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 28)) && (c & (1u << 27))) {
            unsigned lo, hi;
            int f16c = (c & (1u << 29)) != 0;
            __asm__ volatile ("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
            if ((lo & 6) == 6) {
                mt_f16c = f16c;
                mt_avx2 = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 5));
            }
        }
    #endif
    }

    static inline uint32_t mt_ld32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }
    static inline uint16_t mt_ld16(const void *p) { uint16_t v; memcpy(&v, p, 2); return v; }
    static inline void mt_st32(void *p, uint32_t v) { memcpy(p, &v, 4); }
    static inline void mt_st16(void *p, uint16_t v) { memcpy(p, &v, 2); }
    static inline float mt_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
    static inline uint32_t mt_u32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

    /* fp32 -> fp16, round to nearest even. NaNs are quieted and keep their top
       payload bits, which is what F16C's vcvtps2ph does. */
    static inline uint16_t mt_h_from_f(uint32_t x) {
        uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
        if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
        if (ax >= 0x47800000u) return (uint16_t)(sign | 0x7c00u);
        if (ax >= 0x38800000u) {
            uint32_t r = ax - 0x38000000u;
            r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;  /* a carry rounds up to inf */
            return (uint16_t)(sign | r);
        }
        if (ax < 0x33000000u) return (uint16_t)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, s = 126 - e;
        uint32_t q = m >> s, rem = m & ((1u << s) - 1u), half = 1u << (s - 1);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    /* fp16 -> fp32 is exact; NaNs are quieted like F16C's vcvtph2ps. */
    static inline uint32_t mt_f_from_h(uint16_t h) {
        uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
        if (e == 0x1f) return sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u);
        if (e == 0) {
            if (m == 0) return sign;
            e = 113;
            while (!(m & 0x400u)) { m <<= 1; e--; }
            return sign | (e << 23) | ((m & 0x3ffu) << 13);
        }
        return sign | ((e + 112) << 23) | (m << 13);
    }
    /* fp32 -> bf16 exactly as ggml_compute_fp32_to_bf16 (and gguf.quants). */
    static inline uint16_t mt_b_from_f(uint32_t u) {
        if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64u);
        return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
    }

    #if defined(MT_X86)
    __attribute__((target("avx,f16c")))
    static void mt_h2f_f16c(const void *src, void *dst, size_t n) {
        const unsigned char *s = (const unsigned char *)src;
        unsigned char *d = (unsigned char *)dst;
        size_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps((float *)(d + 4 * i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 2 * i))));
        for (; i < n; i++) mt_st32(d + 4 * i, mt_f_from_h(mt_ld16(s + 2 * i)));
    }
    __attribute__((target("avx,f16c")))
    static void mt_f2h_f16c(const void *src, void *dst, size_t n) {
        const unsigned char *s = (const unsigned char *)src;
        unsigned char *d = (unsigned char *)dst;
        size_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(d + 2 * i),
                             _mm256_cvtps_ph(_mm256_loadu_ps((const float *)(s + 4 * i)), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++) mt_st16(d + 2 * i, mt_h_from_f(mt_ld32(s + 4 * i)));
    }
    #endif

    /* Contiguous runs of n elements to and from fp32. */
    static void mt_to_f32(int code, const void *src, void *dst, size_t n) {
        const unsigned char *s = (const unsigned char *)src;
        unsigned char *d = (unsigned char *)dst;
        if (code == MT_F32) { memcpy(d, s, 4 * n); return; }
        if (code == MT_F16) {
    #if defined(MT_X86)
            if (mt_f16c) { mt_h2f_f16c(s, d, n); return; }
    #endif
            for (size_t i = 0; i < n; i++) mt_st32(d + 4 * i, mt_f_from_h(mt_ld16(s + 2 * i)));
            return;
        }
        for (size_t i = 0; i < n; i++) mt_st32(d + 4 * i, (uint32_t)mt_ld16(s + 2 * i) << 16);
    }
    static void mt_from_f32(int code, const void *src, void *dst, size_t n) {
        const unsigned char *s = (const unsigned char *)src;
        unsigned char *d = (unsigned char *)dst;
        if (code == MT_F32) { memcpy(d, s, 4 * n); return; }
        if (code == MT_F16) {
    #if defined(MT_X86)
            if (mt_f16c) { mt_f2h_f16c(s, d, n); return; }
    #endif
            for (size_t i = 0; i < n; i++) mt_st16(d + 2 * i, mt_h_from_f(mt_ld32(s + 4 * i)));
            return;
        }
        for (size_t i = 0; i < n; i++) mt_st16(d + 2 * i, mt_b_from_f(mt_ld32(s + 4 * i)));
    }

    typedef void (*mt_run_fn)(const void *ctx, const char *s, ptrdiff_t ss, char *d, ptrdiff_t ds, size_t n);
    typedef struct { int sc, dc; } mt_conv_ctx;

    static void mt_gather(unsigned char *out, const char *s, ptrdiff_t ss, size_t size, size_t n) {
        if (size == 4) for (size_t i = 0; i < n; i++) mt_st32(out + 4 * i, mt_ld32(s + (ptrdiff_t)i * ss));
        else for (size_t i = 0; i < n; i++) mt_st16(out + 2 * i, mt_ld16(s + (ptrdiff_t)i * ss));
    }
    static void mt_scatter(char *d, ptrdiff_t ds, const unsigned char *in, size_t size, size_t n) {
        if (size == 4) for (size_t i = 0; i < n; i++) mt_st32(d + (ptrdiff_t)i * ds, mt_ld32(in + 4 * i));
        else for (size_t i = 0; i < n; i++) mt_st16(d + (ptrdiff_t)i * ds, mt_ld16(in + 2 * i));
    }

    /* One strided run: gather into a block, convert through fp32, scatter. */
    static void mt_convert_run(const void *vctx, const char *s, ptrdiff_t ss, char *d, ptrdiff_t ds, size_t n) {
        const mt_conv_ctx *ctx = (const mt_conv_ctx *)vctx;
        const size_t si = ctx->sc == MT_F32 ? 4 : 2, di = ctx->dc == MT_F32 ? 4 : 2;
        float tmp[MT_BLOCK];
        unsigned char sbuf[4 * MT_BLOCK], dbuf[4 * MT_BLOCK];
        while (n) {
            size_t m = n < MT_BLOCK ? n : MT_BLOCK;
            const void *sp = s;
            int dcontig = ds == (ptrdiff_t)di;
            void *dp = dcontig ? (void *)d : (void *)dbuf;
            if (ss != (ptrdiff_t)si) { mt_gather(sbuf, s, ss, si, m); sp = sbuf; }
            if (ctx->sc == MT_F32) mt_from_f32(ctx->dc, sp, dp, m);
            else if (ctx->dc == MT_F32) mt_to_f32(ctx->sc, sp, dp, m);
            else { mt_to_f32(ctx->sc, sp, tmp, m); mt_from_f32(ctx->dc, tmp, dp, m); }
            if (!dcontig) mt_scatter(d, ds, dbuf, di, m);
            s += (ptrdiff_t)m * ss; d += (ptrdiff_t)m * ds; n -= m;
        }
    }

    static void mt_copy_run(const void *vctx, const char *s, ptrdiff_t ss, char *d, ptrdiff_t ds, size_t n) {
        const size_t size = *(const size_t *)vctx;
        if (ss == (ptrdiff_t)size && ds == (ptrdiff_t)size) { memcpy(d, s, n * size); return; }
        switch (size) {
        case 1: for (size_t i = 0; i < n; i++) d[(ptrdiff_t)i * ds] = s[(ptrdiff_t)i * ss]; break;
        case 2: for (size_t i = 0; i < n; i++) mt_st16(d + (ptrdiff_t)i * ds, mt_ld16(s + (ptrdiff_t)i * ss)); break;
        case 4: for (size_t i = 0; i < n; i++) mt_st32(d + (ptrdiff_t)i * ds, mt_ld32(s + (ptrdiff_t)i * ss)); break;
        case 8: for (size_t i = 0; i < n; i++) {
                    uint64_t v; memcpy(&v, s + (ptrdiff_t)i * ss, 8); memcpy(d + (ptrdiff_t)i * ds, &v, 8);
                } break;
        default: for (size_t i = 0; i < n; i++) memcpy(d + (ptrdiff_t)i * ds, s + (ptrdiff_t)i * ss, size);
        }
    }

    /* Walk an n-d strided pair, merging dimensions that are contiguous in both
       so the innermost run is as long as possible. */
    static void mt_nd(int nd, const Py_ssize_t *shape, const Py_ssize_t *sst, const Py_ssize_t *dst,
                      const char *s, char *d, Py_ssize_t sitem, Py_ssize_t ditem,
                      mt_run_fn fn, const void *ctx) {
        Py_ssize_t sh[64], a[64], b[64], idx[64];
        int k = 0;
        for (int i = 0; i < nd; i++) if (shape[i] == 0) return;
        for (int i = 0; i < nd; i++) {
            if (shape[i] == 1) continue;
            if (k > 0 && a[k - 1] == shape[i] * sst[i] && b[k - 1] == shape[i] * dst[i]) {
                sh[k - 1] *= shape[i]; a[k - 1] = sst[i]; b[k - 1] = dst[i];
            } else {
                sh[k] = shape[i]; a[k] = sst[i]; b[k] = dst[i]; k++;
            }
        }
        if (k == 0) { sh[0] = 1; a[0] = sitem; b[0] = ditem; k = 1; }
        for (int i = 0; i < k; i++) idx[i] = 0;
        for (;;) {
            fn(ctx, s, a[k - 1], d, b[k - 1], (size_t)sh[k - 1]);
            int j = k - 2;
            for (; j >= 0; j--) {
                s += a[j]; d += b[j];
                if (++idx[j] < sh[j]) break;
                s -= a[j] * sh[j]; d -= b[j] * sh[j]; idx[j] = 0;
            }
            if (j < 0) break;
        }
    }

    static void mt_convert_nd(int sc, int dc, int nd, const Py_ssize_t *shape, const Py_ssize_t *sst,
                              const Py_ssize_t *dst, const char *s, char *d) {
        mt_conv_ctx ctx = {sc, dc};
        mt_nd(nd, shape, sst, dst, s, d, sc == MT_F32 ? 4 : 2, dc == MT_F32 ? 4 : 2, mt_convert_run, &ctx);
    }
    static void mt_copy_nd(size_t item, int nd, const Py_ssize_t *shape, const Py_ssize_t *sst,
                           const Py_ssize_t *dst, const char *s, char *d) {
        mt_nd(nd, shape, sst, dst, s, d, (Py_ssize_t)item, (Py_ssize_t)item, mt_copy_run, &item);
    }

    /* ggml q8_0 as gguf.quants computes it: d = amax/127 (fp16), q = roundf(x/d)
       with halves away from zero. Non-finite products quantize to 0 and a
       block containing NaN gets the canonical NaN scale, like numpy on x86. */
    static void mt_q8_0_quantize(const unsigned char *src, unsigned char *dst, size_t nblocks) {
        for (size_t b = 0; b < nblocks; b++) {
            float x[32];
            unsigned char *o = dst + 34 * b;
            memcpy(x, src + 128 * b, 128);
            float amax = 0.0f;
            int nan = 0;
            for (int i = 0; i < 32; i++) {
                float a = fabsf(x[i]);
                nan |= a != a;
                amax = a > amax ? a : amax;
            }
            if (nan) { o[0] = 0x00; o[1] = 0x7e; memset(o + 2, 0, 32); continue; }
            float d = amax / 127.0f;
            float id = d != 0.0f ? 1.0f / d : 0.0f;
            uint16_t h = mt_h_from_f(mt_u32(d));
            o[0] = (unsigned char)(h & 0xff); o[1] = (unsigned char)(h >> 8);
            /* branch-free so the compiler vectorizes it: signs are random */
            for (int i = 0; i < 32; i++) {
                float v = x[i] * id;
                float a = fabsf(v);
                a = a < 2147483648.0f ? a : 0.0f;  /* NaN/inf quantize to 0 */
                int t = (int)a;
                int r = t + ((a - (float)t) >= 0.5f ? 1 : 0);
                r = v < 0 ? -r : r;
                o[2 + i] = (unsigned char)(r & 0xff);
            }
        }
    }
    #if defined(MT_X86)
    /* The scalar loop above, eight lanes at a time; same operations, same
       roundings, so the output is identical. */
    __attribute__((target("avx2")))
    static void mt_q8_0_quantize_avx2(const unsigned char *src, unsigned char *dst, size_t nblocks) {
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        const __m256 limit = _mm256_set1_ps(2147483648.0f), half = _mm256_set1_ps(0.5f);
        const __m256 zero = _mm256_setzero_ps();
        const __m256i bytemask = _mm256_set1_epi32(0xff);
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (size_t b = 0; b < nblocks; b++) {
            const float *x = (const float *)(const void *)(src + 128 * b);
            unsigned char *o = dst + 34 * b;
            __m256 v[4], a[4];
            for (int k = 0; k < 4; k++) { v[k] = _mm256_loadu_ps(x + 8 * k); a[k] = _mm256_and_ps(v[k], absmask); }
            __m256 unord = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(a[0], a[0], _CMP_UNORD_Q), _mm256_cmp_ps(a[1], a[1], _CMP_UNORD_Q)),
                                        _mm256_or_ps(_mm256_cmp_ps(a[2], a[2], _CMP_UNORD_Q), _mm256_cmp_ps(a[3], a[3], _CMP_UNORD_Q)));
            if (_mm256_movemask_ps(unord)) { o[0] = 0x00; o[1] = 0x7e; memset(o + 2, 0, 32); continue; }
            __m256 m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            float amax = _mm_cvtss_f32(m4);
            float d = amax / 127.0f;
            float id = d != 0.0f ? 1.0f / d : 0.0f;
            uint16_t h = mt_h_from_f(mt_u32(d));
            o[0] = (unsigned char)(h & 0xff); o[1] = (unsigned char)(h >> 8);
            const __m256 idv = _mm256_set1_ps(id);
            __m256i r[4];
            for (int k = 0; k < 4; k++) {
                __m256 p = _mm256_mul_ps(v[k], idv);
                __m256 ap = _mm256_and_ps(p, absmask);
                ap = _mm256_and_ps(ap, _mm256_cmp_ps(ap, limit, _CMP_LT_OQ));
                __m256i t = _mm256_cvttps_epi32(ap);
                __m256 frac = _mm256_sub_ps(ap, _mm256_cvtepi32_ps(t));
                t = _mm256_sub_epi32(t, _mm256_castps_si256(_mm256_cmp_ps(frac, half, _CMP_GE_OQ)));
                __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(p, zero, _CMP_LT_OQ));
                t = _mm256_sub_epi32(_mm256_xor_si256(t, neg), neg);
                r[k] = _mm256_and_si256(t, bytemask);
            }
            __m256i p01 = _mm256_packus_epi32(r[0], r[1]), p23 = _mm256_packus_epi32(r[2], r[3]);
            __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), order);
            _mm256_storeu_si256((__m256i *)(void *)(o + 2), bytes);
        }
    }
    #endif
    static void mt_q8_0_dispatch(const unsigned char *src, unsigned char *dst, size_t nblocks) {
    #if defined(MT_X86)
        if (mt_avx2) { mt_q8_0_quantize_avx2(src, dst, nblocks); return; }
    #endif
        mt_q8_0_quantize(src, dst, nblocks);
    }

    static void mt_q8_0_dequantize(const unsigned char *src, unsigned char *dst, size_t nblocks) {
        for (size_t b = 0; b < nblocks; b++) {
            const unsigned char *q = src + 34 * b;
            float d = mt_f32(mt_f_from_h((uint16_t)(q[0] | (q[1] << 8))));
            float out[32];
            for (int i = 0; i < 32; i++) out[i] = (float)(int8_t)q[2 + i] * d;
            memcpy(dst + 128 * b, out, 128);
        }
    }
    MT_NO_FMA_ATTR
    static inline unsigned mt_q4(float x, float id) {
        MT_NO_FMA_BEGIN
        float v = x * id;
        v = v + 8.5f;
        v = (v > -2147483648.0f && v < 2147483648.0f) ? v : 0.0f;  /* NaN/inf -> 0 */
        unsigned t = (unsigned)((int)v & 0xff);
        return t > 15 ? 15 : t;
    }
    /* ggml q4_0 as gguf.quants computes it: d = (value of max |x|)/-8, nibble
       = min(15, trunc(x/d + 8.5)); low nibbles hold the first 16 elements. */
    MT_NO_FMA_ATTR
    static void mt_q4_0_quantize(const unsigned char *src, unsigned char *dst, size_t nblocks) {
        for (size_t b = 0; b < nblocks; b++) {
            float x[32];
            unsigned char *o = dst + 18 * b;
            memcpy(x, src + 128 * b, 128);
            float amax = -1.0f, mx = 0.0f;
            int nan = 0;
            for (int i = 0; i < 32; i++) {
                float a = fabsf(x[i]);
                nan |= a != a;
                if (a > amax) { amax = a; mx = x[i]; }
            }
            if (nan) { o[0] = 0x00; o[1] = 0x7e; memset(o + 2, 0, 16); continue; }
            float d = mx / -8.0f;
            float id = d != 0.0f ? 1.0f / d : 0.0f;
            uint16_t h = mt_h_from_f(mt_u32(d));
            o[0] = (unsigned char)(h & 0xff); o[1] = (unsigned char)(h >> 8);
            for (int j = 0; j < 16; j++)
                o[2 + j] = (unsigned char)(mt_q4(x[j], id) | (mt_q4(x[j + 16], id) << 4));
        }
    }
    static void mt_q4_0_dequantize(const unsigned char *src, unsigned char *dst, size_t nblocks) {
        for (size_t b = 0; b < nblocks; b++) {
            const unsigned char *q = src + 18 * b;
            float d = mt_f32(mt_f_from_h((uint16_t)(q[0] | (q[1] << 8))));
            float out[32];
            for (int j = 0; j < 16; j++) {
                out[j] = d * (float)((int)(q[2 + j] & 15) - 8);
                out[j + 16] = d * (float)((int)(q[2 + j] >> 4) - 8);
            }
            memcpy(dst + 128 * b, out, 128);
        }
    }
    """
    void mt_kv_init()
    int mt_f16c
    void mt_convert_nd(int sc, int dc, int nd, const Py_ssize_t *shape, const Py_ssize_t *sst,
                       const Py_ssize_t *dst, const char *s, char *d) nogil
    void mt_copy_nd(size_t item, int nd, const Py_ssize_t *shape, const Py_ssize_t *sst,
                    const Py_ssize_t *dst, const char *s, char *d) nogil
    int mt_avx2
    void mt_q8_0_quantize(const uint8_t *src, uint8_t *dst, size_t nblocks) nogil
    void mt_q8_0_dispatch(const uint8_t *src, uint8_t *dst, size_t nblocks) nogil
    void mt_q8_0_dequantize(const uint8_t *src, uint8_t *dst, size_t nblocks) nogil
    void mt_q4_0_quantize(const uint8_t *src, uint8_t *dst, size_t nblocks) nogil
    void mt_q4_0_dequantize(const uint8_t *src, uint8_t *dst, size_t nblocks) nogil

mt_kv_init()

cdef enum:
    F32 = 1
    F16 = 2
    BF16 = 3
    QBLOCK = 32


def features():
    """Which hardware paths this build selected at import."""
    return {"f16c": bool(mt_f16c), "avx2": bool(mt_avx2)}


cdef int _acquire(object obj, Py_buffer *view, int flags) except -1:
    try:
        PyObject_GetBuffer(obj, view, flags)
    except (BufferError, TypeError, ValueError) as exc:
        raise KernelError(f"unsupported buffer: {exc}") from exc
    return 0


cdef int _same_shape(Py_buffer *a, Py_buffer *b) except -1:
    cdef int i
    if a.ndim != b.ndim:
        raise KernelError("source and destination differ in ndim")
    for i in range(a.ndim):
        if a.shape[i] != b.shape[i]:
            raise KernelError("source and destination differ in shape")
    return 0


def convert(src, dst, int src_code, int dst_code):
    """Convert ``src`` into ``dst`` (same shape, any strides) between F32/F16/BF16."""
    cdef Py_buffer s, d
    if src_code == dst_code or not (F32 <= src_code <= BF16 and F32 <= dst_code <= BF16):
        raise KernelError(f"unsupported conversion {src_code} -> {dst_code}")
    _acquire(src, &s, PyBUF_STRIDES)
    try:
        _acquire(dst, &d, PyBUF_STRIDES | PyBUF_WRITABLE)
        try:
            _same_shape(&s, &d)
            if s.itemsize != (4 if src_code == F32 else 2) or d.itemsize != (4 if dst_code == F32 else 2):
                raise KernelError("buffer itemsize does not match the dtype")
            with nogil:
                mt_convert_nd(src_code, dst_code, s.ndim, s.shape, s.strides, d.strides,
                              <const char *>s.buf, <char *>d.buf)
        finally:
            PyBuffer_Release(&d)
    finally:
        PyBuffer_Release(&s)


def copy(src, dst):
    """Copy ``src`` into ``dst``: same shape and itemsize, any strides."""
    cdef Py_buffer s, d
    _acquire(src, &s, PyBUF_STRIDES)
    try:
        _acquire(dst, &d, PyBUF_STRIDES | PyBUF_WRITABLE)
        try:
            _same_shape(&s, &d)
            if s.itemsize != d.itemsize:
                raise KernelError("source and destination differ in itemsize")
            with nogil:
                mt_copy_nd(<size_t>s.itemsize, s.ndim, s.shape, s.strides, d.strides,
                           <const char *>s.buf, <char *>d.buf)
        finally:
            PyBuffer_Release(&d)
    finally:
        PyBuffer_Release(&s)


cdef int _blocks(object src, object dst, Py_buffer *s, Py_buffer *d,
                 Py_ssize_t in_block, Py_ssize_t out_block, Py_ssize_t *nblocks) except -1:
    """Acquire contiguous src/dst and check they hold the same whole number of blocks."""
    _acquire(src, s, PyBUF_SIMPLE)
    try:
        _acquire(dst, d, PyBUF_SIMPLE | PyBUF_WRITABLE)
    except BaseException:
        PyBuffer_Release(s)
        raise
    if s.len % in_block or d.len != s.len // in_block * out_block:
        PyBuffer_Release(d)
        PyBuffer_Release(s)
        raise KernelError("buffer sizes are not matching whole blocks")
    nblocks[0] = s.len // in_block
    return 0


def quantize_q8_0(src, dst, bint portable=False):
    """Quantize contiguous float32 ``src`` into q8_0 blocks in ``dst``.

    ``portable`` forces the scalar loop (tests compare it with the SIMD one).
    """
    cdef Py_buffer s, d
    cdef Py_ssize_t n
    _blocks(src, dst, &s, &d, 4 * QBLOCK, 34, &n)
    try:
        with nogil:
            if portable:
                mt_q8_0_quantize(<const uint8_t *>s.buf, <uint8_t *>d.buf, <size_t>n)
            else:
                mt_q8_0_dispatch(<const uint8_t *>s.buf, <uint8_t *>d.buf, <size_t>n)
    finally:
        PyBuffer_Release(&d)
        PyBuffer_Release(&s)


def dequantize_q8_0(src, dst):
    """Dequantize contiguous q8_0 blocks in ``src`` into float32 ``dst``."""
    cdef Py_buffer s, d
    cdef Py_ssize_t n
    _blocks(src, dst, &s, &d, 34, 4 * QBLOCK, &n)
    try:
        with nogil:
            mt_q8_0_dequantize(<const uint8_t *>s.buf, <uint8_t *>d.buf, <size_t>n)
    finally:
        PyBuffer_Release(&d)
        PyBuffer_Release(&s)


def quantize_q4_0(src, dst):
    """Quantize contiguous float32 ``src`` into q4_0 blocks in ``dst``."""
    cdef Py_buffer s, d
    cdef Py_ssize_t n
    _blocks(src, dst, &s, &d, 4 * QBLOCK, 18, &n)
    try:
        with nogil:
            mt_q4_0_quantize(<const uint8_t *>s.buf, <uint8_t *>d.buf, <size_t>n)
    finally:
        PyBuffer_Release(&d)
        PyBuffer_Release(&s)


def dequantize_q4_0(src, dst):
    """Dequantize contiguous q4_0 blocks in ``src`` into float32 ``dst``."""
    cdef Py_buffer s, d
    cdef Py_ssize_t n
    _blocks(src, dst, &s, &d, 18, 4 * QBLOCK, &n)
    try:
        with nogil:
            mt_q4_0_dequantize(<const uint8_t *>s.buf, <uint8_t *>d.buf, <size_t>n)
    finally:
        PyBuffer_Release(&d)
        PyBuffer_Release(&s)
