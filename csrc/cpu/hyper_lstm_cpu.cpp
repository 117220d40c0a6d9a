// Fused per-step HyperLSTM kernels for the CPU: one pass per batch row does the hyper LN-LSTM cell, the 12
// embeddings, the 12 scaling vectors, the row scaling, the main per-gate LN and the cell update (forward),
// or all of that in reverse (backward). Rows are independent, so at::parallel_for splits the batch.
//
// Every inner loop runs along contiguous memory with no calls, so the compiler vectorises it: the
// Ĥ→N_z and N_z→H projections (and their backward) are small GEMMs over a chunk of rows with register tiles
// (add_products), so each thread reads each weight once per tile of rows, and
// float32 sigmoid/tanh use an inline exp (Cephes' polynomial, relative error ~2e-7) instead of libm.
// float64 keeps libm: it is the precision the tests check gradients in, not a fast path.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
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

// The projections of a block of rows, as small GEMMs whose register tile is (rows × columns): each weight row
// is read once for up to kTileRows batch rows instead of once per row (which made the step kernels stream
// all 12 projections from cache for every row), and the tile is kAccumulators vector registers, enough
// independent sums to hide the FMA latency, few enough not to spill. The vector width is the build machine's.
#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int64_t kVectorBytes = 32;
#else
constexpr int64_t kVectorBytes = 16;
#endif
constexpr int kTileRows = 6, kAccumulators = 8;

// The values of T in one vector register.
template <typename T>
constexpr int64_t lanes() {
  return kVectorBytes / int64_t(sizeof(T));
}

// The columns of one tile of R rows, a whole number of vectors.
template <typename T, int R>
constexpr int64_t tile_cols() {
  return lanes<T>() * ((kAccumulators + R - 1) / R);
}

// Calls f(std::integral_constant<int, R>) for each tile of up to kTileRows of `rows`, with the tile's first row.
template <typename F>
void for_each_tile(int64_t rows, const F& f) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    switch (std::min<int64_t>(kTileRows, rows - r0)) {
      case 1: f(std::integral_constant<int, 1>(), r0); break;
      case 2: f(std::integral_constant<int, 2>(), r0); break;
      case 3: f(std::integral_constant<int, 3>(), r0); break;
      case 4: f(std::integral_constant<int, 4>(), r0); break;
      case 5: f(std::integral_constant<int, 5>(), r0); break;
      default: f(std::integral_constant<int, 6>(), r0); break;
    }
  }
  static_assert(kTileRows == 6, "for_each_tile's cases");
}

// A row-major matrix view: element (i, k) at p[i·ld + k·inc].
template <typename T>
struct Rows {
  T* p;
  int64_t ld, inc = 1;
  T* row(int64_t i) const { return p + i * ld; }
  Rows<T> from(int64_t i) const { return {row(i), ld, inc}; }
};

