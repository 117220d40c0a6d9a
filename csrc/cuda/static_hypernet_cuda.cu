// Static-hypernetwork kernel generation on CUDA: launch wrappers around the bodies in static_hypernet_simt.h
// (the code the tests also run under the CPU's SIMT emulator). One thread block per tile computes the tile's
// hidden layer A = W_i z + B_i in shared memory, then every weight of the tile (W_out A + B_out) and writes it
// straight to its place in the conv kernel: both GEMMs and the layout change in one launch for the whole model.
#include <cuda_runtime.h>

#include "../static_hypernet_simt.h"
#include "cuda_block.cuh"

namespace hyperfused {
namespace {

template <typename T>
__global__ void __launch_bounds__(simt::kTileThreads) generate_kernel(TileGenArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  CudaBlock<T, 1> blk{{nullptr}};  // no reductions
  simt::generate_tile<T>(blk, a, reinterpret_cast<T*>(smem_raw));
}

template <typename T>
__global__ void __launch_bounds__(simt::kTileThreads) gather_kernel(TileLayoutArgs a) {
  CudaBlock<T, 1> blk{{nullptr}};
  simt::gather_tile<T>(blk, a);
}

template <typename T>
int launch_generate(const TileGenArgs& a) {
  const size_t smem = generate_shared_bytes(a.z_dim, a.in_tile, a.hidden, a.is_double);
  if (smem > 48 * 1024) {  // above the default, the kernel must opt in (the host checked the device's limit)
    const cudaError_t err =
        cudaFuncSetAttribute(generate_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return int(err);
  }
  generate_kernel<T><<<dim3(a.tiles), dim3(simt::kTileThreads), smem, static_cast<cudaStream_t>(a.stream)>>>(a);
  return int(cudaGetLastError());
}

template <typename T>
int launch_gather(const TileLayoutArgs& a) {
  gather_kernel<T><<<dim3(a.tiles), dim3(simt::kTileThreads), 0, static_cast<cudaStream_t>(a.stream)>>>(a);
  return int(cudaGetLastError());
}

}  // namespace

int generate_tiles_cuda(const TileGenArgs& a) {
  return a.is_double ? launch_generate<double>(a) : launch_generate<float>(a);
}

int gather_tiles_cuda(const TileLayoutArgs& a) {
  return a.is_double ? launch_gather<double>(a) : launch_gather<float>(a);
}

}  // namespace hyperfused
