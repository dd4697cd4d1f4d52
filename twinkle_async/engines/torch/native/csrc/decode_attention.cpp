// Decode attention over the paged KV cache on CPU: one query token per row, each row reading only its own
// cached length from its blocks in place (no gather, no padding to the longest row), grouped-query heads
// sharing each K/V row as it is loaded.
#include <torch/extension.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include "simd.h"

template <typename T> static inline float f(T x) { return static_cast<float>(x); }

template <typename T>
static void run(const T* q, int64_t q_stride, const T* k, const T* v, T* out, const int64_t* tables, int64_t W,
                int64_t bs,
                const int64_t* lengths, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t head_stride,
                int64_t block_stride, float scale, int threads) {
  const int64_t G = H / Hkv;
  #pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores, acc(G * D), qf(G * D), row(D);
    #pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < B * Hkv; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, L = lengths[b], blocks = (L + bs - 1) / bs;
      const int64_t* table = tables + b * W;
      scores.resize(G * L);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = f(q[b * q_stride + (h * G + g) * D + d]) * scale;
      for (int64_t t = 0, blk = 0; blk < blocks; ++blk)  // walk the row's blocks, bs positions each
      for (const T* kt = k + table[blk] * block_stride + h * head_stride; t < std::min(L, (blk + 1) * bs);
           ++t, kt += D) {
        for (int64_t d = 0; d < D; ++d) row[d] = f(kt[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
          #pragma omp simd reduction(+:s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * row[d];
          scores[g * L + t] = s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float m = -INFINITY;
        for (int64_t t = 0; t < L; ++t) m = sg[t] > m ? sg[t] : m;
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0, blk = 0; blk < blocks; ++blk)
      for (const T* vt = v + table[blk] * block_stride + h * head_stride; t < std::min(L, (blk + 1) * bs);
           ++t, vt += D) {
        for (int64_t d = 0; d < D; ++d) row[d] = f(vt[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float w = scores[g * L + t];
          float* ag = acc.data() + g * D;
          #pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += w * row[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) out[(b * H + h * G + g) * D + d] = static_cast<T>(acc[g * D + d]);
    }
  }
}

#ifdef TWINKLE_AVX512_BF16
// e^(s - max s) for scores s[0, L) in place, 16 lanes at a time (the tail masked); returns 1 / their sum.
static inline float exp_shifted16(float* scores, int64_t L) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < L; t += 16) {
    const __mmask16 keep = twinkle::first(L - t);
    m = _mm512_mask_max_ps(m, keep, m, _mm512_maskz_loadu_ps(keep, scores + t));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; t += 16) {
    const __mmask16 keep = twinkle::first(L - t);
    const __m512 e = twinkle::exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, scores + t), top));
    sum = _mm512_mask_add_ps(sum, keep, sum, e);
    _mm512_mask_storeu_ps(scores + t, keep, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// bfloat16 rows of head size D (64 or 128) for G query heads per K/V head, with AVX-512. Scores: q.k as bf16 pair
// dot products accumulated in fp32 (vdpbf16ps; q and k are bf16 already, so nothing is rounded before the sum),
// 16 positions at a time; softmax in fp32, its e^(s - max) rounded to bf16 and multiplied with the values as bf16
// pair dot products too (two positions per vdpbf16ps, as the prefill kernel and FlashAttention do) into fp32
// accumulators in registers, divided by the sum at the end. Each K/V row is read once for the G heads of its
// group, each block prefetched while the one before it is read.
template <int D, int G>
static void run_bf16(const at::BFloat16* q, int64_t q_stride, const at::BFloat16* k, const at::BFloat16* v,
                     at::BFloat16* out,
                     const int64_t* tables, int64_t W, int64_t bs, const int64_t* lengths, int64_t B, int64_t Hkv,
                     int64_t head_stride, int64_t block_stride, float scale, int threads) {
  constexpr int C = D / 32;  // zmm of bf16 per row
  const int64_t heads = G * Hkv;
  #pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
    std::vector<int32_t> weights;
    std::vector<int64_t> rows;  // each position's row, as an offset into either pool
    #pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < B * Hkv; ++i) {  // row by row: a block holds the row's K/V heads side by side
      const int64_t b = i / Hkv, h = i % Hkv, L = lengths[b], padded = (L + 15) / 16 * 16;
      scores.resize(G * padded);
      weights.resize(G * padded / 2);
      twinkle::row_offsets(rows, tables + b * W, L, bs, block_stride, h * head_stride, D);
      __m512i qv[G][C];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c)
          qv[g][c] = _mm512_loadu_si512(reinterpret_cast<const void*>(q + b * q_stride + (h * G + g) * D + 32 * c));
      twinkle::prefetch_rows(k + rows[0], std::min<int64_t>(L, bs) * D * 2);
      for (int64_t t0 = 0; t0 < padded; t0 += 16) {
        if (t0 + 16 < L) twinkle::prefetch_rows(k + rows[t0 + 16], std::min<int64_t>(16, L - t0 - 16) * D * 2);
        for (int g = 0; g < G; ++g) {
          const __m512 scaled = _mm512_mul_ps(twinkle::dot16<C>(qv[g], k, rows.data() + t0), _mm512_set1_ps(scale));
          _mm512_storeu_ps(scores.data() + g * padded + t0, scaled);
        }
      }
      float inv[G];
      for (int g = 0; g < G; ++g) {  // e^(s - max) as bf16, (p[2j], p[2j + 1]) per 32-bit word, 0 past L
        float* sg = scores.data() + g * padded;
        inv[g] = exp_shifted16(sg, L);
        for (int64_t t0 = 0; t0 < padded; t0 += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(weights.data() + g * padded / 2 + t0 / 2),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(twinkle::first(L - t0), sg + t0)));
      }
      __m512 acc[G][2 * C];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < 2 * C; ++c) acc[g][c] = _mm512_setzero_ps();
      twinkle::prefetch_rows(v + rows[0], std::min<int64_t>(L, bs) * D * 2);
      for (int64_t j = 0; 2 * j < L; ++j) {  // positions 2j and 2j + 1 (past L: position 0's row, weighted 0)
        if (j % 8 == 0 && 2 * j + 16 < L)
          twinkle::prefetch_rows(v + rows[2 * j + 16], std::min<int64_t>(16, L - 2 * j - 16) * D * 2);
        __m512i pairs[2 * C];
        twinkle::interleave<C>(v + rows[2 * j], v + rows[2 * j + 1], pairs);
        for (int g = 0; g < G; ++g) {
          const __m512bh w = (__m512bh)_mm512_set1_epi32(weights[g * padded / 2 + j]);
          for (int c = 0; c < 2 * C; ++c) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], w, (__m512bh)pairs[c]);
        }
      }
      for (int g = 0; g < G; ++g)
        twinkle::store_interleaved<C>(out + (b * heads + h * G + g) * D, acc[g], _mm512_set1_ps(inv[g]));
    }
  }
}

