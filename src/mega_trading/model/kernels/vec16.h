/* 16-float vectors (GCC vector extensions: AVX-512 registers, or pairs of AVX2 ones) and
 * the few operations both kernels need. Included by causal_attention.c and decode_step.c. */
#ifndef MEGA_TRADING_VEC16_H
#define MEGA_TRADING_VEC16_H

typedef float vf __attribute__((vector_size(64), aligned(4)));  /* 16 floats, unaligned ok */
typedef int vi __attribute__((vector_size(64), aligned(4)));

/* The vector width this build compiled the vf operations to (kernels.vector_bits). Defined
 * here, not static: each kernel is one translation unit, so each library exports it once. */
int kernel_vector_bits(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

static inline vf bcast(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline vi ibcast(int x) { return (vi){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline vf ld(const float *p) { return *(const vf *)p; }
static inline void st(float *p, vf x) { *(vf *)p = x; }
static inline vf sel(vi keep, vf a, vf b) { return (vf)(((vi)a & keep) | ((vi)b & ~keep)); }
static inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
/* Horizontal max / sum by halving (4 shuffles instead of a 16-step dependency chain). */
static const vi HALF8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
static const vi HALF4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
static const vi HALF2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
static const vi HALF1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
static inline float hmax(vf x) {
    x = vmax(x, __builtin_shuffle(x, HALF8));
    x = vmax(x, __builtin_shuffle(x, HALF4));
    x = vmax(x, __builtin_shuffle(x, HALF2));
    return vmax(x, __builtin_shuffle(x, HALF1))[0];
}
static inline float hsum(vf x) {
    x += __builtin_shuffle(x, HALF8);
    x += __builtin_shuffle(x, HALF4);
    x += __builtin_shuffle(x, HALF2);
    return (x + __builtin_shuffle(x, HALF1))[0];
}

/* exp(x) in registers (a libm call per 16 lanes costs more than the scores' FMAs):
 * 2^t with t = x log2(e) clamped to [-127, 127], split as 2^floor(t) * 2^f, f in [0, 1),
 * 2^f by a degree-6 fit (relative error ~1e-8 before float32 rounding). t = -127 gives
 * exactly 0, so masked scores vanish. */
static inline vf vexp(vf x) {
    vf t = x * bcast(1.44269504088896341f);
    t = vmax(t, bcast(-127.f));
    t = sel(t > bcast(127.f), bcast(127.f), t);
    vi n = __builtin_convertvector(t, vi);             /* toward zero */
    vf nf = __builtin_convertvector(n, vf);
    vi below = nf > t;                                  /* negative non-integers: floor */
    n += below;                                         /* -1 where true */
    nf = __builtin_convertvector(n, vf);
    vf f = t - nf;
    vf poly = bcast(2.169060899e-04f);
    poly = poly * f + bcast(1.244308194e-03f);
    poly = poly * f + bcast(9.678472765e-03f);
    poly = poly * f + bcast(5.548352376e-02f);
    poly = poly * f + bcast(2.402298003e-01f);
    poly = poly * f + bcast(6.931470037e-01f);
    poly = poly * f + bcast(1.0f);
    vf scale = (vf)((n + ibcast(127)) << 23);          /* 2^n; n = -127 -> 0.0 */
    return poly * scale;
}

static const vi LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

#endif
