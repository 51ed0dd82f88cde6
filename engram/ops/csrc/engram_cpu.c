/* The N-gram hash on a CPU (engram/ops/cpu.py builds this and loads it with ctypes).
 *
 * engram_hash is engram/ops/hash.py's formula over a whole batch; engram_hash_step compresses,
 * hashes and advances the history of a decode step in one call; engram_mod is the residue alone
 * (a test hook). tests/test_ops.py holds all three bit-identical to the formula / torch.remainder.
 *
 * Shapes: B batch, T time, L Engram layers, N max n-gram, K heads per order, H = (N-1)*K heads.
 *
 * Per position and layer: mix_n = XOR_{k<n} x_{t-k} * m_k (wrapping int64, done in uint64) for
 * each order n, then row = mix_n mod p for the order's K heads (non-negative, Python's %,
 * DESIGN.md §2.4). The residues are where the time goes. Two exact ways, chosen per order:
 *  - every prime of the order below 2^30 (any realistic table), a bulk call: in doubles,
 *    vectorised over heads (residues_double);
 *  - otherwise: Barrett reduction with a 128-bit product, else the hardware division
 *    (residues_barrett).
 * A call runs in blocks of TB positions of one row: pass 1 (split_mixes) computes every order's
 * mix for the block, vectorised over positions; pass 2 turns them into rows, order by order.
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <immintrin.h> /* streaming stores (STREAM_MIN_BYTES) */
#endif

#define TB 256 /* positions per block */

/* ------------------------------------------------------------------ Barrett (any 0 < p < 2^63)
 * |mix| mod p with the sign applied, non-negative. With 128-bit products: m = floor((2^64-1)/p)
 * (engram.ops.hash.barrett_magic); the quotient estimate floor(|x|*m / 2^64) is q or q-1 and one
 * conditional subtraction makes it exact. */
static inline int64_t mod_abs(uint64_t u, int neg, uint64_t p, uint64_t m) {
#ifdef __SIZEOF_INT128__
    uint64_t r = u - (uint64_t)(((unsigned __int128)u * m) >> 64) * p;
    if (r >= p) r -= p;
#else
    (void)m;
    const uint64_t r = u % p;
#endif
    return (int64_t)(neg && r ? p - r : r);
}

/* One order's K residues at one position: o[j] = mix mod p[j]. */
static inline void residues_barrett(uint64_t mix, int64_t K, const int64_t *p, const uint64_t *m, int64_t *o) {
    const int neg = (int64_t)mix < 0;
    const uint64_t u = neg ? (uint64_t)0 - mix : mix; /* |mix|, exact even for INT64_MIN */
    for (int64_t j = 0; j < K; j++) o[j] = mod_abs(u, neg, (uint64_t)p[j], m[j]);
}

/* ------------------------------------------------------------------ doubles (0 < p < 2^30)
 * Split the signed mix as mix = a*2^44 + b*2^22 + c, a = its top 20 bits as a signed number
 * (-2^19 <= a < 2^19), 0 <= b, c < 2^22. With r22 = 2^22 mod p and r44 = 2^44 mod p (both < p):
 *     s = a*r44 + b*r22 + c  ≡ mix (mod p),   |s| < p*(2^22 + 2^19) + 2^22 < 2^53 for p < 2^30,
 * so s and each partial sum are exact in a double (fused multiply-adds or not). Then
 *     q = round(s * fl(1/p))   (to nearest, by adding and then subtracting 1.5*2^52),
 * where s * fl(1/p), rounded or not, is within |s/p| * 2^-52 < 2^-29 of s/p: q is floor(s/p) or
 * one more; |q*p| <= |s| + p < 2^53 is exact, and so is r = s - q*p, an integer in (-p, p).
 * r + 1.5*2^52 lies in [2^52, 2^53), where a double's bits minus those of 1.5*2^52 are r as an
 * int64 (an exact conversion that vectorises on AVX2 too); then r + p where r < 0.
 * Needs IEEE doubles without excess precision (FLT_EVAL_METHOD 0), no -ffast-math (it would fold
 * the +/- 1.5*2^52) and GCC/Clang vector extensions; elsewhere Barrett runs everywhere.
 * tests/test_ops.py checks it on adversarial mixes, primes up to and across 2^30. */
