/* Fused CPU merge kernels: one pass over the raw inputs per block of entries.
 *
 * The maths is exactly that of blocked.py (the reference these are tested against, bit for bit):
 * the same fp32 operations in the same order, an fma where torch's add-with-alpha uses one, the
 * same rounding to bf16/fp16 on the store. Compiled with -ffp-contract=off so that the compiler
 * fuses nothing torch does not. Entries are walked in tiles of TILE so that a tile's N task
 * vectors stay in L1 while every step of a method runs over them; each step is a plain loop the
 * compiler vectorises. Called from Python threads through ctypes (which releases the GIL), one
 * block of entries per call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define TILE 512

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { MODE_SUM = 0, MODE_TIES = 1, MODE_DARE = 2 };
#define DARE_SKIP 0xFFFFFFFFu /* keep_below of an expert with density >= 1: nothing dropped or rescaled */

typedef struct {
    int32_t mode;          /* MODE_SUM (task arithmetic, linear), MODE_TIES, MODE_DARE */
    int32_t elect;         /* TIES sign election + disjoint mean (else a plain sum) */
    int32_t normalize;
    int32_t unit;          /* every weight is 1: no multiplications by them */
    int32_t clamp_count;   /* TIES normalize: divide by max(count, 1e-8) (else by 1 where |count| < 1e-8) */
    int32_t subtract_base; /* 0 for linear: Σ w_i θ_i, no base */
    int32_t rescale;       /* DARE: multiply kept entries by 1/density */
    int32_t base_dtype, expert_dtype, out_dtype;
    int32_t count;         /* experts */
    int32_t pad;
    int64_t expert_stride; /* entries between two experts' rows */
    int64_t offset;        /* DARE: flat index in the whole tensor of entry 0 of these arrays */
    float lam;             /* scale of the merged vector (fma into the base) */
    float divisor;         /* sum with normalize: Σ w_i */
    float out_scale;       /* linear: scale of the sum */
    float pad2;
    const float *weights;  /* per expert */
    const float *below;    /* TIES: the fp32 just below each threshold (|τ| > below ⟺ |τ| >= t) */
    const uint32_t *keys;  /* DARE: two per expert */
    const uint32_t *keep_below; /* DARE: keep an entry when (hash >> 8) < this, or DARE_SKIP */
    const float *inverse;  /* DARE: 1/density in fp32, 0 where density is 0 (no rescaling) */
} Params;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t rounded = (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : rounded;
}

static void load(float *dst, const void *src, int dtype, int64_t at, int n) {
    if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int j = 0; j < n; j++) dst[j] = bf16_to_f32(s[j]);
    } else if (dtype == F16) {
        const _Float16 *s = (const _Float16 *)src + at;
        for (int j = 0; j < n; j++) dst[j] = (float)s[j];
    } else {
        memcpy(dst, (const float *)src + at, (size_t)n * sizeof(float));
    }
}

static void store(void *dst, const float *src, int dtype, int64_t at, int n) {
    if (dtype == BF16) {
        uint16_t *d = (uint16_t *)dst + at;
        for (int j = 0; j < n; j++) d[j] = f32_to_bf16(src[j]);
    } else if (dtype == F16) {
        _Float16 *d = (_Float16 *)dst + at;
        for (int j = 0; j < n; j++) d[j] = (_Float16)src[j];
    } else {
        memcpy((float *)dst + at, src, (size_t)n * sizeof(float));
    }
}

/* 1 if any of src[at, at + n) is NaN or ±Inf (every exponent bit set): an OR over integers, which
 * vectorises, run on a tile about to be loaded anyway; the merge is unchanged either way. */
static int nonfinite(const void *src, int dtype, int64_t at, int n) {
    uint32_t bad = 0;
    if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int j = 0; j < n; j++) bad |= (uint32_t)((s[j] & 0x7F80u) == 0x7F80u);
    } else if (dtype == F16) {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int j = 0; j < n; j++) bad |= (uint32_t)((s[j] & 0x7C00u) == 0x7C00u);
    } else {
        const uint32_t *s = (const uint32_t *)src + at;
        for (int j = 0; j < n; j++) bad |= (uint32_t)((s[j] & 0x7F800000u) == 0x7F800000u);
    }
    return bad != 0;
}

