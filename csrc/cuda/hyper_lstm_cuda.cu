// Fused per-step HyperLSTM kernels for CUDA. One thread block owns one batch row for the whole step, so
// the per-gate layer norms and the Ĥ→N_z→H projections are block reductions with no global sync. The
// recurrent GEMMs stay in cuBLAS (driven from hyper_lstm.cpp); this file holds the pointwise core only
// and includes no torch headers so nvcc compiles it in seconds.
#include <cuda_runtime.h>

#include "../hyper_lstm_kernels.h"

namespace hyperfused {
namespace {

constexpr int kThreads = 256;

// The activations the shared cell math (hyper_lstm_kernels.h) uses here.
struct Act {
  template <typename T>
  static HF_HD T sig(T x) { return sigmoid_(x); }
  template <typename T>
  static HF_HD T tanh(T x) { return ::tanh(x); }
};

template <typename T>
__device__ T block_sum(T v, T* red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // earlier readers of red are done
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < (blockDim.x + 31) / 32; ++w) total += red[w];
  return total;
}

template <typename T>
__device__ T affine(const T* v, const T* gain, const T* bias, int64_t j, bool ln) {
  return ln ? v[j] * gain[j] + bias[j] : v[j];
}

template <typename T>
__device__ void normalize(T* x, int64_t n, T* rstd_out, T* red) {
  T s = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += x[j];
  const T mean = block_sum(s, red) / T(n);
  T v = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) v += (x[j] - mean) * (x[j] - mean);
  const T r = T(1) / sqrt(block_sum(v, red) / T(n) + T(kLnEps));
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) x[j] = (x[j] - mean) * r;
  if (threadIdx.x == 0) *rstd_out = r;
  __syncthreads();
}

template <typename T>
__device__ void layer_norm_backward(const T* dout, const T* xhat, const T* gain, T rstd, int64_t n, T* dx, T* red) {
  T a = 0, b = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const T d = dout[j] * gain[j];
    a += d;
    b += d * xhat[j];
  }
  const T mean_d = block_sum(a, red) / T(n);
  const T mean_dx = block_sum(b, red) / T(n);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    dx[j] = layer_norm_backward_at(dout[j], gain[j], xhat[j], rstd, mean_d, mean_dx);
  __syncthreads();
}

template <typename T>
__device__ void cell_forward(const T* gates, const T* gg, const T* gb, const T* cg, const T* cb, const T* c_prev,
                             const T* mask, T fb, bool ln, int64_t n, T* c, T* h, T* cn, T* crstd, T* red,
                             const T* zoneout, const T* h_prev) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    c[j] = cell_state<Act>(affine(gates, gg, gb, j, ln), affine(gates, gg, gb, n + j, ln),
                           affine(gates, gg, gb, 2 * n + j, ln), mask ? mask[j] : T(1), c_prev[j], fb);
    if (ln) cn[j] = c[j];
  }
  __syncthreads();
  if (ln) normalize(cn, n, crstd, red);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const T co = ln ? cn[j] * cg[j] + cb[j] : c[j];
    const T h_new = cell_output<Act>(affine(gates, gg, gb, 3 * n + j, ln), co);
    h[j] = zoneout ? zoneout_(h_new, h_prev[j], zoneout[j]) : h_new;
  }
  __syncthreads();
}

template <typename T>
__device__ void cell_backward(const T* gates, const T* gg, const T* gb, const T* cg, const T* cb, const T* rstd,
                              const T* cn, T crstd, const T* c, const T* c_prev, const T* mask, T fb, bool ln,
                              int64_t n, const T* dh_a, const T* dh_b, const T* dc_out, T* dc_carry, T* dcout,
                              T* dy, T* da, T* red, const T* zoneout, T* dh_zone) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const T dh_in = (dh_a ? dh_a[j] : T(0)) + (dh_b ? dh_b[j] : T(0));
    const T dh = zoneout ? zoneout_backward_(dh_in, zoneout[j], dh_zone + j) : dh_in;
    cell_output_backward<Act>(dh, affine(gates, gg, gb, 3 * n + j, ln), ln ? cn[j] * cg[j] + cb[j] : c[j],
                              &dy[3 * n + j], &dcout[j]);
  }
  __syncthreads();
  // dc via LN_c backward; da's slot for gate i is free until the gate LN below, so it holds dc_ln.
  T* dc_ln = da;
  if (ln)
    layer_norm_backward(dcout, cn, cg, crstd, n, dc_ln, red);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const T dc = dc_carry[j] + (ln ? dc_ln[j] : dcout[j]) + (dc_out ? dc_out[j] : T(0));
    dc_carry[j] = cell_state_backward<Act>(dc, affine(gates, gg, gb, j, ln), affine(gates, gg, gb, n + j, ln),
                                           affine(gates, gg, gb, 2 * n + j, ln), mask ? mask[j] : T(1), c_prev[j],
                                           fb, &dy[j], &dy[n + j], &dy[2 * n + j]);
  }
  __syncthreads();
  for (int k = 0; k < 4; ++k) {
    if (ln) {
      layer_norm_backward(dy + k * n, gates + k * n, gg + k * n, rstd[k], n, da + k * n, red);
    } else {
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) da[k * n + j] = dy[k * n + j];
    }
  }
  __syncthreads();
}

