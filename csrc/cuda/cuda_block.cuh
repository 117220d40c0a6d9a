// One CUDA block as the Blk interface of hyper_lstm_simt.h, for the kernels whose bodies live in the
// *_simt.h headers (the CPU's SIMT emulator implements the same interface for the tests).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace hyperfused {

// Reductions: shuffles within each warp, then the warps' partial sums through shared memory (red, one value
// per warp; kernels without reductions pass null).
template <typename T, int kGroups>
struct CudaBlock {
  T* red;
  __device__ int64_t tid() const { return threadIdx.x; }
  __device__ int64_t threads() const { return blockDim.x; }
  __device__ int64_t row() const { return blockIdx.x; }
  __device__ int groups() const { return kGroups; }
  __device__ int group() const { return int(threadIdx.x / (blockDim.x / kGroups)); }
  __device__ int64_t group_threads() const { return blockDim.x / kGroups; }
  __device__ int64_t lane() const { return threadIdx.x % (blockDim.x / kGroups); }
  __device__ void sync() const { __syncthreads(); }
  __device__ T reduce(T v, bool in_group) const {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // earlier readers of red are done
    if (lane == 0) red[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5, per = in_group ? warps / kGroups : warps, first = warp / per * per;
    T total = 0;
    for (int w = first; w < first + per; ++w) total += red[w];
    return total;
  }
};

}  // namespace hyperfused
