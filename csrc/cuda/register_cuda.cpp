// CUDA implementations of the hyperfused ops: the shared sequence driver with the CUDA step kernels, on
// torch's current stream. A plain C++ file, so the .cu stays free of torch headers.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../hyper_lstm.h"
#include "../static_hypernet.h"

namespace hyperfused {
namespace {

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const StepKernels kCudaKernels{&forward_step_cuda, &backward_step_cuda, &current_stream, false};
const TileKernels kCudaTileKernels{&generate_tiles_cuda, nullptr, &gather_tiles_cuda, &current_stream};

}  // namespace

TORCH_LIBRARY_IMPL(hyperfused, CUDA, m) {
  m.impl("hyper_lstm_forward", &forward_on<kCudaKernels>);
  m.impl("hyper_lstm_backward", &backward_on<kCudaKernels>);
  m.impl("generate_kernels", &generate_kernels_on<kCudaTileKernels>);
  m.impl("generate_kernels_backward", &generate_kernels_backward_on<kCudaTileKernels>);
}

}  // namespace hyperfused
