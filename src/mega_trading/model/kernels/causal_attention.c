/* Causal grouped-query attention for CPU training: forward and backward, float32.
 *
 * Why hand-written: PyTorch's CPU flash-attention kernel tiles 64 queries x all keys and
 * runs at about a third of the matmul peak at small head dims (the micro preset's 32),
 * where the model spends ~23 % of a training step (BENCHMARKS.md). Here 4 query rows x
 * 64 keys of scores stay in vector registers, the causal triangle is skipped 16 keys at a
 * time, and the backward is a single pass per (batch, key/value head), so it needs no
 * atomics and its sums always run in the same order: results are deterministic.
 *
 * Compiled at run time by mega_trading.model.kernels (cc -O3 -march=native -fopenmp ...,
 * -DHEAD_DIM=<d>); GCC vector extensions, so the same source builds for AVX2 or AVX-512.
 *
 * Layout: q, out, dout, dq: [B, H, T, D] and k, v, dk, dv: [B, KV, T, D] with any strides
 * for b, h, t (d contiguous), so the model's transposed views need no copies; kt, vt: keys
 * and values transposed, [B, KV, D, T] contiguous; lse, delta: [B, H, T] contiguous.
 * T must be a multiple of 64 (the caller pads). Masked scores are a large finite negative
 * value, so no inf - inf can make a NaN.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>

#ifndef HEAD_DIM
#define HEAD_DIM 32
#endif
#define D HEAD_DIM
#define KT 64           /* keys per tile */
#define R 4             /* query rows per register block */
#define QB 32           /* query rows per parallel task in the forward */
#define NV (KT / 16)
#define DV (D / 16)
#define MASKED (-1e30f)

typedef struct { long b, h, t; } strides;

#include "vec16.h"

/* Scores of keys j0 + 16 c + lane for a row that sees keys < j0 + visible. */
static inline vf masked(vf s, int c, long visible) {
    if (16 * c + 16 <= visible) return s;
    return sel(LANE + ibcast(16 * c) < ibcast((int)visible), s, bcast(MASKED));
}

/* s[r][c] = sum_d a[r][d] * bt[d * T + j0 + 16 c + lane] for the first nv vectors */
static inline void dot_tile(float a[R][D], const float *bt, long T, long j0, int nv,
                            vf s[R][NV]) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NV; c++) s[r][c] = bcast(0.f);
    if (nv == NV) {
        for (int d = 0; d < D; d++) {
            const float *bd = bt + d * T + j0;
            vf k0 = ld(bd), k1 = ld(bd + 16), k2 = ld(bd + 32), k3 = ld(bd + 48);
            for (int r = 0; r < R; r++) {
                vf x = bcast(a[r][d]);
                s[r][0] += x * k0; s[r][1] += x * k1; s[r][2] += x * k2; s[r][3] += x * k3;
            }
        }
        return;
    }
    for (int c = 0; c < nv; c++) {  /* the diagonal tile: only the key vectors in reach */
        vf a0 = bcast(0.f), a1 = a0, a2 = a0, a3 = a0;
        for (int d = 0; d < D; d++) {
            vf kd = ld(bt + d * T + j0 + 16 * c);
            a0 += bcast(a[0][d]) * kd; a1 += bcast(a[1][d]) * kd;
            a2 += bcast(a[2][d]) * kd; a3 += bcast(a[3][d]) * kd;
        }
        s[0][c] = a0; s[1][c] = a1; s[2][c] = a2; s[3][c] = a3;
    }
}

static void forward_rows(const float *q, strides qs, const float *kt, const float *v,
                         strides vs, float *out, strides os, float *lse, long T, long i0,
                         float scale) {
    float qr[R][D], m[R], l[R], p[R][KT];
    vf acc[R][DV];
    for (int r = 0; r < R; r++) {
        for (int d = 0; d < D; d++) qr[r][d] = q[(i0 + r) * qs.t + d] * scale;
        m[r] = MASKED; l[r] = 0.f;
        for (int c = 0; c < DV; c++) acc[r][c] = bcast(0.f);
    }
    long end = i0 + R;  /* keys < end are visible to some row of the block */
    for (long j0 = 0; j0 < end; j0 += KT) {
        int nv = (int)((end - j0 + 15) / 16);
        if (nv > NV) nv = NV;
        vf s[R][NV];
        dot_tile(qr, kt, T, j0, nv, s);
        for (int r = 0; r < R; r++) {
            long visible = i0 + r - j0 + 1;
            vf best = bcast(m[r]);
            for (int c = 0; c < nv; c++) best = vmax(best, s[r][c] = masked(s[r][c], c, visible));
            float mx = hmax(best);
            vf top = bcast(mx), total = bcast(0.f);
            for (int c = 0; c < nv; c++) {
                vf e = vexp(s[r][c] - top);
                st(p[r] + 16 * c, e);
                total += e;
            }
            float sum = hsum(total);
            float rescale = expf(m[r] - mx);
            l[r] = l[r] * rescale + sum;
            m[r] = mx;
            for (int c = 0; c < DV; c++) acc[r][c] *= bcast(rescale);
        }
        long jn = end - j0 < KT ? end - j0 : KT;
        for (long j = 0; j < jn; j++) {
            const float *vj = v + (j0 + j) * vs.t;
            vf vv[DV];
            for (int c = 0; c < DV; c++) vv[c] = ld(vj + 16 * c);
            for (int r = 0; r < R; r++) {
                vf pr = bcast(p[r][j]);
                for (int c = 0; c < DV; c++) acc[r][c] += pr * vv[c];
            }
        }
    }
    for (int r = 0; r < R; r++) {
        vf inv = bcast(1.f / l[r]);
        for (int c = 0; c < DV; c++) st(out + (i0 + r) * os.t + 16 * c, acc[r][c] * inv);
        lse[i0 + r] = m[r] + logf(l[r]);
    }
}

