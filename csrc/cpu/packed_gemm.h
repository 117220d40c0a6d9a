// out = a · w for a weight w that is reused on every time step. With MKL (torch's x86 CPU builds) w is
// packed into MKL's internal GEMM format once and each step calls the packed GEMM, so the per-step cost is
// the multiply alone, not re-packing a weight of (4H+4Ĥ)·H floats for a handful of rows. Elsewhere (no MKL,
// float64, CUDA) it is at::mm_out.
#pragma once
#include <ATen/core/Tensor.h>

namespace hyperfused {

class StepGemm {
 public:
  // w: (K, N), row-major or a transposed view of a row-major (N, K); m: the rows of every a.
  StepGemm(const at::Tensor& w, int64_t m);
  // out (m, N), rows contiguous; a (m, K), rows contiguous (any row stride).
  void run(at::Tensor& out, const at::Tensor& a) const;

 private:
  at::Tensor w_, packed_;
  int64_t m_ = 0;
};

}  // namespace hyperfused
