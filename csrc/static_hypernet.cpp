// Whole-model kernel generation: every tile of every generated layer in one call (docs/design.md §2).
//   A[t, i, :] = W_i z_t + B_i                       (tiles, in_tile, hidden)
//   K[t, i, :] = W_out A[t, i, :] + B_out            (tiles, in_tile, out_tile·k·k)
//   kernels[layer][o, c, :, :]  <-  K[t, i, ...]     layout change straight into the conv weights
// Backward: the layout change reversed, then dW_out, dB_out, dA, dW_i, dB_i, dZ as GEMMs/reductions.
#include "static_hypernet.h"
#include "cpu/buffer_pool.h"
#include "cpu/step_gemm.h"
#include "no_autocast.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>

namespace hyperfused {
namespace {

// Far above any conv kernel, and small enough that k·k·out_tile·in_tile stays far from overflowing int64.
constexpr int64_t kMaxKernelSize = 1024;

struct TileSizes {
  int64_t tiles, z_dim, hidden, in_tile, out_tile, kk;
};

void check_same(const at::Tensor& t, const char* name, const at::Tensor& z) {
  TORCH_CHECK(t.device() == z.device(), "hyperfused::generate_kernels: '", name, "' is on ", t.device(),
              " but 'z' is on ", z.device());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), "hyperfused::generate_kernels: '", name, "' has dtype ",
              t.scalar_type(), ", expected ", z.scalar_type(), " (the dtype of 'z')");
  TORCH_CHECK(t.is_contiguous(), "hyperfused::generate_kernels: '", name, "' must be contiguous");
}

TileSizes check_inputs(const at::Tensor& z, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
                       const at::Tensor* b_out, const at::Tensor& meta, int64_t kernel_size) {
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "hyperfused::generate_kernels: 'z' must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(z.dim() == 2 && z.size(0) > 0, "hyperfused::generate_kernels: 'z' must be (tiles, z_dim), got ",
              z.sizes());
  TORCH_CHECK(w_in.dim() == 3, "hyperfused::generate_kernels: 'w_in' must be (in_tile, hidden, z_dim), got ",
              w_in.sizes());
  TORCH_CHECK(kernel_size > 0 && kernel_size <= kMaxKernelSize, "hyperfused::generate_kernels: 'kernel_size' must be in [1, ",
              kMaxKernelSize, "], got ", kernel_size);
  const int64_t kk = kernel_size * kernel_size;
  TileSizes s{z.size(0), z.size(1), w_in.size(1), w_in.size(0), w_out.size(0) / kk, kk};
  TORCH_CHECK(w_in.size(2) == s.z_dim, "hyperfused::generate_kernels: 'w_in' has shape ", w_in.sizes(),
              ", expected (in_tile, hidden, ", s.z_dim, ") to match z_dim of 'z'");
  TORCH_CHECK(b_in.sizes() == at::IntArrayRef({s.in_tile, s.hidden}), "hyperfused::generate_kernels: 'b_in' has shape ",
              b_in.sizes(), ", expected [", s.in_tile, ", ", s.hidden, "]");
  TORCH_CHECK(w_out.dim() == 2 && w_out.size(1) == s.hidden && w_out.size(0) % kk == 0 && w_out.size(0) > 0,
              "hyperfused::generate_kernels: 'w_out' has shape ", w_out.sizes(), ", expected (out_tile*", kk, ", ",
              s.hidden, ")");
  if (b_out)
    TORCH_CHECK(b_out->sizes() == at::IntArrayRef({w_out.size(0)}), "hyperfused::generate_kernels: 'b_out' has shape ",
                b_out->sizes(), ", expected [", w_out.size(0), "]");
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.sizes() == at::IntArrayRef({s.tiles, 2}) && meta.is_contiguous(),
              "hyperfused::generate_kernels: 'tile_meta' must be a contiguous int64 tensor of shape [", s.tiles,
              ", 2], got ", meta.scalar_type(), " ", meta.sizes());
  TORCH_CHECK(meta.device() == z.device(), "hyperfused::generate_kernels: 'tile_meta' is on ", meta.device(),
              " but 'z' is on ", z.device());
  check_same(z, "z", z);
  check_same(w_in, "w_in", z);
  check_same(b_in, "b_in", z);
  check_same(w_out, "w_out", z);
  if (b_out) check_same(*b_out, "b_out", z);
  return s;
}

