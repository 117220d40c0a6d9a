// The CUDA tile-generation kernels' bodies, written once against the thread-block interface of
// hyper_lstm_simt.h (tid, threads, row = the tile, sync), so that cuda/static_hypernet_cuda.cu launches them on
// a GPU and the CPU's SIMT emulator (cpu/simt_emulator.cpp) runs the same code in the tests.
#pragma once
#include <cstdint>

#include "hyper_lstm_simt.h"
#include "static_hypernet_kernels.h"

namespace hyperfused {
namespace simt {

// Threads per block of both tile kernels.
constexpr int kTileThreads = 256;

// One block per tile: the tile's hidden layer A = W_i z + B_i in shared memory (`shared`, holding
// generate_shared_bytes: z, then A), then every weight of the tile (W_out A + B_out), written straight to its
// place in the conv kernel.
template <typename T, class Blk>
HF_SIMT void generate_tile(Blk& blk, const TileGenArgs& a, T* shared) {
  T* z = shared;        // (z_dim)
  T* A = z + a.z_dim;   // (in_tile, hidden)
  const int64_t t = blk.row();
  const int64_t stride = a.meta[2 * t + 1], row = a.in_tile * a.kk;
  if (!tile_in_bounds(a.meta[2 * t], stride, a.out_tile, row, a.numel)) return;  // the host could not check
  const T* zt = static_cast<const T*>(a.z) + t * a.z_dim;
  for (int64_t n = blk.tid(); n < a.z_dim; n += blk.threads()) z[n] = zt[n];
  blk.sync();
  const T* w_in = static_cast<const T*>(a.w_in);
  const T* b_in = static_cast<const T*>(a.b_in);
  for (int64_t idx = blk.tid(); idx < a.in_tile * a.hidden; idx += blk.threads()) {
    const T* w = w_in + idx * a.z_dim;
    T acc = b_in[idx];
    for (int64_t n = 0; n < a.z_dim; ++n) acc += w[n] * z[n];
    A[idx] = acc;
  }
  blk.sync();
  const T* w_out = static_cast<const T*>(a.w_out);
  const T* b_out = static_cast<const T*>(a.b_out);
  T* out = static_cast<T*>(a.out) + a.meta[2 * t];
  // idx runs over (ob, ib, ab) so consecutive threads write consecutive addresses of one output row.
  for (int64_t idx = blk.tid(); idx < a.out_tile * row; idx += blk.threads()) {
    const int64_t ob = idx / row, rem = idx % row, ib = rem / a.kk, ab = rem % a.kk;
    const int64_t o = ob * a.kk + ab;
    const T* w = w_out + o * a.hidden;
    const T* h = A + ib * a.hidden;
    T acc = b_out[o];
    for (int64_t j = 0; j < a.hidden; ++j) acc += w[j] * h[j];
    out[ob * stride + rem] = acc;
  }
}

// One block per tile: the tile's rows of the flat kernels into (in_tile, out_tile·kk) order (the backward).
template <typename T, class Blk>
HF_SIMT void gather_tile(Blk& blk, const TileLayoutArgs& a) {
  const int64_t t = blk.row(), row = a.in_tile * a.kk, width = a.out_tile * a.kk;
  const int64_t stride = a.meta[2 * t + 1];
  T* tiled = static_cast<T*>(a.tiled) + t * a.in_tile * width;
  if (!tile_in_bounds(a.meta[2 * t], stride, a.out_tile, row, a.numel)) {  // its gradient reads as zero
    for (int64_t idx = blk.tid(); idx < a.in_tile * width; idx += blk.threads()) tiled[idx] = T(0);
    return;
  }
  const T* flat = static_cast<const T*>(a.flat) + a.meta[2 * t];
  for (int64_t idx = blk.tid(); idx < a.out_tile * row; idx += blk.threads()) {
    const int64_t ob = idx / row, rem = idx % row, ib = rem / a.kk, ab = rem % a.kk;
    tiled[ib * width + ob * a.kk + ab] = flat[ob * stride + rem];
  }
}

}  // namespace simt
}  // namespace hyperfused
