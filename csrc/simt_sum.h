// The sums of the CUDA step kernels (a layer norm's mean and variance over a block, a thread group or a
// cluster of blocks), written once against the primitives a CUDA thread (cuda/cuda_block.cuh) or a thread of
// the CPU's SIMT emulator (cpu/simt_emulator.cpp) provides, so that the emulator runs the same placement of
// the warps' partial sums in shared memory, the same barriers and the same reads of other blocks' memory.
// No torch or CUDA headers.
#pragma once
#include <cstdint>

#include "hd.h"

#if defined(__CUDACC__)
#define HF_SIMT __device__ __forceinline__
#else
#define HF_SIMT inline
#endif

namespace hyperfused {
namespace simt {

// Shared slots a block's sums use: one per warp (at most 32), then the block's own sum for a cluster's others.
constexpr int kSumSlots = 33;

// The sum of v over a cluster of blocks (one block without clusters), or over this thread's group of
// consecutive threads: n threads, a multiple of 32 that divides the block's size or is a multiple of it.
// Every thread gets the same value, summed in the same order. Thr provides Blk's threads(), group_threads()
// (hyper_lstm_simt.h) and:
//   int64_t thread(), block_threads()  this thread within its block; the block's size (a multiple of 32)
//   unsigned rank()                    this block's rank in its cluster (0 without clusters)
//   T warp_sum(T v)                    the sum of v over this thread's warp, at least in lane 0 (shuffles)
//   void block_sync(), cluster_sync()  __syncthreads(); the cluster's barrier (__syncthreads without one)
//   T* slots()                         this block's kSumSlots shared slots
//   T block_total(unsigned rank)       the last slot of block `rank` of the cluster (its sum)
template <typename T, class Thr>
HF_SIMT T simt_sum(Thr& th, T v, bool in_group) {
  v = th.warp_sum(v);
  th.cluster_sync();  // earlier readers of the slots, in any block, are done
  const int64_t t = th.thread(), threads = th.block_threads();
  const int lane = int(t & 31), warp = int(t >> 5), warps = int(threads >> 5);
  T* own = th.slots();
  if (lane == 0) own[warp] = v;
  th.block_sync();
  const int64_t n = in_group ? th.group_threads() : th.threads();
  if (n <= threads) {  // this block's warps only
    const int per = int(n >> 5), first = warp / per * per;
    T total = 0;
    for (int w = first; w < first + per; ++w) total += own[w];
    return total;
  }
  // Whole blocks: each block's sum, then the sum of the blocks' sums, in rank order in every thread.
  T mine = 0;
  for (int w = 0; w < warps; ++w) mine += own[w];
  if (t == 0) own[kSumSlots - 1] = mine;
  th.cluster_sync();
  const unsigned span = unsigned(n / threads), first = th.rank() / span * span;
  T total = 0;
  for (unsigned r = first; r < first + span; ++r) total += th.block_total(r);
  return total;
}

}  // namespace simt
}  // namespace hyperfused
