// Fused per-step HyperLSTM kernels for the CPU: one pass per batch row does the hyper LN-LSTM cell, the 12
// embeddings, the 12 scaling vectors, the row scaling, the main per-gate LN and the cell update (forward),
// or all of that in reverse (backward). Rows are independent, so at::parallel_for splits the batch.
//
// Every inner loop runs along contiguous memory with no calls, so the compiler vectorises it: the
// Ĥ→N_z and N_z→H projections sum rows of transposed weights in registers (add_weighted_rows), and
// float32 sigmoid/tanh use an inline exp (Cephes' polynomial, relative error ~2e-7) instead of libm.
// float64 keeps libm: it is the precision the tests check gradients in, not a fast path.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "../hyper_lstm_kernels.h"

namespace hyperfused {
namespace {

inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float fx = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(fx + (fx >= 0.0f ? 0.5f : -0.5f));
  const float fn = static_cast<float>(n);
  const float r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigm(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline float tanh_(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }
inline double sigm(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_(double x) { return std::tanh(x); }

// The activations the shared cell math (hyper_lstm_kernels.h) uses here.
struct Act {
  template <typename T>
  static T sig(T x) { return sigm(x); }
  template <typename T>
  static T tanh(T x) { return tanh_(x); }
};

// y[i] += a * x[i]
template <typename T>
inline void axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// out[j] += Σ_m a[m] · w[m·ldw + j] for j < n: rows of w weighted by a, summed kBlock columns at a time in
// registers. (One axpy per row stores and reloads all of `out` for every row; that store was the hot spot.)
template <typename T>
void add_weighted_rows(const T* __restrict a, int64_t rows, const T* __restrict w, int64_t ldw, int64_t n,
                       T* __restrict out) {
  constexpr int64_t kBlock = 64;
  int64_t j0 = 0;
  for (; j0 + kBlock <= n; j0 += kBlock) {
    T acc[kBlock];
    for (int64_t j = 0; j < kBlock; ++j) acc[j] = out[j0 + j];
    for (int64_t m = 0; m < rows; ++m) {
      const T am = a[m];
      const T* __restrict wr = w + m * ldw + j0;
      for (int64_t j = 0; j < kBlock; ++j) acc[j] += am * wr[j];
    }
    for (int64_t j = 0; j < kBlock; ++j) out[j0 + j] = acc[j];
  }
  for (int64_t m = 0; m < rows && j0 < n; ++m) axpy(out + j0, a[m], w + m * ldw + j0, n - j0);
}

// `p`, or (for an absent optional input) `n` copies of `value` held in `storage`: keeps branches out of
// the loops so that they vectorise.
template <typename T>
const T* or_constant(const T* p, std::vector<T>& storage, T value, int64_t n) {
  if (p) return p;
  storage.assign(n, value);
  return storage.data();
}

// Σ_i f(i) with 16 independent partial sums, so that the compiler vectorises it without reassociating.
template <typename T, typename F>
inline T lane_sum(int64_t n, const F& f) {
  constexpr int kLanes = 16;
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += f(i + l);
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += f(i);
  return s;
}

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  return lane_sum<T>(n, [&](int64_t i) { return a[i] * b[i]; });
}

// Normalises each block of v (size n) in place; stores 1/sqrt(var+eps) per block.
template <typename T>
void normalize_blocks(T* __restrict v, int64_t blocks, int64_t n, T* __restrict rstd) {
  for (int64_t k = 0; k < blocks; ++k) {
    T* x = v + k * n;
    const T mean = lane_sum<T>(n, [&](int64_t j) { return x[j]; }) / T(n);
    const T var = lane_sum<T>(n, [&](int64_t j) { return (x[j] - mean) * (x[j] - mean); }) / T(n);
    const T r = T(1) / std::sqrt(var + T(kLnEps));
    for (int64_t j = 0; j < n; ++j) x[j] = (x[j] - mean) * r;
    rstd[k] = r;
  }
}

// Gradient through one LN block: from dout (grad of gain·x̂ + bias) to the grad of its input.
template <typename T>
void layer_norm_backward(const T* __restrict dout, const T* __restrict xhat, const T* __restrict gain, T rstd,
                         int64_t n, T* __restrict dx) {
  const T mean_d = lane_sum<T>(n, [&](int64_t j) { return dout[j] * gain[j]; }) / T(n);
  const T mean_dx = lane_sum<T>(n, [&](int64_t j) { return dout[j] * gain[j] * xhat[j]; }) / T(n);
  for (int64_t j = 0; j < n; ++j) dx[j] = layer_norm_backward_at(dout[j], gain[j], xhat[j], rstd, mean_d, mean_dx);
}

// Gate values after LN's gain and bias (or the raw pre-activations without LN), 4n of them.
template <typename T>
void apply_affine(const T* __restrict v, const T* __restrict gain, const T* __restrict bias, bool ln, int64_t n,
                  T* __restrict out) {
  if (ln)
    for (int64_t j = 0; j < n; ++j) out[j] = v[j] * gain[j] + bias[j];
  else
    std::copy(v, v + n, out);
}

// c_t and h_t of one cell of width n from its (normalised) gates. Writes cn/crstd when LN is on.
template <typename T>
void cell_forward(const T* gates, const T* g_gain, const T* g_bias, const T* c_gain, const T* c_bias,
                  const T* __restrict c_prev, const T* __restrict mask, T forget_bias, bool ln, int64_t n,
                  T* __restrict c, T* __restrict h, T* __restrict cn, T* crstd, std::vector<T>& y,
                  std::vector<T>& ones, const T* __restrict zoneout = nullptr, const T* __restrict h_prev = nullptr) {
  y.resize(4 * n);
  apply_affine(gates, g_gain, g_bias, ln, 4 * n, y.data());
  const T *yi = y.data(), *yf = yi + n, *yg = yf + n, *yo = yg + n;
  const T* __restrict m = or_constant(mask, ones, T(1), n);
  for (int64_t j = 0; j < n; ++j) c[j] = cell_state<Act>(yi[j], yf[j], yg[j], m[j], c_prev[j], forget_bias);
  const T* cout = c;
  if (ln) {
    std::copy(c, c + n, cn);
    normalize_blocks(cn, 1, n, crstd);
    T* co = y.data();  // yi is no longer needed
    for (int64_t j = 0; j < n; ++j) co[j] = cn[j] * c_gain[j] + c_bias[j];
    cout = co;
  }
  for (int64_t j = 0; j < n; ++j) h[j] = cell_output<Act>(yo[j], cout[j]);
  if (zoneout)
    for (int64_t j = 0; j < n; ++j) h[j] = zoneout_(h[j], h_prev[j], zoneout[j]);
}

// Reverse of cell_forward. Produces dy (grad of the affine gate outputs), da (grad of the gate
// pre-activations) and dcout, and turns dc_carry from the grad of c_t into the grad of c_{t-1}.
template <typename T>
void cell_backward(const T* gates, const T* g_gain, const T* g_bias, const T* c_gain, const T* c_bias,
                   const T* rstd, const T* __restrict cn, T crstd, const T* __restrict c, const T* __restrict c_prev,
                   const T* __restrict mask, T forget_bias, bool ln, int64_t n, const T* __restrict dh_a,
                   const T* __restrict dh_b, const T* __restrict dc_out, T* __restrict dc_carry,
                   T* __restrict dcout, T* __restrict dy, T* __restrict da, std::vector<T>& y, std::vector<T>& tmp,
                   std::vector<T> (&fill)[4], const T* __restrict zoneout = nullptr, T* __restrict dh_zone = nullptr) {
  y.resize(4 * n);
  tmp.resize(n);
  const T* __restrict m = or_constant(mask, fill[0], T(1), n);
  const T* __restrict dha = or_constant(dh_a, fill[1], T(0), n);
  const T* __restrict dhb = or_constant(dh_b, fill[2], T(0), n);
  const T* __restrict dco = or_constant(dc_out, fill[3], T(0), n);
  apply_affine(gates, g_gain, g_bias, ln, 4 * n, y.data());
  const T *yi = y.data(), *yf = yi + n, *yg = yf + n, *yo = yg + n;
  T* co = tmp.data();
  if (ln)
    for (int64_t j = 0; j < n; ++j) co[j] = cn[j] * c_gain[j] + c_bias[j];
  else
    std::copy(c, c + n, co);
  for (int64_t j = 0; j < n; ++j) {
    const T dh = zoneout ? zoneout_backward_(dha[j] + dhb[j], zoneout[j], dh_zone + j) : dha[j] + dhb[j];
    cell_output_backward<Act>(dh, yo[j], co[j], &dy[3 * n + j], &dcout[j]);
  }
  T* dc_ln = tmp.data();
  if (ln)
    layer_norm_backward(dcout, cn, c_gain, crstd, n, dc_ln);
  else
    std::copy(dcout, dcout + n, dc_ln);
  for (int64_t j = 0; j < n; ++j) {
    const T dc = dc_carry[j] + dc_ln[j] + dco[j];
    dc_carry[j] = cell_state_backward<Act>(dc, yi[j], yf[j], yg[j], m[j], c_prev[j], forget_bias, &dy[j],
                                           &dy[n + j], &dy[2 * n + j]);
  }
  for (int64_t k = 0; k < 4; ++k) {
    if (ln)
      layer_norm_backward(dy + k * n, gates + k * n, g_gain + k * n, rstd[k], n, da + k * n);
    else
      std::copy(dy + k * n, dy + (k + 1) * n, da + k * n);
  }
}

template <typename T>
struct Ptrs {
  const T *bias, *zb, *zw, *bzw, *sw, *bsw, *zwt, *swt, *lnw, *lnb, *lncw, *lncb, *hlnw, *hlnb, *hlncw, *hlncb;
  explicit Ptrs(const StepParams& p)
      : bias(cast(p.bias)), zb(cast(p.z_bias)), zw(cast(p.z_weight)), bzw(cast(p.bias_z_weight)),
        sw(cast(p.scale_weight)), bsw(cast(p.bias_scale_weight)), zwt(cast(p.z_weight_t)),
        swt(cast(p.scale_weight_t)), lnw(cast(p.ln_weight)), lnb(cast(p.ln_bias)), lncw(cast(p.ln_cell_weight)),
        lncb(cast(p.ln_cell_bias)), hlnw(cast(p.hyper_ln_weight)), hlnb(cast(p.hyper_ln_bias)),
        hlncw(cast(p.hyper_ln_cell_weight)), hlncb(cast(p.hyper_ln_cell_bias)) {}
  static const T* cast(const void* v) { return static_cast<const T*>(v); }
};

template <typename T>
const T* row_of(const void* base, int64_t b, int64_t width) {
  return base ? static_cast<const T*>(base) + b * width : nullptr;
}

// z = [z_bias ; 0] + [z_weight ; bias_z_weight] ĥ, accumulated along the contiguous rows of the transpose.
template <typename T>
void embeddings(const Ptrs<T>& P, const Dims& d, const T* hh, T* z) {
  const int64_t Z = 12 * d.Nz;
  for (int64_t k = 0; k < Z; ++k) z[k] = k < 8 * d.Nz ? P.zb[k] : T(0);
  add_weighted_rows(hh, d.Hh, P.zwt, Z, Z, z);
}

// scale[k·4H + r] = d_k[r] = Σ_n W_kz^y[r, n] z_k^y[n] for the three kinds k.
template <typename T>
void scaling_vectors(const Ptrs<T>& P, const Dims& d, const T* z, int kinds, T* scale) {
  const int64_t H = d.H, Nz = d.Nz;
  std::fill(scale, scale + kinds * 4 * H, T(0));
  for (int64_t q = 0; q < kinds * 4; ++q) add_weighted_rows(z + q * Nz, Nz, P.swt + q * Nz * H, H, H, scale + q * H);
}

template <typename T>
void forward_rows(const ForwardStep& s) {
  const Dims& d = s.dims;
  const WsLayout L(d);
  const Ptrs<T> P(s.p);
  const int64_t H = d.H, Hh = d.Hh, GW = d.g_width();
  const T fb = T(s.forget_bias);
  const bool hyper = s.phase != StepPhase::Main, main = s.phase != StepPhase::Hyper;
  at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> scale(12 * H), y, ones;
    for (int64_t b = b0; b < b1; ++b) {
      const T* g = row_of<T>(s.g, b, GW);
      T* ws = static_cast<T*>(s.ws) + b * L.width;
      T* hh = static_cast<T*>(s.hh) + b * Hh;
      if (hyper) {  // Hyper LN-LSTM on [x_t ; h_{t-1}].
        T* __restrict hn = ws + L.hn;
        const T* __restrict ghh = row_of<T>(s.ghh, b, 4 * Hh);
        const T* __restrict ghx = row_of<T>(s.ghx, b, 4 * Hh);
        const T* __restrict gh = g + 4 * H;
        for (int64_t j = 0; j < 4 * Hh; ++j) hn[j] = ghx[j] + gh[j] + ghh[j];
        if (s.layer_norm) normalize_blocks(hn, 4, Hh, ws + L.hrstd);
        cell_forward(hn, P.hlnw, P.hlnb, P.hlncw, P.hlncb, row_of<T>(s.hc_prev, b, Hh), row_of<T>(s.hmask, b, Hh),
                     fb, s.layer_norm, Hh, static_cast<T*>(s.hc) + b * Hh, hh, ws + L.hcn, ws + L.hcrstd, y, ones,
                     row_of<T>(s.hzmask, b, Hh), row_of<T>(s.hh_prev, b, Hh));
      }
      if (!main) continue;
      // The scaling vectors d_h, d_x, d_b of this row, gate y at dk[kind] + y·gate: computed here from the
      // embeddings of the updated ĥ_t, or given as (12, B, H) by the GEMM-shaped step.
      std::array<const T*, 3> dk{};
      int64_t gate = H;
      if (s.phase == StepPhase::Whole) {
        T* z = ws + L.z;
        embeddings(P, d, hh, z);
        scaling_vectors(P, d, z, 3, scale.data());
        for (int k = 0; k < 3; ++k) dk[k] = scale.data() + k * 4 * H;
      } else {
        gate = d.B * H;
        for (int k = 0; k < 3; ++k) dk[k] = static_cast<const T*>(s.scale) + k * 4 * gate + b * H;
      }
      // Row-scaled pre-activation d_h ⊙ (W_h h) + d_x ⊙ (W_x x) + b_0 + d_b.
      T* __restrict n = ws + L.n;
      const T* __restrict gx = row_of<T>(s.gx, b, 4 * H);
      for (int64_t y4 = 0; y4 < 4; ++y4) {
        const T *__restrict dh = dk[0] + y4 * gate, *__restrict dx = dk[1] + y4 * gate,
                *__restrict db = dk[2] + y4 * gate;
        const int64_t o = y4 * H;
        for (int64_t r = 0; r < H; ++r) n[o + r] = dh[r] * g[o + r] + dx[r] * gx[o + r] + P.bias[o + r] + db[r];
      }
      if (s.layer_norm) normalize_blocks(n, 4, H, ws + L.rstd);
      cell_forward(n, P.lnw, P.lnb, P.lncw, P.lncb, row_of<T>(s.c_prev, b, H), row_of<T>(s.mask, b, H), fb,
                   s.layer_norm, H, static_cast<T*>(s.c) + b * H, static_cast<T*>(s.h) + b * H, ws + L.cn,
                   ws + L.crstd, y, ones, row_of<T>(s.zmask, b, H), row_of<T>(s.h_prev, b, H));
      if (!s.layer_norm)
        for (int64_t i = 0; i < L.ln_only_count(d); ++i) ws[L.ln_only_slot(d, i)] = T(0);
    }
  });
}

template <typename T>
void backward_rows(const BackwardStep& s) {
  const Dims& d = s.dims;
  const WsLayout L(d);
  const DwsLayout D(d, /*main_ln_rows=*/s.accum == nullptr);
  const Ptrs<T> P(s.p);
  const int64_t H = d.H, Hh = d.Hh, Nz = d.Nz, GW = d.g_width();
  const T fb = T(s.forget_bias);
  const AccumLayout A(d);
  const bool hyper = s.phase != StepPhase::Main, main = s.phase != StepPhase::Hyper;
  at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> y, tmp, dhh(Hh), scale(8 * H), dd(8 * H), fill[4], dy_row, dco_row;
    T* acc = s.accum ? static_cast<T*>(s.accum) + at::get_thread_num() * A.width : nullptr;
    if (acc) {  // dy and dcout only feed this row's sums: scratch, not workspace rows
      dy_row.resize(4 * H);
      dco_row.resize(H);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const T* __restrict g = row_of<T>(s.g, b, GW);
      const T* __restrict gx = row_of<T>(s.gx, b, 4 * H);
      const T* ws = row_of<T>(s.ws, b, L.width);
      T* dws = static_cast<T*>(s.dws) + b * D.width;
      T* __restrict dg = static_cast<T*>(s.dg) + b * GW;
      T* __restrict da = dws + D.da;
      T* dy = acc ? dy_row.data() : dws + D.dy;
      T* dco = acc ? dco_row.data() : dws + D.dcout;
      T* dz = dws + D.dz;
      if (main) {
        cell_backward(ws + L.n, P.lnw, P.lnb, P.lncw, P.lncb, ws + L.rstd, ws + L.cn, ws[L.crstd],
                      row_of<T>(s.c, b, H), row_of<T>(s.c_prev, b, H), row_of<T>(s.mask, b, H), fb, s.layer_norm, H,
                      row_of<T>(s.dh_out, b, H), row_of<T>(s.dh_rec, b, H), row_of<T>(s.dc_out, b, H),
                      static_cast<T*>(s.dc_carry) + b * H, dco, dy, da, y, tmp, fill, row_of<T>(s.zmask, b, H),
                      s.dh_zone ? static_cast<T*>(s.dh_zone) + b * H : nullptr);
      }
      if (s.phase == StepPhase::Main) {
        // GEMM-shaped: dg = da ⊙ d_h with d_h given (4, B, H); dd = [da ⊙ W_h h | da ⊙ W_x x | da] out for the
        // driver's dz GEMM, (12, B, H).
        const T* dh_given = static_cast<const T*>(s.scale) + b * H;
        T* dd_out = static_cast<T*>(s.dd) + b * H;
        for (int64_t y4 = 0; y4 < 4; ++y4) {
          const int64_t o = y4 * H, gate = y4 * d.B * H, kind = 4 * d.B * H;
          for (int64_t r = 0; r < H; ++r) {
            dg[o + r] = da[o + r] * dh_given[gate + r];
            dd_out[gate + r] = da[o + r] * g[o + r];
            dd_out[kind + gate + r] = da[o + r] * gx[o + r];
            dd_out[2 * kind + gate + r] = da[o + r];
          }
        }
        continue;
      }
      if (main) {
        // Through the row scaling into W_h h_{t-1} ...
        const T* z = ws + L.z;
        scaling_vectors(P, d, z, acc ? 2 : 1, scale.data());
        for (int64_t r = 0; r < 4 * H; ++r) dg[r] = da[r] * scale[r];
        // ... and into the embeddings: dz[k, y, m] = Σ_r dd_k[yH + r] · W_kz^y[r, m], one dot product along
        // the contiguous rows of the transposed weights per entry (dd_h = da ⊙ W_h h, dd_x = da ⊙ W_x x,
        // dd_b = da).
        for (int64_t r = 0; r < 4 * H; ++r) {
          dd[r] = da[r] * g[r];
          dd[4 * H + r] = da[r] * gx[r];
        }
        // With acc, the same dd_k^y also give this row's share of the scaling-weight gradients,
        // Σ_rows z_k^y[m] · dd_k^y, added while they are in cache.
        for (int k = 0; k < 3; ++k) {
          const T* ddk = k < 2 ? dd.data() + k * 4 * H : da;
          for (int64_t y4 = 0; y4 < 4; ++y4)
            for (int64_t m = 0; m < Nz; ++m) {
              const int64_t q = (k * 4 + y4) * Nz + m;
              dz[q] = dot(ddk + y4 * H, P.swt + q * H, H);
              if (acc) axpy(acc + A.scale + q * H, z[q], ddk + y4 * H, H);
            }
        }
        if (acc) {
          // The rest of this row's share of the row-reduced gradients (biases, main LN); then da's slot takes
          // da ⊙ d_x, the grad of W_x x_t that the post-loop GEMMs want.
          const T *__restrict n = ws + L.n, *__restrict cn = ws + L.cn;
          for (int64_t r = 0; r < 4 * H; ++r) acc[A.bias + r] += da[r];
          if (s.layer_norm) {
            for (int64_t r = 0; r < 4 * H; ++r) {
              acc[A.ln_w + r] += dy[r] * n[r];
              acc[A.ln_b + r] += dy[r];
            }
            for (int64_t j = 0; j < H; ++j) {
              acc[A.lnc_w + j] += dco[j] * cn[j];
              acc[A.lnc_b + j] += dco[j];
            }
          }
          const T* __restrict sx = scale.data() + 4 * H;
          for (int64_t r = 0; r < 4 * H; ++r) da[r] *= sx[r];
        }
      }
      if (!hyper) continue;
      // ĥ_t gets the embeddings' gradient (dz·Z, here or given) on top of what flows in from outside and from
      // step t+1.
      const T* dhh_out = row_of<T>(s.dhh_out, b, Hh);
      const T* dhh_rec = row_of<T>(s.dhh_rec, b, Hh);
      const T* extra = row_of<T>(s.dhh_extra, b, Hh);
      for (int64_t j = 0; j < Hh; ++j)
        dhh[j] = (dhh_out ? dhh_out[j] : T(0)) + (dhh_rec ? dhh_rec[j] : T(0)) + (extra ? extra[j] : T(0));
      if (s.phase == StepPhase::Whole) {
        add_weighted_rows(dz, 8 * Nz, P.zw, Hh, Hh, dhh.data());
        add_weighted_rows(dz + 8 * Nz, 4 * Nz, P.bzw, Hh, Hh, dhh.data());
      }
      cell_backward(ws + L.hn, P.hlnw, P.hlnb, P.hlncw, P.hlncb, ws + L.hrstd, ws + L.hcn, ws[L.hcrstd],
                    row_of<T>(s.hc, b, Hh), row_of<T>(s.hc_prev, b, Hh), row_of<T>(s.hmask, b, Hh), fb, s.layer_norm,
                    Hh, static_cast<const T*>(dhh.data()), static_cast<const T*>(nullptr), row_of<T>(s.dhc_out, b, Hh),
                    static_cast<T*>(s.dhc_carry) + b * Hh, dws + D.dhcout, dws + D.dyh, dg + 4 * H, y, tmp, fill,
                    row_of<T>(s.hzmask, b, Hh), s.dhh_zone ? static_cast<T*>(s.dhh_zone) + b * Hh : nullptr);
    }
  });
}

}  // namespace

void forward_step_cpu(const ForwardStep& s) {
  if (s.kind == ScalarKind::Float64)
    forward_rows<double>(s);
  else
    forward_rows<float>(s);
}

void backward_step_cpu(const BackwardStep& s) {
  if (s.kind == ScalarKind::Float64)
    backward_rows<double>(s);
  else
    backward_rows<float>(s);
}

}  // namespace hyperfused
