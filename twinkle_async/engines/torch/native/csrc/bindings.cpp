// The native runner's CPU kernels as one Python module, built on first use by
// twinkle_async.engines.torch.native.kernels (torch.utils.cpp_extension.load).
#include <torch/extension.h>

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tables,
                               torch::Tensor lengths, double scale, int64_t threads);
bool has_prefill_attention(int64_t head_dim, int64_t group);
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tables,
                                torch::Tensor spans, double scale);
torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> delta, torch::Tensor weight, double eps);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul(torch::Tensor gate_up);
torch::Tensor argmax(torch::Tensor x);
void write_rows_(torch::Tensor pool, torch::Tensor blocks, torch::Tensor offsets, torch::Tensor rows);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention);
  m.def("has_prefill_attention", &has_prefill_attention);
  m.def("prefill_attention", &prefill_attention);
  m.def("rms_norm", &rms_norm, pybind11::arg("x"), pybind11::arg("delta"), pybind11::arg("weight"),
        pybind11::arg("eps"));
  m.def("rotary_", &rotary_);
  m.def("silu_mul", &silu_mul);
  m.def("argmax", &argmax);
  m.def("write_rows_", &write_rows_);
}
