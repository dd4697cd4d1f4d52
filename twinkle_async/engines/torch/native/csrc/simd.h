// 16-lane float32 helpers over AVX-512 (F, BW, VL) shared by the kernels: loads that widen bfloat16/float16 to
// float32, stores that round to nearest even, masked tails, and e^x. Kernels use them under TWINKLE_AVX512 and
// keep a portable loop otherwise.
#pragma once
#include <ATen/ATen.h>
#include <algorithm>
#include <type_traits>
#include <vector>

namespace twinkle {
// Where positions 0..length-1 of one K/V head live in a paged pool, as element offsets (`table`: the sequence's
// blocks of `bs` positions, `head_offset`: the head's offset in a block), padded to a multiple of 16 with
// position 0's (read with the rest, then weighted 0 or ignored).
inline void row_offsets(std::vector<int64_t>& rows, const int64_t* table, int64_t length, int64_t bs,
                        int64_t block_stride, int64_t head_offset, int64_t dim) {
  rows.resize((length + 15) / 16 * 16);
  for (int64_t t = 0, blk = 0; t < length; ++blk)
    for (int64_t row = table[blk] * block_stride + head_offset; t < std::min(length, (blk + 1) * bs); ++t, row += dim)
      rows[t] = row;
  std::fill(rows.begin() + length, rows.end(), rows[0]);
}

// make(std::integral_constant<int, G>) for G = group in 1..8 (query heads per K/V head: kernels are compiled per
// group so their accumulators live in registers), or make's type default-constructed (nullptr) for other groups.
template <typename Make> auto by_group(int64_t group, Make make) {
  using Result = decltype(make(std::integral_constant<int, 1>{}));
  switch (group) {
    case 1: return make(std::integral_constant<int, 1>{});
    case 2: return make(std::integral_constant<int, 2>{});
    case 3: return make(std::integral_constant<int, 3>{});
    case 4: return make(std::integral_constant<int, 4>{});
    case 5: return make(std::integral_constant<int, 5>{});
    case 6: return make(std::integral_constant<int, 6>{});
    case 7: return make(std::integral_constant<int, 7>{});
    case 8: return make(std::integral_constant<int, 8>{});
    default: return Result{};
  }
}
}  // namespace twinkle

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define TWINKLE_AVX512 1

namespace twinkle {

inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// Masked moves only for the tail: a masked store is several times slower than a plain one on some CPUs (AMD).
inline __m256i load16(const void* p, __mmask16 m) {
  return m == 0xFFFF ? _mm256_loadu_si256(static_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
}
inline __m512 load(const float* p, __mmask16 m) {
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
inline __m512 load(const at::BFloat16* p, __mmask16 m) { return widen_bf16(load16(p, m)); }
inline __m512 load(const at::Half* p, __mmask16 m) { return _mm512_cvtph_ps(load16(p, m)); }

inline __m256i narrow(__m512 x, const at::BFloat16*) {
#ifdef __AVX512BF16__
  return (__m256i)_mm512_cvtneps_pbh(x);
#else  // round to nearest even on the bits (NaN aside)
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(up, 16));
#endif
}
inline __m256i narrow(__m512 x, const at::Half*) {
  return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <typename T> inline void store(T* p, __m512 x, __mmask16 m) {
  if (m == 0xFFFF) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(x, p));
  else _mm256_mask_storeu_epi16(p, m, narrow(x, p));
}

// x rounded to T and back: where the reference rounds between two ops.
inline __m512 rounded(__m512 x, const at::BFloat16* tag) { return widen_bf16(narrow(x, tag)); }
inline __m512 rounded(__m512 x, const at::Half* tag) { return _mm512_cvtph_ps(narrow(x, tag)); }

// e^x (Cephes' expf: 2^n * p(r), |r| <= ln2 / 2; relative error ~2e-7); x below -87 gives ~1e-38.
inline __m512 exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// The 16 sums of 16 vectors' lanes: out[i] = sum of v[i]'s lanes (a transpose-and-add tree, 45 instructions
// instead of 16 horizontal reductions).
inline __m512 sum16x16(const __m512* v) {
  __m512 t[8], w[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}

// Prefetch one head's rows of one block into the caches: blocks are scattered over the pool, and the hardware
// prefetcher would only catch up with each after several misses.
inline void prefetch_rows(const void* rows, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(rows);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

#if defined(__AVX512BF16__)
#define TWINKLE_AVX512_BF16 1
// q.k for the 16 positions at offsets rows[0..15] of k: bf16 pair dot products (vdpbf16ps) summed in fp32; C zmm
// (32 bf16 each) per row.
template <int C> inline __m512 dot16(const __m512i* q, const at::BFloat16* k, const int64_t* rows) {
  __m512 dots[16];
  for (int j = 0; j < 16; ++j) {
    __m512 dot = _mm512_setzero_ps();
    for (int c = 0; c < C; ++c)
      dot = _mm512_dpbf16_ps(dot, (__m512bh)q[c], (__m512bh)_mm512_loadu_si512(k + rows[j] + 32 * c));
    dots[j] = dot;
  }
  return sum16x16(dots);
}

// Two bf16 rows of 32 * C values (positions t and t + 1) interleaved per dimension for vdpbf16ps against
// (p[t], p[t + 1]) pairs: pairs[2c] holds dimensions 0-3, 8-11, 16-19, 24-27 of chunk c, pairs[2c + 1] the others.
template <int C> inline void interleave(const at::BFloat16* a, const at::BFloat16* b, __m512i* pairs) {
  for (int c = 0; c < C; ++c) {
    const __m512i x = _mm512_loadu_si512(a + 32 * c), y = _mm512_loadu_si512(b + 32 * c);
    pairs[2 * c] = _mm512_unpacklo_epi16(x, y);
    pairs[2 * c + 1] = _mm512_unpackhi_epi16(x, y);
  }
}

// Accumulators over interleave()d pairs (2 * C), times `scale`, back into dimension order, rounded to bf16.
template <int C> inline void store_interleaved(at::BFloat16* out, const __m512* acc, __m512 scale) {
  for (int c = 0; c < C; ++c) {
    const __m512 lo = _mm512_mul_ps(acc[2 * c], scale), hi = _mm512_mul_ps(acc[2 * c + 1], scale);
    const __m512 low = _mm512_shuffle_f32x4(lo, hi, 0x44), high = _mm512_shuffle_f32x4(lo, hi, 0xEE);
    const __m512 x = _mm512_shuffle_f32x4(low, low, 0xD8), y = _mm512_shuffle_f32x4(high, high, 0xD8);
    _mm512_storeu_si512(out + 32 * c, (__m512i)_mm512_cvtne2ps_pbh(y, x));
  }
}
#endif

}  // namespace twinkle
#endif
