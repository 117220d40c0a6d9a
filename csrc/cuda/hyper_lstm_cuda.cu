// Fused per-step HyperLSTM kernels for CUDA: launch wrappers around the bodies in hyper_lstm_simt.h (the
// same code the tests run on the CPU under the SIMT emulator). One thread block, or on sm_90+ one cluster of
// blocks, owns one batch row for its phase of the step, so the layer norms are block (or cluster, or
// thread-group) reductions with no grid-wide sync. The
// recurrent GEMMs stay in cuBLAS (driven from hyper_lstm.cpp); this file includes no torch headers so nvcc
// compiles it in seconds.
#include <cuda_runtime.h>

#include <mutex>

#include "../hyper_lstm_simt.h"
#include "cuda_block.cuh"

namespace hyperfused {
namespace {

// Blocks per multiprocessor the register budget must allow: two 256-thread blocks (128 registers each, which
// the bodies fit without spilling in float32), or one block of 1024 threads (64 registers).
template <int kGroups>
constexpr int kMinBlocks = kGroups == 1 ? 2 : 1;

template <typename T, class Blk>
__device__ __forceinline__ void run_step(Blk& blk, const ForwardStep& s) { simt::forward_step<T>(blk, s); }
template <typename T, class Blk>
__device__ __forceinline__ void run_step(Blk& blk, const BackwardStep& s) { simt::backward_step<T>(blk, s); }

// A step kernel's body with one block per row.
template <typename T, int kGroups, class Step>
__device__ __forceinline__ void block_body(const Step& s) {
  __shared__ T red[simt::kSumSlots];
  CudaBlock<T, kGroups> blk{{red}};
  run_step<T>(blk, s);
}

// The same with a cluster of blocks per row (launched only on sm_90+; older targets get a stub). The last
// barrier keeps every block alive until the others have read its shared memory.
template <typename T, int kGroups, class Step>
__device__ __forceinline__ void cluster_body(const Step& s) {
#if defined(HF_CLUSTERS)
  __shared__ T red[simt::kSumSlots];
  CudaCluster<T, kGroups> blk{{red}};
  run_step<T>(blk, s);
  blk.sync();
#else
  __trap();
#endif
}

template <typename T, int kGroups>
__global__ void __launch_bounds__(simt::kGroupThreads * kGroups, kMinBlocks<kGroups>) forward_kernel(ForwardStep s) {
  block_body<T, kGroups>(s);
}

template <typename T, int kGroups>
__global__ void __launch_bounds__(simt::kGroupThreads * kGroups, kMinBlocks<kGroups>) backward_kernel(BackwardStep s) {
  block_body<T, kGroups>(s);
}

template <typename T, int kGroups>
__global__ void __launch_bounds__(simt::kGroupThreads * kGroups, 1) cluster_forward_kernel(ForwardStep s) {
  cluster_body<T, kGroups>(s);
}

template <typename T, int kGroups>
__global__ void __launch_bounds__(simt::kGroupThreads * kGroups, 1) cluster_backward_kernel(BackwardStep s) {
  cluster_body<T, kGroups>(s);
}

// The virtual architecture of the cluster kernels' code that this device runs (simt::clusters_runnable), or 0
// when the runtime cannot say. A failed query must not linger as the thread's last error, which the next
// launch's check reads.
int cluster_kernel_arch() {
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, cluster_forward_kernel<float, 4>) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return attributes.ptxVersion;
}

// The device's multiprocessor count and whether its launches may use thread-block clusters, asked once per
// device.
struct Device {
  int multiprocessors = 0;
  bool clusters = false;
};

Device device() {
  static Device known[64] = {};
  static std::once_flag asked[64];  // threads that launch at once on a new device ask it once, together
  int id = 0;
  if (cudaGetDevice(&id) != cudaSuccess || id < 0 || id >= 64) return {1, false};
  std::call_once(asked[id], [id] {
    int count = 0, major = 0, minor = 0;
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, id);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, id);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, id);
    known[id] = Device{count > 0 ? count : 1, simt::clusters_runnable(10 * major + minor, cluster_kernel_arch())};
  });
  return known[id];
}

template <class Step>
struct Kernels {
  void (*one)(Step);
  void (*four)(Step);
  void (*cluster_one)(Step);
  void (*cluster_four)(Step);
};

template <class Step>
int launch(const Step& s, const Kernels<Step>& k) {
  const Device dev = device();
  const int groups = simt::launch_groups(s, dev.multiprocessors);
  const int cluster = simt::launch_cluster(s, dev.multiprocessors, dev.clusters);
  const dim3 block(unsigned(simt::kGroupThreads * groups));
  const auto stream = static_cast<cudaStream_t>(s.stream);
  if (cluster == 1) {
    (groups == 4 ? k.four : k.one)<<<dim3(unsigned(s.dims.B)), block, 0, stream>>>(s);
    return int(cudaGetLastError());
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(s.dims.B * cluster));
  config.blockDim = block;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = unsigned(cluster);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, groups == 4 ? k.cluster_four : k.cluster_one, s);
  return int(err != cudaSuccess ? err : cudaGetLastError());
}

template <typename T>
int launch_forward(const ForwardStep& s) {
  return launch(s, Kernels<ForwardStep>{forward_kernel<T, 1>, forward_kernel<T, 4>, cluster_forward_kernel<T, 1>,
                                        cluster_forward_kernel<T, 4>});
}

template <typename T>
int launch_backward(const BackwardStep& s) {
  return launch(s, Kernels<BackwardStep>{backward_kernel<T, 1>, backward_kernel<T, 4>, cluster_backward_kernel<T, 1>,
                                         cluster_backward_kernel<T, 4>});
}

}  // namespace

void cuda_step_device(int* multiprocessors, bool* clusters) {
  const Device d = device();
  *multiprocessors = d.multiprocessors;
  *clusters = d.clusters;
}

int forward_step_cuda(const ForwardStep& s) {
  return s.kind == ScalarKind::Float64 ? launch_forward<double>(s) : launch_forward<float>(s);
}

int backward_step_cuda(const BackwardStep& s) {
  return s.kind == ScalarKind::Float64 ? launch_backward<double>(s) : launch_backward<float>(s);
}

}  // namespace hyperfused
