/* Attention of one decode step over the KV cache, for alignkit.decode.FastDecoder.
 *
 * One call per layer does what the PyTorch step does in some ten operations: rotate the
 * new token's query and key heads (RoPE), write its key and value into the cache, and
 * attend each query head over its key/value head's filled slots. Each (row, key/value
 * head) is one task: its key and value rows are read once for all the query heads that
 * share them, the scores and the softmax stay in fp32, and the next task's rows are
 * prefetched while this one computes. bf16 in and out (as uint16 bit patterns);
 * products accumulate in fp32.
 *
 * Built on first use by alignkit/native/__init__.py with the machine's C compiler and
 * -fopenmp, so the parallel loop runs on the OpenMP runtime torch already loaded.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#define DOT_BF16 1
#endif

static inline float from_bf16(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch rounds */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)rounded; /* NaN stays NaN */
}

/* exp(x) for x <= 0 in plain float operations the compiler vectorizes: x = n ln2 + r,
 * |r| <= ln2 / 2, exp(r) by its degree-6 polynomial (relative error ~2e-7), 2^n from the
 * exponent bits. Below -87 it is 0 (the smallest normal float is exp(-87.3)). */
static inline float exp_nonpositive(float x) {
    const float low = -87.0f;
    float clamped = x < low ? low : x;
    float n = floorf(clamped * 1.44269504088896341f + 0.5f);
    float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t exponent = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &exponent, sizeof scale);
    return x < low ? 0.0f : p * scale;
}

static inline void prefetch(const uint16_t *row, int64_t head_dim) {
    for (int64_t d = 0; d < head_dim; d += 32) __builtin_prefetch(row + d, 0, 3);
}

/* x rotated by RoPE (rotate-half convention), in fp32, rounded once to bf16 */
static void rotate(const uint16_t *x, const float *cos, const float *sin, uint16_t *out,
                   int64_t head_dim) {
    int64_t half = head_dim / 2;
    for (int64_t d = 0; d < half; d++) {
        float a = from_bf16(x[d]), b = from_bf16(x[d + half]);
        out[d] = to_bf16(a * cos[d] - b * sin[d]);
        out[d + half] = to_bf16(b * cos[d + half] + a * sin[d + half]);
    }
}

/* scores[j * width + w] = q_j . k_w over the kept slots; ``next``'s rows prefetched */
static void dots(const uint16_t *q, const uint16_t *k, const uint8_t *keep, float *scores,
                 int64_t group, int64_t head_dim, int64_t width, const uint16_t *next) {
#ifdef DOT_BF16
    if (head_dim == 64 && group <= 8) {
        __m512bh low[8], high[8];
        for (int64_t j = 0; j < group; j++) {
            low[j] = (__m512bh)_mm512_loadu_si512(q + j * 64);
            high[j] = (__m512bh)_mm512_loadu_si512(q + j * 64 + 32);
        }
        for (int64_t w = 0; w < width; w++) {
            if (next) prefetch(next + w * 64, 64);
            if (!keep[w]) continue;
            __m512bh k_low = (__m512bh)_mm512_loadu_si512(k + w * 64);
            __m512bh k_high = (__m512bh)_mm512_loadu_si512(k + w * 64 + 32);
            for (int64_t j = 0; j < group; j++) {
                __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), low[j], k_low);
                sum = _mm512_dpbf16_ps(sum, high[j], k_high);
                scores[j * width + w] = _mm512_reduce_add_ps(sum);
            }
        }
        return;
    }
#endif
    for (int64_t w = 0; w < width; w++) {
        if (next) prefetch(next + w * head_dim, head_dim);
        if (!keep[w]) continue;
        const uint16_t *kw = k + w * head_dim;
        for (int64_t j = 0; j < group; j++) {
            const uint16_t *qj = q + j * head_dim;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t d = 0; d < head_dim; d++) sum += from_bf16(qj[d]) * from_bf16(kw[d]);
            scores[j * width + w] = sum;
        }
    }
}

