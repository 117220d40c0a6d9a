// Framework-independent interface between the sequence driver (hyper_lstm.cpp, ATen GEMMs and the time
// loop) and the fused per-step kernels (cpu/, cuda/). Only raw pointers cross it, so the .cu file needs no
// torch headers and compiles in seconds.
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace hyperfused {

enum class ScalarKind { Float32, Float64 };

// Sizes of one layer/direction. Gate order inside each 4·n block is (i, f, g, o).
struct Dims {
  int64_t B, H, Hh, Nz;
  HF_HD int64_t g_width() const { return 4 * H + 4 * Hh; }  // [W_h h | Ŵ_{x,h-part} h] per step
};

// Per-row layouts of the forward workspace saved for backward (WsLayout) and of the backward workspace
// (DwsLayout), in the op's dtype: each slot's offset, in the order and with the widths that
// triton_kernels/workspace_layouts.def lists (the one definition, which the Triton kernels and the Python
// fakes read too). Gate order inside each 4·n block is (i, f, g, o).
#define HF_LAYOUT_WIDTH(h, hh, nz, c) ((h) * d.H + (hh) * d.Hh + (nz) * d.Nz + (c))

struct WsLayout {
#define HF_WS_SLOT(name, h, hh, nz, c) int64_t name;
#define HF_DWS_SLOT(name, h, hh, nz, c, ln)
#include "../triton_kernels/workspace_layouts.def"
#undef HF_WS_SLOT
#undef HF_DWS_SLOT
  int64_t width;
  HF_HD explicit WsLayout(const Dims& d) {
    int64_t at = 0;
#define HF_WS_SLOT(name, h, hh, nz, c) name = at, at += HF_LAYOUT_WIDTH(h, hh, nz, c);
#define HF_DWS_SLOT(name, h, hh, nz, c, ln)
#include "../triton_kernels/workspace_layouts.def"
#undef HF_WS_SLOT
#undef HF_DWS_SLOT
    width = at;
  }
  // The slots only layer norm fills (cn, hcn and the ten rstd values, which are contiguous). Without LN the
  // forward zeroes them, so the saved workspace (an op output) is fully defined and the backward, which
  // reads crstd by value, never reads memory nothing wrote.
  HF_HD int64_t ln_only_count(const Dims& d) const { return d.H + d.Hh + 10; }
  HF_HD int64_t ln_only_slot(const Dims& d, int64_t i) const {
    return i < d.H ? cn + i : i < d.H + d.Hh ? hcn + (i - d.H) : rstd + (i - d.H - d.Hh);
  }
};

// A kernel that sums the layer norms' gradients itself (AccumLayout) keeps no dy/dcout/dyh/dhcout rows:
// ln_rows false drops them (their offsets are then -1), which takes 5H + 5Ĥ of 9H + 12N_z + 5Ĥ per row off the
// workspace.
struct DwsLayout {
#define HF_WS_SLOT(name, h, hh, nz, c)
#define HF_DWS_SLOT(name, h, hh, nz, c, ln) int64_t name;
#include "../triton_kernels/workspace_layouts.def"
#undef HF_WS_SLOT
#undef HF_DWS_SLOT
  int64_t width;
  HF_HD explicit DwsLayout(const Dims& d, bool ln_rows = true) {
    int64_t at = 0;
#define HF_WS_SLOT(name, h, hh, nz, c)
#define HF_DWS_SLOT(name, h, hh, nz, c, ln) \
  if ((ln) && !ln_rows) name = -1;         \
  else name = at, at += HF_LAYOUT_WIDTH(h, hh, nz, c);
#include "../triton_kernels/workspace_layouts.def"
#undef HF_WS_SLOT
#undef HF_DWS_SLOT
    width = at;
  }
};
#undef HF_LAYOUT_WIDTH

// Per-thread sums over the (T·B) rows that a backward step kernel may accumulate itself instead of leaving
// per-row gradients for post-loop reductions (the CPU does; one block per row on CUDA does not): the main
// cell's CellSums (n = H) at `main`, the hyper cell's (n = Ĥ) at `hyper`, and
//   scale (12·N_z·H) Σ z_k^y[m] · dd_k^y for kinds k = (h, x, b), laid out (3, 4, N_z, H) like scale_weight_t.
struct AccumLayout {
  // One LN-LSTM cell of width n, offsets from its start: bias (4n) Σ da (the pre-activations' grad);
  // ln_w (4n) Σ dy ⊙ n̂; ln_b (4n) Σ dy; lnc_w (n) Σ dcout ⊙ ĉn; lnc_b (n) Σ dcout.
  struct CellSums {
    int64_t bias, ln_w, ln_b, lnc_w, lnc_b, width;
    HF_HD explicit CellSums(int64_t n)
        : bias(0), ln_w(4 * n), ln_b(8 * n), lnc_w(12 * n), lnc_b(13 * n), width(14 * n) {}
  };
  CellSums main_cell, hyper_cell;
  int64_t main, hyper, scale, width;
  HF_HD explicit AccumLayout(const Dims& d)
      : main_cell(d.H), hyper_cell(d.Hh), main(0), hyper(main_cell.width), scale(hyper + hyper_cell.width),
        width(scale + 12 * d.Nz * d.H) {}
};

// Parameters the step kernels read (views of the op's inputs; contiguous).
struct StepParams {
  const void *bias;               // (4H)       b_0
  const void *z_weight, *z_bias;  // (8Nz, Hh), (8Nz)
  const void *bias_z_weight;      // (4Nz, Hh)
  const void *scale_weight;       // (2, 4H, Nz)
  const void *bias_scale_weight;  // (4H, Nz)
  const void *ln_weight, *ln_bias, *ln_cell_weight, *ln_cell_bias;
  const void *hyper_ln_weight, *hyper_ln_bias, *hyper_ln_cell_weight, *hyper_ln_cell_bias;
  // Transposed copies made once per call, so that the CPU's inner loops run along contiguous memory:
  const void* z_weight_t;      // (Hh, 12Nz)      [z_weight ; bias_z_weight]^T
  const void* scale_weight_t;  // (3, 4, Nz, H)   W_kz^y transposed, kinds (h, x, b)
};

// What one launch of a step kernel does. Whole: everything for its rows (one pass per row). The GEMM-shaped
// step splits it around GEMMs that read each projection weight once per step instead of once per row.
// Forward: Hyper (the hyper cell: ĥ_t, ĉ_t and their workspace slots), then z = [z_bias;0] + ĥ_t Zᵀ
// (B × Ĥ × 12N_z) and the 12 scaling vectors d (a batched B × N_z × H GEMM) in the driver, then Main (the
// row scaling with the given d, the per-gate LN and the cell update). Backward: Main (the main cell's
// backward, dg = da ⊙ d_h with d_h given, and dd = [da ⊙ W_h h | da ⊙ W_x x | da] out), then dz = dd·W_z
// (batched) and dĥ += dz·Z in the driver, then Hyper (the hyper cell's backward). The backward's
// weight-gradient sums are then left to the post-loop reductions (no accum).
enum class StepPhase { Whole, Hyper, Main };

struct ForwardStep {
  Dims dims;
  ScalarKind kind;
  bool layer_norm;
  double forget_bias;
  StepParams p;
  const void* g;        // (B, 4H+4Hh)  [W_h h_{t-1} | Ŵ_x[:, X:] h_{t-1}]
  const void* ghh;      // (B, 4Hh)     Ŵ_h ĥ_{t-1}
  const void* gx;       // (B, 4H)      W_x x_t
  const void* ghx;      // (B, 4Hh)     Ŵ_x[:, :X] x_t + b̂
  const void* c_prev;   // (B, H)
  const void* hc_prev;  // (B, Hh)
  const void* mask;     // (B, H) or null: recurrent-dropout multiplier on φ(g)
  const void* hmask;    // (B, Hh) or null
  const void* zmask;    // (B, H) or null: zoneout on h, 1 = take the new value (h = h_prev + zm ⊙ (h̃ - h_prev))
  const void* hzmask;   // (B, Hh) or null: zoneout on ĥ (the embeddings read the zoned ĥ_t)
  const void* h_prev;   // (B, H)  read only with zmask
  const void* hh_prev;  // (B, Hh) read only with hzmask
  void *h, *c, *hh, *hc;  // (B, ·) outputs of this step
  void* ws;               // (B, WsLayout.width)
  void* stream;           // cudaStream_t on CUDA, unused on CPU
  StepPhase phase = StepPhase::Whole;
  const void* scale = nullptr;  // Main: (12, B, H) d for (kind h/x/b, gate i/f/g/o), kind-major
  int thread_groups = 0;        // CUDA: thread groups per block (1 or 4), or 0: the launch decides
  int cluster = 0;              // CUDA sm_90+: blocks per row (1, 2, 4 or 8), or 0: the launch decides
};

struct BackwardStep {
  Dims dims;
  ScalarKind kind;
  bool layer_norm;
  double forget_bias;
  StepParams p;
  const void* g;        // saved (B, 4H+4Hh) of this step
  const void* gx;       // (B, 4H)  recomputed W_x x_t
  const void* c;        // (B, H)   c_t
  const void* c_prev;   // (B, H)
  const void* hc;       // (B, Hh)  ĉ_t
  const void* hc_prev;  // (B, Hh)
  const void* ws;       // saved forward workspace of this step
  const void* mask;     // or null
  const void* hmask;    // or null
  const void* zmask;    // or null (see ForwardStep)
  const void* hzmask;   // or null
  const void* dh_out;   // (B, H)  grad of h_t from the op's output, or null
  const void* dh_rec;   // (B, H)  grad of h_t through step t+1, or null
  const void* dc_out;   // (B, H)  or null
  const void* dhh_out;  // (B, Hh) or null
  const void* dhh_rec;  // (B, Hh) or null
  const void* dhc_out;  // (B, Hh) or null
  void* dc_carry;       // (B, H)  in: grad of c_t through step t+1; out: grad of c_{t-1}
  void* dhc_carry;      // (B, Hh) likewise for ĉ
  void* dh_zone;        // (B, H)  out with zmask: (1 - zm) ⊙ dh_t, the grad h_{t-1} gets past the cell
  void* dhh_zone;       // (B, Hh) out with hzmask: likewise for ĥ_{t-1}
  void* dg;             // (B, 4H+4Hh) out: [grad of W_h h_{t-1} | grad of hyper pre-activation]
  void* dws;            // (B, DwsLayout.width) out; with accum, its da slot holds da ⊙ d_x instead
  void* accum;          // null, or (threads, AccumLayout.width): thread i adds its rows' sums to row i
  void* stream;
  StepPhase phase = StepPhase::Whole;
  const void* scale = nullptr;      // Main: (4, B, H) d_h per gate
  void* dd = nullptr;               // Main, out: (12, B, H) [da ⊙ W_h h | da ⊙ W_x x | da], kind-major
  const void* dhh_extra = nullptr;  // Hyper: (B, Hh) the embeddings' share of dĥ_t, dz·Z
  int thread_groups = 0;            // as in ForwardStep
  int cluster = 0;                  // as in ForwardStep
};

// StepParams' pointers typed as the kernels' T, with the scaling and embedding weights' rows (the CPU and CUDA
// kernels both read the parameters through it).
template <typename T>
struct Ptrs {
  const T *bias, *zw, *zwt, *swt, *zb, *bzw, *sw, *bsw, *lnw, *lnb, *lncw, *lncb, *hlnw, *hlnb, *hlncw, *hlncb;
  HF_HD explicit Ptrs(const StepParams& p)
      : bias(static_cast<const T*>(p.bias)), zw(static_cast<const T*>(p.z_weight)),
        zwt(static_cast<const T*>(p.z_weight_t)), swt(static_cast<const T*>(p.scale_weight_t)),
        zb(static_cast<const T*>(p.z_bias)), bzw(static_cast<const T*>(p.bias_z_weight)),
        sw(static_cast<const T*>(p.scale_weight)), bsw(static_cast<const T*>(p.bias_scale_weight)),
        lnw(static_cast<const T*>(p.ln_weight)), lnb(static_cast<const T*>(p.ln_bias)),
        lncw(static_cast<const T*>(p.ln_cell_weight)), lncb(static_cast<const T*>(p.ln_cell_bias)),
        hlnw(static_cast<const T*>(p.hyper_ln_weight)), hlnb(static_cast<const T*>(p.hyper_ln_bias)),
        hlncw(static_cast<const T*>(p.hyper_ln_cell_weight)), hlncb(static_cast<const T*>(p.hyper_ln_cell_bias)) {}
  HF_HD const T* scale_row(int k, int64_t r, const Dims& d) const {
    return k < 2 ? sw + (k * 4 * d.H + r) * d.Nz : bsw + r * d.Nz;
  }
  HF_HD const T* z_row(int64_t k, const Dims& d) const {
    return k < 8 * d.Nz ? zw + k * d.Hh : bzw + (k - 8 * d.Nz) * d.Hh;
  }
  // d_kind[r] from the transposed scale weights, so that threads with consecutive r read consecutive memory.
  HF_HD T scale(int kind, int64_t r, const T* z, const Dims& d) const {
    const int64_t y = r / d.H, h = r % d.H, q0 = (kind * 4 + y) * d.Nz;
    T acc = 0;
    for (int64_t m = 0; m < d.Nz; ++m) acc += swt[(q0 + m) * d.H + h] * z[q0 + m];
    return acc;
  }
};

// Row b of a (B, width) tensor, or null for an absent optional one.
template <typename T>
HF_HD const T* row_of(const void* base, int64_t b, int64_t width) {
  return base ? static_cast<const T*>(base) + b * width : nullptr;
}

void forward_step_cpu(const ForwardStep& s);
void backward_step_cpu(const BackwardStep& s);
// The CUDA launches return the launch's cudaError_t as an int (0: launched); the registration code checks
// it, so that this header and the .cu stay free of CUDA and torch headers respectively.
int forward_step_cuda(const ForwardStep& s);
int backward_step_cuda(const BackwardStep& s);
// The current device's multiprocessor count and whether the step launches give a row a cluster there
// (simt::clusters_runnable), as the launches see them: for the tests and the GPU timings' records.
void cuda_step_device(int* multiprocessors, bool* clusters);
// The CUDA kernels' code run on the CPU by the SIMT emulator (cpu/simt_emulator.cpp), for the tests: active
// when HYPERFUSED_EMULATE_CUDA is set (emulating_cuda() also checks its value).
bool emulating_cuda();
void forward_step_emulated(const ForwardStep& s);
void backward_step_emulated(const BackwardStep& s);

// Pointwise math shared by the CPU and CUDA kernels.
template <typename T>
HF_HD T sigmoid_(T x) {
#if defined(__CUDA_ARCH__)
  return T(1) / (T(1) + exp(-x));
#else
  return T(1) / (T(1) + std::exp(-x));
#endif
}

// The LSTM cell, one unit, written once for the CPU and CUDA kernels. `A` supplies the activations (A::sig,
// A::tanh: each device has its own fast versions); y = (y_i, y_f, y_g, y_o) are the gate values after the
// layer norm's gain and bias (or the raw pre-activations without LN); `keep` is recurrent dropout's
// multiplier on φ(g).

// LN's epsilon, as in the reference TensorFlow cell (hyperfused/reference/hyper_lstm.py: LN_EPS).
constexpr double kLnEps = 1e-3;

// c_t = σ(y_f + forget_bias) c_{t-1} + σ(y_i) (φ(y_g) · keep)
template <class A, typename T>
HF_HD T cell_state(T yi, T yf, T yg, T keep, T c_prev, T forget_bias) {
  return A::sig(yf + forget_bias) * c_prev + A::sig(yi) * (A::tanh(yg) * keep);
}

// h_t = σ(y_o) φ(c_out), c_out being LN_c(c_t) with its gain and bias, or c_t without LN
template <class A, typename T>
HF_HD T cell_output(T yo, T c_out) {
  return A::sig(yo) * A::tanh(c_out);
}

// Reverse of cell_output: the grads of y_o and of c_out from dh.
template <class A, typename T>
HF_HD void cell_output_backward(T dh, T yo, T c_out, T* dyo, T* dc_out) {
  const T tc = A::tanh(c_out), so = A::sig(yo);
  *dyo = dh * tc * so * (T(1) - so);
  *dc_out = dh * so * (T(1) - tc * tc);
}

// Reverse of cell_state: from dc, the whole grad of c_t, the grads of y_i, y_f, y_g; returns that of c_{t-1}.
template <class A, typename T>
HF_HD T cell_state_backward(T dc, T yi, T yf, T yg, T keep, T c_prev, T forget_bias, T* dyi, T* dyf, T* dyg) {
  const T si = A::sig(yi), sf = A::sig(yf + forget_bias), tg = A::tanh(yg);
  *dyi = dc * tg * keep * si * (T(1) - si);
  *dyf = dc * c_prev * sf * (T(1) - sf);
  *dyg = dc * si * keep * (T(1) - tg * tg);
  return dc * sf;
}

// Layer norm's backward, one element: the grad of its input from dout (the grad of gain·x̂ + bias), given the
// row's means of dout·gain (mean_d) and of dout·gain·x̂ (mean_dx) and the row's 1/sqrt(var + ε).
template <typename T>
HF_HD T layer_norm_backward_at(T dout, T gain, T xhat, T rstd, T mean_d, T mean_dx) {
  return rstd * (dout * gain - mean_d - xhat * mean_dx);
}

// Zoneout, one unit: the new value where keep_new = 1, the previous where 0 (or the expectation at eval).
template <typename T>
HF_HD T zoneout_(T new_value, T prev, T keep_new) {
  return prev + keep_new * (new_value - prev);
}

// Zoneout's backward, one unit: dh_t splits into the cell's share (returned) and the share that passes
// straight to h_{t-1} (stored in *zone).
template <typename T>
HF_HD T zoneout_backward_(T dh, T keep_new, T* zone) {
  *zone = (T(1) - keep_new) * dh;
  return keep_new * dh;
}

}  // namespace hyperfused
