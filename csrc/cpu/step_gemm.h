// out = a · w (+ bias) for a weight w used on every step of the time loop, with few rows in a (the batch).
// On the CPU in float32 this runs oneDNN's matmul (torch's mkldnn::_linear_pointwise op, which caches the
// primitive per shape; the library behind nn.LSTM on the CPU) or MKL's sgemm (at::mm_out), whichever is
// faster on this machine for this shape: measured once per shape and process. Neither wins everywhere (oneDNN
// by up to 1.5x on an AMD EPYC, MKL on an Intel Xeon). Elsewhere (CUDA, float64, a torch built without
// oneDNN or with torch.backends.mkldnn disabled) it is at::mm_out.
#pragma once
#include <ATen/core/Tensor.h>

namespace hyperfused {

class StepGemm {
 public:
  // w: (K, N); a strided view is fine (it is copied once if oneDNN needs it row-major as (N, K)).
  // bias: (N), added to every row, or undefined.
  explicit StepGemm(const at::Tensor& w, const at::Tensor& bias = at::Tensor());
  // out (m, N) and a (m, K), each with contiguous rows.
  void run(at::Tensor& out, const at::Tensor& a) const;

 private:
  enum class Library { Measure, OneDnn, Mm };
  static Library forced();
  Library choose(at::Tensor& out, const at::Tensor& a) const;
  void run_with(Library lib, at::Tensor& out, const at::Tensor& a) const;
  void mm_out(at::Tensor& out, const at::Tensor& a) const;

  at::Tensor w_, bias_, w_nk_;  // w_nk_ = wᵀ contiguous, defined when oneDNN may run the product
  mutable Library lib_ = Library::Measure;  // chosen at the first run
};

}  // namespace hyperfused