// One SIMD register of T (a GCC/Clang vector extension), loaded and stored unaligned. The tiles below are
// written with it because the auto-vectoriser kept a plain T[R][C] tile in memory when n was narrow (the
// N_z-wide products: 0.6 GMAC/s instead of ~45 on an AVX-512 Xeon).
template <typename T>
struct VecOf;
template <>
struct VecOf<float> { typedef float type __attribute__((vector_size(kVectorBytes))); };
template <>
struct VecOf<double> { typedef double type __attribute__((vector_size(kVectorBytes))); };
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// out[i, j] += Σ_k a[i, k] · w[k, j] for i < R, k < K and the columns j0 ≤ j < n that fill whole blocks of C,
// the R × C sums of a block in R · C / lanes vector registers. Returns where the blocks stopped.
template <typename T, int R, int64_t C>
int64_t add_products_blocks(Rows<const T> a, int64_t K, Rows<const T> w, int64_t j0, int64_t n, Rows<T> out) {
  constexpr int64_t L = lanes<T>(), V = C / L;
  for (; j0 + C <= n; j0 += C) {
    Vec<T> acc[R][V];
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
      for (int64_t v = 0; v < V; ++v) acc[i][v] = load(out.row(i) + j0 + v * L);
    for (int64_t k = 0; k < K; ++k) {
      const T* wk = w.row(k) + j0;
      Vec<T> wv[V];
#pragma GCC unroll 16
      for (int64_t v = 0; v < V; ++v) wv[v] = load(wk + v * L);
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        const T aik = a.row(i)[k * a.inc];
#pragma GCC unroll 16
        for (int64_t v = 0; v < V; ++v) acc[i][v] += aik * wv[v];
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
      for (int64_t v = 0; v < V; ++v) store(out.row(i) + j0 + v * L, acc[i][v]);
  }
  return j0;
}

// out += a · w, (rows × K) · (K × n): a tile of rows at a time, its columns in wide blocks (enough sums to
// hide the FMA latency), then one-vector blocks (N_z-wide products are one or two vectors), then scalars.
template <typename T>
void add_products(Rows<const T> a, int64_t rows, int64_t K, Rows<const T> w, int64_t n, Rows<T> out) {
  for_each_tile(rows, [&](auto tile, int64_t r0) {
    constexpr int R = decltype(tile)::value;
    const auto at = a.from(r0);
    const auto ot = out.from(r0);
    int64_t j = add_products_blocks<T, R, tile_cols<T, R>()>(at, K, w, 0, n, ot);
    j = add_products_blocks<T, R, lanes<T>()>(at, K, w, j, n, ot);
    for (int i = 0; i < R && j < n; ++i)
      for (int64_t k = 0; k < K; ++k) axpy(ot.row(i) + j, at.row(i)[k * at.inc], w.row(k) + j, n - j);
  });
}

// `v`'s first n elements as scratch: grown when too small, never shrunk or cleared, so that the per-thread
// buffers below (reused across steps and calls) cost nothing per step. Callers write before they read.
template <typename T>
T* scratch(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(n);
  return v.data();
}

// A thread's step-kernel scratch, kept for the thread's life: a step allocates and clears none of it (it used
// to allocate and zero ~350 KB per thread and step at H = 256). Each storage of `ones` and `fill` holds one
// constant for good (or_constant).
template <typename T>
struct ThreadScratch {
  struct {
    std::vector<T> scale, y, ones;
  } forward;
  struct {
    std::vector<T> y, tmp, dhh, scale, dd, dy_row, dco_row, fill[4];
  } backward;
};

template <typename T>
ThreadScratch<T>& thread_scratch() {
  static thread_local ThreadScratch<T> s;
  return s;
}

// `p`, or (for an absent optional input) `n` copies of `value` held in `storage`: keeps branches out of
// the loops so that they vectorise. A storage only ever holds one value, so it is filled once, not per row.
template <typename T>
const T* or_constant(const T* p, std::vector<T>& storage, T value, int64_t n) {
  if (p) return p;
  if (int64_t(storage.size()) < n) storage.assign(n, value);
  return storage.data();
}

// Σ_j f(at_j) for j < n, where f reads its operands through `at` (at(p): p[j], one vector or one value): two
// vectors of partial sums, then the tail one value at a time. With a plain array of partial sums GCC
// vectorised these sums across the surrounding loop, shuffling and spilling (6× slower in the step kernels).
template <typename T, typename F>
inline T lane_sum(int64_t n, const F& f) {
  constexpr int64_t L = lanes<T>();
  Vec<T> acc0 = {}, acc1 = {};
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    acc0 += f([&](const T* p) { return load(p + j); });
    acc1 += f([&](const T* p) { return load(p + j + L); });
  }
  if (j + L <= n) {
    acc0 += f([&](const T* p) { return load(p + j); });
    j += L;
  }
  acc0 += acc1;
  T s = 0;
  for (int64_t l = 0; l < L; ++l) s += acc0[l];
  for (; j < n; ++j) s += f([&](const T* p) { return p[j]; });
  return s;
}

// Normalises each block of v (size n) in place; stores 1/sqrt(var+eps) per block.
template <typename T>
void normalize_blocks(T* __restrict v, int64_t blocks, int64_t n, T* __restrict rstd) {
  for (int64_t k = 0; k < blocks; ++k) {
    T* x = v + k * n;
    const T mean = lane_sum<T>(n, [&](auto at) { return at(x); }) / T(n);
    const T var = lane_sum<T>(n, [&](auto at) { return (at(x) - mean) * (at(x) - mean); }) / T(n);
    const T r = T(1) / std::sqrt(var + T(kLnEps));
    for (int64_t j = 0; j < n; ++j) x[j] = (x[j] - mean) * r;
    rstd[k] = r;
  }
}

