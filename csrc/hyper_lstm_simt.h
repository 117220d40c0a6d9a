// The CUDA step kernels' bodies, written once against a thread-block interface `Blk` so that the same code
// runs on a GPU (cuda/hyper_lstm_cuda.cu: one CUDA block) and, for the tests, on the CPU under a
// deterministic SIMT emulator (cpu/simt_emulator.cpp) that runs every thread of a block to each barrier in
// turn. No torch or CUDA headers: nvcc compiles it for the device, the host compiler for the emulator.
//
// One block owns one batch row (Blk::row()) for its phase of the step; on sm_90+ a small batch's main cell
// gets a cluster of 2–8 blocks per row instead, which Blk presents as one block (cuda_block.cuh). Its threads
// form `groups()` equal groups (1, 2 or 4); the four per-gate layer norms run side by side, gate k in group
// k mod groups(), so a small batch gets up to 4 × 256 threads per block and a quarter of the reduction
// rounds. The cell update, its layer norm and the projections use the whole block.
//
// Blk provides:
//   int64_t tid(), threads()        this thread, and the block's size (a multiple of 32·groups())
//   int64_t row()                   the batch row
//   int groups(), group()           the thread groups and this thread's group (consecutive threads)
//   int64_t lane(), group_threads() this thread's index in its group, and the group's size
//   void sync()                     __syncthreads(): every thread of the block must reach it
//   T reduce(T v, bool group)       the sum of v over the block (or over this thread's group), in every thread
#pragma once
#include <cmath>
#include <cstdint>

#include "hyper_lstm_kernels.h"
#include "simt_sum.h"

