// Causal prefill attention over the paged KV cache on CPU for bfloat16 (AVX-512 BF16): the query rows of a prompt
// (a whole prompt, or a chunk of one after `start` cached positions) attend to their sequence's cached positions
// up to their own, read from the blocks in place (the chunk's own K/V are written to the cache first). A flash-style
// pass: 16 query rows at a time, 64 positions per online-softmax update (fp32), scores as bf16 pair dot products
// accumulated in fp32 (vdpbf16ps), probabilities x values as bf16 pair dot products into fp32 accumulators (the
// probabilities rounded to bf16, as FlashAttention's kernels do). ~150 GFLOP/s on a 2-core EPYC, where SDPA's CPU
// kernel runs bf16 at ~70 (masked) to ~110 (causal).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "simd.h"

#ifdef TWINKLE_AVX512_BF16
namespace {

constexpr int TILES = 4;  // 16-position tiles per softmax update (64 positions)

// Spans are (first row, end row, slot, start position): rows first..end-1 of q are positions start.. of the slot.
template <int D, int G>
void prefill_bf16(const at::BFloat16* q, int64_t q_stride, const at::BFloat16* k, const at::BFloat16* v,
                  at::BFloat16* out, const int64_t* tables, int64_t W, int64_t bs, const int64_t* spans, int64_t S,
                  int64_t Hkv, int64_t head_stride, int64_t block_stride, float scale) {
  constexpr int C = D / 32;  // zmm of bf16 per row; 2 * C fp32 accumulators per query row
  const int64_t heads = G * Hkv;
  std::vector<std::array<int64_t, 3>> items;  // (span, kv head, first query row of the tile)
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t i0 = 0; i0 < spans[4 * s + 1] - spans[4 * s]; i0 += 16) items.push_back({s, h, i0});
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows;
    std::vector<__m512> acc(G * 16 * 2 * C);
    std::vector<float> top(G * 16), sum(G * 16);
    for (int64_t item = begin; item < end; ++item) {
      const auto [s, h, i0] = items[item];
      const int64_t first = spans[4 * s], n = spans[4 * s + 1] - first, start = spans[4 * s + 3];
      const int64_t count = std::min<int64_t>(16, n - i0), length = start + i0 + count;
      twinkle::row_offsets(rows, tables + spans[4 * s + 2] * W, length, bs, block_stride, h * head_stride, D);
      std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
      std::fill(top.begin(), top.end(), -INFINITY);
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t t0 = 0; t0 < length; t0 += 16 * TILES) {
        __m512i pairs[8 * TILES][2 * C];  // values of positions (2j, 2j+1) interleaved per dimension, for vdpbf16ps
        const int tiles = (int)std::min<int64_t>(TILES, (length - t0 + 15) / 16);
        for (int j = 0; j < 8 * tiles; ++j)
          twinkle::interleave<C>(v + rows[t0 + 2 * j], v + rows[t0 + 2 * j + 1], pairs[j]);
        for (int g = 0; g < G; ++g)
          for (int64_t r = 0; r < count; ++r) {
            const int64_t last = start + i0 + r;  // the last position this row sees
            if (t0 > last) continue;
            const at::BFloat16* qr = q + (first + i0 + r) * q_stride + (h * G + g) * D;
            __m512i qv[C];
            for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_si512(qr + 32 * c);
            __m512 scores[TILES];
            __mmask16 seen[TILES];
            __m512 high = _mm512_set1_ps(-INFINITY);
            for (int u = 0; u < tiles; ++u) {
              const __m512 dots = twinkle::dot16<C>(qv, k, rows.data() + t0 + 16 * u);
              seen[u] = last - t0 - 16 * u < 0 ? (__mmask16)0 : twinkle::first(last - t0 - 16 * u + 1);
              scores[u] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), seen[u],
                                             _mm512_mul_ps(dots, _mm512_set1_ps(scale)));
              high = _mm512_max_ps(high, scores[u]);
            }
            float& m = top[g * 16 + r];
            const float next = std::max(m, _mm512_reduce_max_ps(high));
            const float shrink = std::exp(m - next);  // 0 on the first tile (m = -inf)
            m = next;
            __m512* a = acc.data() + (g * 16 + r) * 2 * C;
            const __m512 factor = _mm512_set1_ps(shrink);
            for (int c = 0; c < 2 * C; ++c) a[c] = _mm512_mul_ps(a[c], factor);
            __m512 total = _mm512_setzero_ps();
            for (int u = 0; u < tiles; ++u) {
              const __m512 shifted = _mm512_sub_ps(scores[u], _mm512_set1_ps(next));
              const __m512 p = _mm512_maskz_mov_ps(seen[u], twinkle::exp(shifted));
              total = _mm512_add_ps(total, p);
              alignas(32) int32_t weights[8];  // (p[2j], p[2j+1]) as bf16 pairs
              _mm256_store_si256(reinterpret_cast<__m256i*>(weights), (__m256i)_mm512_cvtneps_pbh(p));
              for (int j = 0; j < 8; ++j) {
                const __m512bh w = (__m512bh)_mm512_set1_epi32(weights[j]);
                for (int c = 0; c < 2 * C; ++c) a[c] = _mm512_dpbf16_ps(a[c], w, (__m512bh)pairs[8 * u + j][c]);
              }
            }
            sum[g * 16 + r] = sum[g * 16 + r] * shrink + _mm512_reduce_add_ps(total);
          }
      }
      for (int g = 0; g < G; ++g)
        for (int64_t r = 0; r < count; ++r) {
          twinkle::store_interleaved<C>(out + ((first + i0 + r) * heads + h * G + g) * D,
                                        acc.data() + (g * 16 + r) * 2 * C, _mm512_set1_ps(1.f / sum[g * 16 + r]));
        }
    }
  });
}