template <typename T>
struct Ptrs {
  const T *bias, *zw, *zwt, *swt, *zb, *bzw, *sw, *bsw, *lnw, *lnb, *lncw, *lncb, *hlnw, *hlnb, *hlncw, *hlncb;
  __device__ explicit Ptrs(const StepParams& p)
      : bias(static_cast<const T*>(p.bias)), zw(static_cast<const T*>(p.z_weight)),
        zwt(static_cast<const T*>(p.z_weight_t)), swt(static_cast<const T*>(p.scale_weight_t)),
        zb(static_cast<const T*>(p.z_bias)), bzw(static_cast<const T*>(p.bias_z_weight)),
        sw(static_cast<const T*>(p.scale_weight)), bsw(static_cast<const T*>(p.bias_scale_weight)),
        lnw(static_cast<const T*>(p.ln_weight)), lnb(static_cast<const T*>(p.ln_bias)),
        lncw(static_cast<const T*>(p.ln_cell_weight)), lncb(static_cast<const T*>(p.ln_cell_bias)),
        hlnw(static_cast<const T*>(p.hyper_ln_weight)), hlnb(static_cast<const T*>(p.hyper_ln_bias)),
        hlncw(static_cast<const T*>(p.hyper_ln_cell_weight)), hlncb(static_cast<const T*>(p.hyper_ln_cell_bias)) {}
  __device__ const T* scale_row(int k, int64_t r, const Dims& d) const {
    return k < 2 ? sw + (k * 4 * d.H + r) * d.Nz : bsw + r * d.Nz;
  }
  __device__ const T* z_row(int64_t k, const Dims& d) const {
    return k < 8 * d.Nz ? zw + k * d.Hh : bzw + (k - 8 * d.Nz) * d.Hh;
  }
  // d_kind[r] from the transposed scale weights, so that threads with consecutive r read consecutive memory.
  __device__ T scale(int kind, int64_t r, const T* z, const Dims& d) const {
    const int64_t y = r / d.H, h = r % d.H, q0 = (kind * 4 + y) * d.Nz;
    T acc = 0;
    for (int64_t m = 0; m < d.Nz; ++m) acc += swt[(q0 + m) * d.H + h] * z[q0 + m];
    return acc;
  }
};

