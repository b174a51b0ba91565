/* One decode step of the Llama-style decoder through all its layers, float32, on CPU.
 *
 * Why hand-written: a decode step feeds one token per rollout, so each of its ~90 PyTorch
 * ops is tiny and the step is bound by per-op overhead and by re-reading weights that the
 * KV-cache stream evicted (BENCHMARKS.md, bench/generate.py). One call per step keeps the
 * activations ([B, D] rows) in cache and leaves only the cache read and the weight reads.
 *
 * Same maths as mega_trading.model.decode.decode_step on its fused weights, transposed here to
 * [in, out] so that a block of 4 rows x 64 outputs is accumulated in vector registers:
 *   x [B, D] in/out; per layer: wqkv [D, 2 (H + K) Dh + K Dh] (q, k, rotate_half(q),
 *   rotate_half(k), v; attention norm gain folded in), wo [H Dh, D], w13 [D, 2 F] (gate,
 *   up; ffn norm gain folded in), w2 [F, D]; cos, sin [Dh] at pos; cache k, v
 *   [layers, B, K, max_len, Dh] and the keys again in transposed tiles of 16, kt [layers,
 *   B, K, kt_len / 16, Dh, 16] (kt_len >= max_len, a multiple of 16): both get the new
 *   keys; head [D, vocab]
 *   (final norm gain folded in, vocab padded to a multiple of 16) -> logits [B, vocab].
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "vec16.h"

/* out[M, N] (+)= a[M, K] @ bt[K, N]; N a multiple of 16. Blocks of 4 rows x 64 outputs. */
static void gemm(const float *a, const float *bt, float *out, long M, long K, long N,
                 int accumulate) {
    long row_blocks = (M + 3) / 4, col_blocks = (N + 63) / 64;
    #pragma omp parallel for collapse(2) schedule(static)
    for (long rb = 0; rb < row_blocks; rb++) {
        for (long cb = 0; cb < col_blocks; cb++) {
            long m0 = rb * 4, n0 = cb * 64;
            int rows = M - m0 < 4 ? (int)(M - m0) : 4;
            int nv = (int)((N - n0) / 16 < 4 ? (N - n0) / 16 : 4);
            vf acc[4][4];
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++) acc[r][c] = bcast(0.f);
            if (rows == 4 && nv == 4) {
                for (long k = 0; k < K; k++) {
                    const float *b = bt + k * N + n0;
                    vf b0 = ld(b), b1 = ld(b + 16), b2 = ld(b + 32), b3 = ld(b + 48);
                    for (int r = 0; r < 4; r++) {
                        vf x = bcast(a[(m0 + r) * K + k]);
                        acc[r][0] += x * b0; acc[r][1] += x * b1;
                        acc[r][2] += x * b2; acc[r][3] += x * b3;
                    }
                }
            } else {
                for (long k = 0; k < K; k++)
                    for (int c = 0; c < nv; c++) {
                        vf b = ld(bt + k * N + n0 + 16 * c);
                        for (int r = 0; r < rows; r++) acc[r][c] += bcast(a[(m0 + r) * K + k]) * b;
                    }
            }
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < nv; c++) {
                    float *o = out + (m0 + r) * N + n0 + 16 * c;
                    st(o, accumulate ? ld(o) + acc[r][c] : acc[r][c]);
                }
        }
    }
}

/* RMSNorm without its gain (folded into the next weights): out = x / rms(x). */
static void normalize(const float *x, float *out, long B, long D, float eps) {
    for (long b = 0; b < B; b++) {
        const float *row = x + b * D;
        float ss = 0.f;
        for (long d = 0; d < D; d++) ss += row[d] * row[d];
        float inv = 1.f / sqrtf(ss / (float)D + eps);
        for (long d = 0; d < D; d++) out[b * D + d] = row[d] * inv;
    }
}

/* The G query heads that share one key/value head, over keys 0..L-1: att[g] =
 * softmax(q[g] K / sqrt(Dh)) V. Keys come in tiles of 16, each transposed ([kt_len / 16,
 * Dh, 16]), so 16 scores at a time are plain FMAs with no horizontal sums, and the keys
 * are read as one sequential stream; each key and value is read once for the group. */
static void attend_group(const float *q, const float *kt, long kt_len, const float *values,
                         long G, long L, long Dh, float scale, float *scores, long stride,
                         float *att) {
    long nvec = Dh / 16, padded = (L + 15) / 16 * 16;
    float qs[8][128];  /* [g][d]: G <= 8, Dh <= 128 */
    for (long g = 0; g < G; g++)
        for (long d = 0; d < Dh; d++) qs[g][d] = q[g * Dh + d] * scale;
    vf best[8];
    for (long g = 0; g < G; g++) best[g] = bcast(-INFINITY);
    for (long j0 = 0; j0 < padded; j0 += 16) {
        vf acc[8];
        for (long g = 0; g < G; g++) acc[g] = bcast(0.f);
        const float *tile = kt + j0 * Dh;  /* keys j0..j0+15 as [Dh, 16]: one stream */
        for (long d = 0; d < Dh; d++) {
            vf kd = ld(tile + d * 16);
            for (long g = 0; g < G; g++) acc[g] += bcast(qs[g][d]) * kd;
        }
        if (j0 + 16 > L) {
            vi keep = LANE + ibcast((int)j0) < ibcast((int)L);
            for (long g = 0; g < G; g++) acc[g] = sel(keep, acc[g], bcast(-INFINITY));
        }
        for (long g = 0; g < G; g++) {
            st(scores + g * stride + j0, acc[g]);
            best[g] = vmax(best[g], acc[g]);
        }
    }
    float inv[8];
    for (long g = 0; g < G; g++) {
        float *sg = scores + g * stride;
        vf top = bcast(hmax(best[g])), total = bcast(0.f);
        for (long j = 0; j < padded; j += 16) {
            vf e = vexp(ld(sg + j) - top);
            st(sg + j, e);
            total += e;
        }
        inv[g] = 1.f / hsum(total);
    }
    vf out[8][8];
    for (long g = 0; g < G; g++)
        for (long c = 0; c < nvec; c++) out[g][c] = bcast(0.f);
    for (long j = 0; j < L; j++) {
        const float *vj = values + j * Dh;
        vf vv[8];
        for (long c = 0; c < nvec; c++) vv[c] = ld(vj + 16 * c);
        for (long g = 0; g < G; g++) {
            vf pg = bcast(scores[g * stride + j]);
            for (long c = 0; c < nvec; c++) out[g][c] += pg * vv[c];
        }
    }
    for (long g = 0; g < G; g++)
        for (long c = 0; c < nvec; c++) st(att + g * Dh + 16 * c, out[g][c] * bcast(inv[g]));
}