int head_dim(void) { return D; }

void attention_forward(const float *q, strides qs, const float *kt, const float *v, strides vs,
                       float *out, strides os, float *lse, long B, long H, long KV, long T,
                       float scale) {
    long group = H / KV, blocks = T / QB;
    #pragma omp parallel for collapse(2) schedule(dynamic, 2)
    for (long bh = 0; bh < B * H; bh++) {
        for (long blk = blocks - 1; blk >= 0; blk--) {  /* longest rows first */
            long b = bh / H, h = bh % H, kvh = h / group;
            const float *qh = q + b * qs.b + h * qs.h;
            const float *kth = kt + (b * KV + kvh) * D * T;
            const float *vh = v + b * vs.b + kvh * vs.h;
            float *oh = out + b * os.b + h * os.h;
            for (long i0 = blk * QB; i0 < (blk + 1) * QB; i0 += R)
                forward_rows(qh, qs, kth, vh, vs, oh, os, lse + bh * T, T, i0, scale);
        }
    }
}

/* One query head against its key/value head: adds to dk, dv; writes dq. */
static void backward_head(const float *q, strides qs, const float *k, strides ks,
                          const float *kt, const float *vt, const float *dout, strides gs,
                          const float *lse, const float *delta, float *dq, strides dqs,
                          float *dk, strides dks, float *dv, strides dvs, long T, float scale) {
    for (long i0 = 0; i0 < T; i0 += R) {
        float qr[R][D], go[R][D], p[R][KT], ds[R][KT];
        vf dqa[R][DV];
        for (int r = 0; r < R; r++) {
            for (int d = 0; d < D; d++) {
                qr[r][d] = q[(i0 + r) * qs.t + d] * scale;
                go[r][d] = dout[(i0 + r) * gs.t + d];
            }
            for (int c = 0; c < DV; c++) dqa[r][c] = bcast(0.f);
        }
        long end = i0 + R;
        for (long j0 = 0; j0 < end; j0 += KT) {
            int nv = (int)((end - j0 + 15) / 16);
            if (nv > NV) nv = NV;
            vf s[R][NV], dp[R][NV];
            dot_tile(qr, kt, T, j0, nv, s);
            dot_tile(go, vt, T, j0, nv, dp);
            for (int r = 0; r < R; r++) {
                long visible = i0 + r - j0 + 1;
                vf lr = bcast(lse[i0 + r]), dr = bcast(delta[i0 + r]);
                for (int c = 0; c < nv; c++) {
                    vf e = vexp(masked(s[r][c], c, visible) - lr);
                    st(p[r] + 16 * c, e);
                    st(ds[r] + 16 * c, e * (dp[r][c] - dr));
                }
            }
            long jn = end - j0 < KT ? end - j0 : KT;
            for (long j = 0; j < jn; j++) {
                const float *kj = k + (j0 + j) * ks.t;
                float *dvj = dv + (j0 + j) * dvs.t, *dkj = dk + (j0 + j) * dks.t;
                vf kk[DV], va[DV], ka[DV];
                for (int c = 0; c < DV; c++) { kk[c] = ld(kj + 16 * c); va[c] = ld(dvj + 16 * c); ka[c] = ld(dkj + 16 * c); }
                for (int r = 0; r < R; r++) {
                    vf pr = bcast(p[r][j]), dsr = bcast(ds[r][j]);
                    for (int c = 0; c < DV; c++) {
                        dqa[r][c] += dsr * kk[c];
                        va[c] += pr * ld(go[r] + 16 * c);
                        ka[c] += dsr * ld(qr[r] + 16 * c);  /* qr carries the scale */
                    }
                }
                for (int c = 0; c < DV; c++) { st(dvj + 16 * c, va[c]); st(dkj + 16 * c, ka[c]); }
            }
        }
        vf sc = bcast(scale);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < DV; c++) st(dq + (i0 + r) * dqs.t + 16 * c, dqa[r][c] * sc);
    }
}

void attention_backward(const float *q, strides qs, const float *k, strides ks,
                        const float *kt, const float *vt, const float *dout, strides gs,
                        const float *lse, const float *delta, float *dq, strides dqs,
                        float *dk, strides dks, float *dv, strides dvs,
                        long B, long H, long KV, long T, float scale) {
    long group = H / KV;
    #pragma omp parallel for schedule(dynamic, 1)
    for (long bk = 0; bk < B * KV; bk++) {
        long b = bk / KV, kvh = bk % KV;
        float *dkh = dk + b * dks.b + kvh * dks.h, *dvh = dv + b * dvs.b + kvh * dvs.h;
        for (long t = 0; t < T; t++) {
            memset(dkh + t * dks.t, 0, sizeof(float) * D);
            memset(dvh + t * dvs.t, 0, sizeof(float) * D);
        }
        for (long g = 0; g < group; g++) {
            long h = kvh * group + g, bh = b * H + h;
            backward_head(q + b * qs.b + h * qs.h, qs, k + b * ks.b + kvh * ks.h, ks,
                          kt + bk * D * T, vt + bk * D * T, dout + b * gs.b + h * gs.h, gs,
                          lse + bh * T, delta + bh * T, dq + b * dqs.b + h * dqs.h, dqs,
                          dkh, dks, dvh, dvs, T, scale);
        }
    }
}