using PrefillKernel = void (*)(const at::BFloat16*, int64_t, const at::BFloat16*, const at::BFloat16*,
                               at::BFloat16*, const int64_t*, int64_t, int64_t, const int64_t*, int64_t, int64_t,
                               int64_t, int64_t, float);

PrefillKernel prefill_kernel(int64_t D, int64_t G) {
  if (D == 64)
    return twinkle::by_group(G, [](auto g) -> PrefillKernel { return prefill_bf16<64, decltype(g)::value>; });
  if (D == 128)
    return twinkle::by_group(G, [](auto g) -> PrefillKernel { return prefill_bf16<128, decltype(g)::value>; });
  return nullptr;
}

}  // namespace
#endif

// Whether prefill_attention serves bfloat16 models of this head size and query heads per K/V head here.
bool has_prefill_attention(int64_t head_dim, int64_t group) {
#ifdef TWINKLE_AVX512_BF16
  return prefill_kernel(head_dim, group) != nullptr;
#else
  (void)head_dim, (void)group;
  return false;
#endif
}

// q [T, H, D] bfloat16 (rows may be strided); k, v [num_blocks, H_kv, block_size, D]; tables [slots, W] int64;
// spans [S, 4] int64 (first row, end row, slot, start position). Returns [T, H, D]: each span's rows attend causally
// to their slot's positions 0..start + their index (rows outside every span are zero).
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tables,
                                torch::Tensor spans, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2) && q.scalar_type() == at::kBFloat16,
              "prefill_attention: q must be a bfloat16 [T, H, D] tensor with contiguous rows");
  TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() &&
              k.size(3) == q.size(2) && k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "prefill_attention: k, v contiguous [num_blocks, H_kv, block_size, D] of q's dtype");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.dim() == 2 && tables.is_contiguous(),
              "prefill_attention: tables contiguous int64 [slots, W]");
  TORCH_CHECK(spans.scalar_type() == at::kLong && spans.dim() == 2 && spans.size(1) == 4 && spans.is_contiguous(),
              "prefill_attention: spans int64 [S, 4]");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), bs = k.size(2), W = tables.size(1);
  TORCH_CHECK(H % Hkv == 0 && has_prefill_attention(D, H / Hkv),
              "prefill_attention: not built for this head size and grouping (see has_prefill_attention)");
  const int64_t* s = spans.data_ptr<int64_t>();
  for (int64_t i = 0; i < spans.size(0); ++i)
    TORCH_CHECK(0 <= s[4 * i] && s[4 * i] < s[4 * i + 1] && s[4 * i + 1] <= T && 0 <= s[4 * i + 2] &&
                s[4 * i + 2] < tables.size(0) && s[4 * i + 3] >= 0 &&
                s[4 * i + 3] + s[4 * i + 1] - s[4 * i] <= W * bs, "prefill_attention: a span is out of range");
  auto out = torch::zeros({T, H, D}, q.options());
#ifdef TWINKLE_AVX512_BF16
  prefill_kernel(D, H / Hkv)(q.data_ptr<at::BFloat16>(), q.stride(0), k.data_ptr<at::BFloat16>(),
                             v.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), tables.data_ptr<int64_t>(), W,
                             bs, s, spans.size(0), Hkv, k.stride(1), k.stride(0), (float)scale);
#endif
  return out;
}
