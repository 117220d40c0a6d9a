// Whole-sequence HyperLSTM forward/backward for one layer and one direction, written once against ATen
// (the GEMMs, the time loop, the post-loop weight-gradient GEMMs) and parameterised by the device's fused
// step kernels.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "graphs.h"
#include "hyper_lstm_kernels.h"

namespace hyperfused {

struct StepKernels {
  void (*forward)(const ForwardStep&);
  void (*backward)(const BackwardStep&);
  void* (*stream)();  // current stream for the kernels, or null
  bool accumulates;   // the backward kernel can sum into BackwardStep::accum (AccumLayout)
  // The default step design, forward and backward: the whole step in one kernel launch (false), or the
  // GEMM-shaped step (StepPhase: the projections as GEMMs that read each weight once per step between a
  // hyper-cell and a main-cell launch). HYPERFUSED_STEP_DESIGN=fused|gemm overrides it (the tests run both).
  bool gemm_shaped_forward;
  // How the device records a whole op to replay it (graphs.h), or null: HYPERFUSED_CUDA_GRAPHS=1 asks for it.
  const GraphBackend* graphs = nullptr;
  // The decode step may run its float32 products as direct MKL (or oneDNN) calls on the tensors' memory (the
  // CPU's kernels; StepGemm::batch_allowed()), rather than as ATen ops.
  bool raw_blas = false;
};

using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardOut hyper_lstm_forward(const StepKernels& k, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                              const at::Tensor& hh0, const at::Tensor& hc0, at::TensorList params,
                              const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& hyper_mask,
                              bool layer_norm, double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
                              const std::optional<at::Tensor>& hyper_zoneout_mask, bool save_for_backward,
                              const std::optional<at::ScalarType>& gemm_dtype);

// One step without gradients (decoding): x (B, X) and the state h, c (B, H), ĥ, ĉ (B, Ĥ) give the next state,
// four (B, ·) tensors. The forward above with T = 1 and nothing saved, minus the caller's reshaping.
// A projected cell's h (B, P) is taken as it is (W_h (4H, P), Ŵ_x (4Ĥ, X + P); c gives H): the h returned is
// then the unprojected (B, H) one, which the caller projects (h = W_hr u).
using StepOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
StepOut hyper_lstm_step(const StepKernels& k, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                        const at::Tensor& hh, const at::Tensor& hc, at::TensorList params, bool layer_norm,
                        double forget_bias);

std::vector<at::Tensor> hyper_lstm_backward(
    const StepKernels& k, const std::optional<at::Tensor>& grad_hs, const std::optional<at::Tensor>& grad_cs,
    const std::optional<at::Tensor>& grad_hhs, const std::optional<at::Tensor>& grad_hcs, const at::Tensor& x,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& hh0, const at::Tensor& hc0, at::TensorList params,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& hyper_mask, const at::Tensor& hs,
    const at::Tensor& cs, const at::Tensor& hhs, const at::Tensor& hcs, const at::Tensor& g, const at::Tensor& ws,
    bool layer_norm, double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
    const std::optional<at::Tensor>& hyper_zoneout_mask, const std::optional<at::ScalarType>& gemm_dtype);

// hyper_lstm_forward, hyper_lstm_backward and hyper_lstm_step through the device's recordings (graphs.h:
// run_recorded).
ForwardOut hyper_lstm_forward_recorded(const StepKernels& k, const at::Tensor& x, const at::Tensor& h0,
                                       const at::Tensor& c0, const at::Tensor& hh0, const at::Tensor& hc0,
                                       at::TensorList params, const std::optional<at::Tensor>& mask,
                                       const std::optional<at::Tensor>& hyper_mask, bool layer_norm,
                                       double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
                                       const std::optional<at::Tensor>& hyper_zoneout_mask, bool save_for_backward,
                                       const std::optional<at::ScalarType>& gemm_dtype);
std::vector<at::Tensor> hyper_lstm_backward_recorded(
    const StepKernels& k, const std::optional<at::Tensor>& grad_hs, const std::optional<at::Tensor>& grad_cs,
    const std::optional<at::Tensor>& grad_hhs, const std::optional<at::Tensor>& grad_hcs, const at::Tensor& x,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& hh0, const at::Tensor& hc0, at::TensorList params,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& hyper_mask, const at::Tensor& hs,
    const at::Tensor& cs, const at::Tensor& hhs, const at::Tensor& hcs, const at::Tensor& g, const at::Tensor& ws,
    bool layer_norm, double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
    const std::optional<at::Tensor>& hyper_zoneout_mask, const std::optional<at::ScalarType>& gemm_dtype);

StepOut hyper_lstm_step_recorded(const StepKernels& k, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                 const at::Tensor& hh, const at::Tensor& hc, at::TensorList params, bool layer_norm,
                                 double forget_bias);

// The op entry points for one device: a registration file binds forward_on<its_kernels> to a dispatch key,
// its_kernels returning the device's StepKernels (the CPU's may change with HYPERFUSED_EMULATE_CUDA).
template <const StepKernels& (*K)()>
ForwardOut forward_on(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& hh0,
                      const at::Tensor& hc0, at::TensorList params, const std::optional<at::Tensor>& mask,
                      const std::optional<at::Tensor>& hyper_mask, bool layer_norm, double forget_bias,
                      const std::optional<at::Tensor>& zoneout_mask, const std::optional<at::Tensor>& hyper_zoneout_mask,
                      bool save_for_backward, std::optional<at::ScalarType> gemm_dtype) {
  const StepKernels& k = K();
  if (k.graphs && graphs_requested())
    return hyper_lstm_forward_recorded(k, x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm, forget_bias,
                                       zoneout_mask, hyper_zoneout_mask, save_for_backward, gemm_dtype);
  return hyper_lstm_forward(k, x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm, forget_bias, zoneout_mask,
                            hyper_zoneout_mask, save_for_backward, gemm_dtype);
}

template <const StepKernels& (*K)()>
StepOut step_on(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c, const at::Tensor& hh,
                const at::Tensor& hc, at::TensorList params, bool layer_norm, double forget_bias) {
  const StepKernels& k = K();
  if (k.graphs && graphs_requested())
    return hyper_lstm_step_recorded(k, x, h, c, hh, hc, params, layer_norm, forget_bias);
  return hyper_lstm_step(k, x, h, c, hh, hc, params, layer_norm, forget_bias);
}

template <const StepKernels& (*K)()>
std::vector<at::Tensor> backward_on(
    const std::optional<at::Tensor>& grad_hs, const std::optional<at::Tensor>& grad_cs,
    const std::optional<at::Tensor>& grad_hhs, const std::optional<at::Tensor>& grad_hcs, const at::Tensor& x,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& hh0, const at::Tensor& hc0, at::TensorList params,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& hyper_mask, const at::Tensor& hs,
    const at::Tensor& cs, const at::Tensor& hhs, const at::Tensor& hcs, const at::Tensor& g, const at::Tensor& ws,
    bool layer_norm, double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
    const std::optional<at::Tensor>& hyper_zoneout_mask, std::optional<at::ScalarType> gemm_dtype) {
  const StepKernels& k = K();
  if (k.graphs && graphs_requested())
    return hyper_lstm_backward_recorded(k, grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, params, mask,
                                        hyper_mask, hs, cs, hhs, hcs, g, ws, layer_norm, forget_bias, zoneout_mask,
                                        hyper_zoneout_mask, gemm_dtype);
  return hyper_lstm_backward(k, grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, params, mask, hyper_mask,
                             hs, cs, hhs, hcs, g, ws, layer_norm, forget_bias, zoneout_mask, hyper_zoneout_mask,
                             gemm_dtype);
}

// Tests: the threads per batch row (a block, or a cluster's blocks together) of each step kernel the CUDA
// emulator has launched since the last call, in launch order; the list is then emptied.
std::vector<int64_t> take_emulated_step_widths();
// Tests: the emulator itself, on one cluster of `blocks` blocks of `block_threads` threads in `groups` groups,
// each thread's result: kind "sum" / "group_sum" (of tid + 1 over the cluster / the thread's group, by
// simt_sum); "read_next_block" (block r writes r, passes __syncthreads, reads block r+1's value) and
// "read_next_block_after_cluster_barrier"; "skip_block_barrier" / "skip_cluster_barrier" (thread 3 skips one:
// an error).
std::vector<double> emulator_probe(const std::string& kind, int blocks, int64_t block_threads, int groups,
                                   bool reverse);

}  // namespace hyperfused