#if defined(__GNUC__) && defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0 && !defined(__FAST_MATH__)
#define DOUBLE_RESIDUES 1
#else
#define DOUBLE_RESIDUES 0
#endif
#define DOUBLE_P_LIMIT ((int64_t)1 << 30)
/* Fewer positions than this in a call (a decode step): Barrett, no constants to set up. */
#define DOUBLE_MIN_POSITIONS 64
/* From this many output bytes in a call (more than a core's L2 cache), the double path writes its
 * rows with streaming stores: to memory without first reading each line into the cache, half the
 * memory traffic of a plain store there (x86; a plain store elsewhere). The output was 2x faster
 * to write, and a gather reading it right after no slower (docs/performance.md). */
#define STREAM_MIN_BYTES ((int64_t)1 << 20)
#define VW 8 /* heads per vector */

/* Per-head constants of one layer: rows of (N-1)*Kp doubles, Kp = K rounded up to whole vectors;
 * order o's head j at o*Kp + j. P_BITS: p + 1.5*2^52 (its bits minus ROUNDER_BITS are p). */
enum { C_P, C_INV, C_R22, C_R44, C_P_BITS, C_ROWS };
#define TWO52 4503599627370496.0                   /* 2^52 */
#define ROUNDER 6755399441055744.0                 /* 1.5 * 2^52 */
#define ROUNDER_BITS ((int64_t)0x4338000000000000) /* its bits */

static int64_t padded(int64_t K) {
    return (K + VW - 1) / VW * VW;
}

/* 0 <= v < 2^51 as a double, exactly, from its bits (vectorises where int64 -> double does not). */
static inline double small_to_double(uint64_t v) {
    const uint64_t bits = v | (uint64_t)0x4330000000000000; /* the double 2^52 + v */
    double d;
    memcpy(&d, &bits, sizeof d);
    return d - TWO52;
}

#if DOUBLE_RESIDUES
typedef double vd_t __attribute__((vector_size(8 * VW)));
typedef int64_t vi_t __attribute__((vector_size(8 * VW)));

/* VW int64 to o (64-byte aligned) by a streaming store (see STREAM_MIN_BYTES), else a plain one. */
static inline void store_streaming(int64_t *o, const vi_t *r) {
#if defined(__AVX512F__)
    _mm512_stream_si512((void *)o, (__m512i)*r);
#elif defined(__AVX__)
    __m256i h[2];
    memcpy(h, r, sizeof h);
    _mm256_stream_si256((__m256i *)o, h[0]);
    _mm256_stream_si256((__m256i *)o + 1, h[1]);
#elif defined(__SSE2__)
    __m128i q[4];
    memcpy(q, r, sizeof q);
    for (int i = 0; i < 4; i++) _mm_stream_si128((__m128i *)o + i, q[i]);
#else
    memcpy(o, r, sizeof *r);
#endif
}

/* n positions, heads h0 .. h0+w-1 (w <= VW) of one order, from the mixes' parts a, b, c (n each):
 * o[i*H + j] = mix_i mod p_j. cst points at head h0 in a layer's constants (rows Hp apart). One
 * vector of VW heads (GCC/Clang vector extensions, lowered to what the target has: one AVX-512
 * register, two AVX2 ones, four SSE2/NEON ones). stream: streaming stores where every row is
 * whole and 64-byte aligned. */