/* Wellons' lowbias32: rng.py's mix32 in native uint32 arithmetic. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

/* t[0..n) = expert entries [at, at + n) − b, in fp32 (one loop per input dtype). */
static void task_vector(float *t, const void *src, int dtype, int64_t at, int n, const float *b) {
    if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int j = 0; j < n; j++) t[j] = bf16_to_f32(s[j]) - b[j];
    } else if (dtype == F16) {
        const _Float16 *s = (const _Float16 *)src + at;
        for (int j = 0; j < n; j++) t[j] = (float)s[j] - b[j];
    } else {
        const float *s = (const float *)src + at;
        for (int j = 0; j < n; j++) t[j] = s[j] - b[j];
    }
}

/* total[j] (+)= t[j]: row 0 is copied, the others added in order, as blocked.rows_sum adds. */
static inline void accumulate(float *total, const float *t, int i, int n) {
    if (i == 0) memcpy(total, t, sizeof(float) * (size_t)n);
    else for (int j = 0; j < n; j++) total[j] += t[j];
}

/* The weighted task vectors of one tile, trimmed (TIES) or dropped (DARE): tau[i][0..n), and
 * their sum over i into total. Each step multiplies in blocked's order (mask, then 1/density,
 * then the weight); a factor of 1 where blocked skips the multiplication changes no bit. */
static void weighted_tau(const Params *p, const void *experts, const float *b, float *tau, float *total,
                         int64_t at, int n) {
    for (int i = 0; i < p->count; i++) {
        float *t = tau + (size_t)i * TILE;
        task_vector(t, experts, p->expert_dtype, (int64_t)i * p->expert_stride + at, n, b);
        const float w = p->unit ? 1.0f : p->weights[i];
        if (p->mode == MODE_TIES) {
            const float below = p->below[i];
            for (int j = 0; j < n; j++) {
                float m = fabsf(t[j]);
                t[j] = copysignf(m > below ? m : 0.0f, t[j]) * w;
            }
        } else if (p->mode == MODE_DARE && p->keep_below[i] != DARE_SKIP) {
            const uint32_t k0 = p->keys[2 * i], k1 = p->keys[2 * i + 1], keep = p->keep_below[i];
            const uint32_t first = (uint32_t)(p->offset + at);
            const float r = p->rescale && p->inverse[i] != 0.0f ? p->inverse[i] : 1.0f;
            for (int j = 0; j < n; j++) {
                uint32_t h = mix32(mix32((first + (uint32_t)j) ^ k0) ^ k1);
                t[j] = t[j] * ((h >> 8) < keep ? 1.0f : 0.0f) * r * w;
            }
        } else if (!p->unit) {
            for (int j = 0; j < n; j++) t[j] = t[j] * w;
        }
        accumulate(total, t, i, n);
    }
}

/* TIES election and disjoint mean of one tile (Election.merge + disjoint_merge): mixed[0..n)
 * from the weighted task vectors (overwritten) and their sum `total` (overwritten by γ).
 * zero[j] is set to 1 where the sum is exactly 0. For those entries γ = +1 is provisional (the
 * tensor's majority decides), so the sum and count of the entries agreeing with γ = −1 are kept
 * in alt and alt_count for every entry (a few more operations than a re-read). Returns Σ sign. */
