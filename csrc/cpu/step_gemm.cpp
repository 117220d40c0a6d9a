#include "step_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

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

StepGemm::StepGemm(const at::Tensor& w) : w_(w) {
  // userEnabledMkldnn: torch.backends.mkldnn.enabled, which a user may turn off to rule oneDNN out
  if (w.is_cpu() && w.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn() && onednn_linear())
    w_nk_ = w.t().contiguous();
}

void StepGemm::run(at::Tensor& out, const at::Tensor& a) const {
  if (!w_nk_.defined()) {
    at::mm_out(out, a, w_);
    return;
  }
  out.copy_(onednn_linear()->call(a, w_nk_, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(),
                                  std::nullopt));
}

}  // namespace hyperfused