using FastKernel = void (*)(const at::BFloat16*, int64_t, const at::BFloat16*, const at::BFloat16*, at::BFloat16*,
                            const int64_t*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int64_t, int64_t, float,
                            int);

// The AVX-512 kernel for this head size and group, or nullptr (the portable one then runs).
static FastKernel fast_kernel(int64_t D, int64_t G) {
  if (D == 64) return twinkle::by_group(G, [](auto g) -> FastKernel { return run_bf16<64, decltype(g)::value>; });
  if (D == 128) return twinkle::by_group(G, [](auto g) -> FastKernel { return run_bf16<128, decltype(g)::value>; });
  return nullptr;
}
#endif

// q [B, H, D]; k, v [num_blocks, H_kv, block_size, D]; tables [>= B, W] int64: row b's blocks in position order;
// lengths [B] int64: the positions row b attends to (< W * block_size).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tables,
                               torch::Tensor lengths, double scale, int64_t threads) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "q must be a [B, H, D] tensor with contiguous rows (a view of the qkv projection is fine)");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides(),
              "k, v: [num_blocks, H_kv, block_size, D]");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == k.size(3) && k.size(3) == q.size(2), "k, v rows must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v: one dtype");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous() && lengths.size(0) == q.size(0),
              "lengths: int64 [B]");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.dim() == 2 && tables.is_contiguous() &&
              tables.size(0) >= q.size(0), "tables: contiguous int64 [>= B, W]");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "H must be a multiple of H_kv");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), bs = k.size(2), W = tables.size(1);
  const int64_t* L = lengths.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(L, L + B, [&](int64_t n) { return 0 < n && n <= W * bs; }),
              "each length must be in 1..block table width * block_size");
  auto out = torch::empty({B, H, D}, q.options());
#ifdef TWINKLE_AVX512_BF16
  if (FastKernel fast = q.scalar_type() == at::kBFloat16 ? fast_kernel(D, H / Hkv) : nullptr) {
    fast(q.data_ptr<at::BFloat16>(), q.stride(0), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(),
         out.data_ptr<at::BFloat16>(), tables.data_ptr<int64_t>(), W, bs, L, B, Hkv,
         k.stride(1), k.stride(0), (float)scale, (int)threads);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    run<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                  out.data_ptr<scalar_t>(),
                  tables.data_ptr<int64_t>(), W, bs, L, B, H, Hkv, D, k.stride(1),
                  k.stride(0), (float)scale, (int)threads);
  });
  return out;
}