// Every tile must land inside the buffer; a bad tile_meta would otherwise write out of bounds. A CPU tile_meta
// is checked here, tile by tile, without ATen (no reductions, no .item()). A GPU tile_meta is not read back,
// which would cost a host sync per call: there each kernel checks its own tile with the same function and
// leaves a tile that falls outside untouched. The modules check their layout once, on the CPU copy that
// they build it from (hyperfused.ops.tile_layout).
void check_meta_bounds(const at::Tensor& meta, const TileSizes& s, int64_t numel) {
  TORCH_CHECK(numel >= 0, "hyperfused::generate_kernels: 'numel' must be non-negative, got ", numel);
  if (!meta.device().is_cpu()) return;
  const int64_t* m = meta.data_ptr<int64_t>();
  for (int64_t t = 0; t < s.tiles; ++t)
    TORCH_CHECK(tile_in_bounds(m[2 * t], m[2 * t + 1], s.out_tile, s.in_tile * s.kk, numel),
                "hyperfused::generate_kernels: 'tile_meta' row ", t, " (offset ", m[2 * t], ", row stride ",
                m[2 * t + 1], ") places a tile outside a buffer of ", numel,
                " elements (or its rows overlap: row strides must be >= in_tile*k*k = ", s.in_tile * s.kk, ")");
}

// The CUDA generation kernel keeps one tile's hidden layer in shared memory.
void check_shared_memory(const TileKernels& k, const TileSizes& s, bool dbl) {
  if (!k.max_shared_bytes) return;
  const auto need = int64_t(generate_shared_bytes(s.z_dim, s.in_tile, s.hidden, dbl));
  const int64_t have = k.max_shared_bytes();
  TORCH_CHECK(need <= have, "hyperfused::generate_kernels: the CUDA kernel keeps one tile's embedding and hidden "
              "layer (z_dim + in_tile*hidden = ", s.z_dim, " + ", s.in_tile, "*", s.hidden, " values) in shared memory: ",
              need, " bytes, but this GPU allows ", have, " per block; use a smaller in_tile or hidden size, or "
              "backend='triton'");
}

template <typename T>
void layout_cpu(const TileLayoutArgs& a, bool to_flat) {
  const int64_t width = a.out_tile * a.kk;
  at::parallel_for(0, a.tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* flat = static_cast<T*>(a.flat) + a.meta[2 * t];
      T* tiled = static_cast<T*>(a.tiled) + t * a.in_tile * width;
      const int64_t stride = a.meta[2 * t + 1];
      for (int64_t ob = 0; ob < a.out_tile; ++ob)
        for (int64_t ib = 0; ib < a.in_tile; ++ib) {
          T* f = flat + ob * stride + ib * a.kk;
          T* k = tiled + ib * width + ob * a.kk;
          if (to_flat)
            std::copy(k, k + a.kk, f);
          else
            std::copy(f, f + a.kk, k);
        }
    }
  });
}

at::Tensor hidden_layer(const at::Tensor& z, const at::Tensor& w_in, const at::Tensor& b_in) {
  return at::einsum("ihn,tn->tih", {w_in, z}) + b_in;  // (tiles, in_tile, hidden)
}

}  // namespace

void scatter_tiles_cpu(const TileLayoutArgs& a) {
  a.is_double ? layout_cpu<double>(a, true) : layout_cpu<float>(a, true);
}

