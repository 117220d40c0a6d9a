// CUDA implementations of the hyperfused ops: the shared sequence driver with the CUDA step kernels, on
// torch's current stream. A plain C++ file, so the .cu stays free of torch headers. Every launch is checked
// here: a launch that failed would leave the outputs (at::empty) uninitialised and return garbage.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../hyper_lstm.h"
#include "../static_hypernet.h"

namespace hyperfused {
namespace {

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(int status, const char* kernel) {
  const auto err = static_cast<cudaError_t>(status);
  TORCH_CHECK(err == cudaSuccess, "hyperfused: the CUDA kernel '", kernel, "' failed to launch: ",
              cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

void forward_step(const ForwardStep& s) { check_launch(forward_step_cuda(s), "hyper_lstm forward step"); }
void backward_step(const BackwardStep& s) { check_launch(backward_step_cuda(s), "hyper_lstm backward step"); }
void generate_tiles(const TileGenArgs& a) { check_launch(generate_tiles_cuda(a), "generate_tiles"); }
void gather_tiles(const TileLayoutArgs& a) { check_launch(gather_tiles_cuda(a), "gather_tiles"); }

int64_t max_shared_bytes() {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  return value;
}

// One block per row would read the 12 projections from L2 once per row: the GEMM-shaped step reads them once.
const StepKernels kCudaKernels{&forward_step, &backward_step, &current_stream, false, true};
const StepKernels& cuda_kernels() { return kCudaKernels; }
const TileKernels kCudaTileKernels{&generate_tiles, nullptr, &gather_tiles, &current_stream, &max_shared_bytes};
const TileKernels& cuda_tile_kernels() { return kCudaTileKernels; }

}  // namespace

TORCH_LIBRARY_IMPL(hyperfused, CUDA, m) {
  m.impl("hyper_lstm_forward", &forward_on<cuda_kernels>);
  m.impl("hyper_lstm_step", &step_on<cuda_kernels>);
  m.impl("hyper_lstm_backward", &backward_on<cuda_kernels>);
  m.impl("generate_kernels", &generate_kernels_on<cuda_tile_kernels>);
  m.impl("generate_kernels_backward", &generate_kernels_backward_on<cuda_tile_kernels>);
}

}  // namespace hyperfused
