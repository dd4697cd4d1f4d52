// The native runner's element-wise steps on CPU, each one pass over its rows instead of the 5-12 ATen ops (and
// their float32 temporaries) of the module code, for half-precision models (bfloat16, float16). Each rounds where
// the Hugging Face modules round: values are computed in float32 and rounded to the model's dtype after every op
// the modules run in that dtype, so results agree with them to one unit in the last place (sums and exp are
// computed in another order).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>

#include "simd.h"

namespace {

template <typename T> inline float f(T x) { return static_cast<float>(x); }
template <typename T> inline float r(float x) { return static_cast<float>(static_cast<T>(x)); }  // round to T

// Rows per task of torch's thread pool: enough work (~32k values) to pay for waking a thread.
inline int64_t grain(int64_t n) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(n, 1)); }

// out = weight * T(x * rsqrt(mean(x^2) + eps)), x = T(x + delta) first when delta is given (stored back to x).
template <typename T>
void rms_norm_rows(T* x, const T* delta, const T* weight, T* out, int64_t rows, int64_t n, int64_t x_stride,
                   int64_t delta_stride, float eps) {
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* xi = x + i * x_stride;
      T* oi = out + i * n;
#ifdef TWINKLE_AVX512
      using namespace twinkle;
      __m512 squares = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = first(n - j);
        __m512 xj = load(xi + j, m);
        if (delta != nullptr) {
          xj = rounded(_mm512_add_ps(xj, load(delta + i * delta_stride + j, m)), xi);
          store(xi + j, xj, m);
        }
        squares = _mm512_fmadd_ps(xj, xj, squares);
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / n + eps));
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = first(n - j);
        store(oi + j, _mm512_mul_ps(load(weight + j, m), rounded(_mm512_mul_ps(load(xi + j, m), inv), xi)), m);
      }
#else
      if (delta != nullptr) {
        const T* di = delta + i * delta_stride;
        #pragma omp simd
        for (int64_t j = 0; j < n; ++j) xi[j] = static_cast<T>(f(xi[j]) + f(di[j]));
      }
      float squares = 0.f;
      #pragma omp simd reduction(+:squares)
      for (int64_t j = 0; j < n; ++j) squares += f(xi[j]) * f(xi[j]);
      const float inv = 1.f / std::sqrt(squares / n + eps);
      #pragma omp simd
      for (int64_t j = 0; j < n; ++j) oi[j] = static_cast<T>(f(weight[j]) * r<T>(f(xi[j]) * inv));
#endif
    }
  });
}

// x = T(T(x * cos) + T(rotate_half(x) * sin)) for every head of every row, in place.
template <typename T>
void rotate_rows(T* x, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t dim, int64_t row_stride,
                 int64_t head_stride) {
  const int64_t half = dim / 2;
  at::parallel_for(0, rows, grain(heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* c = cos + i * dim;
      const T* s = sin + i * dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* xh = x + i * row_stride + h * head_stride;
#ifdef TWINKLE_AVX512
        using namespace twinkle;
        for (int64_t j = 0; j < half; j += 16) {
          const __mmask16 m = first(half - j);
          const __m512 a = load(xh + j, m), b = load(xh + j + half, m);
          store(xh + j, _mm512_sub_ps(rounded(_mm512_mul_ps(a, load(c + j, m)), xh),
                                      rounded(_mm512_mul_ps(b, load(s + j, m)), xh)), m);
          store(xh + j + half, _mm512_add_ps(rounded(_mm512_mul_ps(b, load(c + j + half, m)), xh),
                                             rounded(_mm512_mul_ps(a, load(s + j + half, m)), xh)), m);
        }
#else
        #pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float a = f(xh[j]), b = f(xh[j + half]);
          xh[j] = static_cast<T>(r<T>(a * f(c[j])) + r<T>(-b * f(s[j])));
          xh[j + half] = static_cast<T>(r<T>(b * f(c[j + half])) + r<T>(a * f(s[j + half])));
        }
#endif
      }
    }
  });
}

// out = T(T(silu(gate)) * up) for gate_up = [gate | up] per row.
template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* g = gate_up + i * 2 * n;
      T* oi = out + i * n;
#ifdef TWINKLE_AVX512
      using namespace twinkle;
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = first(n - j);
        const __m512 x = load(g + j, m);
        const __m512 act = rounded(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), twinkle::exp(_mm512_sub_ps(
            _mm512_setzero_ps(), x)))), oi);
        store(oi + j, _mm512_mul_ps(act, load(g + n + j, m)), m);
      }
#else
      #pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float x = f(g[j]);
        oi[j] = static_cast<T>(r<T>(x / (1.f + std::exp(-x))) * f(g[n + j]));
      }
#endif
    }
  });
}