static void residues_double(int64_t n, const double *restrict a, const double *restrict b, const double *restrict c,
                            int64_t w, const double *restrict cst, int64_t Hp, int64_t H, int64_t *restrict o,
                            int stream) {
    vd_t P, INV, R22, R44, PB;
    memcpy(&P, cst + C_P * Hp, sizeof P);
    memcpy(&INV, cst + C_INV * Hp, sizeof INV);
    memcpy(&R22, cst + C_R22 * Hp, sizeof R22);
    memcpy(&R44, cst + C_R44 * Hp, sizeof R44);
    memcpy(&PB, cst + C_P_BITS * Hp, sizeof PB);
    const vi_t PI = (vi_t)PB - ROUNDER_BITS; /* p as int64 */
    stream = stream && w == VW && ((uintptr_t)o & 63) == 0 && (H * 8) % 64 == 0;
    for (int64_t i = 0; i < n; i++, o += H) {
        const vd_t s = a[i] * R44 + (b[i] * R22 + c[i]);       /* ≡ mix (mod p), exact */
        const vd_t q = (s * INV + ROUNDER) - ROUNDER;          /* floor(s/p) or one more */
        vi_t r = (vi_t)((s - q * P) + ROUNDER) - ROUNDER_BITS; /* in (-p, p) */
        r += PI & (r < 0);                                     /* r + p where r < 0 (a mask, no branch) */
        if (stream)
            store_streaming(o, &r);
        else if (w == VW)
            memcpy(o, &r, sizeof r);
        else
            memcpy(o, &r, (size_t)w * sizeof(int64_t));
    }
}
#endif

/* ------------------------------------------------------------------ the walk
 * Scratch of one call, one allocation: the constants (L, C_ROWS, Hp) when doubles run, a block's
 * mixes (N-1, nb) and their parts a, b, c (N-1, 3, nb) (nb: positions per block), and which
 * orders take the double path (L, N-1). */
typedef struct {
    double *cst;
    uint64_t *mixes;
    double *abc;
    uint8_t *fast;
} scratch_t;

/* 0, or 2 when out of memory (free s.cst after use). doubles: whether the double path may run
 * (else Barrett throughout). */
static int scratch_make(scratch_t *s, int64_t L, int64_t N, int64_t K, const int64_t *primes, int doubles,
                        int64_t nb) {
    const int64_t H = (N - 1) * K, Kp = padded(K), Hp = (N - 1) * Kp;
    const int64_t n_cst = doubles ? L * C_ROWS * Hp : 0, n_abc = doubles ? (N - 1) * 3 * nb : 0;
    s->cst = (double *)malloc((size_t)(n_cst + (N - 1) * nb + n_abc) * 8 + (size_t)(L * (N - 1)) + 1);
    if (!s->cst) return 2;
    s->mixes = (uint64_t *)(s->cst + n_cst);
    s->abc = (double *)(s->mixes + (N - 1) * nb);
    s->fast = (uint8_t *)(s->abc + n_abc);
    memset(s->fast, 0, (size_t)(L * (N - 1)));
    if (!doubles) return 0;
    for (int64_t l = 0; l < L; l++) {
        double *c = s->cst + l * C_ROWS * Hp;
        for (int64_t o = 0; o < N - 1; o++) {
            int fast = 1;
            for (int64_t j = 0; j < Kp; j++) { /* lanes past K: p = 1 (computed, never stored) */
                const int64_t p = j < K ? primes[l * H + o * K + j] : 1;
                const int ok = p > 0 && p < DOUBLE_P_LIMIT;
                const int64_t at = o * Kp + j;
                fast = fast && ok;
                c[C_P * Hp + at] = ok ? (double)p : 1.0;
                c[C_INV * Hp + at] = ok ? 1.0 / (double)p : 1.0;
                c[C_R22 * Hp + at] = ok ? (double)(((uint64_t)1 << 22) % (uint64_t)p) : 0.0;
                c[C_R44 * Hp + at] = ok ? (double)(((uint64_t)1 << 44) % (uint64_t)p) : 0.0;
                c[C_P_BITS * Hp + at] = (ok ? (double)p : 1.0) + ROUNDER;
            }
            s->fast[l * (N - 1) + o] = (uint8_t)fast;
        }
    }
    return 0;
}