/* Each scores row j becomes exp(scale * (scores_j - max)) over the kept slots (0
 * elsewhere): softmax's numerators; their sum's inverse goes to inverse[j]. */
static void softmax(float *scores, const uint8_t *keep, float *inverse, int64_t group,
                    int64_t width, float scale) {
    for (int64_t j = 0; j < group; j++) {
        float *row = scores + j * width;
        float top = -INFINITY, total = 0.0f;
#pragma omp simd reduction(max : top)
        for (int64_t w = 0; w < width; w++) {
            float value = keep[w] ? row[w] : -INFINITY;
            top = value > top ? value : top;
        }
#pragma omp simd reduction(+ : total)
        for (int64_t w = 0; w < width; w++) {
            float e = keep[w] ? exp_nonpositive((row[w] - top) * scale) : 0.0f;
            row[w] = e;
            total += e;
        }
        inverse[j] = 1.0f / total;
    }
}

/* out_j = inverse[j] sum_w e_j[w] v_w in fp32, rounded to bf16; ``next``'s rows prefetched */
static void mix(const float *weights, const float *inverse, const uint16_t *v,
                const uint8_t *keep, float *acc, uint16_t *out, int64_t group,
                int64_t head_dim, int64_t width, const uint16_t *next) {
#ifdef DOT_BF16
    if (head_dim == 64 && group <= 4) { /* the sums stay in 16 registers */
        __m512 sums[4][4];
        for (int64_t j = 0; j < 4; j++)
            for (int64_t part = 0; part < 4; part++) sums[j][part] = _mm512_setzero_ps();
        for (int64_t w = 0; w < width; w++) {
            if (next) prefetch(next + w * 64, 64);
            if (!keep[w]) continue;
            __m512 row[4];
            for (int64_t part = 0; part < 4; part++) {
                __m256i bits = _mm256_loadu_si256((const __m256i *)(v + w * 64 + part * 16));
                row[part] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
            }
            for (int64_t j = 0; j < 4; j++) {
                if (j >= group) break;
                __m512 weight = _mm512_set1_ps(weights[j * width + w]);
                for (int64_t part = 0; part < 4; part++)
                    sums[j][part] = _mm512_fmadd_ps(weight, row[part], sums[j][part]);
            }
        }
        for (int64_t j = 0; j < group; j++)
            for (int64_t part = 0; part < 4; part++)
                _mm512_storeu_ps(acc + j * 64 + part * 16,
                                 _mm512_mul_ps(sums[j][part], _mm512_set1_ps(inverse[j])));
        for (int64_t i = 0; i < group * 64; i++) out[i] = to_bf16(acc[i]);
        return;
    }
#endif
    memset(acc, 0, sizeof(float) * group * head_dim);
    for (int64_t w = 0; w < width; w++) {
        if (next) prefetch(next + w * head_dim, head_dim);
        if (!keep[w]) continue;
        const uint16_t *vw = v + w * head_dim;
        for (int64_t j = 0; j < group; j++) {
            float weight = weights[j * width + w];
            float *aj = acc + j * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) aj[d] += weight * from_bf16(vw[d]);
        }
    }
    for (int64_t j = 0; j < group; j++)
        for (int64_t d = 0; d < head_dim; d++)
            out[j * head_dim + d] = to_bf16(acc[j * head_dim + d] * inverse[j]);
}

/* One layer of a decode step, for n rows each feeding one token at cache slot ``slot``.
 *
 * qkv: (n, (heads + 2 kv_heads) x head_dim) the fused projection, query heads first,
 *      then key heads, then value heads; rows ``qkv_stride`` elements apart.
 * cos, sin: (n, head_dim) fp32 rotary tables at each row's position.
 * keys, values: (n, kv_heads, capacity, head_dim) the cache; slot ``slot`` is written.
 * keep: (n, slot + 1) 1 where a row attends that slot.
 * out: (n, heads x head_dim) each query head's attention output.
 */