static int64_t elect(const Params *p, float *tau, float *total, float *mixed, float *zero, float *alt,
                     float *alt_count, int n) {
    const int N = p->count;
    float *gamma = total, *count = tau + (size_t)N * TILE; /* the spare row */
    int64_t balance = 0;
    for (int j = 0; j < n; j++) {
        float s = total[j] + 0.0f; /* −0 → +0: zero sums get γ = +1 */
        balance += (s > 0.0f) - (s < 0.0f);
        zero[j] = s == 0.0f ? 1.0f : 0.0f;
        gamma[j] = copysignf(1.0f, s);
    }
    for (int i = 0; i < N; i++) { /* agreeing entries relu(γ·wτ_i), summed (and counted) in order */
        const float *t = tau + (size_t)i * TILE;
        const float w = p->unit ? 1.0f : p->weights[i];
        if (i == 0) {
            for (int j = 0; j < n; j++) {
                float a = t[j] * gamma[j], b = t[j] * -1.0f;
                a = a > 0.0f ? a : 0.0f;
                b = b > 0.0f ? b : 0.0f;
                mixed[j] = a;
                count[j] = a > 0.0f ? w : 0.0f;
                alt[j] = b;
                alt_count[j] = b > 0.0f ? w : 0.0f;
            }
        } else {
            for (int j = 0; j < n; j++) {
                float a = t[j] * gamma[j], b = t[j] * -1.0f;
                a = a > 0.0f ? a : 0.0f;
                b = b > 0.0f ? b : 0.0f;
                mixed[j] += a;
                count[j] += a > 0.0f ? w : 0.0f;
                alt[j] += b;
                alt_count[j] += b > 0.0f ? w : 0.0f;
            }
        }
    }
    if (p->normalize) {
        if (p->clamp_count)
            for (int j = 0; j < n; j++) mixed[j] = mixed[j] / (count[j] < 1e-8f ? 1e-8f : count[j]);
        else
            for (int j = 0; j < n; j++) mixed[j] = mixed[j] / (fabsf(count[j]) < 1e-8f ? 1.0f : count[j]);
    }
    for (int j = 0; j < n; j++) mixed[j] = mixed[j] * gamma[j];
    return balance;
}

/* The merged value of entry j with γ = −1 (disjoint_merge's steps on alt, alt_count), before the
 * rounding to the output dtype. */
static inline float merged_with_minus(const Params *p, const float *alt, const float *alt_count, const float *b,
                                      int j) {
    float m = alt[j];
    if (p->normalize) {
        float c = alt_count[j];
        m = m / (p->clamp_count ? (c < 1e-8f ? 1e-8f : c) : (fabsf(c) < 1e-8f ? 1.0f : c));
    }
    return fmaf(m * -1.0f, p->lam, b[j]);
}

/* Append at + j for the j in [0, n) with a zero elected sum but a non-zero merge to out[found..cap),
 * with their value merged with γ = −1 in minus[found..cap) (counting past cap); returns the new
 * count. Eight entries are tested at a time. */
static int64_t list_undecided(const Params *p, const float *zero, const float *mixed, const float *alt,
                              const float *alt_count, const float *b, int n, int64_t at, int64_t *out,
                              float *minus, int64_t found, int64_t cap) {
    int j = 0;
#ifdef __AVX2__
    const __m256 none = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        unsigned hits = (unsigned)_mm256_movemask_ps(_mm256_and_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(zero + j), none, _CMP_NEQ_UQ),
            _mm256_cmp_ps(_mm256_loadu_ps(mixed + j), none, _CMP_NEQ_UQ)));
        while (hits) {
            int k = j + __builtin_ctz(hits);
            if (found < cap) {
                out[found] = at + k;
                minus[found] = merged_with_minus(p, alt, alt_count, b, k);
            }
            found++;
            hits &= hits - 1;
        }
    }
#endif
    for (; j < n; j++) {
        if (zero[j] != 0.0f && mixed[j] != 0.0f) {
            if (found < cap) {
                out[found] = at + j;
                minus[found] = merged_with_minus(p, alt, alt_count, b, j);
            }
            found++;
        }
    }
    return found;
}

/* Merge entries [start, stop) of a tensor into out. Returns Σ sign(Σ_i w_i τ_i) over them (TIES),
 * or INT64_MIN if memory ran out. Entries merged with γ = +1 for a zero elected sum although
 * some τ_i is non-zero ("undecided": the tensor's majority decides, known to the caller only at
 * the end) are written to undecided[0..cap), with their value merged with γ = −1 (fp32, before
 * the output rounding) in minus[0..cap), and all counted in *n_undecided. *n_nonfinite is set to 1
 * if any input entry is NaN or ±Inf (the caller names the tensor), else 0. */