/* Pass 1, positions t0 <= t < t1 (at most nb <= TB) of one row and layer, vectorised over t:
 * mix_n of every order, for Barrett into mixes (N-1, nb), for the double path as its parts a, b,
 * c (see above) into abc (N-1, 3, nb). x points at the row's position 0 (x[t-k] is x_{t-k});
 * ml (N) multipliers; since (nb) or NULL: ids x_{t-k} with k > since[t-t0] read as pad
 * (document starts). */
static void split_mixes(const int64_t *restrict x, int64_t t0, int64_t t1, const int64_t *restrict since,
                        int64_t pad, int64_t N, const int64_t *restrict ml, const uint8_t *fast, int64_t nb,
                        uint64_t *restrict mixes, double *restrict abc) {
    const int64_t n = t1 - t0;
    uint64_t acc[TB]; /* the mix of the orders so far */
    for (int64_t i = 0; i < n; i++) acc[i] = (uint64_t)x[t0 + i] * (uint64_t)ml[0];
    for (int64_t k = 1; k < N; k++) { /* order k+1 */
        const uint64_t m = (uint64_t)ml[k];
        const int64_t *restrict xk = x + t0 - k;
        if (since)
            for (int64_t i = 0; i < n; i++) acc[i] ^= (uint64_t)(k > since[i] ? pad : xk[i]) * m;
        else
            for (int64_t i = 0; i < n; i++) acc[i] ^= (uint64_t)xk[i] * m;
        if (!fast[k - 1]) {
            memcpy(mixes + (k - 1) * nb, acc, (size_t)n * sizeof(uint64_t));
            continue;
        }
        double *restrict a = abc + (k - 1) * 3 * nb, *restrict b = a + nb, *restrict c = b + nb;
        for (int64_t i = 0; i < n; i++) {
            const uint64_t u = acc[i];
            a[i] = small_to_double((u >> 44) ^ ((uint64_t)1 << 19)) - 524288.0; /* top 20 bits, signed */
            b[i] = small_to_double((u >> 22) & 0x3FFFFF);
            c[i] = small_to_double(u & 0x3FFFFF);
        }
    }
}

/* Hash positions [t0, t1) of B rows of compressed ids: row b is full[b*row_len ...], N-1 ids of
 * history then T; output position t reads full[b*row_len + t .. t+N-1]. mult (L, N), primes and
 * magic (L, H); out (L, B, T, H). starts (B, T) bytes or NULL: nonzero where a document starts;
 * there the n-gram history resets as at a sequence start (ids before the latest start at or
 * before t read as pad). doubles: whether orders with primes < 2^30 take the double path (else
 * Barrett throughout). Returns 0, or 2 when out of memory. */