// Gradient through one LN block: from dout (grad of gain·x̂ + bias) to the grad of its input.
template <typename T>
void layer_norm_backward(const T* __restrict dout, const T* __restrict xhat, const T* __restrict gain, T rstd,
                         int64_t n, T* __restrict dx) {
  const T mean_d = lane_sum<T>(n, [&](auto at) { return at(dout) * at(gain); }) / T(n);
  const T mean_dx = lane_sum<T>(n, [&](auto at) { return at(dout) * at(gain) * at(xhat); }) / T(n);
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
  scratch(y, 4 * n);
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

// Through h = o ⊙ tanh(c_out) (and zoneout's mix with h_{t-1} when kZoneout): dy_o and dcout from dh = dha + dhb.
// Zoneout is a template flag, not a test in the loop: the loop with the test vectorised into masked loads
// through a null `zoneout`, which cost a microcode assist per vector on an AMD EPYC (42% of cell_backward).
template <bool kZoneout, typename T>
void output_backward(int64_t n, const T* __restrict dha, const T* __restrict dhb, const T* __restrict zoneout,
                     T* __restrict dh_zone, const T* __restrict yo, const T* __restrict co, T* __restrict dy_o,
                     T* __restrict dcout) {
  for (int64_t j = 0; j < n; ++j) {
    T dh = dha[j] + dhb[j];
    if constexpr (kZoneout) dh = zoneout_backward_(dh, zoneout[j], dh_zone + j);
    cell_output_backward<Act>(dh, yo[j], co[j], &dy_o[j], &dcout[j]);
  }
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
  scratch(y, 4 * n);
  scratch(tmp, n);
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
  if (zoneout)
    output_backward<true>(n, dha, dhb, zoneout, dh_zone, yo, co, dy + 3 * n, dcout);
  else
    output_backward<false>(n, dha, dhb, zoneout, dh_zone, yo, co, dy + 3 * n, dcout);
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

// The batch rows one thread handles together: two tiles, so the projections' weights are read once per
// tile and the per-row scratch (12H per row) stays in cache.
constexpr int64_t kChunkRows = 2 * kTileRows;

// z = [z_bias ; 0] + [z_weight ; bias_z_weight] ĥ for `rows` rows, from their ĥ (rows of `hh`) into `z`.
template <typename T>
void embeddings(const Ptrs<T>& P, const Dims& d, Rows<const T> hh, int64_t rows, Rows<T> z) {
  const int64_t Z = 12 * d.Nz;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < Z; ++k) z.row(i)[k] = k < 8 * d.Nz ? P.zb[k] : T(0);
  add_products<T>(hh, rows, d.Hh, {P.zwt, Z}, Z, z);
}

// scale[i, k·4H + r] = d_k[r] = Σ_n W_kz^y[r, n] z_k^y[n] of row i, for the first `kinds` kinds k.
template <typename T>
void scaling_vectors(const Ptrs<T>& P, const Dims& d, Rows<const T> z, int64_t rows, int kinds, Rows<T> scale) {
  const int64_t H = d.H, Nz = d.Nz;
  for (int64_t i = 0; i < rows; ++i) std::fill(scale.row(i), scale.row(i) + kinds * 4 * H, T(0));
  for (int64_t q = 0; q < kinds * 4; ++q)
    add_products<T>({z.p + q * Nz, z.ld}, rows, Nz, {P.swt + q * Nz * H, H}, H, {scale.p + q * H, scale.ld});
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
    auto& [scale, y, ones] = thread_scratch<T>().forward;
    scratch(scale, kChunkRows * 12 * H);
    for (int64_t c0 = b0; c0 < b1; c0 += kChunkRows) {
      const int64_t c1 = std::min(b1, c0 + kChunkRows);
      for (int64_t b = c0; b < c1 && hyper; ++b) {  // Hyper LN-LSTM on [x_t ; h_{t-1}].
        T* ws = static_cast<T*>(s.ws) + b * L.width;
        T* __restrict hn = ws + L.hn;
        const T* __restrict ghh = row_of<T>(s.ghh, b, 4 * Hh);
        const T* __restrict ghx = row_of<T>(s.ghx, b, 4 * Hh);
        const T* __restrict gh = row_of<T>(s.g, b, GW) + 4 * H;
        for (int64_t j = 0; j < 4 * Hh; ++j) hn[j] = ghx[j] + gh[j] + ghh[j];
        if (s.layer_norm) normalize_blocks(hn, 4, Hh, ws + L.hrstd);
        cell_forward(hn, P.hlnw, P.hlnb, P.hlncw, P.hlncb, row_of<T>(s.hc_prev, b, Hh), row_of<T>(s.hmask, b, Hh),
                     fb, s.layer_norm, Hh, static_cast<T*>(s.hc) + b * Hh, static_cast<T*>(s.hh) + b * Hh,
                     ws + L.hcn, ws + L.hcrstd, y, ones, row_of<T>(s.hzmask, b, Hh), row_of<T>(s.hh_prev, b, Hh));
      }
      if (!main) continue;
      // The embeddings of the updated ĥ_t (into the workspace's z slot) and the scaling vectors, for the
      // chunk's rows at once.
      T* ws0 = static_cast<T*>(s.ws) + c0 * L.width;
      if (s.phase == StepPhase::Whole) {
        embeddings<T>(P, d, {static_cast<const T*>(s.hh) + c0 * Hh, Hh}, c1 - c0, {ws0 + L.z, L.width});
        scaling_vectors<T>(P, d, {ws0 + L.z, L.width}, c1 - c0, 3, {scale.data(), 12 * H});
      }
      for (int64_t b = c0; b < c1; ++b) {
        // The scaling vectors d_h, d_x, d_b of this row, gate y at dk[kind] + y·gate: computed above, or
        // given as (12, B, H) by the GEMM-shaped step.
        std::array<const T*, 3> dk{};
        int64_t gate = H;
        if (s.phase == StepPhase::Whole) {
          for (int k = 0; k < 3; ++k) dk[k] = scale.data() + (b - c0) * 12 * H + k * 4 * H;
        } else {
          gate = d.B * H;
          for (int k = 0; k < 3; ++k) dk[k] = static_cast<const T*>(s.scale) + k * 4 * gate + b * H;
        }
        // Row-scaled pre-activation d_h ⊙ (W_h h) + d_x ⊙ (W_x x) + b_0 + d_b.
        T* ws = static_cast<T*>(s.ws) + b * L.width;
        T* __restrict n = ws + L.n;
        const T* __restrict g = row_of<T>(s.g, b, GW);
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
    }
  });
}