int64_t ri_merge(const Params *p, const void *base, const void *experts, void *out, int64_t start, int64_t stop,
                 int64_t *undecided, float *minus, int64_t cap, int64_t *n_undecided, int32_t *n_nonfinite) {
    const int N = p->count;
    float *buf = (float *)calloc((size_t)TILE * (size_t)(N + 7), sizeof(float));
    if (!buf) return INT64_MIN;
    float *b = buf, *total = buf + TILE, *mixed = buf + 2 * TILE, *zero = buf + 3 * TILE, *alt = buf + 4 * TILE,
          *alt_count = buf + 5 * TILE, *tau = buf + 6 * TILE;
    int64_t balance = 0, found = 0;
    int bad = 0;
    for (int64_t at = start; at < stop; at += TILE) {
        const int n = (int)((stop - at) < TILE ? (stop - at) : TILE);
        if (p->subtract_base) { /* else b stays 0: τ = θ − 0 = θ */
            bad |= nonfinite(base, p->base_dtype, at, n);
            load(b, base, p->base_dtype, at, n);
        }
        for (int i = 0; i < N; i++) bad |= nonfinite(experts, p->expert_dtype, (int64_t)i * p->expert_stride + at, n);
        weighted_tau(p, experts, b, tau, total, at, n);
        if (!p->elect) {
            if (!p->subtract_base) {
                for (int j = 0; j < n; j++) total[j] = total[j] * p->out_scale;
            } else {
                if (p->normalize)
                    for (int j = 0; j < n; j++) total[j] = total[j] / p->divisor;
                for (int j = 0; j < n; j++) total[j] = fmaf(total[j], p->lam, b[j]);
            }
            store(out, total, p->out_dtype, at, n);
            continue;
        }
        balance += elect(p, tau, total, mixed, zero, alt, alt_count, n);
        found = list_undecided(p, zero, mixed, alt, alt_count, b, n, at, undecided, minus, found, cap);
        for (int j = 0; j < n; j++) b[j] = fmaf(mixed[j], p->lam, b[j]);
        store(out, b, p->out_dtype, at, n);
    }
    *n_undecided = found;
    *n_nonfinite = bad;
    free(buf);
    return balance;
}

/* Append the values of t[0..n) with l <= v < h to dst[k..cap) (counting past cap); returns the new k.
 * They are ~1% of the entries: eight are compared at a time and only the hits are visited. */
static int64_t collect(const float *t, int n, float l, float h, float *dst, int64_t k, int64_t cap) {
    int j = 0;
#ifdef __AVX2__
    const __m256 lo8 = _mm256_set1_ps(l), hi8 = _mm256_set1_ps(h);
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(t + j);
        unsigned hits = (unsigned)_mm256_movemask_ps(
            _mm256_and_ps(_mm256_cmp_ps(v, lo8, _CMP_GE_OQ), _mm256_cmp_ps(v, hi8, _CMP_LT_OQ)));
        while (hits) {
            int b = __builtin_ctz(hits);
            if (k < cap) dst[k] = t[j + b];
            k++;
            hits &= hits - 1;
        }
    }
#endif
    for (; j < n; j++) {
        if (t[j] >= l && t[j] < h) {
            if (k < cap) dst[k] = t[j];
            k++;
        }
    }
    return k;
}

/* The TIES threshold's counting pass over entries [start, stop): per expert i, the number of
 * |τ_i| >= hi[i] (into above[i]) and the values with lo[i] <= |τ_i| < hi[i] (into band + i·cap,
 * the first cap of them; all counted in inside[i]). Returns 0, or -1 if memory ran out. */