void gather_tiles_cpu(const TileLayoutArgs& a) {
  a.is_double ? layout_cpu<double>(a, false) : layout_cpu<float>(a, false);
}

at::Tensor generate_kernels(const TileKernels& k, const at::Tensor& z, const at::Tensor& w_in, const at::Tensor& b_in,
                            const at::Tensor& w_out, const at::Tensor& b_out, const at::Tensor& tile_meta,
                            int64_t numel, int64_t kernel_size) {
  const TileSizes s = check_inputs(z, w_in, b_in, w_out, &b_out, tile_meta, kernel_size);
  const c10::DeviceGuard guard(z.device());
  const NoAutocast no_autocast;
  check_meta_bounds(tile_meta, s, numel);
  auto out = pooled_empty({numel}, z.options()).zero_();  // parts no tile covers stay zero
  const bool dbl = z.scalar_type() == at::kDouble;
  if (k.generate) {
    check_shared_memory(k, s, dbl);
    TileGenArgs a{s.tiles, s.z_dim, s.hidden, s.in_tile, s.out_tile, s.kk, dbl, z.data_ptr(), w_in.data_ptr(),
                  b_in.data_ptr(), w_out.data_ptr(), b_out.data_ptr(), tile_meta.data_ptr<int64_t>(),
                  out.data_ptr(), numel, k.stream()};
    k.generate(a);
    return out;
  }
  auto tiled = pooled_empty({s.tiles * s.in_tile, s.out_tile * s.kk}, z.options());
  sequence_mm(tiled, hidden_layer(z, w_in, b_in).reshape({-1, s.hidden}), w_out.t(), b_out);
  TileLayoutArgs a{s.tiles, s.in_tile, s.out_tile, s.kk, dbl, tile_meta.data_ptr<int64_t>(), out.data_ptr(),
                   tiled.data_ptr(), numel, k.stream()};
  k.scatter(a);
  return out;
}

std::vector<at::Tensor> generate_kernels_backward(const TileKernels& k, const at::Tensor& grad_in, const at::Tensor& z,
                                                  const at::Tensor& w_in, const at::Tensor& b_in,
                                                  const at::Tensor& w_out, const at::Tensor& tile_meta,
                                                  int64_t kernel_size) {
  const TileSizes s = check_inputs(z, w_in, b_in, w_out, nullptr, tile_meta, kernel_size);
  const c10::DeviceGuard guard(z.device());
  const NoAutocast no_autocast;
  const auto grad = grad_in.contiguous();
  TORCH_CHECK(grad.dim() == 1 && grad.scalar_type() == z.scalar_type() && grad.device() == z.device(),
              "hyperfused::generate_kernels_backward: 'grad' must be a flat ", z.scalar_type(), " tensor on ",
              z.device());
  check_meta_bounds(tile_meta, s, grad.numel());
  const int64_t width = s.out_tile * s.kk;
  auto dk = pooled_empty({s.tiles, s.in_tile, width}, z.options());
  TileLayoutArgs a{s.tiles, s.in_tile, s.out_tile, s.kk, z.scalar_type() == at::kDouble,
                   tile_meta.data_ptr<int64_t>(), grad.data_ptr(), dk.data_ptr(), grad.numel(), k.stream()};
  k.gather(a);
  const auto A = hidden_layer(z, w_in, b_in);  // recomputed: cheaper than keeping it
  const auto dk2 = dk.view({-1, width});
  auto d_w_out = sequence_product(dk2.t(), A.reshape({-1, s.hidden}));
  auto d_b_out = dk2.sum(0);
  const auto dA = at::matmul(dk, w_out);  // (tiles, in_tile, hidden)
  auto d_b_in = dA.sum(0);
  auto d_w_in = at::einsum("tih,tn->ihn", {dA, z});
  auto d_z = at::einsum("tih,ihn->tn", {dA, w_in});
  return {d_z, d_w_in, d_b_in, d_w_out, d_b_out};
}

}  // namespace hyperfused
