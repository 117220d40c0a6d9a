// One CUDA block, or one thread-block cluster, as the Blk interface of hyper_lstm_simt.h, for the kernels
// whose bodies live in the *_simt.h headers (the CPU's SIMT emulator implements the same interface for the
// tests). Their sums are simt_sum (simt_sum.h) over the primitives below, as in the emulator.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../simt_sum.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define HF_CLUSTERS 1
#endif

namespace hyperfused {

// What a block and a cluster share: the thread groups (kGroups equal runs of consecutive threads) and the
// warp sum. Derived supplies tid(), threads(), rank(), cluster_sync() and block_total(rank).
template <typename T, int kGroups, class Derived>
struct CudaThreads {
  T* red;  // this block's simt::kSumSlots shared slots (null for kernels without sums)
  __device__ const Derived& self() const { return static_cast<const Derived&>(*this); }
  __device__ int groups() const { return kGroups; }
  __device__ int64_t group_threads() const { return self().threads() / kGroups; }
  __device__ int group() const { return int(self().tid() / group_threads()); }
  __device__ int64_t lane() const { return self().tid() % group_threads(); }
  __device__ int64_t thread() const { return threadIdx.x; }
  __device__ int64_t block_threads() const { return blockDim.x; }
  __device__ T warp_sum(T v) const {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
  }
  __device__ void block_sync() const { __syncthreads(); }
  __device__ T* slots() const { return red; }
  // The sum of v over the block or cluster (or over this thread's group), in every thread.
  __device__ T reduce(T v, bool in_group) const {
    return simt::simt_sum(self(), v, in_group);
  }
};

template <typename T, int kGroups>
struct CudaBlock : CudaThreads<T, kGroups, CudaBlock<T, kGroups>> {
  __device__ int64_t tid() const { return threadIdx.x; }
  __device__ int64_t threads() const { return blockDim.x; }
  __device__ int64_t row() const { return blockIdx.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ unsigned rank() const { return 0; }
  __device__ void cluster_sync() const { __syncthreads(); }
  __device__ T block_total(unsigned) const { return this->red[simt::kSumSlots - 1]; }  // never read: one block
};

#if defined(HF_CLUSTERS)
// One batch row's thread-block cluster (sm_90+: the launch's cluster dimension, blocks ranked along x) as one
// Blk: its blocks' threads numbered in rank order, every barrier cluster-wide (barrier.cluster's release and
// acquire order the blocks' global-memory writes before the others' reads), and sums read from the other
// blocks' shared memory.
template <typename T, int kGroups>
struct CudaCluster : CudaThreads<T, kGroups, CudaCluster<T, kGroups>> {
  __device__ unsigned rank() const { return cooperative_groups::this_cluster().block_rank(); }
  __device__ static int64_t blocks() { return cooperative_groups::this_cluster().num_blocks(); }
  __device__ int64_t tid() const { return rank() * int64_t(blockDim.x) + threadIdx.x; }
  __device__ int64_t threads() const { return blocks() * blockDim.x; }
  __device__ int64_t row() const { return blockIdx.x / blocks(); }
  __device__ void sync() const { cooperative_groups::this_cluster().sync(); }
  __device__ void cluster_sync() const { sync(); }
  __device__ T block_total(unsigned r) const {
    return *cooperative_groups::this_cluster().map_shared_rank(this->red + simt::kSumSlots - 1, r);
  }
};
#endif

}  // namespace hyperfused
