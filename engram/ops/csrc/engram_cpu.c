/* Fused CPU kernels for one decode step of Engram (engram/cpu_kernels.py loads them with ctypes).
 *
 * A decode step on a CPU is dispatch-bound: the hash of a few ids and the ~25 small tensor ops of
 * the Engram branch cost far more in interpreter and dispatcher time than in arithmetic. These
 * two functions do the same math in one call each. They are the fast path of
 * NgramHashMapping._step_scalar and of Engram.forward (no autograd, float32, one token per row;
 * a plain table is looked up here, an offloaded or quantised one by its storage module before
 * the call); tests/test_cpu_kernels.py holds them equal to the plain paths.
 *
 * Shapes: B batch, T time, L Engram layers, N max n-gram, K heads per order, H = (N-1)*K heads,
 * d head row width, E = H*d memory width, M branches (hc_mult), D hidden size, C = M*D,
 * Kc conv kernel, W = (Kc-1)*dil conv history rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static float dotf(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* x mod p for a signed 64-bit x and 0 < p < 2^63, non-negative (Python's %, DESIGN.md §2.4).
 * With 128-bit products: Barrett reduction, m = floor((2^64-1)/p) precomputed, so the quotient
 * estimate floor(|x|*m / 2^64) is q or q-1 and one conditional subtraction makes it exact.
 * Otherwise the hardware division. tests/test_cpu_kernels.py checks it on adversarial values. */
#ifdef __SIZEOF_INT128__
static inline int64_t mod_p(int64_t x, uint64_t p, uint64_t m) {
    const uint64_t u = x < 0 ? (uint64_t)0 - (uint64_t)x : (uint64_t)x; /* |x|, exact even for INT64_MIN */
    uint64_t r = u - (uint64_t)(((unsigned __int128)u * m) >> 64) * p;
    if (r >= p) r -= p;
    return (int64_t)(x < 0 && r ? p - r : r);
}
#else
static inline int64_t mod_p(int64_t x, uint64_t p, uint64_t m) {
    (void)m;
    const int64_t r = x % (int64_t)p;
    return r < 0 ? r + (int64_t)p : r;
}
#endif

/* Residues of n signed mixes by n primes (a test hook for mod_p): out[i] = x[i] mod p[i]. */
void engram_mod(int64_t n, const int64_t *x, const int64_t *p, int64_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = mod_p(x[i], (uint64_t)p[i], UINT64_MAX / (uint64_t)p[i]);
}

/* Hash positions [t0, t1) of B rows of compressed ids: row b is full[b*row_len ...], N-1 ids of
 * history then T; output position t reads full[b*row_len + t .. t+N-1]. mult (L, N), primes and
 * magic (L, H); out (L, B, T, H). The reference's wrapping int64 product and xor, in uint64. */
static void hash_rows(int64_t B, int64_t T, int64_t t0, int64_t t1, const int64_t *full, int64_t row_len,
                      int64_t L, int64_t N, int64_t K, const int64_t *mult, const int64_t *primes,
                      const uint64_t *magic, int64_t *out) {
    const int64_t H = (N - 1) * K;
    for (int64_t l = 0; l < L; l++) {
        const int64_t *ml = mult + l * N, *pl = primes + l * H;
        const uint64_t *mg = magic + l * H;
        for (int64_t b = 0; b < B; b++) {
            const int64_t *row = full + b * row_len + (N - 1);
            for (int64_t t = t0; t < t1; t++) {
                int64_t *o = out + ((l * B + b) * T + t) * H;
                uint64_t mix = 0;
                for (int64_t k = 0; k < N; k++) {
                    mix ^= (uint64_t)row[t - k] * (uint64_t)ml[k];
                    if (k >= 1)
                        for (int64_t j = 0; j < K; j++)
                            o[(k - 1) * K + j] = mod_p((int64_t)mix, (uint64_t)pl[(k - 1) * K + j], mg[(k - 1) * K + j]);
                }
            }
        }
    }
}

