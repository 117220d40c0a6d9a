// out = a · w for a recurrent weight w used on every step of the time loop, with few rows in a (the batch).
// On the CPU in float32 this runs oneDNN's matmul (torch's mkldnn::_linear_pointwise op, which caches the
// primitive per shape), the library behind nn.LSTM on the CPU: for these short-and-wide GEMMs it is up to
// 1.5x faster than MKL's sgemm on the machines we measured (T=100, B=32, H=1000: fwd+bwd 1.08-1.12 s vs
// 1.15-1.36 s). Elsewhere (CUDA, float64, a torch built without oneDNN or with torch.backends.mkldnn
// disabled) it is at::mm_out.
#pragma once
#include <ATen/core/Tensor.h>

namespace hyperfused {

class StepGemm {
 public:
  // w: (K, N); a strided view is fine (it is copied once if oneDNN needs it row-major as (N, K)).
  explicit StepGemm(const at::Tensor& w);
  // out (m, N) and a (m, K), each with contiguous rows.
  void run(at::Tensor& out, const at::Tensor& a) const;

 private:
  at::Tensor w_, w_nk_;  // w_nk_ = wᵀ contiguous, defined when oneDNN runs the product
};

}  // namespace hyperfused