static int hash_rows(int64_t B, int64_t T, int64_t t0, int64_t t1, const int64_t *full, int64_t row_len,
                     int64_t L, int64_t N, int64_t K, const int64_t *mult, const int64_t *primes,
                     const uint64_t *magic, int64_t *out, const uint8_t *starts, int64_t pad, int doubles) {
    const int64_t H = (N - 1) * K, Kp = padded(K), Hp = (N - 1) * Kp;
    const int64_t nb = t1 - t0 < TB ? t1 - t0 : TB; /* positions per block */
    const int stream = L * B * (t1 - t0) * H * 8 >= STREAM_MIN_BYTES;
    scratch_t s;
    if (scratch_make(&s, L, N, K, primes, doubles, nb)) return 2;
    int64_t since[TB];
    for (int64_t b = 0; b < B; b++) {
        const int64_t *row = full + b * row_len + (N - 1);
        const uint8_t *st = starts ? starts + b * T : NULL;
        int64_t last = -N; /* latest document start <= t; -N: none within reach of the history */
        if (st)
            for (int64_t i = t0 - 1; i >= 0 && i >= t0 - (N - 1); i--)
                if (st[i]) { last = i; break; }
        for (int64_t tb = t0; tb < t1; tb += nb) {
            const int64_t te = tb + nb < t1 ? tb + nb : t1, n = te - tb;
            if (st)
                for (int64_t t = tb; t < te; t++) {
                    if (st[t]) last = t;
                    since[t - tb] = t - last; /* ids t-k with k > since belong to an earlier document */
                }
            for (int64_t l = 0; l < L; l++) {
                const uint8_t *fast = s.fast + l * (N - 1);
                split_mixes(row, tb, te, st ? since : NULL, pad, N, mult + l * N, fast, nb, s.mixes, s.abc);
                int64_t *o = out + ((l * B + b) * T + tb) * H;
                for (int64_t k = 1; k < N; k++) { /* order k+1: heads off .. off+K-1 */
                    const int64_t off = (k - 1) * K;
#if DOUBLE_RESIDUES
                    if (fast[k - 1]) {
                        const double *ab = s.abc + (k - 1) * 3 * nb;
                        const double *c = s.cst + l * C_ROWS * Hp + (k - 1) * Kp;
                        for (int64_t h0 = 0; h0 < K; h0 += VW)
                            residues_double(n, ab, ab + nb, ab + 2 * nb, K - h0 < VW ? K - h0 : VW, c + h0, Hp, H,
                                            o + off + h0, stream);
                        continue;
                    }
#endif
                    const uint64_t *mk = s.mixes + (k - 1) * nb;
                    for (int64_t i = 0; i < n; i++)
                        residues_barrett(mk[i], K, primes + l * H + off, magic + l * H + off, o + i * H + off);
                }
            }
        }
    }
    free(s.cst);
#if defined(__SSE2__)
    if (stream) _mm_sfence(); /* streaming stores are weakly ordered: visible to other threads before returning */
#endif
    return 0;
}

/* ------------------------------------------------------------------ entry points */

/* Rows [t0, t1) of the bulk hash (engram.ops.cpu.hash_ngrams; workers take disjoint slices).
 * full (B, N-1+T) compressed ids, history first. Returns 0, or 2 when out of memory. */
int engram_hash(int64_t B, int64_t T, int64_t t0, int64_t t1, const int64_t *full, int64_t L, int64_t N, int64_t K,
                const int64_t *mult, const int64_t *primes, const uint64_t *magic, int64_t *out,
                const uint8_t *starts, int64_t pad) {
    return hash_rows(B, T, t0, t1, full, N - 1 + T, L, N, K, mult, primes, magic, out, starts, pad,
                     DOUBLE_RESIDUES && B * (t1 - t0) >= DOUBLE_MIN_POSITIONS);
}

/* out[i] = x[i] mod p for n signed mixes (a test hook): hash_rows on n positions whose only
 * order's mix is x[i] (multipliers 1, 0), by the double path (doubles != 0, p < 2^30) or
 * Barrett (magic = floor((2^64-1)/p)). Returns 0, or 2 when out of memory. */
int engram_mod(int64_t n, const int64_t *x, int64_t p, uint64_t magic, int doubles, int64_t *out) {
    const int64_t one[2] = {1, 0};
    int64_t *full = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t)); /* one id of history, then x */
    if (!full) return 2;
    full[0] = 0;
    if (n > 0) memcpy(full + 1, x, (size_t)n * sizeof(int64_t));
    const int rc = hash_rows(1, n, 0, n, full, n + 1, 1, 2, 1, one, &p, &magic, out, NULL, 0, DOUBLE_RESIDUES && doubles);
    free(full);
    return rc;
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
    const int rc = hash_rows(B, T, 0, T, full, len, L, N, K, mult, primes, magic, out, starts, pad,
                             DOUBLE_RESIDUES && B * T >= DOUBLE_MIN_POSITIONS);
    free(full);
    return rc;
}