/* Hash already compressed ids (NgramHashMapping.hash_compressed): full (B, row_len) with
 * row_len = N-1+T (history then ids), positions [t0, t1) of out (L, B, T, H); magic (L, H) is
 * floor((2^64-1)/p) of every prime (the caller computes it once). Several calls on disjoint
 * [t0, t1) may run at once (threads). */
void engram_hash(int64_t B, int64_t T, int64_t t0, int64_t t1, const int64_t *full, int64_t L, int64_t N, int64_t K,
                 const int64_t *mult, const int64_t *primes, const uint64_t *magic, int64_t *out) {
    hash_rows(B, T, t0, t1, full, N - 1 + T, L, N, K, mult, primes, magic, out);
}

/* Compress, hash and advance the history (NgramHashMapping.hash_step, a few tokens).
 *
 * ids (B, T) raw ids; lookup (vocab) compression table; hist (B, hist_len) compressed history
 * (the last N-1 are read) or NULL for a pad-filled start; mask (B, T) bytes, 0 = padding (reads
 * as pad), or NULL; mult (L, N); primes and magic (L, H) as in engram_hash. Writes out (L, B, T, H)
 * and next_hist (B, N-1).
 * Returns 0, 1 when an id is >= vocab (nothing meaningful written; the caller raises), 2 when
 * out of memory. Negative ids pass through compression unchanged, as in the reference. */
int engram_hash_step(int64_t B, int64_t T, const int64_t *ids, const int64_t *lookup, int64_t vocab,
                     const int64_t *hist, int64_t hist_len, const uint8_t *mask, int64_t pad,
                     int64_t L, int64_t N, int64_t K, const int64_t *mult, const int64_t *primes,
                     const uint64_t *magic, int64_t *out, int64_t *next_hist) {
    const int64_t h = N - 1, len = h + T;
    int64_t *full = (int64_t *)malloc((size_t)(B * len > 0 ? B * len : 1) * sizeof(int64_t));
    if (!full) return 2;
    for (int64_t b = 0; b < B; b++) {
        int64_t *win = full + b * len;
        for (int64_t i = 0; i < h; i++) win[i] = hist ? hist[b * hist_len + hist_len - h + i] : pad;
        for (int64_t t = 0; t < T; t++) {
            int64_t v = ids[b * T + t];
            if (v >= vocab) {
                free(full);
                return 1;
            }
            v = v >= 0 ? lookup[v] : v;
            win[h + t] = (mask && !mask[b * T + t]) ? pad : v;
        }
        for (int64_t i = 0; i < h; i++) next_hist[b * h + i] = win[T + i];
    }
    hash_rows(B, T, 0, T, full, len, L, N, K, mult, primes, magic, out);
    free(full);
    return 0;
}

/* One token per row of the Engram branch (engram/module.py, Engram.forward and ShortConv).
 *
 * mem (B, E) the looked-up memory vectors (an offloaded or quantised storage module's rows), or NULL
 * to look them up here in a plain table: hash_ids (B, H) per-head rows, offsets (H), table
 * (num_rows, E/H); wv (D, E), bv (D) or NULL;
 * wk (C, E) or NULL (no gate), bk (C) or NULL, wkn/wqn (M, D); hs (B, M, D) hidden states;
 * gate_c1 = float(sqrt(D) * eps), gate_c2 = float(D**-0.5); cw (C, Kc) or NULL (no short conv),
 * cnorm (M, D), conv_eps, conv_inv_d = float(1/D); past (B, past_len, C) conv inputs (its last W
 * rows are the window) or NULL (zeros); mask (B) bytes, 0 = padding (kept out of the conv), or
 * NULL. Writes out (B, M, D) and, when tail is not NULL, the new conv history tail (B, W, C).
 * Returns 0, 1 when a looked-up row is outside the table (nothing meaningful written; the caller
 * takes the plain path, which raises), 2 when out of memory. */
