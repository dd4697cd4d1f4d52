// Decode attention over the paged KV cache on CPU: one query token per row, each row reading only its own
// cached length from its blocks in place (no gather, no padding to the longest row), grouped-query heads
// sharing each K/V row as it is loaded.
// Built on first use by twinkle_async.engines.torch.native.kernels (torch.utils.cpp_extension.load).
#include <torch/extension.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <vector>

template <typename T> static inline float f(T x) { return static_cast<float>(x); }

template <typename T>
static void run(const T* q, const T* k, const T* v, T* out, const int64_t* tables, int64_t W, int64_t bs,
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
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = f(q[(b * H + h * G + g) * D + d]) * scale;
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

// q [B, H, D]; k, v [num_blocks, H_kv, block_size, D]; tables [>= B, W] int64: row b's blocks in position order;
// lengths [B] int64: the positions row b attends to (< W * block_size).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tables,
                               torch::Tensor lengths, double scale, int64_t threads) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [B, H, D] tensor");
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
  TORCH_CHECK(B == 0 || lengths.max().item<int64_t>() <= W * bs, "a length is past the block table");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    run<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                  tables.data_ptr<int64_t>(), W, bs, lengths.data_ptr<int64_t>(), B, H, Hkv, D, k.stride(1),
                  k.stride(0), (float)scale, (int)threads);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_attention", &decode_attention); }