// The GEMM-shaped step's Main backward for row b: dg = da ⊙ d_h with d_h given (4, B, H), and dd = [da ⊙ W_h h |
// da ⊙ W_x x | da] out for the driver's dz GEMM, (12, B, H).
template <typename T>
void main_dd(const Dims& d, int64_t b, const T* __restrict da, const T* __restrict g, const T* __restrict gx,
             const T* dh_all, T* __restrict dg, T* dd_all) {
  const int64_t H = d.H, kind = 4 * d.B * H;
  const T* __restrict dh_given = dh_all + b * H;
  T* __restrict dd = dd_all + b * H;
  for (int64_t y4 = 0; y4 < 4; ++y4) {
    const int64_t o = y4 * H, gate = y4 * d.B * H;
    for (int64_t r = 0; r < H; ++r) {
      dg[o + r] = da[o + r] * dh_given[gate + r];
      dd[gate + r] = da[o + r] * g[o + r];
      dd[kind + gate + r] = da[o + r] * gx[o + r];
      dd[2 * kind + gate + r] = da[o + r];
    }
  }
}

// Through the row scaling, one row: dg = da ⊙ d_h, dd_h = da ⊙ W_h h, dd_x = da ⊙ W_x x (n = 4H each). A
// function of its own so that the pointers' __restrict holds and the loop vectorises.
template <typename T>
void scaled_grads(int64_t n, const T* __restrict da, const T* __restrict d_h, const T* __restrict g,
                  const T* __restrict gx, T* __restrict dg, T* __restrict dd_h, T* __restrict dd_x) {
  for (int64_t r = 0; r < n; ++r) {
    dg[r] = da[r] * d_h[r];
    dd_h[r] = da[r] * g[r];
    dd_x[r] = da[r] * gx[r];
  }
}

