// Static-hypernetwork kernel generation on CUDA: one thread block per tile computes the tile's hidden layer
// A = W_i z + B_i in shared memory, then every weight of the tile (W_out A + B_out) and writes it straight
// to its place in the conv kernel: both GEMMs and the layout change in one launch for the whole model.
#include <cuda_runtime.h>

#include "../static_hypernet_kernels.h"

namespace hyperfused {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) generate_kernel(TileGenArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* z = reinterpret_cast<T*>(smem_raw);  // (z_dim)
  T* A = z + a.z_dim;                     // (in_tile, hidden)
  const int64_t t = blockIdx.x;
  const int64_t stride = a.meta[2 * t + 1], row = a.in_tile * a.kk;
  if (!tile_in_bounds(a.meta[2 * t], stride, a.out_tile, row, a.numel)) return;  // the host could not check
  const T* zt = static_cast<const T*>(a.z) + t * a.z_dim;
  for (int64_t n = threadIdx.x; n < a.z_dim; n += blockDim.x) z[n] = zt[n];
  __syncthreads();
  const T* w_in = static_cast<const T*>(a.w_in);
  const T* b_in = static_cast<const T*>(a.b_in);
  for (int64_t idx = threadIdx.x; idx < a.in_tile * a.hidden; idx += blockDim.x) {
    const T* w = w_in + idx * a.z_dim;
    T acc = b_in[idx];
    for (int64_t n = 0; n < a.z_dim; ++n) acc += w[n] * z[n];
    A[idx] = acc;
  }
  __syncthreads();
  const T* w_out = static_cast<const T*>(a.w_out);
  const T* b_out = static_cast<const T*>(a.b_out);
  T* out = static_cast<T*>(a.out) + a.meta[2 * t];
  // idx runs over (ob, ib, ab) so consecutive threads write consecutive addresses of one output row.
  for (int64_t idx = threadIdx.x; idx < a.out_tile * row; idx += blockDim.x) {
    const int64_t ob = idx / row, rem = idx % row, ib = rem / a.kk, ab = rem % a.kk;
    const int64_t o = ob * a.kk + ab;
    const T* w = w_out + o * a.hidden;
    const T* h = A + ib * a.hidden;
    T acc = b_out[o];
    for (int64_t j = 0; j < a.hidden; ++j) acc += w[j] * h[j];
    out[ob * stride + rem] = acc;
  }
}

template <typename T>
__global__ void gather_kernel(TileLayoutArgs a) {
  const int64_t t = blockIdx.x, row = a.in_tile * a.kk, width = a.out_tile * a.kk;
  const int64_t stride = a.meta[2 * t + 1];
  T* tiled = static_cast<T*>(a.tiled) + t * a.in_tile * width;
  if (!tile_in_bounds(a.meta[2 * t], stride, a.out_tile, row, a.numel)) {  // its gradient reads as zero
    for (int64_t idx = threadIdx.x; idx < a.in_tile * width; idx += blockDim.x) tiled[idx] = T(0);
    return;
  }
  const T* flat = static_cast<const T*>(a.flat) + a.meta[2 * t];
  for (int64_t idx = threadIdx.x; idx < a.out_tile * row; idx += blockDim.x) {
    const int64_t ob = idx / row, rem = idx % row, ib = rem / a.kk, ab = rem % a.kk;
    tiled[ib * width + ob * a.kk + ab] = flat[ob * stride + rem];
  }
}

template <typename T>
int launch_generate(const TileGenArgs& a) {
  const size_t smem = generate_shared_bytes(a.z_dim, a.in_tile, a.hidden, a.is_double);
  if (smem > 48 * 1024) {  // above the default, the kernel must opt in (the host checked the device's limit)
    const cudaError_t err =
        cudaFuncSetAttribute(generate_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return int(err);
  }
  generate_kernel<T><<<dim3(a.tiles), dim3(kThreads), smem, static_cast<cudaStream_t>(a.stream)>>>(a);
  return int(cudaGetLastError());
}

template <typename T>
int launch_gather(const TileLayoutArgs& a) {
  gather_kernel<T><<<dim3(a.tiles), dim3(kThreads), 0, static_cast<cudaStream_t>(a.stream)>>>(a);
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