void decode_attention(const uint16_t *qkv, int64_t qkv_stride, const float *cos,
                      const float *sin, uint16_t *keys, uint16_t *values,
                      const uint8_t *keep, uint16_t *out, int64_t n, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, int64_t slot, int64_t capacity,
                      float scale, int threads) {
    int64_t group = heads / kv_heads, width = slot + 1, tasks = n * kv_heads;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * group * width);
        float *acc = malloc(sizeof(float) * group * head_dim);
        float *inverse = malloc(sizeof(float) * group);
        uint16_t *query = malloc(sizeof(uint16_t) * group * head_dim);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t row = task / kv_heads, head = task % kv_heads;
            const uint16_t *x = qkv + row * qkv_stride;
            const float *c = cos + row * head_dim, *s = sin + row * head_dim;
            const uint8_t *kept = keep + row * width;
            uint16_t *k = keys + task * capacity * head_dim;
            uint16_t *v = values + task * capacity * head_dim;
            rotate(x + (heads + head) * head_dim, c, s, k + slot * head_dim, head_dim);
            memcpy(v + slot * head_dim, x + (heads + kv_heads + head) * head_dim,
                   sizeof(uint16_t) * head_dim);
            for (int64_t j = 0; j < group; j++)
                rotate(x + (head * group + j) * head_dim, c, s, query + j * head_dim, head_dim);
            /* this task's values come in while the scores compute, the next task's keys
             * while the values mix */
            int last = task + 1 == tasks;
            dots(query, k, kept, scores, group, head_dim, width, v);
            softmax(scores, kept, inverse, group, width, scale);
            mix(scores, inverse, v, kept, acc, out + (row * heads + head * group) * head_dim,
                group, head_dim, width, last ? NULL : k + capacity * head_dim);
        }
        free(scores);
        free(acc);
        free(inverse);
        free(query);
    }
}

/* hidden += delta (when given), then out = RMSNorm(hidden) * weight rounded to bf16.
 *
 * hidden: (n, size) fp32, the residual stream, updated in place; delta: (n, size) bf16
 * rows ``delta_stride`` apart, or NULL; weight: (size,) fp32; out: (n, size) bf16.
 */
void add_rms_norm(float *hidden, const uint16_t *delta, int64_t delta_stride,
                  const float *weight, uint16_t *out, int64_t n, int64_t size, float eps,
                  int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n > 1)
    for (int64_t row = 0; row < n; row++) {
        float *h = hidden + row * size;
        if (delta) {
            const uint16_t *d = delta + row * delta_stride;
#pragma omp simd
            for (int64_t i = 0; i < size; i++) h[i] += from_bf16(d[i]);
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < size; i++) squares += h[i] * h[i];
        float inverse = 1.0f / sqrtf(squares / (float)size + eps);
        uint16_t *o = out + row * size;
#pragma omp simd
        for (int64_t i = 0; i < size; i++) o[i] = to_bf16(h[i] * inverse * weight[i]);
    }
}

static void silu_mul_row(const uint16_t *restrict gate, const uint16_t *restrict up,
                         uint16_t *restrict out, int64_t inner) {
#pragma omp simd
    for (int64_t i = 0; i < inner; i++) {
        float g = from_bf16(gate[i]);
        float e = exp_nonpositive(g < 0.0f ? g : -g); /* exp(-|g|) */
        float sigmoid = g < 0.0f ? e / (1.0f + e) : 1.0f / (1.0f + e);
        out[i] = to_bf16(g * sigmoid * from_bf16(up[i]));
    }
}

/* out = silu(gate) * up, in fp32, rounded once to bf16.
 *
 * gate_up: (n, 2 inner) bf16, each row's gate then its up; out: (n, inner) bf16.
 */
void silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t n, int64_t inner, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n > 1)
    for (int64_t row = 0; row < n; row++)
        silu_mul_row(gate_up + row * 2 * inner, gate_up + row * 2 * inner + inner,
                     out + row * inner, inner);
}