int engram_branch_step(int64_t B, int64_t M, int64_t D, int64_t E, const float *mem, const int64_t *hash_ids,
                       int64_t H, const int64_t *offsets, int64_t num_rows, const float *table, const float *wv,
                       const float *bv, const float *wk, const float *bk, const float *wkn, const float *wqn,
                       const float *hs, float gate_c1, float gate_c2, const float *cw, int64_t Kc, int64_t dil,
                       const float *cnorm, float conv_eps, float conv_inv_d, const float *past, int64_t past_len,
                       const uint8_t *mask, float *tail, float *out) {
    const int64_t C = M * D, W = cw ? (Kc - 1) * dil : 0, d = H > 0 ? E / H : 0;
    float *buf = (float *)malloc((size_t)(E + D + 3 * C) * sizeof(float));
    if (!buf) return 2;
    float *row_buf = buf, *v = row_buf + E, *u = v + D, *xn = u + C, *k = xn + C;
    for (int64_t b = 0; b < B; b++) {
        const float *e = mem ? mem + b * E : row_buf;
        for (int64_t j = 0; !mem && j < H; j++) { /* the lookup of a plain table: flat row = row + offset */
            const int64_t row = hash_ids[b * H + j] + offsets[j];
            if (row < 0 || row >= num_rows) {
                free(buf);
                return 1;
            }
            memcpy(row_buf + j * d, table + row * d, (size_t)d * sizeof(float));
        }
        for (int64_t o = 0; o < D; o++) v[o] = dotf(wv + o * E, e, E) + (bv ? bv[o] : 0.0f); /* v = W_V e */
        for (int64_t m = 0; m < M; m++) {
            float a = 1.0f;
            if (wk) { /* the context gate, factored as in Engram.gate */
                const float *q = hs + (b * M + m) * D, *wkm = wkn + m * D, *wqm = wqn + m * D;
                for (int64_t o = 0; o < D; o++)
                    k[o] = dotf(wk + (m * D + o) * E, e, E) + (bk ? bk[m * D + o] : 0.0f);
                const float sk = dotf(k, k, D), sq = dotf(q, q, D);
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < D; i++) dot += (k[i] * wkm[i]) * (q[i] * wqm[i]);
                const float rk = 1.0f / sqrtf(gate_c1 + sk * gate_c2), rq = 1.0f / sqrtf(gate_c1 + sq * gate_c2);
                const float z = dot * (rk * rq);
                const float sign = z > 0.0f ? 1.0f : (z < 0.0f ? -1.0f : 0.0f);
                a = 1.0f / (1.0f + expf(-(sqrtf(fmaxf(fabsf(z), 1e-6f)) * sign)));
            }
            for (int64_t i = 0; i < D; i++) u[m * D + i] = a * v[i];
        }
        float *ob = out + b * C;
        if (!cw) {
            memcpy(ob, u, (size_t)C * sizeof(float));
            continue;
        }
        const int keep = !mask || mask[b];
        for (int64_t m = 0; m < M; m++) { /* RMSNorm of each branch before the conv */
            const float *um = u + m * D;
            const float r = 1.0f / sqrtf(conv_eps + dotf(um, um, D) * conv_inv_d);
            for (int64_t i = 0; i < D; i++) xn[m * D + i] = keep ? (um[i] * r) * cnorm[m * D + i] : 0.0f;
        }
        /* window rows 0..W-1 are the past conv inputs, row W is xn; tap kk reads row kk*dil */
        const float *pb = past ? past + b * past_len * C + (past_len - W) * C : NULL;
        for (int64_t c = 0; c < C; c++) {
            float y = 0.0f;
            for (int64_t kk = 0; kk < Kc; kk++) {
                const int64_t r = kk * dil;
                const float x = r < W ? (pb ? pb[r * C + c] : 0.0f) : xn[c];
                y += x * cw[c * Kc + kk];
            }
            ob[c] = u[c] + y / (1.0f + expf(-y)); /* u + SiLU(conv) */
        }
        if (tail) {
            float *tb = tail + b * W * C;
            for (int64_t r = 1; r < W; r++) {
                if (pb) memcpy(tb + (r - 1) * C, pb + r * C, (size_t)C * sizeof(float));
                else memset(tb + (r - 1) * C, 0, (size_t)C * sizeof(float));
            }
            if (W > 0) memcpy(tb + (W - 1) * C, xn, (size_t)C * sizeof(float));
        }
    }
    free(buf);
    return 0;
}
