// Autograd for the C++ sequence ops (CPU and CUDA alike): hyperfused::hyper_lstm_forward's backward is
// hyperfused::hyper_lstm_backward. Registered here, at the Autograd key, rather than from Python
// (torch.library.register_autograd): that path flattens and rebuilds the 19 parameters' list and runs Python
// on every call: 0.3-0.5 ms per forward+backward on the CPU, 15% of a T = 1 call at B = 8.
// The fake implementations stay in Python (hyperfused/ops/hyper_lstm.py); the Triton ops keep their Python
// autograd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "optionals.h"

namespace hyperfused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("hyperfused::hyper_lstm_forward", "")
                              .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, at::TensorList, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, bool, double, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, bool, std::optional<at::ScalarType>)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hyperfused::hyper_lstm_backward", "")
          .typed<std::vector<at::Tensor>(
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, at::TensorList, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, double, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, std::optional<at::ScalarType>)>();
  return op;
}

// The forward in differentiable PyTorch ops, defined and implemented in Python (hyperfused/ops/hyper_lstm.py).
const auto& reference_op() {
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("hyperfused::hyper_lstm_reference", "")
                              .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, at::TensorList, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, bool, double, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&)>();
  return op;
}

// Saved, in order: x, h0, c0, ĥ0, ĉ0, the four masks, the six outputs, then the parameters.
constexpr int kInputs = 5, kMasks = 4, kOutputs = 6;

struct HyperLSTMFunction : public torch::autograd::Function<HyperLSTMFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& hh0, const at::Tensor& hc0, at::TensorList params,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& hyper_mask,
                               bool layer_norm, double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
                               const std::optional<at::Tensor>& hyper_zoneout_mask, bool save_for_backward,
                               std::optional<at::ScalarType> gemm_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [hs, cs, hhs, hcs, g, ws] = forward_op().call(x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm,
                                                       forget_bias, zoneout_mask, hyper_zoneout_mask,
                                                       save_for_backward, gemm_dtype);
    std::vector<at::Tensor> saved = {x,  h0, c0, hh0, hc0, or_undefined(mask), or_undefined(hyper_mask),
                                     or_undefined(zoneout_mask), or_undefined(hyper_zoneout_mask),
                                     hs, cs, hhs, hcs, g, ws};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["layer_norm"] = layer_norm;
    ctx->saved_data["forget_bias"] = forget_bias;
    ctx->saved_data["saved"] = save_for_backward;
    ctx->saved_data["gemm_dtype"] = dtype_code(gemm_dtype);
    ctx->saved_data["params"] = int64_t(params.size());
    ctx->mark_non_differentiable({g, ws});
    ctx->set_materialize_grads(false);  // unused outputs (cs, often) need no zero-filled gradients
    return {hs, cs, hhs, hcs, g, ws};
  }

  // Gradients in the forward's argument positions (the parameters one each): x, h0, c0, ĥ0, ĉ0, the
  // parameters, and none for the masks and the flags.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads = at::GradMode::is_enabled() ? recomputed(ctx, grad_outputs) : fused(ctx, grad_outputs);
    // then mask, hyper_mask, layer_norm, forget_bias, the zoneout masks, save_for_backward, gemm_dtype
    grads.resize(grads.size() + 8);
    return grads;
  }

  static variable_list fused(AutogradContext* ctx, const variable_list& grad_outputs) {
    TORCH_CHECK(ctx->saved_data["saved"].toBool(), "hyperfused::hyper_lstm_forward: the forward ran with "
                "save_for_backward=False and kept nothing for a backward; call it with save_for_backward=True to "
                "differentiate it");
    const auto s = ctx->get_saved_variables();
    const int64_t n = ctx->saved_data["params"].toInt(), dtype = ctx->saved_data["gemm_dtype"].toInt();
    const std::vector<at::Tensor> params(s.begin() + kInputs + kMasks + kOutputs, s.end());
    const auto* m = &s[kInputs];
    const auto* out = &s[kInputs + kMasks];
    auto grads = backward_op().call(
        or_none(grad_outputs[0]), or_none(grad_outputs[1]), or_none(grad_outputs[2]), or_none(grad_outputs[3]), s[0],
        s[1], s[2], s[3], s[4], params, or_none(m[0]), or_none(m[1]), out[0], out[1], out[2], out[3], out[4], out[5],
        ctx->saved_data["layer_norm"].toBool(), ctx->saved_data["forget_bias"].toDouble(), or_none(m[2]),
        or_none(m[3]), dtype_of_code(dtype));
    TORCH_INTERNAL_ASSERT(int64_t(grads.size()) == kInputs + n);
    return grads;
  }

  // With create_graph=True (a gradient penalty, Hessian-vector products): the fused backward has no autograd of
  // its own, so the forward is recomputed in differentiable PyTorch ops from the saved inputs and differentiated,
  // which gives gradients that can be differentiated again. As ops/_autograd.py's recomputed_grads does for the
  // Python-registered ops, and for the same reason from aliases (views) of the inputs: the gradients must be
  // the partial derivatives this op owes each input, not total ones, which would count twice the paths from one
  // input through another computed from it (c_0 through h_0 = tanh(c_0)).
  static variable_list recomputed(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto s = ctx->get_saved_variables();
    variable_list inputs(s.begin(), s.begin() + kInputs);
    inputs.insert(inputs.end(), s.begin() + kInputs + kMasks + kOutputs, s.end());
    for (auto& t : inputs) {
      if (t.requires_grad()) t = t.view_as(t);
    }
    const std::vector<at::Tensor> params(inputs.begin() + kInputs, inputs.end());
    const auto* m = &s[kInputs];
    const auto [hs, cs, hhs, hcs] = reference_op().call(
        inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], params, or_none(m[0]), or_none(m[1]),
        ctx->saved_data["layer_norm"].toBool(), ctx->saved_data["forget_bias"].toDouble(), or_none(m[2]),
        or_none(m[3]));
    const at::Tensor outs[] = {hs, cs, hhs, hcs};
    variable_list outputs, given, wanted;
    for (int k = 0; k < 4; ++k) {
      if (grad_outputs[k].defined()) {
        outputs.push_back(outs[k]);
        given.push_back(grad_outputs[k]);
      }
    }
    for (const auto& t : inputs) {
      if (t.requires_grad()) wanted.push_back(t);
    }
    variable_list grads(inputs.size());
    if (outputs.empty() || wanted.empty()) return grads;
    const auto found = torch::autograd::grad(outputs, wanted, given, /*retain_graph=*/true, /*create_graph=*/true,
                                             /*allow_unused=*/true);
    for (size_t i = 0, j = 0; i < inputs.size(); ++i) {
      if (inputs[i].requires_grad()) grads[i] = found[j++];
    }
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_autograd(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& hh0, const at::Tensor& hc0,
    at::TensorList params, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& hyper_mask,
    bool layer_norm, double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
    const std::optional<at::Tensor>& hyper_zoneout_mask, bool save_for_backward,
    std::optional<at::ScalarType> gemm_dtype) {
  auto o = HyperLSTMFunction::apply(x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm, forget_bias,
                                    zoneout_mask, hyper_zoneout_mask, save_for_backward, gemm_dtype);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperfused, Autograd, m) { m.impl("hyper_lstm_forward", &forward_autograd); }

}  // namespace hyperfused
