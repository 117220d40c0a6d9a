#include "step_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace hyperfused {
namespace {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

// mkldnn::_linear_pointwise(input, weight (N, K), bias?, attr, scalars, algorithm): y = input · weightᵀ.
// Looked up once; absent when torch was built without oneDNN.
const c10::TypedOperatorHandle<LinearFn>* onednn_linear() {
  static const auto handle = []() -> std::optional<c10::TypedOperatorHandle<LinearFn>> {
    const auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!h) return std::nullopt;
    return h->typed<LinearFn>();
  }();
  return handle ? &*handle : nullptr;
}

using MklLinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                               int64_t);
using MklReorderFn = at::Tensor(const at::Tensor&, int64_t);

// mkl::_mkl_linear(input, packed weight, weight (N, K), bias?, batch_size) and
// mkl::_mkl_reorder_linear_weight(weight (N, K), batch_size): MKL's sgemm with the weight packed once for
// a batch size (cblas_sgemm_pack), instead of packed again on every call. Absent without MKL.
struct MklPacked {
  c10::TypedOperatorHandle<MklLinearFn> linear;
  c10::TypedOperatorHandle<MklReorderFn> reorder;
};

const MklPacked* mkl_packed() {
  static const auto ops = []() -> std::optional<MklPacked> {
    const auto linear = c10::Dispatcher::singleton().findSchema({"mkl::_mkl_linear", ""});
    const auto reorder = c10::Dispatcher::singleton().findSchema({"mkl::_mkl_reorder_linear_weight", ""});
    if (!linear || !reorder) return std::nullopt;
    return MklPacked{linear->typed<MklLinearFn>(), reorder->typed<MklReorderFn>()};
  }();
  return ops ? &*ops : nullptr;
}

}  // namespace

at::Tensor GemmPrecision::operand(const at::Tensor& t) const { return low ? t.to(*low) : t; }

at::Tensor GemmPrecision::mm(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) const {
  if (!low) return at::mm(a, b);
  // cuBLAS accumulates in float32 and returns it; the CPU's low-precision GEMMs accumulate in float32 too but
  // return their inputs' dtype (as nn.Linear under autocast does), cast back here.
  if (a.is_cuda()) return at::mm(operand(a), b, out_dtype);
  return at::mm(operand(a), b).to(out_dtype);
}

at::Tensor GemmPrecision::addmm(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) const {
  if (!low) return at::addmm(bias, a, b);
  return mm(a, b, bias.scalar_type()).add_(bias);
}

void GemmPrecision::mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
  if (!low)
    at::mm_out(out, a, b);
  else if (out.is_cuda())  // cuBLAS accumulates in float32 and writes it into out
    at::mm_out(out, operand(a), b, out.scalar_type());
  else
    out.copy_(mm(a, b, out.scalar_type()));
}

StepGemm::StepGemm(const at::Tensor& w, const at::Tensor& bias, GemmPrecision precision)
    : precision_(precision), w_(precision.operand(w)), bias_(bias) {
  const Library force = forced();
  // userEnabledMkldnn: torch.backends.mkldnn.enabled, which a user may turn off to rule oneDNN out
  const bool onednn_dtype = w_.scalar_type() == at::kFloat || w_.scalar_type() == at::kBFloat16;
  onednn_ = w.is_cpu() && onednn_dtype && at::globalContext().userEnabledMkldnn() && onednn_linear() &&
            (force == Library::Measure || force == Library::OneDnn);
  // MKL's packed sgemm: float32 operands only
  mkl_ = w.is_cpu() && w_.scalar_type() == at::kFloat && mkl_packed() &&
         (force == Library::Measure || force == Library::MklPacked);
  if (onednn_ || mkl_) {
    w_nk_ = w_.t().contiguous();
    if (bias_.defined()) bias_nk_ = bias_.to(w_.scalar_type());  // oneDNN takes the bias in the weight's dtype
  }
}

// HYPERFUSED_STEP_GEMM=onednn|mkl|mm forces a library (the tests run each); anything else, or nothing,
// measures.
StepGemm::Library StepGemm::forced() {
  const char* v = std::getenv("HYPERFUSED_STEP_GEMM");
  if (v && std::string(v) == "onednn") return Library::OneDnn;
  if (v && std::string(v) == "mkl") return Library::MklPacked;
  if (v && std::string(v) == "mm") return Library::Mm;
  return Library::Measure;
}

void StepGemm::run_with(Library lib, at::Tensor& out, const at::Tensor& a) const {
  const auto bias = bias_nk_.defined() ? std::optional<at::Tensor>(bias_nk_) : std::nullopt;
  if (lib == Library::OneDnn) {
    out.copy_(onednn_linear()->call(precision_.operand(a), w_nk_, bias, "none",
                                    c10::List<std::optional<at::Scalar>>(), std::nullopt));
  } else if (lib == Library::MklPacked) {
    out.copy_(mkl_packed()->linear.call(a, packed_for(a.size(0)), w_nk_, bias, a.size(0)));
  } else {
    mm_out(out, a);
  }
}

// The weight packed for `rows` rows of a: packed at the first step, again if the batch size changes (the decode
// step's cached StepGemm may serve several). Locked: decoding threads may share one StepGemm.
at::Tensor StepGemm::packed_for(int64_t rows) const {
  std::lock_guard<std::mutex> lock(packed_->mutex);
  if (packed_->rows != rows) {
    packed_->weight = mkl_packed()->reorder.call(w_nk_, rows);
    packed_->rows = rows;
  }
  return packed_->weight;
}

// Which library is faster for this GEMM shape differs from CPU to CPU (oneDNN's kernels won by 1.5x on an AMD
// EPYC where MKL took a generic path; MKL won on an Intel Xeon with AMX, and its packed sgemm by 1.1-1.7x
// more there), so it is measured, once per shape, set of candidates and process: the best of a few runs of
// each, on the call's own operands.
StepGemm::Library StepGemm::choose(at::Tensor& out, const at::Tensor& a) const {
  const Library force = forced();
  if (force != Library::Measure) return force;
  std::vector<Library> candidates = {Library::Mm};
  if (onednn_) candidates.push_back(Library::OneDnn);
  if (mkl_) candidates.push_back(Library::MklPacked);
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t, bool, int, bool, bool>, Library> chosen;
  const auto key = std::make_tuple(a.size(0), w_.size(0), w_.size(1), bias_.defined(), int(w_.scalar_type()),
                                   onednn_, mkl_);
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = chosen.find(key);
  if (it != chosen.end()) return it->second;
  std::vector<double> best(candidates.size(), 1e30);
  for (int round = 0; round < 16; ++round)
    for (size_t i = 0; i < candidates.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      run_with(candidates[i], out, a);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round > 0) best[i] = std::min(best[i], dt);  // round 0 warms each up (and packs MKL's weight)
    }
  return chosen[key] = candidates[std::min_element(best.begin(), best.end()) - best.begin()];
}

void StepGemm::mm_out(at::Tensor& out, const at::Tensor& a) const {
  if (precision_.low) {
    precision_.mm_out(out, a, w_);
    if (bias_.defined()) out.add_(bias_);
  } else if (bias_.defined()) {
    at::addmm_out(out, bias_, a, w_);
  } else {
    at::mm_out(out, a, w_);
  }
}

void StepGemm::run(at::Tensor& out, const at::Tensor& a) const {
  if (!onednn_ && !mkl_) {
    mm_out(out, a);
    return;
  }
  if (lib_ == Library::Measure) lib_ = choose(out, a);
  run_with(lib_, out, a);
}

}  // namespace hyperfused
