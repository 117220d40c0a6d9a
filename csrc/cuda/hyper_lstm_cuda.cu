// Fused per-step HyperLSTM kernels for CUDA: launch wrappers around the bodies in hyper_lstm_simt.h (the
// same code the tests run on the CPU under the SIMT emulator). One thread block owns one batch row for its
// phase of the step, so the layer norms are block (or thread-group) reductions with no global sync. The
// recurrent GEMMs stay in cuBLAS (driven from hyper_lstm.cpp); this file includes no torch headers so nvcc
// compiles it in seconds.
#include <cuda_runtime.h>

#include "../hyper_lstm_simt.h"
#include "cuda_block.cuh"

namespace hyperfused {
namespace {

// Blocks per multiprocessor the register budget must allow: two 256-thread blocks (128 registers each, which
// the bodies fit without spilling in float32), or one block of 1024 threads (64 registers).
template <int kGroups>
constexpr int kMinBlocks = kGroups == 1 ? 2 : 1;

template <typename T, int kGroups>
__global__ void __launch_bounds__(simt::kGroupThreads * kGroups, kMinBlocks<kGroups>) forward_kernel(ForwardStep s) {
  __shared__ T red[32];
  CudaBlock<T, kGroups> blk{red};
  simt::forward_step<T>(blk, s);
}

template <typename T, int kGroups>
__global__ void __launch_bounds__(simt::kGroupThreads * kGroups, kMinBlocks<kGroups>) backward_kernel(BackwardStep s) {
  __shared__ T red[32];
  CudaBlock<T, kGroups> blk{red};
  simt::backward_step<T>(blk, s);
}

// The device's multiprocessor count, asked once per device.
int multiprocessors() {
  static int count[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 1;
  if (!count[device]) cudaDeviceGetAttribute(&count[device], cudaDevAttrMultiProcessorCount, device);
  return count[device] > 0 ? count[device] : 1;
}

template <class Step, typename T>
int launch(const Step& s, void (*one)(Step), void (*four)(Step)) {
  const int groups = simt::launch_groups(s, multiprocessors());
  const dim3 grid(unsigned(s.dims.B)), block(unsigned(simt::kGroupThreads * groups));
  (groups == 4 ? four : one)<<<grid, block, 0, static_cast<cudaStream_t>(s.stream)>>>(s);
  return int(cudaGetLastError());
}

template <typename T>
int launch_forward(const ForwardStep& s) {
  return launch<ForwardStep, T>(s, forward_kernel<T, 1>, forward_kernel<T, 4>);
}

template <typename T>
int launch_backward(const BackwardStep& s) {
  return launch<BackwardStep, T>(s, backward_kernel<T, 1>, backward_kernel<T, 4>);
}

}  // namespace

int forward_step_cuda(const ForwardStep& s) {
  return s.kind == ScalarKind::Float64 ? launch_forward<double>(s) : launch_forward<float>(s);
}

int backward_step_cuda(const BackwardStep& s) {
  return s.kind == ScalarKind::Float64 ? launch_backward<double>(s) : launch_backward<float>(s);
}

}  // namespace hyperfused
