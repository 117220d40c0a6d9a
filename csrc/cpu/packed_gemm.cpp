#include "packed_gemm.h"

#include <ATen/ATen.h>

// MKL's packed-GEMM entry points, exported by libtorch_cpu when torch is built with MKL. Weak, so that the
// extension loads (and falls back to at::mm_out) against a torch without them. MKL_INT is int: torch links
// MKL's LP64 interface.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace hyperfused {
namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

bool mkl_packing_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}
}  // namespace

StepGemm::StepGemm(const at::Tensor& w, int64_t m) : w_(w), m_(m) {
  const bool row_major = w.stride(1) == 1, transposed = w.stride(0) == 1;
  if (!w.is_cpu() || w.scalar_type() != at::kFloat || !(row_major || transposed) || !mkl_packing_available())
    return;
  const int K = int(w.size(0)), N = int(w.size(1));
  const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(m), N, K);
  packed_ = at::empty({int64_t((bytes + sizeof(float) - 1) / sizeof(float))}, w.options());
  cblas_sgemm_pack(kRowMajor, kBMatrix, row_major ? kNoTrans : kTrans, int(m), N, K, 1.0f, w.data_ptr<float>(),
                   int(row_major ? w.stride(0) : w.stride(1)), packed_.data_ptr<float>());
}

void StepGemm::run(at::Tensor& out, const at::Tensor& a) const {
  if (!packed_.defined()) {
    at::mm_out(out, a, w_);
    return;
  }
  TORCH_CHECK(a.size(0) == m_ && a.stride(1) == 1 && out.stride(1) == 1, "hyperfused: StepGemm shape mismatch");
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(m_), int(w_.size(1)), int(w_.size(0)), a.data_ptr<float>(),
                      int(a.stride(0)), packed_.data_ptr<float>(), int(w_.size(1)), 0.0f, out.data_ptr<float>(),
                      int(out.stride(0)));
}

}  // namespace hyperfused