int decode_layers(float *x, long B, long D, long n_layers, const float *const *wqkv,
                  const float *const *wo, const float *const *w13, const float *const *w2,
                  long H, long KV, long Dh, long F, const float *cos, const float *sin,
                  float *cache_k, float *cache_v, float *cache_kt, long kt_len, long max_len,
                  long pos, float eps, const float *head, long vocab, float *logits) {
    if (Dh % 16 || Dh > 128 || D % 16 || F % 16 || H % KV || H / KV > 8 || kt_len % 16 ||
        vocab % 16 ||
        pos >= max_len || kt_len < max_len)
        return 1;
    long G = H / KV, n_qk = (H + KV) * Dh, n_out = 2 * n_qk + KV * Dh, L = pos + 1;
    long padded = (L + 15) / 16 * 16;
    float *xn = malloc(sizeof(float) * B * D), *y = malloc(sizeof(float) * B * n_out);
    float *att = malloc(sizeof(float) * B * H * Dh), *gu = malloc(sizeof(float) * B * 2 * F);
    float *hidden = malloc(sizeof(float) * B * F);
    float *scores = malloc(sizeof(float) * B * H * padded);
    if (!xn || !y || !att || !gu || !hidden || !scores) {
        free(xn); free(y); free(att); free(gu); free(hidden); free(scores);
        return 2;
    }
    float scale = 1.f / sqrtf((float)Dh);
    for (long layer = 0; layer < n_layers; layer++) {
        normalize(x, xn, B, D, eps);
        gemm(xn, wqkv[layer], y, B, D, n_out, 0);
        float *k_layer = cache_k + layer * B * KV * max_len * Dh;
        float *kt_layer = cache_kt + layer * B * KV * Dh * kt_len;
        float *v_layer = cache_v + layer * B * KV * max_len * Dh;
        for (long b = 0; b < B; b++) {  /* RoPE: x cos + rotate_half(x) sin; write k, v */
            float *row = y + b * n_out;
            for (long head = 0; head < H + KV; head++) {
                float *x0 = row + head * Dh, *rotated = row + n_qk + head * Dh;
                for (long d = 0; d < Dh; d++) x0[d] = x0[d] * cos[d] + rotated[d] * sin[d];
            }
            for (long kvh = 0; kvh < KV; kvh++) {
                long slot = ((b * KV + kvh) * max_len + pos) * Dh;
                memcpy(k_layer + slot, row + (H + kvh) * Dh, sizeof(float) * Dh);
                memcpy(v_layer + slot, row + 2 * n_qk + kvh * Dh, sizeof(float) * Dh);
                float *lane = kt_layer + (b * KV + kvh) * Dh * kt_len + (pos / 16) * 16 * Dh
                              + pos % 16;
                for (long d = 0; d < Dh; d++) lane[d * 16] = row[(H + kvh) * Dh + d];
            }
        }
        #pragma omp parallel for schedule(static)
        for (long bk = 0; bk < B * KV; bk++) {
            long b = bk / KV, kvh = bk % KV, h0 = kvh * G;
            long base = bk * max_len * Dh;
            attend_group(y + b * n_out + h0 * Dh, kt_layer + bk * Dh * kt_len, kt_len,
                         v_layer + base, G, L, Dh, scale, scores + (b * H + h0) * padded, padded,
                         att + (b * H + h0) * Dh);
        }
        gemm(att, wo[layer], x, B, H * Dh, D, 1);
        normalize(x, xn, B, D, eps);
        gemm(xn, w13[layer], gu, B, D, 2 * F, 0);
        for (long b = 0; b < B; b++)  /* SwiGLU: silu(gate) * up */
            for (long i = 0; i < F; i += 16) {
                vf g = ld(gu + b * 2 * F + i), u = ld(gu + b * 2 * F + F + i);
                st(hidden + b * F + i, g / (bcast(1.f) + vexp(-g)) * u);
            }
        gemm(hidden, w2[layer], x, B, F, D, 1);
    }
    if (head) {  /* final norm (gain folded into head) and the output head [D, vocab] */
        normalize(x, xn, B, D, eps);
        gemm(xn, head, logits, B, D, vocab, 0);
    }
    free(xn); free(y); free(att); free(gu); free(hidden); free(scores);
    return 0;
}