template <typename T>
__device__ const T* row_of(const void* base, int64_t b, int64_t width) {
  return base ? static_cast<const T*>(base) + b * width : nullptr;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardStep s) {
  __shared__ T red[32];
  const Dims d = s.dims;
  const WsLayout L(d);
  const Ptrs<T> P(s.p);
  const int64_t b = blockIdx.x, H = d.H, Hh = d.Hh, Nz = d.Nz;
  const T fb = T(s.forget_bias);
  const T* g = row_of<T>(s.g, b, d.g_width());
  T* ws = static_cast<T*>(s.ws) + b * L.width;
  T* hh = static_cast<T*>(s.hh) + b * Hh;

  if (s.phase != StepPhase::Main) {
    T* hn = ws + L.hn;
    const T* ghh = row_of<T>(s.ghh, b, 4 * Hh);
    const T* ghx = row_of<T>(s.ghx, b, 4 * Hh);
    for (int64_t j = threadIdx.x; j < 4 * Hh; j += blockDim.x) hn[j] = ghx[j] + g[4 * H + j] + ghh[j];
    __syncthreads();
    if (s.layer_norm)
      for (int k = 0; k < 4; ++k) normalize(hn + k * Hh, Hh, ws + L.hrstd + k, red);
    cell_forward(hn, P.hlnw, P.hlnb, P.hlncw, P.hlncb, row_of<T>(s.hc_prev, b, Hh), row_of<T>(s.hmask, b, Hh), fb,
                 s.layer_norm, Hh, static_cast<T*>(s.hc) + b * Hh, hh, ws + L.hcn, ws + L.hcrstd, red,
                 row_of<T>(s.hzmask, b, Hh), row_of<T>(s.hh_prev, b, Hh));
  }
  if (s.phase == StepPhase::Hyper) return;

  T* n = ws + L.n;
  const T* gx = row_of<T>(s.gx, b, 4 * H);
  if (s.phase == StepPhase::Whole) {
    // z = [z_bias ; 0] + [z_weight ; bias_z_weight] ĥ_t, read through the transpose for coalescing.
    T* z = ws + L.z;
    for (int64_t k = threadIdx.x; k < 12 * Nz; k += blockDim.x) {
      T acc = k < 8 * Nz ? P.zb[k] : T(0);
      for (int64_t j = 0; j < Hh; ++j) acc += P.zwt[j * 12 * Nz + k] * hh[j];
      z[k] = acc;
    }
    __syncthreads();
    for (int64_t r = threadIdx.x; r < 4 * H; r += blockDim.x)
      n[r] = P.scale(0, r, z, d) * g[r] + P.scale(1, r, z, d) * gx[r] + P.bias[r] + P.scale(2, r, z, d);
  } else {  // d given, (12, B, H): gate y of kind k at ((k·4 + y)·B + b)·H
    const T* given = static_cast<const T*>(s.scale) + b * H;
    const int64_t kind = 4 * d.B * H;
    for (int64_t r = threadIdx.x; r < 4 * H; r += blockDim.x) {
      const int64_t at = (r / H) * d.B * H + r % H;
      n[r] = given[at] * g[r] + given[kind + at] * gx[r] + P.bias[r] + given[2 * kind + at];
    }
  }
  __syncthreads();
  if (s.layer_norm)
    for (int k = 0; k < 4; ++k) normalize(n + k * H, H, ws + L.rstd + k, red);
  cell_forward(n, P.lnw, P.lnb, P.lncw, P.lncb, row_of<T>(s.c_prev, b, H), row_of<T>(s.mask, b, H), fb, s.layer_norm,
               H, static_cast<T*>(s.c) + b * H, static_cast<T*>(s.h) + b * H, ws + L.cn, ws + L.crstd, red,
               row_of<T>(s.zmask, b, H), row_of<T>(s.h_prev, b, H));
  if (!s.layer_norm)
    for (int64_t i = threadIdx.x; i < L.ln_only_count(d); i += blockDim.x) ws[L.ln_only_slot(d, i)] = T(0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardStep s) {
  __shared__ T red[32];
  const Dims d = s.dims;
  const WsLayout L(d);
  const DwsLayout D(d);
  const Ptrs<T> P(s.p);
  const int64_t b = blockIdx.x, H = d.H, Hh = d.Hh, Nz = d.Nz;
  const T fb = T(s.forget_bias);
  const T* g = row_of<T>(s.g, b, d.g_width());
  const T* gx = row_of<T>(s.gx, b, 4 * H);
  const T* ws = row_of<T>(s.ws, b, L.width);
  T* dws = static_cast<T*>(s.dws) + b * D.width;
  T* dg = static_cast<T*>(s.dg) + b * d.g_width();
  T* da = dws + D.da;

  if (s.phase != StepPhase::Hyper)
    cell_backward(ws + L.n, P.lnw, P.lnb, P.lncw, P.lncb, ws + L.rstd, ws + L.cn, ws[L.crstd], row_of<T>(s.c, b, H),
                  row_of<T>(s.c_prev, b, H), row_of<T>(s.mask, b, H), fb, s.layer_norm, H, row_of<T>(s.dh_out, b, H),
                  row_of<T>(s.dh_rec, b, H), row_of<T>(s.dc_out, b, H), static_cast<T*>(s.dc_carry) + b * H,
                  dws + D.dcout, dws + D.dy, da, red, row_of<T>(s.zmask, b, H),
                  s.dh_zone ? static_cast<T*>(s.dh_zone) + b * H : nullptr);
  if (s.phase == StepPhase::Main) {
    // GEMM-shaped: dg = da ⊙ d_h with d_h given (4, B, H); dd = [da ⊙ W_h h | da ⊙ W_x x | da] out, (12, B, H).
    const T* dh_given = static_cast<const T*>(s.scale) + b * H;
    T* dd = static_cast<T*>(s.dd) + b * H;
    const int64_t kind = 4 * d.B * H;
    for (int64_t r = threadIdx.x; r < 4 * H; r += blockDim.x) {
      const int64_t at = (r / H) * d.B * H + r % H;
      dg[r] = da[r] * dh_given[at];
      dd[at] = da[r] * g[r];
      dd[kind + at] = da[r] * gx[r];
      dd[2 * kind + at] = da[r];
    }
    return;
  }

  T* dz = dws + D.dz;
  if (s.phase == StepPhase::Whole) {
    const T* z = ws + L.z;
    for (int64_t r = threadIdx.x; r < 4 * H; r += blockDim.x) dg[r] = da[r] * P.scale(0, r, z, d);
    // dz[kind, y, m] = Σ_r dd_kind[yH + r] · W_kind[yH + r, m]; one thread per embedding entry.
    for (int64_t k = threadIdx.x; k < 12 * Nz; k += blockDim.x) {
      const int kind = int(k / (4 * Nz));
      const int64_t y = (k / Nz) % 4, m = k % Nz;
      T acc = 0;
      for (int64_t r = y * H; r < (y + 1) * H; ++r) {
        const T dd = kind == 0 ? da[r] * g[r] : kind == 1 ? da[r] * gx[r] : da[r];
        acc += dd * P.scale_row(kind, r, d)[m];
      }
      dz[k] = acc;
    }
    __syncthreads();
  }
  // ĥ_t's gradient, parked in dg's hyper slot until the hyper cell backward overwrites it with dâ: what
  // flows in from outside and from step t+1, plus the embeddings' share (dz·Z, here or given).
  T* dhh = dg + 4 * H;
  const T* dhh_out = row_of<T>(s.dhh_out, b, Hh);
  const T* dhh_rec = row_of<T>(s.dhh_rec, b, Hh);
  const T* extra = row_of<T>(s.dhh_extra, b, Hh);
  for (int64_t j = threadIdx.x; j < Hh; j += blockDim.x) {
    T acc = (dhh_out ? dhh_out[j] : T(0)) + (dhh_rec ? dhh_rec[j] : T(0)) + (extra ? extra[j] : T(0));
    if (s.phase == StepPhase::Whole)
      for (int64_t k = 0; k < 12 * Nz; ++k) acc += dz[k] * P.z_row(k, d)[j];
    dhh[j] = acc;
  }
  __syncthreads();
  // cell_backward reads its dh only in its first loop, which ends in a barrier before anything is written
  // to its da slot, so dâ may overwrite the parked dhh.
  cell_backward(ws + L.hn, P.hlnw, P.hlnb, P.hlncw, P.hlncb, ws + L.hrstd, ws + L.hcn, ws[L.hcrstd],
                row_of<T>(s.hc, b, Hh), row_of<T>(s.hc_prev, b, Hh), row_of<T>(s.hmask, b, Hh), fb, s.layer_norm, Hh,
                static_cast<const T*>(dhh), static_cast<const T*>(nullptr), row_of<T>(s.dhc_out, b, Hh),
                static_cast<T*>(s.dhc_carry) + b * Hh, dws + D.dhcout, dws + D.dyh, dg + 4 * H, red,
                row_of<T>(s.hzmask, b, Hh), s.dhh_zone ? static_cast<T*>(s.dhh_zone) + b * Hh : nullptr);
}

template <typename T>
int launch_forward(const ForwardStep& s) {
  forward_kernel<T><<<dim3(s.dims.B), dim3(kThreads), 0, static_cast<cudaStream_t>(s.stream)>>>(s);
  return int(cudaGetLastError());
}

template <typename T>
int launch_backward(const BackwardStep& s) {
  backward_kernel<T><<<dim3(s.dims.B), dim3(kThreads), 0, static_cast<cudaStream_t>(s.stream)>>>(s);
  return int(cudaGetLastError());
}

}  // namespace

int forward_step_cuda(const ForwardStep& s) {
  return s.kind == ScalarKind::Float64 ? launch_forward<double>(s) : launch_forward<float>(s);
}

int backward_step_cuda(const BackwardStep& s) {
  return s.kind == ScalarKind::Float64 ? launch_backward<double>(s) : launch_backward<float>(s);
}

}  // namespace hyperfused