// One row's share of a cell's row-reduced gradients that a thread sums itself (AccumLayout::CellSums at acc):
// the bias's and the layer norms'.
template <typename T>
void add_row_sums(int64_t n, bool ln, const T* __restrict da, const T* __restrict dy, const T* __restrict dco,
                  const T* __restrict nrm, const T* __restrict cn, T* __restrict acc) {
  const AccumLayout::CellSums C(n);
  for (int64_t r = 0; r < 4 * n; ++r) acc[C.bias + r] += da[r];
  if (!ln) return;
  for (int64_t r = 0; r < 4 * n; ++r) {
    acc[C.ln_w + r] += dy[r] * nrm[r];
    acc[C.ln_b + r] += dy[r];
  }
  for (int64_t j = 0; j < n; ++j) {
    acc[C.lnc_w + j] += dco[j] * cn[j];
    acc[C.lnc_b + j] += dco[j];
  }
}

template <typename T>
void backward_rows(const BackwardStep& s) {
  const Dims& d = s.dims;
  const WsLayout L(d);
  const DwsLayout D(d, /*ln_rows=*/s.accum == nullptr);
  const Ptrs<T> P(s.p);
  const int64_t H = d.H, Hh = d.Hh, Nz = d.Nz, GW = d.g_width();
  const T fb = T(s.forget_bias);
  const AccumLayout A(d);
  const bool hyper = s.phase != StepPhase::Main, main = s.phase != StepPhase::Hyper;
  at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
    auto& [y, tmp, dhh, scale, dd, dy_row, dco_row, fill] = thread_scratch<T>().backward;
    scratch(dhh, kChunkRows * Hh);
    scratch(scale, kChunkRows * 8 * H);
    scratch(dd, kChunkRows * 8 * H);
    T* acc = s.accum ? static_cast<T*>(s.accum) + at::get_thread_num() * A.width : nullptr;
    if (acc) {  // dy and dcout (of either cell) only feed this row's sums: scratch, not workspace rows
      scratch(dy_row, 4 * std::max(H, Hh));
      scratch(dco_row, std::max(H, Hh));
    }
    for (int64_t c0 = b0; c0 < b1; c0 += kChunkRows) {
      const int64_t c1 = std::min(b1, c0 + kChunkRows), rows = c1 - c0;
      const T* ws0 = static_cast<const T*>(s.ws) + c0 * L.width;
      T* dws0 = static_cast<T*>(s.dws) + c0 * D.width;
      for (int64_t b = c0; b < c1 && main; ++b) {
        const T* ws = row_of<T>(s.ws, b, L.width);
        T* dws = static_cast<T*>(s.dws) + b * D.width;
        T* __restrict da = dws + D.da;
        T* dy = acc ? dy_row.data() : dws + D.dy;
        T* dco = acc ? dco_row.data() : dws + D.dcout;
        cell_backward(ws + L.n, P.lnw, P.lnb, P.lncw, P.lncb, ws + L.rstd, ws + L.cn, ws[L.crstd],
                      row_of<T>(s.c, b, H), row_of<T>(s.c_prev, b, H), row_of<T>(s.mask, b, H), fb, s.layer_norm, H,
                      row_of<T>(s.dh_out, b, H), row_of<T>(s.dh_rec, b, H), row_of<T>(s.dc_out, b, H),
                      static_cast<T*>(s.dc_carry) + b * H, dco, dy, da, y, tmp, fill, row_of<T>(s.zmask, b, H),
                      s.dh_zone ? static_cast<T*>(s.dh_zone) + b * H : nullptr);
        if (s.phase == StepPhase::Main) {
          main_dd(d, b, da, row_of<T>(s.g, b, GW), row_of<T>(s.gx, b, 4 * H), static_cast<const T*>(s.scale),
                  static_cast<T*>(s.dg) + b * GW, static_cast<T*>(s.dd));
          continue;
        }
        if (acc) add_row_sums(H, s.layer_norm, da, dy, dco, ws + L.n, ws + L.cn, acc + A.main);
      }
      if (s.phase == StepPhase::Main) continue;
      if (main) {
        // Through the row scaling into W_h h_{t-1} (d_h), and (with acc) d_x for W_x x_t's grad below.
        const Rows<const T> z{ws0 + L.z, L.width};
        scaling_vectors<T>(P, d, z, rows, acc ? 2 : 1, {scale.data(), 8 * H});
        // dd_h = da ⊙ W_h h and dd_x = da ⊙ W_x x per row (dd_b = da).
        for (int64_t i = 0; i < rows; ++i)
          scaled_grads(4 * H, dws0 + i * D.width + D.da, scale.data() + i * 8 * H, row_of<T>(s.g, c0 + i, GW),
                       row_of<T>(s.gx, c0 + i, 4 * H), static_cast<T*>(s.dg) + (c0 + i) * GW,
                       dd.data() + i * 8 * H, dd.data() + i * 8 * H + 4 * H);
        // Into the embeddings: dz[k, y, m] = Σ_r dd_k^y[r] · W_kz^y[r, m]; and with acc, the chunk's share of
        // the scaling-weight gradients, Σ_rows z_k^y[m] · dd_k^y, while dd is in cache.
        for (int k = 0; k < 3; ++k)
          for (int64_t y4 = 0; y4 < 4; ++y4) {
            const int64_t q = (k * 4 + y4) * Nz;
            const Rows<const T> ddk = k < 2 ? Rows<const T>{dd.data() + k * 4 * H + y4 * H, 8 * H}
                                            : Rows<const T>{dws0 + D.da + y4 * H, D.width};
            const T* w = k < 2 ? P.sw + (k * 4 + y4) * H * Nz : P.bsw + y4 * H * Nz;  // W_kz^y, (H, N_z)
            for (int64_t i = 0; i < rows; ++i) std::fill_n(dws0 + i * D.width + D.dz + q, Nz, T(0));
            add_products<T>(ddk, rows, H, {w, Nz}, Nz, {dws0 + D.dz + q, D.width});
            if (acc) add_products<T>({z.p + q, 1, L.width}, Nz, rows, ddk, H, {acc + A.scale + q * H, H});
          }
        if (acc)  // da's slot takes da ⊙ d_x, the grad of W_x x_t that the post-loop GEMMs want
          for (int64_t i = 0; i < rows; ++i) {
            T* __restrict da = dws0 + i * D.width + D.da;
            const T* __restrict sx = scale.data() + i * 8 * H + 4 * H;
            for (int64_t r = 0; r < 4 * H; ++r) da[r] *= sx[r];
          }
      }
      if (!hyper) continue;
      // ĥ_t gets the embeddings' gradient (dz·Z, here or given) on top of what flows in from outside and from
      // step t+1.
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t b = c0 + i;
        const T* dhh_out = row_of<T>(s.dhh_out, b, Hh);
        const T* dhh_rec = row_of<T>(s.dhh_rec, b, Hh);
        const T* extra = row_of<T>(s.dhh_extra, b, Hh);
        for (int64_t j = 0; j < Hh; ++j)
          dhh[i * Hh + j] =
              (dhh_out ? dhh_out[j] : T(0)) + (dhh_rec ? dhh_rec[j] : T(0)) + (extra ? extra[j] : T(0));
      }
      if (s.phase == StepPhase::Whole) {
        add_products<T>({dws0 + D.dz, D.width}, rows, 8 * Nz, {P.zw, Hh}, Hh, {dhh.data(), Hh});
        add_products<T>({dws0 + D.dz + 8 * Nz, D.width}, rows, 4 * Nz, {P.bzw, Hh}, Hh, {dhh.data(), Hh});
      }
      for (int64_t b = c0; b < c1; ++b) {
        const T* ws = row_of<T>(s.ws, b, L.width);
        T* dws = static_cast<T*>(s.dws) + b * D.width;
        T* dyh = acc ? dy_row.data() : dws + D.dyh;
        T* dhco = acc ? dco_row.data() : dws + D.dhcout;
        T* dah = static_cast<T*>(s.dg) + b * GW + 4 * H;
        cell_backward(ws + L.hn, P.hlnw, P.hlnb, P.hlncw, P.hlncb, ws + L.hrstd, ws + L.hcn, ws[L.hcrstd],
                      row_of<T>(s.hc, b, Hh), row_of<T>(s.hc_prev, b, Hh), row_of<T>(s.hmask, b, Hh), fb,
                      s.layer_norm, Hh, static_cast<const T*>(dhh.data() + (b - c0) * Hh),
                      static_cast<const T*>(nullptr), row_of<T>(s.dhc_out, b, Hh),
                      static_cast<T*>(s.dhc_carry) + b * Hh, dhco, dyh, dah, y, tmp, fill,
                      row_of<T>(s.hzmask, b, Hh), s.dhh_zone ? static_cast<T*>(s.dhh_zone) + b * Hh : nullptr);
        if (acc) add_row_sums(Hh, s.layer_norm, dah, dyh, dhco, ws + L.hn, ws + L.hcn, acc + A.hyper);
      }
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
