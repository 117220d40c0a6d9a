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
  const int64_t stride = a.meta[2 * t + 1], row = a.in_tile * a.kk;
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
  const T* flat = static_cast<const T*>(a.flat) + a.meta[2 * t];
  T* tiled = static_cast<T*>(a.tiled) + t * a.in_tile * width;
  const int64_t stride = a.meta[2 * t + 1];
  for (int64_t idx = threadIdx.x; idx < a.out_tile * row; idx += blockDim.x) {
    const int64_t ob = idx / row, rem = idx % row, ib = rem / a.kk, ab = rem % a.kk;
    tiled[ib * width + ob * a.kk + ab] = flat[ob * stride + rem];
  }
}

}  // namespace

void generate_tiles_cuda(const TileGenArgs& a) {
  auto stream = static_cast<cudaStream_t>(a.stream);
  const size_t elems = a.z_dim + a.in_tile * a.hidden;
  if (a.is_double) {
    const size_t smem = elems * sizeof(double);
    if (smem > 48 * 1024) cudaFuncSetAttribute(generate_kernel<double>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    generate_kernel<double><<<dim3(a.tiles), dim3(kThreads), smem, stream>>>(a);
  } else {
    const size_t smem = elems * sizeof(float);
    if (smem > 48 * 1024) cudaFuncSetAttribute(generate_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    generate_kernel<float><<<dim3(a.tiles), dim3(kThreads), smem, stream>>>(a);
  }
}

void gather_tiles_cuda(const TileLayoutArgs& a) {
  auto stream = static_cast<cudaStream_t>(a.stream);
  if (a.is_double)
    gather_kernel<double><<<dim3(a.tiles), dim3(kThreads), 0, stream>>>(a);
  else
    gather_kernel<float><<<dim3(a.tiles), dim3(kThreads), 0, stream>>>(a);
}

}  // namespace hyperfused