// Index of each row's largest value, the first one where several are equal (as torch.argmax).
template <typename T>
void argmax_rows(const T* x, int64_t* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = x + i * n;
#ifdef TWINKLE_AVX512
      using namespace twinkle;
      __m512 best = _mm512_set1_ps(-INFINITY);
      __m512i where = _mm512_set1_epi32(0);
      __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (int64_t j = 0; j < n; j += 16, at = _mm512_add_epi32(at, _mm512_set1_epi32(16))) {
        const __mmask16 m = first(n - j);
        const __m512 xj = load(xi + j, m);
        const __mmask16 above = _mm512_mask_cmp_ps_mask(m, xj, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, above, xj);
        where = _mm512_mask_mov_epi32(where, above, at);
      }
      const float top = _mm512_reduce_max_ps(best);
      const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
      out[i] = tops ? _mm512_mask_reduce_min_epi32(tops, where) : 0;
#else
      int64_t index = 0;
      for (int64_t j = 1; j < n; ++j) if (f(xi[j]) > f(xi[index])) index = j;
      out[i] = index;
#endif
    }
  });
}

void check_half(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf),
              name, " must be a bfloat16 or float16 CPU tensor");
}

}  // namespace

// rms_norm(x [T, n], weight [n], eps) -> [T, n]; with delta [T, n]: x += delta in place first (the residual add).
torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> delta, torch::Tensor weight, double eps) {
  check_half(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() && weight.numel() == x.size(1) &&
              weight.scalar_type() == x.scalar_type(), "rms_norm: x [T, n] with rows contiguous, weight [n]");
  if (delta) TORCH_CHECK(delta->sizes() == x.sizes() && delta->stride(1) == 1 &&
                         delta->scalar_type() == x.scalar_type(), "rms_norm: delta shaped as x");
  auto out = torch::empty(x.sizes(), x.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), delta ? delta->data_ptr<scalar_t>() : nullptr,
                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1), x.stride(0),
                            delta ? delta->stride(0) : 0, (float)eps);
  });
  return out;
}

// rotary_(x [T, heads, dim] (rows and heads may be strided, dims contiguous), cos, sin [T, dim]): in place.
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  check_half(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rotary_: x [T, heads, dim], dims contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.dim() == 2 &&
              cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && cos.scalar_type() == x.scalar_type() &&
              sin.scalar_type() == x.scalar_type(), "rotary_: cos, sin [T, dim] contiguous, x's dtype");
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "rotary_", [&] {
    rotate_rows<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), x.size(0),
                          x.size(1), x.size(2), x.stride(0), x.stride(1));
  });
}

// silu_mul(gate_up [T, 2n] contiguous) -> [T, n]: silu(gate) * up.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_half(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up [T, 2n] contiguous");
  const int64_t n = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), n}, gate_up.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gate_up.size(0), n);
  });
  return out;
}

// argmax(x [B, n] contiguous, float32, bfloat16 or float16) -> int64 [B]. NaN is never the largest value (torch's
// argmax would return it; a NaN logit means the model is broken anyway).
torch::Tensor argmax(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.size(1) > 0 && x.size(1) < (1ll << 31),
              "argmax: x [B, n] contiguous on CPU");
  auto out = torch::empty({x.size(0)}, x.options().dtype(at::kLong));
  if (x.scalar_type() == at::kFloat) {
    argmax_rows<float>(x.data_ptr<float>(), out.data_ptr<int64_t>(), x.size(0), x.size(1));
    return out;
  }
  check_half(x, "x");
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "argmax", [&] {
    argmax_rows<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), x.size(0), x.size(1));
  });
  return out;
}

// write_rows_(pool [N, heads, block_size, dim], blocks [T], offsets [T] int64, rows [T, heads, dim] (dims
// contiguous)): pool[blocks[t], :, offsets[t]] = rows[t], in place (any dtype).
void write_rows_(torch::Tensor pool, torch::Tensor blocks, torch::Tensor offsets, torch::Tensor rows) {
  TORCH_CHECK(pool.dim() == 4 && pool.is_contiguous() && rows.dim() == 3 && rows.stride(2) == 1 &&
              rows.size(1) == pool.size(1) && rows.size(2) == pool.size(3) &&
              rows.scalar_type() == pool.scalar_type(),
              "write_rows_: pool [N, heads, block, dim], rows [T, heads, dim]");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong && blocks.is_contiguous() &&
              offsets.is_contiguous() && blocks.numel() == rows.size(0) && offsets.numel() == rows.size(0),
              "write_rows_: blocks, offsets int64 [T]");
  const int64_t T = rows.size(0), heads = rows.size(1), dim = rows.size(3 - 1), N = pool.size(0), bs = pool.size(2);
  const int64_t item = rows.element_size() * dim;
  const int64_t* b = blocks.data_ptr<int64_t>();
  const int64_t* o = offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(b[t] >= 0 && b[t] < N && o[t] >= 0 && o[t] < bs, "write_rows_: a place is outside the pool");
  char* dst = static_cast<char*>(pool.data_ptr());
  const char* src = static_cast<const char*>(rows.data_ptr());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(dst + (((b[t] * heads + h) * bs) + o[t]) * item,
                  src + (t * rows.stride(0) + h * rows.stride(1)) * rows.element_size(), item);
}