int ri_band(const Params *p, const void *base, const void *experts, int64_t start, int64_t stop,
            const float *lo, const float *hi, float *band, int64_t cap, int64_t *above, int64_t *inside) {
    float *buf = (float *)malloc(sizeof(float) * TILE * 2);
    if (!buf) return -1;
    float *b = buf, *t = buf + TILE;
    for (int i = 0; i < p->count; i++) above[i] = inside[i] = 0;
    for (int64_t at = start; at < stop; at += TILE) {
        const int n = (int)((stop - at) < TILE ? (stop - at) : TILE);
        load(b, base, p->base_dtype, at, n);
        for (int i = 0; i < p->count; i++) {
            task_vector(t, experts, p->expert_dtype, (int64_t)i * p->expert_stride + at, n, b);
            const float l = lo[i], h = hi[i];
            int64_t high = 0, in = 0;
            for (int j = 0; j < n; j++) {
                float a = fabsf(t[j]);
                t[j] = a;
                high += a >= h;
                in += (a >= l) & (a < h);
            }
            above[i] += high;
            if (in) inside[i] = collect(t, n, l, h, band + (size_t)i * cap, inside[i], cap);
        }
    }
    free(buf);
    return 0;
}

/* The k-th largest (1-based) of the non-negative floats a[0..n), which it overwrites: a radix
 * select on the bit patterns (which order like the values). Each round histograms the entries
 * left into BINS bins spanning their bit range, keeps only the bin holding the k-th, and stops
 * when a bin is a single value: at most three rounds for fp32, no branches to mispredict (|τ|
 * from bf16 inputs repeats a lot, which makes comparison-based selects slow). */
#define BINS 4096
float ri_kth_largest(float *a, int64_t n, int64_t k) {
    uint32_t *bits = (uint32_t *)a;
    static __thread int64_t counts[BINS];
    for (;;) {
        uint32_t lo = 0xFFFFFFFFu, hi = 0;
        for (int64_t j = 0; j < n; j++) {
            lo = bits[j] < lo ? bits[j] : lo;
            hi = bits[j] > hi ? bits[j] : hi;
        }
        int shift = 0;
        while (((hi - lo) >> shift) >= BINS) shift++;
        memset(counts, 0, sizeof(counts));
        for (int64_t j = 0; j < n; j++) counts[(bits[j] - lo) >> shift]++;
        int bin = (int)((hi - lo) >> shift);
        while (counts[bin] < k) k -= counts[bin--]; /* from the top: the k-th largest is in `bin` */
        if (shift == 0) {
            uint32_t found = lo + (uint32_t)bin;
            float value;
            memcpy(&value, &found, 4);
            return value;
        }
        int64_t m = 0;
        for (int64_t j = 0; j < n; j++) {
            uint32_t v = bits[j];
            bits[m] = v;
            m += (int64_t)((v - lo) >> shift) == bin;
        }
        n = m;
    }
}

/* Histograms of the fp32 bit patterns of |τ_i| over entries [start, stop), per expert, into
 * counts[i·65536 + ·] (added to): of the high 16 bits where bucket[i] < 0, else of the low 16
 * bits of the entries whose high bits equal bucket[i]; nothing where bucket[i] == SKIP_BUCKET.
 * The two passes of the whole-model radix select (TIES trim_scope: model). Returns 0, or -1 if
 * memory ran out. */
#define SKIP_BUCKET (-2)
int ri_histogram(const Params *p, const void *base, const void *experts, int64_t start, int64_t stop,
                 const int32_t *bucket, int64_t *counts) {
    float *buf = (float *)malloc(sizeof(float) * TILE * 2);
    if (!buf) return -1;
    float *b = buf, *t = buf + TILE;
    uint32_t *bits = (uint32_t *)t;
    for (int64_t at = start; at < stop; at += TILE) {
        const int n = (int)((stop - at) < TILE ? (stop - at) : TILE);
        load(b, base, p->base_dtype, at, n);
        for (int i = 0; i < p->count; i++) {
            if (bucket[i] == SKIP_BUCKET) continue;
            task_vector(t, experts, p->expert_dtype, (int64_t)i * p->expert_stride + at, n, b);
            for (int j = 0; j < n; j++) t[j] = fabsf(t[j]);
            int64_t *c = counts + (size_t)i * 65536;
            if (bucket[i] < 0) {
                for (int j = 0; j < n; j++) c[bits[j] >> 16]++;
            } else {
                const uint32_t high = (uint32_t)bucket[i];
                for (int j = 0; j < n; j++)
                    if ((bits[j] >> 16) == high) c[bits[j] & 0xFFFF]++;
            }
        }
    }
    free(buf);
    return 0;
}
