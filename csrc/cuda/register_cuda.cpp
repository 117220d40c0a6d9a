// CUDA implementations of the hyperfused ops: the shared sequence driver with the CUDA step kernels, on
// torch's current stream. A plain C++ file, so the .cu stays free of torch headers. Every launch is checked
// here: a launch that failed would leave the outputs (at::empty) uninitialised and return garbage.
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
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

// A whole op captured as a CUDA graph, replayed on the caller's stream.
class CudaRecording : public Recording {
 public:
  void replay() override {
    graph.replay();
    replayed_.record(c10::cuda::getCurrentCUDAStream());
  }
  // A graph's private memory returns to the allocator with it: let its last replay finish first (an event of
  // its own, since the caller's stream may be gone by then).
  ~CudaRecording() override { replayed_.synchronize(); }
  at::cuda::CUDAGraph graph;

 private:
  at::cuda::CUDAEvent replayed_;
};

bool capturing() {
  cudaStreamCaptureStatus status;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// Captures `body` on a side stream (a capture may not use the default stream), after one warm-up run there
// (lazy initialisations, such as cuBLAS's workspace for that stream, must not happen inside a capture),
// ordered after the caller's work and before the caller's next. A capture that fails is ended, and the op runs
// without a graph for that key.
std::unique_ptr<Recording> record(const Body& body, std::vector<at::Tensor>& outputs) {
  auto rec = std::make_unique<CudaRecording>();
  const auto caller = c10::cuda::getCurrentCUDAStream();
  const auto side = c10::cuda::getStreamFromPool();
  at::cuda::CUDAEvent inputs_ready, done;
  inputs_ready.record(caller);
  inputs_ready.block(side);
  bool ok = true;
  {
    const c10::cuda::CUDAStreamGuard guard(side);
    body();
    try {
      rec->graph.capture_begin();
      outputs = body();
      rec->graph.capture_end();
    } catch (const std::exception& e) {
      try {
        rec->graph.capture_end();
      } catch (...) {
      }
      TORCH_WARN("hyperfused: capturing the op as a CUDA graph failed, so it runs without one for these shapes: ",
                 e.what());
      outputs.clear();
      ok = false;
    }
  }
  done.record(side);
  done.block(caller);
  if (!ok) return nullptr;
  return rec;
}

const GraphBackend kCudaGraphs{&capturing, &record, &current_stream};

// One block per row would read the 12 projections from L2 once per row: the GEMM-shaped step reads them once.
const StepKernels kCudaKernels{&forward_step, &backward_step, &current_stream, false, true, &kCudaGraphs};
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
