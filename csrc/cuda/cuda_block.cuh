// One CUDA block as the Blk interface of hyper_lstm_simt.h, for the kernels whose bodies live in the
// *_simt.h headers (the CPU's SIMT emulator implements the same interface for the tests).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define HF_CLUSTERS 1
#endif

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

#if defined(HF_CLUSTERS)
// One batch row's thread-block cluster (sm_90+: the launch's cluster dimension, blocks ranked along x) as one
// Blk: its blocks' threads numbered in rank order, every barrier cluster-wide (barrier.cluster's release and
// acquire order the blocks' global-memory writes before the others' reads), and sums read from the other
// blocks' shared memory. A thread group (a quarter of the cluster's threads with kGroups = 4) lies within one
// block or spans whole blocks, since the launch's sizes are powers of two.
template <typename T, int kGroups>
struct CudaCluster {
  T* red;  // 33 values: the block's per-warp sums, then (red[32]) the block's sum, read by the other blocks
  __device__ static unsigned rank() { return cooperative_groups::this_cluster().block_rank(); }
  __device__ static int64_t blocks() { return cooperative_groups::this_cluster().num_blocks(); }
  __device__ int64_t tid() const { return rank() * int64_t(blockDim.x) + threadIdx.x; }
  __device__ int64_t threads() const { return blocks() * blockDim.x; }
  __device__ int64_t row() const { return blockIdx.x / blocks(); }
  __device__ int groups() const { return kGroups; }
  __device__ int64_t group_threads() const { return threads() / kGroups; }
  __device__ int group() const { return int(tid() / group_threads()); }
  __device__ int64_t lane() const { return tid() % group_threads(); }
  __device__ void sync() const { cooperative_groups::this_cluster().sync(); }
  __device__ T reduce(T v, bool in_group) const {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    sync();  // earlier readers of red, in any block of the cluster, are done
    if (lane == 0) red[warp] = v;
    __syncthreads();
    const int64_t n = in_group ? group_threads() : threads();  // threads whose values are summed
    if (n <= blockDim.x) {                                      // this block's warps only
      const int per = int(n >> 5), first = warp / per * per;
      T total = 0;
      for (int w = first; w < first + per; ++w) total += red[w];
      return total;
    }
    // Whole blocks: each block's sum, then the sum of this group's blocks' sums, in rank order everywhere.
    T mine = 0;
    for (int w = 0; w < warps; ++w) mine += red[w];
    if (threadIdx.x == 0) red[32] = mine;
    sync();
    const unsigned span = unsigned(n / blockDim.x), first = rank() / span * span;
    T total = 0;
    for (unsigned r = first; r < first + span; ++r)
      total += *cooperative_groups::this_cluster().map_shared_rank(red + 32, r);
    return total;
  }
};
#endif

}  // namespace hyperfused
