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
  // userEnabledMkldnn: torch.backends.mkldnn.enabled, which a user may turn off to rule oneDNN out
  const bool onednn_dtype = w_.scalar_type() == at::kFloat || w_.scalar_type() == at::kBFloat16;
  if (w.is_cpu() && onednn_dtype && at::globalContext().userEnabledMkldnn() && onednn_linear() &&
      forced() != Library::Mm) {
    w_nk_ = w_.t().contiguous();
    if (bias_.defined()) bias_nk_ = bias_.to(w_.scalar_type());  // oneDNN takes the bias in the weight's dtype
  }
}

// HYPERFUSED_STEP_GEMM=onednn|mm forces a library (the tests run both); anything else, or nothing, measures.
StepGemm::Library StepGemm::forced() {
  const char* v = std::getenv("HYPERFUSED_STEP_GEMM");
  if (v && std::string(v) == "onednn") return Library::OneDnn;
  if (v && std::string(v) == "mm") return Library::Mm;
  return Library::Measure;
}

void StepGemm::run_with(Library lib, at::Tensor& out, const at::Tensor& a) const {
  if (lib == Library::Mm) {
    mm_out(out, a);
    return;
  }
  const auto bias = bias_nk_.defined() ? std::optional<at::Tensor>(bias_nk_) : std::nullopt;
  out.copy_(onednn_linear()->call(precision_.operand(a), w_nk_, bias, "none", c10::List<std::optional<at::Scalar>>(),
                                  std::nullopt));
}

// Which library is faster for this GEMM shape differs from CPU to CPU (oneDNN's kernels won by 1.5x on an AMD
// EPYC where MKL took a generic path; MKL won on an Intel Xeon with AMX), so it is measured, once per shape
// and process: the best of a few runs of each, on the call's own operands.
StepGemm::Library StepGemm::choose(at::Tensor& out, const at::Tensor& a) const {
  const Library force = forced();
  if (force != Library::Measure) return force;
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t, bool, int>, Library> chosen;
  const auto key = std::make_tuple(a.size(0), w_.size(0), w_.size(1), bias_.defined(), int(w_.scalar_type()));
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = chosen.find(key);
  if (it != chosen.end()) return it->second;
  double best[2] = {1e30, 1e30};
  for (int round = 0; round < 16; ++round)
    for (int lib = 0; lib < 2; ++lib) {
      const auto t0 = std::chrono::steady_clock::now();
      run_with(lib ? Library::Mm : Library::OneDnn, out, a);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round > 0) best[lib] = std::min(best[lib], dt);  // round 0 warms both up
    }
  return chosen[key] = best[1] < best[0] ? Library::Mm : Library::OneDnn;
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
  if (!w_nk_.defined()) {
    mm_out(out, a);
    return;
  }
  if (lib_ == Library::Measure) lib_ = choose(out, a);
  run_with(lib_, out, a);
}

}  // namespace hyperfused
