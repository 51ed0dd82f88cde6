/* The N-gram hash on a CPU (engram/ops/cpu.py loads these with ctypes).
 *
 * engram_hash is engram/ops/hash.py's formula over a whole batch (4-6x torch's int64 remainder,
 * and faster than torch.compile of it: a Barrett modulo instead of a 64-bit division);
 * engram_hash_step compresses, hashes and advances the history of a decode step in one call.
 * tests/test_ops.py holds both bit-identical to the formula.
 *
 * Shapes: B batch, T time, L Engram layers, N max n-gram, K heads per order, H = (N-1)*K heads.
 */
#include <stdint.h>
#include <stdlib.h>

/* x mod p for a signed 64-bit x and 0 < p < 2^63, non-negative (Python's %, DESIGN.md §2.4).
 * With 128-bit products: Barrett reduction, m = floor((2^64-1)/p) precomputed, so the quotient
 * estimate floor(|x|*m / 2^64) is q or q-1 and one conditional subtraction makes it exact.
 * Otherwise the hardware division. tests/test_ops.py checks it on adversarial values. */
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

/* mod_p with |x| and the sign of x given (one order's K heads share them). */
#ifdef __SIZEOF_INT128__
static inline int64_t mod_abs(uint64_t u, int neg, uint64_t p, uint64_t m) {
    uint64_t r = u - (uint64_t)(((unsigned __int128)u * m) >> 64) * p;
    if (r >= p) r -= p;
    return (int64_t)(neg && r ? p - r : r);
}
#else
static inline int64_t mod_abs(uint64_t u, int neg, uint64_t p, uint64_t m) {
    (void)m;
    const uint64_t r = u % p;
    return (int64_t)(neg && r ? p - r : r);
}
#endif

/* Residues of n signed mixes by n primes (a test hook for mod_p): out[i] = x[i] mod p[i]. */
void engram_mod(int64_t n, const int64_t *x, const int64_t *p, int64_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = mod_p(x[i], (uint64_t)p[i], UINT64_MAX / (uint64_t)p[i]);
}

/* Hash positions [t0, t1) of B rows of compressed ids: row b is full[b*row_len ...], N-1 ids of
 * history then T; output position t reads full[b*row_len + t .. t+N-1]. mult (L, N), primes and
 * magic (L, H); out (L, B, T, H). The reference's wrapping int64 product and xor, in uint64. */
static void hash_rows_plain(int64_t B, int64_t T, int64_t t0, int64_t t1, const int64_t *full, int64_t row_len,
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
                uint64_t mix = (uint64_t)row[t] * (uint64_t)ml[0];
                for (int64_t k = 1; k < N; k++) { /* order k+1: |mix| and its sign once, then K residues */
                    mix ^= (uint64_t)row[t - k] * (uint64_t)ml[k];
                    const int neg = (int64_t)mix < 0;
                    const uint64_t u = neg ? (uint64_t)0 - mix : mix;
                    const int64_t off = (k - 1) * K;
                    for (int64_t j = 0; j < K; j++) o[off + j] = mod_abs(u, neg, (uint64_t)pl[off + j], mg[off + j]);
                }
            }
        }
    }
}

/* hash_rows_plain for packed rows: starts (B, T) bytes, nonzero where a document starts; there the
 * n-gram history resets as at a sequence start (ids before the latest start at or before t read
 * as pad). A separate copy, so the plain path stays exactly as fast as before. */
