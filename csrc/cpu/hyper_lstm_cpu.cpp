// Fused per-step HyperLSTM kernels for the CPU: one pass per batch row does the hyper LN-LSTM cell, the 12
// embeddings, the 12 scaling vectors, the row scaling, the main per-gate LN and the cell update (forward),
// or all of that in reverse (backward). Rows are independent, so at::parallel_for splits the batch.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../hyper_lstm_kernels.h"

namespace hyperfused {
namespace {

constexpr double kLnEps = 1e-3;

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Normalises each of the 4 gate blocks of v (size n) in place; stores 1/sqrt(var+eps) per gate.
template <typename T>
void normalize_blocks(T* v, int64_t blocks, int64_t n, T* rstd) {
  for (int64_t k = 0; k < blocks; ++k) {
    T* x = v + k * n;
    T mean = 0;
    for (int64_t j = 0; j < n; ++j) mean += x[j];
    mean /= T(n);
    T var = 0;
    for (int64_t j = 0; j < n; ++j) var += (x[j] - mean) * (x[j] - mean);
    var /= T(n);
    const T r = T(1) / std::sqrt(var + T(kLnEps));
    for (int64_t j = 0; j < n; ++j) x[j] = (x[j] - mean) * r;
    rstd[k] = r;
  }
}

// Gradient through one LN block: from dout (grad of gain·x̂ + bias) to the grad of its input.
template <typename T>
void layer_norm_backward(const T* dout, const T* xhat, const T* gain, T rstd, int64_t n, T* dx) {
  T mean_d = 0, mean_dx = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T d = dout[j] * gain[j];
    mean_d += d;
    mean_dx += d * xhat[j];
  }
  mean_d /= T(n);
  mean_dx /= T(n);
  for (int64_t j = 0; j < n; ++j) dx[j] = rstd * (dout[j] * gain[j] - mean_d - xhat[j] * mean_dx);
}

template <typename T>
T affine(const T* v, const T* gain, const T* bias, int64_t j, bool ln) {
  return ln ? v[j] * gain[j] + bias[j] : v[j];
}

// c_t and h_t from the (normalised) gates of one cell of width n. Writes cn/crstd when LN is on.
template <typename T>
void cell_forward(const T* gates, const T* g_gain, const T* g_bias, const T* c_gain, const T* c_bias,
                  const T* c_prev, const T* mask, T forget_bias, bool ln, int64_t n, T* c, T* h, T* cn, T* crstd) {
  for (int64_t j = 0; j < n; ++j) {
    const T i = affine(gates, g_gain, g_bias, j, ln);
    const T f = affine(gates, g_gain, g_bias, n + j, ln);
    const T g = affine(gates, g_gain, g_bias, 2 * n + j, ln);
    T ga = std::tanh(g);
    if (mask) ga *= mask[j];
    c[j] = sigmoid_(f + forget_bias) * c_prev[j] + sigmoid_(i) * ga;
  }
  const T* cout = c;
  if (ln) {
    for (int64_t j = 0; j < n; ++j) cn[j] = c[j];
    normalize_blocks(cn, 1, n, crstd);
    cout = cn;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T o = affine(gates, g_gain, g_bias, 3 * n + j, ln);
    const T co = ln ? cout[j] * c_gain[j] + c_bias[j] : cout[j];
    h[j] = sigmoid_(o) * std::tanh(co);
  }
}

// Reverse of cell_forward for one row. Produces dy (grad of the affine gate outputs) and da (grad of the
// gate pre-activations), dcout, and updates dc_carry from grad-of-c_t to grad-of-c_{t-1}.
template <typename T>
void cell_backward(const T* gates, const T* g_gain, const T* g_bias, const T* c_gain, const T* c_bias,
                   const T* rstd, const T* cn, T crstd, const T* c, const T* c_prev, const T* mask, T forget_bias,
                   bool ln, int64_t n, const T* dh_a, const T* dh_b, const T* dc_out, T* dc_carry, T* dcout,
                   T* dy, T* da, std::vector<T>& tmp) {
  tmp.resize(n);
  for (int64_t j = 0; j < n; ++j) {
    const T dh = (dh_a ? dh_a[j] : T(0)) + (dh_b ? dh_b[j] : T(0));
    const T co = ln ? cn[j] * c_gain[j] + c_bias[j] : c[j];
    const T tc = std::tanh(co);
    const T so = sigmoid_(affine(gates, g_gain, g_bias, 3 * n + j, ln));
    dy[3 * n + j] = dh * tc * so * (T(1) - so);
    dcout[j] = dh * so * (T(1) - tc * tc);
  }
  const T* dc_ln = dcout;
  if (ln) {
    layer_norm_backward(dcout, cn, c_gain, crstd, n, tmp.data());
    dc_ln = tmp.data();
  }
  for (int64_t j = 0; j < n; ++j) {
    const T dc = dc_carry[j] + dc_ln[j] + (dc_out ? dc_out[j] : T(0));
    const T si = sigmoid_(affine(gates, g_gain, g_bias, j, ln));
    const T sf = sigmoid_(affine(gates, g_gain, g_bias, n + j, ln) + forget_bias);
    const T tg = std::tanh(affine(gates, g_gain, g_bias, 2 * n + j, ln));
    const T m = mask ? mask[j] : T(1);
    dy[j] = dc * tg * m * si * (T(1) - si);
    dy[n + j] = dc * c_prev[j] * sf * (T(1) - sf);
    dy[2 * n + j] = dc * si * m * (T(1) - tg * tg);
    dc_carry[j] = dc * sf;
  }
  for (int64_t k = 0; k < 4; ++k) {
    if (ln)
      layer_norm_backward(dy + k * n, gates + k * n, g_gain + k * n, rstd[k], n, da + k * n);
    else
      for (int64_t j = 0; j < n; ++j) da[k * n + j] = dy[k * n + j];
  }
}

template <typename T>
struct Ptrs {
  const T *bias, *zw, *zb, *bzw, *sw, *bsw, *lnw, *lnb, *lncw, *lncb, *hlnw, *hlnb, *hlncw, *hlncb;
  explicit Ptrs(const StepParams& p)
      : bias(static_cast<const T*>(p.bias)), zw(static_cast<const T*>(p.z_weight)),
        zb(static_cast<const T*>(p.z_bias)), bzw(static_cast<const T*>(p.bias_z_weight)),
        sw(static_cast<const T*>(p.scale_weight)), bsw(static_cast<const T*>(p.bias_scale_weight)),
        lnw(static_cast<const T*>(p.ln_weight)), lnb(static_cast<const T*>(p.ln_bias)),
        lncw(static_cast<const T*>(p.ln_cell_weight)), lncb(static_cast<const T*>(p.ln_cell_bias)),
        hlnw(static_cast<const T*>(p.hyper_ln_weight)), hlnb(static_cast<const T*>(p.hyper_ln_bias)),
        hlncw(static_cast<const T*>(p.hyper_ln_cell_weight)), hlncb(static_cast<const T*>(p.hyper_ln_cell_bias)) {}
  // Row r of W_kz (k = 0: h, 1: x, 2: b), length Nz.
  const T* scale_row(int k, int64_t r, const Dims& d) const {
    return k < 2 ? sw + (k * 4 * d.H + r) * d.Nz : bsw + r * d.Nz;
  }
  // Row k of the stacked embedding projection [z_weight ; bias_z_weight], length Hh.
  const T* z_row(int64_t k, const Dims& d) const { return k < 8 * d.Nz ? zw + k * d.Hh : bzw + (k - 8 * d.Nz) * d.Hh; }
};

template <typename T>
const T* row_of(const void* base, int64_t b, int64_t width) {
  return base ? static_cast<const T*>(base) + b * width : nullptr;
}

template <typename T>
void forward_rows(const ForwardStep& s) {
  const Dims& d = s.dims;
  const WsLayout L(d);
  const Ptrs<T> P(s.p);
  const int64_t H = d.H, Hh = d.Hh, Nz = d.Nz, GW = d.g_width();
  const T fb = T(s.forget_bias);
  at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* g = row_of<T>(s.g, b, GW);
      T* ws = static_cast<T*>(s.ws) + b * L.width;
      T* hh = static_cast<T*>(s.hh) + b * Hh;
      // Hyper LN-LSTM on [x_t ; h_{t-1}].
      T* hn = ws + L.hn;
      const T* ghh = row_of<T>(s.ghh, b, 4 * Hh);
      const T* ghx = row_of<T>(s.ghx, b, 4 * Hh);
      for (int64_t j = 0; j < 4 * Hh; ++j) hn[j] = ghx[j] + g[4 * H + j] + ghh[j];
      if (s.layer_norm) normalize_blocks(hn, 4, Hh, ws + L.hrstd);
      cell_forward(hn, P.hlnw, P.hlnb, P.hlncw, P.hlncb, row_of<T>(s.hc_prev, b, Hh), row_of<T>(s.hmask, b, Hh), fb,
                   s.layer_norm, Hh, static_cast<T*>(s.hc) + b * Hh, hh, ws + L.hcn, ws + L.hcrstd);
      // Embeddings z from the updated ĥ_t.
      T* z = ws + L.z;
      for (int64_t k = 0; k < 12 * Nz; ++k) z[k] = (k < 8 * Nz ? P.zb[k] : T(0)) + dot(P.z_row(k, d), hh, Hh);
      // Row-scaled pre-activation d_h ⊙ (W_h h) + d_x ⊙ (W_x x) + b_0 + d_b.
      T* n = ws + L.n;
      const T* gx = row_of<T>(s.gx, b, 4 * H);
      for (int64_t r = 0; r < 4 * H; ++r) {
        const int64_t y = r / H;
        const T dh = dot(P.scale_row(0, r, d), z + y * Nz, Nz);
        const T dx = dot(P.scale_row(1, r, d), z + (4 + y) * Nz, Nz);
        const T db = dot(P.scale_row(2, r, d), z + (8 + y) * Nz, Nz);
        n[r] = dh * g[r] + dx * gx[r] + P.bias[r] + db;
      }
      if (s.layer_norm) normalize_blocks(n, 4, H, ws + L.rstd);
      cell_forward(n, P.lnw, P.lnb, P.lncw, P.lncb, row_of<T>(s.c_prev, b, H), row_of<T>(s.mask, b, H), fb,
                   s.layer_norm, H, static_cast<T*>(s.c) + b * H, static_cast<T*>(s.h) + b * H, ws + L.cn,
                   ws + L.crstd);
    }
  });
}

