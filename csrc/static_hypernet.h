// Whole-model kernel generation for the static hypernetwork, shared by the CPU and CUDA registrations.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "static_hypernet_kernels.h"

namespace hyperfused {

struct TileKernels {
  // Both GEMMs and the layout change in one kernel; null means "GEMMs with ATen, then scatter".
  void (*generate)(const TileGenArgs&);
  void (*scatter)(const TileLayoutArgs&);
  void (*gather)(const TileLayoutArgs&);
  void* (*stream)();
  int64_t (*max_shared_bytes)();  // the device's opt-in shared memory per block, for `generate`; or null
};

at::Tensor generate_kernels(const TileKernels& k, const at::Tensor& z, const at::Tensor& w_in, const at::Tensor& b_in,
                            const at::Tensor& w_out, const at::Tensor& b_out, const at::Tensor& tile_meta,
                            int64_t numel, int64_t kernel_size);

std::vector<at::Tensor> generate_kernels_backward(const TileKernels& k, const at::Tensor& grad, const at::Tensor& z,
                                                  const at::Tensor& w_in, const at::Tensor& b_in,
                                                  const at::Tensor& w_out, const at::Tensor& tile_meta,
                                                  int64_t kernel_size);

template <const TileKernels& (*K)()>
at::Tensor generate_kernels_on(const at::Tensor& z, const at::Tensor& w_in, const at::Tensor& b_in,
                               const at::Tensor& w_out, const at::Tensor& b_out, const at::Tensor& tile_meta,
                               int64_t numel, int64_t kernel_size) {
  return generate_kernels(K(), z, w_in, b_in, w_out, b_out, tile_meta, numel, kernel_size);
}

template <const TileKernels& (*K)()>
std::vector<at::Tensor> generate_kernels_backward_on(const at::Tensor& grad, const at::Tensor& z,
                                                     const at::Tensor& w_in, const at::Tensor& b_in,
                                                     const at::Tensor& w_out, const at::Tensor& tile_meta,
                                                     int64_t kernel_size) {
  return generate_kernels_backward(K(), grad, z, w_in, b_in, w_out, tile_meta, kernel_size);
}

}  // namespace hyperfused