static void hash_rows_docs(int64_t B, int64_t T, int64_t t0, int64_t t1, const int64_t *full, int64_t row_len,
                           int64_t L, int64_t N, int64_t K, const int64_t *mult, const int64_t *primes,
                           const uint64_t *magic, int64_t *out, const uint8_t *starts, int64_t pad) {
    const int64_t H = (N - 1) * K;
    for (int64_t l = 0; l < L; l++) {
        const int64_t *ml = mult + l * N, *pl = primes + l * H;
        const uint64_t *mg = magic + l * H;
        for (int64_t b = 0; b < B; b++) {
            const int64_t *row = full + b * row_len + (N - 1);
            const uint8_t *st = starts + b * T;
            int64_t last = -N; /* latest document start <= t; -N: none within reach of the history */
            for (int64_t i = t0 - 1; i >= 0 && i >= t0 - (N - 1); i--)
                if (st[i]) { last = i; break; }
            for (int64_t t = t0; t < t1; t++) {
                int64_t *o = out + ((l * B + b) * T + t) * H;
                if (st[t]) last = t;
                const int64_t since = t - last; /* ids t-k with k > since belong to an earlier document */
                uint64_t mix = (uint64_t)row[t] * (uint64_t)ml[0];
                for (int64_t k = 1; k < N; k++) {
                    const int64_t v = k > since ? pad : row[t - k];
                    mix ^= (uint64_t)v * (uint64_t)ml[k];
                    const int neg = (int64_t)mix < 0;
                    const uint64_t u = neg ? (uint64_t)0 - mix : mix;
                    const int64_t off = (k - 1) * K;
                    for (int64_t j = 0; j < K; j++) o[off + j] = mod_abs(u, neg, (uint64_t)pl[off + j], mg[off + j]);
                }
            }
        }
    }
}

static void hash_rows(int64_t B, int64_t T, int64_t t0, int64_t t1, const int64_t *full, int64_t row_len,
                      int64_t L, int64_t N, int64_t K, const int64_t *mult, const int64_t *primes,
                      const uint64_t *magic, int64_t *out, const uint8_t *starts, int64_t pad) {
    if (starts)
        hash_rows_docs(B, T, t0, t1, full, row_len, L, N, K, mult, primes, magic, out, starts, pad);
    else
        hash_rows_plain(B, T, t0, t1, full, row_len, L, N, K, mult, primes, magic, out);
}

void engram_hash(int64_t B, int64_t T, int64_t t0, int64_t t1, const int64_t *full, int64_t L, int64_t N, int64_t K,
                 const int64_t *mult, const int64_t *primes, const uint64_t *magic, int64_t *out,
                 const uint8_t *starts, int64_t pad) {
    hash_rows(B, T, t0, t1, full, N - 1 + T, L, N, K, mult, primes, magic, out, starts, pad);
}

/* Compress, hash and advance the history (NgramHashMapping.hash_step, a few tokens).
 *
 * ids (B, T) raw ids; lookup (vocab) compression table; hist (B, hist_len) compressed history
 * (the last N-1 are read) or NULL for a pad-filled start; mask (B, T) bytes, 0 = padding (reads
 * as pad), or NULL; mult (L, N); primes and magic (L, H) as in engram_hash; starts (B, T) bytes or
 * NULL, document starts as in engram_hash. Writes out (L, B, T, H) and next_hist (B, N-1) (ids
 * before the row's last document start read as pad there too).
 * Returns 0, 1 when an id is >= vocab (nothing meaningful written; the caller raises), 2 when
 * out of memory. Negative ids pass through compression unchanged, as in the reference. */
int engram_hash_step(int64_t B, int64_t T, const int64_t *ids, const int64_t *lookup, int64_t vocab,
                     const int64_t *hist, int64_t hist_len, const uint8_t *mask, int64_t pad,
                     int64_t L, int64_t N, int64_t K, const int64_t *mult, const int64_t *primes,
                     const uint64_t *magic, int64_t *out, int64_t *next_hist, const uint8_t *starts) {
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
        int64_t last = -1; /* the row's last document start within its last N-1 positions */
        if (starts)
            for (int64_t t = T - 1; t >= 0 && t >= T - h; t--)
                if (starts[b * T + t]) { last = t; break; }
        for (int64_t i = 0; i < h; i++) next_hist[b * h + i] = (last >= 0 && T - h + i < last) ? pad : win[T + i];
    }
    hash_rows(B, T, 0, T, full, len, L, N, K, mult, primes, magic, out, starts, pad);
    free(full);
    return 0;
}