template <typename T>
void backward_rows(const BackwardStep& s) {
  const Dims& d = s.dims;
  const WsLayout L(d);
  const DwsLayout D(d);
  const Ptrs<T> P(s.p);
  const int64_t H = d.H, Hh = d.Hh, Nz = d.Nz, GW = d.g_width();
  const T fb = T(s.forget_bias);
  at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> tmp, dhh(Hh);
    for (int64_t b = b0; b < b1; ++b) {
      const T* g = row_of<T>(s.g, b, GW);
      const T* gx = row_of<T>(s.gx, b, 4 * H);
      const T* ws = row_of<T>(s.ws, b, L.width);
      T* dws = static_cast<T*>(s.dws) + b * D.width;
      T* dg = static_cast<T*>(s.dg) + b * GW;
      T* da = dws + D.da;
      // Main cell.
      cell_backward(ws + L.n, P.lnw, P.lnb, P.lncw, P.lncb, ws + L.rstd, ws + L.cn, ws[L.crstd], row_of<T>(s.c, b, H),
                    row_of<T>(s.c_prev, b, H), row_of<T>(s.mask, b, H), fb, s.layer_norm, H,
                    row_of<T>(s.dh_out, b, H), row_of<T>(s.dh_rec, b, H), row_of<T>(s.dc_out, b, H),
                    static_cast<T*>(s.dc_carry) + b * H, dws + D.dcout, dws + D.dy, da, tmp);
      // Through the row scaling into W_h h, and into the scaling vectors' embeddings.
      const T* z = ws + L.z;
      T* dz = dws + D.dz;
      for (int64_t k = 0; k < 12 * Nz; ++k) dz[k] = 0;
      for (int64_t r = 0; r < 4 * H; ++r) {
        const int64_t y = r / H;
        const T* wh = P.scale_row(0, r, d);
        const T* wx = P.scale_row(1, r, d);
        const T* wb = P.scale_row(2, r, d);
        dg[r] = da[r] * dot(wh, z + y * Nz, Nz);
        const T ddh = da[r] * g[r], ddx = da[r] * gx[r], ddb = da[r];
        for (int64_t m = 0; m < Nz; ++m) {
          dz[y * Nz + m] += ddh * wh[m];
          dz[(4 + y) * Nz + m] += ddx * wx[m];
          dz[(8 + y) * Nz + m] += ddb * wb[m];
        }
      }
      // ĥ_t receives the embeddings' gradient on top of what flows in from outside and from step t+1.
      const T* dhh_out = row_of<T>(s.dhh_out, b, Hh);
      const T* dhh_rec = row_of<T>(s.dhh_rec, b, Hh);
      for (int64_t j = 0; j < Hh; ++j) dhh[j] = (dhh_out ? dhh_out[j] : T(0)) + (dhh_rec ? dhh_rec[j] : T(0));
      for (int64_t k = 0; k < 12 * Nz; ++k) {
        const T* zr = P.z_row(k, d);
        for (int64_t j = 0; j < Hh; ++j) dhh[j] += dz[k] * zr[j];
      }
      cell_backward(ws + L.hn, P.hlnw, P.hlnb, P.hlncw, P.hlncb, ws + L.hrstd, ws + L.hcn, ws[L.hcrstd],
                    row_of<T>(s.hc, b, Hh), row_of<T>(s.hc_prev, b, Hh), row_of<T>(s.hmask, b, Hh), fb, s.layer_norm,
                    Hh, dhh.data(), static_cast<const T*>(nullptr), row_of<T>(s.dhc_out, b, Hh), static_cast<T*>(s.dhc_carry) + b * Hh,
                    dws + D.dhcout, dws + D.dyh, dg + 4 * H, tmp);
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