namespace hyperfused {
namespace simt {

// Threads per group: 8 warps per gate layer norm.
constexpr int kGroupThreads = 256;

// How many groups a launch uses: four (one gate each) while the batch leaves most of the GPU's
// multiprocessors idle, one (the four gates in turn, 256 threads) once there are rows enough for them all.
HF_HD int step_groups(int64_t rows, int multiprocessors) { return rows < 2 * int64_t(multiprocessors) ? 4 : 1; }

// The groups a step's launch uses: the step's own setting (HYPERFUSED_CUDA_THREAD_GROUPS), else step_groups.
template <class Step>
HF_HD int launch_groups(const Step& s, int multiprocessors) {
  return s.thread_groups ? s.thread_groups : step_groups(s.dims.B, multiprocessors);
}

// Blocks per row (a thread-block cluster, on GPUs that have them): the step's own setting
// (HYPERFUSED_CUDA_CLUSTER), else 1, except for the main cell of a batch that takes four thread groups: there
// the largest power of two c ≤ kMaxCluster with c ≤ ⌈H/256⌉ (no more threads per gate than features, give or
// take a round) and c·B ≤ the multiprocessors. In one block, each thread walks ⌈H/256⌉ features of its gate one
// after another; at B = 8, H = 1000, four blocks per row give each thread one, and the step 32 of 132
// multiprocessors instead of 8.
constexpr int kMaxCluster = 8;

// Whether a launch may give a row a cluster: the GPU runs thread-block clusters (compute capability 9.0+) and
// the cluster kernels' code was compiled for such a GPU (`kernel_arch`, the virtual architecture of the code
// the GPU runs, 90 for compute_90). A build for older targets only (TORCH_CUDA_ARCH_LIST="8.0+PTX", say) holds
// stubs for them, which the driver JIT-compiles for a 9.0 GPU; launching those would trap.
HF_HD bool clusters_runnable(int compute_capability, int kernel_arch) {
  return compute_capability >= 90 && kernel_arch >= 90;
}

template <class Step>
HF_HD int launch_cluster(const Step& s, int multiprocessors, bool clusters) {
  if (!clusters) return 1;
  if (s.cluster) return s.cluster;
  if (s.phase != StepPhase::Main || launch_groups(s, multiprocessors) != 4) return 1;
  int c = 1;
  while (2 * c <= kMaxCluster && int64_t(2 * c - 1) * kGroupThreads < s.dims.H &&
         2 * c * s.dims.B <= int64_t(multiprocessors))
    c *= 2;
  return c;
}

// The activations the shared cell math (hyper_lstm_kernels.h) uses here.
struct Act {
  template <typename T>
  static HF_HD T sig(T x) { return sigmoid_(x); }
  template <typename T>
  static HF_HD T tanh(T x) {
#if defined(__CUDA_ARCH__)
    return ::tanh(x);
#else
    return std::tanh(x);
#endif
  }
};

template <typename T>
HF_HD T rsqrt_(T x) {
#if defined(__CUDA_ARCH__)
  return T(1) / ::sqrt(x);
#else
  return T(1) / std::sqrt(x);
#endif
}

template <typename T>
HF_SIMT T affine(const T* v, const T* gain, const T* bias, int64_t j, bool ln) {
  return ln ? v[j] * gain[j] + bias[j] : v[j];
}

// x ← (x - mean) · rstd over n values, by the whole block (group = false) or by this thread's group.
template <typename T, class Blk>
HF_SIMT void normalize(Blk& blk, T* x, int64_t n, T* rstd_out, bool group) {
  const int64_t first = group ? blk.lane() : blk.tid(), step = group ? blk.group_threads() : blk.threads();
  T s = 0;
  for (int64_t j = first; j < n; j += step) s += x[j];
  const T mean = blk.reduce(s, group) / T(n);
  T v = 0;
  for (int64_t j = first; j < n; j += step) v += (x[j] - mean) * (x[j] - mean);
  const T r = rsqrt_(blk.reduce(v, group) / T(n) + T(kLnEps));
  for (int64_t j = first; j < n; j += step) x[j] = (x[j] - mean) * r;
  if (first == 0) *rstd_out = r;
}

// The four gate layer norms of x (4n), gate k by group k mod groups(); rstd (4) out.
template <typename T, class Blk>
HF_SIMT void normalize_gates(Blk& blk, T* x, int64_t n, T* rstd) {
  for (int k = blk.group(); k < 4; k += blk.groups()) normalize(blk, x + k * n, n, rstd + k, true);
  blk.sync();
}

// dx from dout through a layer norm (x̂, gain, rstd) over n values, by the block or by this thread's group.
template <typename T, class Blk>
HF_SIMT void layer_norm_backward(Blk& blk, const T* dout, const T* xhat, const T* gain, T rstd, int64_t n, T* dx,
                                 bool group) {
  const int64_t first = group ? blk.lane() : blk.tid(), step = group ? blk.group_threads() : blk.threads();
  T a = 0, b = 0;
  for (int64_t j = first; j < n; j += step) {
    const T d = dout[j] * gain[j];
    a += d;
    b += d * xhat[j];
  }
  const T mean_d = blk.reduce(a, group) / T(n);
  const T mean_dx = blk.reduce(b, group) / T(n);
  for (int64_t j = first; j < n; j += step) dx[j] = layer_norm_backward_at(dout[j], gain[j], xhat[j], rstd, mean_d, mean_dx);
}

template <typename T, class Blk>
HF_SIMT void cell_forward(Blk& blk, const T* gates, const T* gg, const T* gb, const T* cg, const T* cb,
                          const T* c_prev, const T* mask, T fb, bool ln, int64_t n, T* c, T* h, T* cn, T* crstd,
                          const T* zoneout, const T* h_prev) {
  for (int64_t j = blk.tid(); j < n; j += blk.threads()) {
    c[j] = cell_state<Act>(affine(gates, gg, gb, j, ln), affine(gates, gg, gb, n + j, ln),
                           affine(gates, gg, gb, 2 * n + j, ln), mask ? mask[j] : T(1), c_prev[j], fb);
    if (ln) cn[j] = c[j];
  }
  blk.sync();
  if (ln) {
    normalize(blk, cn, n, crstd, false);
    blk.sync();
  }
  for (int64_t j = blk.tid(); j < n; j += blk.threads()) {
    const T co = ln ? cn[j] * cg[j] + cb[j] : c[j];
    const T h_new = cell_output<Act>(affine(gates, gg, gb, 3 * n + j, ln), co);
    h[j] = zoneout ? zoneout_(h_new, h_prev[j], zoneout[j]) : h_new;
  }
  blk.sync();
}

template <typename T, class Blk>
HF_SIMT void cell_backward(Blk& blk, const T* gates, const T* gg, const T* gb, const T* cg, const T* cb,
                           const T* rstd, const T* cn, T crstd, const T* c, const T* c_prev, const T* mask, T fb,
                           bool ln, int64_t n, const T* dh_a, const T* dh_b, const T* dc_out, T* dc_carry, T* dcout,
                           T* dy, T* da, const T* zoneout, T* dh_zone) {
  for (int64_t j = blk.tid(); j < n; j += blk.threads()) {
    const T dh_in = (dh_a ? dh_a[j] : T(0)) + (dh_b ? dh_b[j] : T(0));
    const T dh = zoneout ? zoneout_backward_(dh_in, zoneout[j], dh_zone + j) : dh_in;
    cell_output_backward<Act>(dh, affine(gates, gg, gb, 3 * n + j, ln), ln ? cn[j] * cg[j] + cb[j] : c[j],
                              &dy[3 * n + j], &dcout[j]);
  }
  blk.sync();
  // dc via LN_c backward; da's slot for gate i is free until the gate LN below, so it holds dc_ln.
  T* dc_ln = da;
  if (ln) {
    layer_norm_backward(blk, dcout, cn, cg, crstd, n, dc_ln, false);
    blk.sync();
  }
  for (int64_t j = blk.tid(); j < n; j += blk.threads()) {
    const T dc = dc_carry[j] + (ln ? dc_ln[j] : dcout[j]) + (dc_out ? dc_out[j] : T(0));
    dc_carry[j] = cell_state_backward<Act>(dc, affine(gates, gg, gb, j, ln), affine(gates, gg, gb, n + j, ln),
                                           affine(gates, gg, gb, 2 * n + j, ln), mask ? mask[j] : T(1), c_prev[j],
                                           fb, &dy[j], &dy[n + j], &dy[2 * n + j]);
  }
  blk.sync();
  if (ln) {
    for (int k = blk.group(); k < 4; k += blk.groups())
      layer_norm_backward(blk, dy + k * n, gates + k * n, gg + k * n, rstd[k], n, da + k * n, true);
  } else {
    for (int64_t j = blk.tid(); j < 4 * n; j += blk.threads()) da[j] = dy[j];
  }
  blk.sync();
}

// The hyper cell forward for row b: ĥ_t, ĉ_t and their workspace slots.
template <typename T, class Blk>
HF_SIMT void hyper_cell_forward(Blk& blk, const ForwardStep& s, const Ptrs<T>& P, const T* g, T* ws, T* hh) {
  const Dims d = s.dims;
  const WsLayout L(d);
  const int64_t b = blk.row(), H = d.H, Hh = d.Hh;
  T* hn = ws + L.hn;
  const T* ghh = row_of<T>(s.ghh, b, 4 * Hh);
  const T* ghx = row_of<T>(s.ghx, b, 4 * Hh);
  for (int64_t j = blk.tid(); j < 4 * Hh; j += blk.threads()) hn[j] = ghx[j] + g[4 * H + j] + ghh[j];
  blk.sync();
  if (s.layer_norm) normalize_gates(blk, hn, Hh, ws + L.hrstd);
  cell_forward(blk, hn, P.hlnw, P.hlnb, P.hlncw, P.hlncb, row_of<T>(s.hc_prev, b, Hh), row_of<T>(s.hmask, b, Hh),
               T(s.forget_bias), s.layer_norm, Hh, static_cast<T*>(s.hc) + b * Hh, hh, ws + L.hcn, ws + L.hcrstd,
               row_of<T>(s.hzmask, b, Hh), row_of<T>(s.hh_prev, b, Hh));
}

// The main cell's pre-activations n (4H) of row b: Whole computes z and the scaling vectors d itself
// (reading every projection weight for this row); Main reads d from the GEMM-shaped step's (12, B, H).
template <typename T, class Blk>
HF_SIMT void main_preactivations(Blk& blk, const ForwardStep& s, const Ptrs<T>& P, const T* g, T* ws, const T* hh,
                                 T* n) {
  const Dims d = s.dims;
  const WsLayout L(d);
  const int64_t b = blk.row(), H = d.H, Hh = d.Hh, Nz = d.Nz;
  const T* gx = row_of<T>(s.gx, b, 4 * H);
  if (s.phase == StepPhase::Whole) {
    // z = [z_bias ; 0] + [z_weight ; bias_z_weight] ĥ_t, read through the transpose for coalescing.
    T* z = ws + L.z;
    for (int64_t k = blk.tid(); k < 12 * Nz; k += blk.threads()) {
      T acc = k < 8 * Nz ? P.zb[k] : T(0);
      for (int64_t j = 0; j < Hh; ++j) acc += P.zwt[j * 12 * Nz + k] * hh[j];
      z[k] = acc;
    }
    blk.sync();
    for (int64_t r = blk.tid(); r < 4 * H; r += blk.threads())
      n[r] = P.scale(0, r, z, d) * g[r] + P.scale(1, r, z, d) * gx[r] + P.bias[r] + P.scale(2, r, z, d);
  } else {  // d given, (12, B, H): gate y of kind k at ((k·4 + y)·B + b)·H
    const T* given = static_cast<const T*>(s.scale) + b * H;
    const int64_t kind = 4 * d.B * H;
    for (int64_t r = blk.tid(); r < 4 * H; r += blk.threads()) {
      const int64_t at = (r / H) * d.B * H + r % H;
      n[r] = given[at] * g[r] + given[kind + at] * gx[r] + P.bias[r] + given[2 * kind + at];
    }
  }
  blk.sync();
}

template <typename T, class Blk>
HF_SIMT void forward_step(Blk& blk, const ForwardStep& s) {
  const Dims d = s.dims;
  const WsLayout L(d);
  const Ptrs<T> P(s.p);
  const int64_t b = blk.row(), H = d.H, Hh = d.Hh;
  const T* g = row_of<T>(s.g, b, d.g_width());
  T* ws = static_cast<T*>(s.ws) + b * L.width;
  T* hh = static_cast<T*>(s.hh) + b * Hh;
  if (s.phase != StepPhase::Main) hyper_cell_forward(blk, s, P, g, ws, hh);
  if (s.phase == StepPhase::Hyper) return;
  T* n = ws + L.n;
  main_preactivations(blk, s, P, g, ws, hh, n);
  if (s.layer_norm) normalize_gates(blk, n, H, ws + L.rstd);
  cell_forward(blk, n, P.lnw, P.lnb, P.lncw, P.lncb, row_of<T>(s.c_prev, b, H), row_of<T>(s.mask, b, H),
               T(s.forget_bias), s.layer_norm, H, static_cast<T*>(s.c) + b * H, static_cast<T*>(s.h) + b * H,
               ws + L.cn, ws + L.crstd, row_of<T>(s.zmask, b, H), row_of<T>(s.h_prev, b, H));
  if (!s.layer_norm)
    for (int64_t i = blk.tid(); i < L.ln_only_count(d); i += blk.threads()) ws[L.ln_only_slot(d, i)] = T(0);
}

// Main, GEMM-shaped: dg = da ⊙ d_h with d_h given (4, B, H); dd = [da ⊙ W_h h | da ⊙ W_x x | da] out, (12, B, H).
template <typename T, class Blk>
HF_SIMT void scaling_grads_given(Blk& blk, const BackwardStep& s, const T* da, const T* g, const T* gx, T* dg) {
  const Dims d = s.dims;
  const int64_t b = blk.row(), H = d.H;
  const T* dh_given = static_cast<const T*>(s.scale) + b * H;
  T* dd = static_cast<T*>(s.dd) + b * H;
  const int64_t kind = 4 * d.B * H;
  for (int64_t r = blk.tid(); r < 4 * H; r += blk.threads()) {
    const int64_t at = (r / H) * d.B * H + r % H;
    dg[r] = da[r] * dh_given[at];
    dd[at] = da[r] * g[r];
    dd[kind + at] = da[r] * gx[r];
    dd[2 * kind + at] = da[r];
  }
}

// Whole: dg = da ⊙ d_h and dz (12N_z) = Σ_r dd_kind[yH + r] · W_kind[yH + r, m], one thread per entry of z.
template <typename T, class Blk>
HF_SIMT void scaling_grads_whole(Blk& blk, const BackwardStep& s, const Ptrs<T>& P, const T* ws, const T* da,
                                 const T* g, const T* gx, T* dg, T* dz) {
  const Dims d = s.dims;
  const WsLayout L(d);
  const int64_t H = d.H, Nz = d.Nz;
  const T* z = ws + L.z;
  for (int64_t r = blk.tid(); r < 4 * H; r += blk.threads()) dg[r] = da[r] * P.scale(0, r, z, d);
  for (int64_t k = blk.tid(); k < 12 * Nz; k += blk.threads()) {
    const int kind = int(k / (4 * Nz));
    const int64_t y = (k / Nz) % 4, m = k % Nz;
    T acc = 0;
    for (int64_t r = y * H; r < (y + 1) * H; ++r) {
      const T dd = kind == 0 ? da[r] * g[r] : kind == 1 ? da[r] * gx[r] : da[r];
      acc += dd * P.scale_row(kind, r, d)[m];
    }
    dz[k] = acc;
  }
  blk.sync();
}

template <typename T, class Blk>
HF_SIMT void backward_step(Blk& blk, const BackwardStep& s) {
  const Dims d = s.dims;
  const WsLayout L(d);
  const DwsLayout D(d);
  const Ptrs<T> P(s.p);
  const int64_t b = blk.row(), H = d.H, Hh = d.Hh, Nz = d.Nz;
  const T fb = T(s.forget_bias);
  const T* g = row_of<T>(s.g, b, d.g_width());
  const T* gx = row_of<T>(s.gx, b, 4 * H);
  const T* ws = row_of<T>(s.ws, b, L.width);
  T* dws = static_cast<T*>(s.dws) + b * D.width;
  T* dg = static_cast<T*>(s.dg) + b * d.g_width();
  T* da = dws + D.da;

  if (s.phase != StepPhase::Hyper)
    cell_backward(blk, ws + L.n, P.lnw, P.lnb, P.lncw, P.lncb, ws + L.rstd, ws + L.cn, ws[L.crstd],
                  row_of<T>(s.c, b, H), row_of<T>(s.c_prev, b, H), row_of<T>(s.mask, b, H), fb, s.layer_norm, H,
                  row_of<T>(s.dh_out, b, H), row_of<T>(s.dh_rec, b, H), row_of<T>(s.dc_out, b, H),
                  static_cast<T*>(s.dc_carry) + b * H, dws + D.dcout, dws + D.dy, da, row_of<T>(s.zmask, b, H),
                  s.dh_zone ? static_cast<T*>(s.dh_zone) + b * H : nullptr);
  if (s.phase == StepPhase::Main) {
    scaling_grads_given(blk, s, da, g, gx, dg);
    return;
  }
  T* dz = dws + D.dz;
  if (s.phase == StepPhase::Whole) scaling_grads_whole(blk, s, P, ws, da, g, gx, dg, dz);
  // ĥ_t's gradient, parked in dg's hyper slot until the hyper cell backward overwrites it with dâ: what
  // flows in from outside and from step t+1, plus the embeddings' share (dz·Z, here or given).
  T* dhh = dg + 4 * H;
  const T* dhh_out = row_of<T>(s.dhh_out, b, Hh);
  const T* dhh_rec = row_of<T>(s.dhh_rec, b, Hh);
  const T* extra = row_of<T>(s.dhh_extra, b, Hh);
  for (int64_t j = blk.tid(); j < Hh; j += blk.threads()) {
    T acc = (dhh_out ? dhh_out[j] : T(0)) + (dhh_rec ? dhh_rec[j] : T(0)) + (extra ? extra[j] : T(0));
    if (s.phase == StepPhase::Whole)
      for (int64_t k = 0; k < 12 * Nz; ++k) acc += dz[k] * P.z_row(k, d)[j];
    dhh[j] = acc;
  }
  blk.sync();
  // cell_backward reads its dh only in its first loop, which ends in a barrier before anything is written
  // to its da slot, so dâ may overwrite the parked dhh.
  cell_backward(blk, ws + L.hn, P.hlnw, P.hlnb, P.hlncw, P.hlncb, ws + L.hrstd, ws + L.hcn, ws[L.hcrstd],
                row_of<T>(s.hc, b, Hh), row_of<T>(s.hc_prev, b, Hh), row_of<T>(s.hmask, b, Hh), fb, s.layer_norm, Hh,
                static_cast<const T*>(dhh), static_cast<const T*>(nullptr), row_of<T>(s.dhc_out, b, Hh),
                static_cast<T*>(s.dhc_carry) + b * Hh, dws + D.dhcout, dws + D.dyh, dg + 4 * H,
                row_of<T>(s.hzmask, b, Hh), s.dhh_zone ? static_cast<T*>(s.dhh_zone) + b * Hh : nullptr);
}

}  // namespace simt
}  // namespace hyperfused
