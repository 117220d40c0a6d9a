// Sequence driver shared by the CPU and CUDA backends (haste's structure):
//  forward  - W_x x and the x-part of the hyper input for all T·B rows in one GEMM each; then per step two
//             recurrent GEMMs ([W_h; Ŵ_x,h] h_{t-1} and Ŵ_h ĥ_{t-1}) and one fused step kernel.
//  backward - per step in reverse one fused step kernel and two GEMMs for dh_{t-1}, dĥ_{t-1}; then every
//             weight gradient as a GEMM or reduction over all T·B rows at once. The CPU kernel adds its
//             rows' share of the elementwise reductions (biases, LN gains, the 12 scaling weights) to
//             per-thread sums while the factors are in cache, which saves the post-loop passes over them.
// Memory kept for backward, per time step and batch row (elements of the op's dtype):
//   h, c (2H) + ĥ, ĉ (2Ĥ) [the op's outputs] + g (4H + 4Ĥ) + ws (5H + 12N_z + 5Ĥ + 10)
//   = 11H + 11Ĥ + 12N_z + 10;  e.g. H=1000, Ĥ=128, N_z=16: 12,610 floats ≈ 50 KB.
// With save_for_backward=false (inference) g and ws are one step's scratch, reused: 2H + 2Ĥ per step and row,
// and the op returns them empty (0, B, ·).
#include "hyper_lstm.h"
#include "cpu/buffer_pool.h"
#include "cpu/step_gemm.h"
#include "no_autocast.h"
#include "optionals.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

namespace hyperfused {
namespace {

enum Param {
  WEIGHT_IH, WEIGHT_HH, BIAS, HYPER_WEIGHT_IH, HYPER_WEIGHT_HH, HYPER_BIAS, Z_WEIGHT, Z_BIAS, SCALE_WEIGHT,
  BIAS_Z_WEIGHT, BIAS_SCALE_WEIGHT, LN_WEIGHT, LN_BIAS, LN_CELL_WEIGHT, LN_CELL_BIAS, HYPER_LN_WEIGHT,
  HYPER_LN_BIAS, HYPER_LN_CELL_WEIGHT, HYPER_LN_CELL_BIAS, NUM_PARAMS
};

const char* const kParamNames[NUM_PARAMS] = {
    "weight_ih", "weight_hh", "bias", "hyper_weight_ih", "hyper_weight_hh", "hyper_bias", "z_weight", "z_bias",
    "scale_weight", "bias_z_weight", "bias_scale_weight", "ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias",
    "hyper_ln_weight", "hyper_ln_bias", "hyper_ln_cell_weight", "hyper_ln_cell_bias"};

// The four weights of the input and recurrent products.
bool is_large_weight(int i) {
  return i == WEIGHT_IH || i == WEIGHT_HH || i == HYPER_WEIGHT_IH || i == HYPER_WEIGHT_HH;
}

// The weights of a decode step's products, which it takes in bfloat16 or float16 too: the four large ones and
// those of the embeddings and the scaling vectors.
bool is_gemm_weight(int i) {
  return is_large_weight(i) || i == Z_WEIGHT || i == BIAS_Z_WEIGHT || i == SCALE_WEIGHT || i == BIAS_SCALE_WEIGHT;
}

struct Sizes {
  int64_t T, B, X, H, Hh, Nz;
  int64_t P;  // h's width: H, or a projected cell's P in a decode step (hyper_lstm_step)
  Dims dims() const { return Dims{B, H, Hh, Nz}; }
};

// half_ok: t may also be bfloat16 or float16 where x is float32 (a decode step's GEMM weights).
void check_arg(const at::Tensor& t, const char* name, std::vector<int64_t> shape, const at::Tensor& x,
               bool half_ok = false) {
  TORCH_CHECK(t.device() == x.device(), "hyperfused::hyper_lstm: '", name, "' is on ", t.device(),
              " but 'x' is on ", x.device());
  half_ok = half_ok && x.scalar_type() == at::kFloat;
  const bool half = t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || (half_ok && half), "hyperfused::hyper_lstm: '", name,
              "' has dtype ", t.scalar_type(), ", expected ", x.scalar_type(), " (the dtype of 'x')",
              half_ok ? ", BFloat16 or Half" : "");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "hyperfused::hyper_lstm: '", name, "' has shape ", t.sizes(),
              ", expected ", at::IntArrayRef(shape));
  TORCH_CHECK(t.is_contiguous(), "hyperfused::hyper_lstm: '", name, "' must be contiguous");
}

Sizes check_inputs(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& hh0,
                   const at::Tensor& hc0, at::TensorList p, const std::optional<at::Tensor>& mask,
                   const std::optional<at::Tensor>& hyper_mask, const std::optional<at::Tensor>& zoneout_mask,
                   const std::optional<at::Tensor>& hyper_zoneout_mask, bool half_gemm_weights = false,
                   bool projected_h = false) {
  TORCH_CHECK(x.dim() == 3, "hyperfused::hyper_lstm: 'x' must have shape (T, B, input_size), got ", x.sizes());
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0,
              "hyperfused::hyper_lstm: 'x' must be non-empty, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "hyperfused::hyper_lstm: 'x' must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(p.size() == NUM_PARAMS, "hyperfused::hyper_lstm: 'params' must hold ", int(NUM_PARAMS),
              " tensors, got ", p.size());
  TORCH_CHECK(h0.dim() == 2 && hh0.dim() == 2, "hyperfused::hyper_lstm: 'h0' and 'hh0' must be 2-D (B, ·), got ",
              h0.sizes(), " and ", hh0.sizes());
  TORCH_CHECK(p[SCALE_WEIGHT].dim() == 3, "hyperfused::hyper_lstm: 'scale_weight' must be (2, 4H, N_z), got ",
              p[SCALE_WEIGHT].sizes());
  // projected_h (the decode step): h may be P wide, the width W_h and Ŵ_x's h columns read, while c gives H
  TORCH_CHECK(!projected_h || c0.dim() == 2, "hyperfused::hyper_lstm: 'c0' must be 2-D (B, H), got ", c0.sizes());
  Sizes s{x.size(0), x.size(1), x.size(2), projected_h ? c0.size(1) : h0.size(1), hh0.size(1),
          p[SCALE_WEIGHT].size(2), h0.size(1)};
  TORCH_CHECK(s.H > 0 && s.Hh > 0 && s.Nz > 0 && s.P > 0, "hyperfused::hyper_lstm: sizes must be positive");
  const int64_t B = s.B, X = s.X, H = s.H, Hh = s.Hh, Nz = s.Nz, P = s.P;
  check_arg(x, "x", {s.T, B, X}, x);
  check_arg(h0, "h0", {B, P}, x);
  check_arg(c0, "c0", {B, H}, x);
  check_arg(hh0, "hh0", {B, Hh}, x);
  check_arg(hc0, "hc0", {B, Hh}, x);
  const std::vector<std::vector<int64_t>> shapes = {
      {4 * H, X}, {4 * H, P},   {4 * H},     {4 * Hh, X + P}, {4 * Hh, Hh}, {4 * Hh}, {8 * Nz, Hh},
      {8 * Nz},   {2, 4 * H, Nz}, {4 * Nz, Hh}, {4 * H, Nz},   {4 * H},      {4 * H},  {H},
      {H},        {4 * Hh},     {4 * Hh},    {Hh},            {Hh}};
  for (int i = 0; i < NUM_PARAMS; ++i)
    check_arg(p[i], kParamNames[i], shapes[i], x, half_gemm_weights && is_gemm_weight(i));
  if (mask) check_arg(*mask, "mask", {s.T, B, H}, x);
  if (hyper_mask) check_arg(*hyper_mask, "hyper_mask", {s.T, B, Hh}, x);
  if (zoneout_mask) check_arg(*zoneout_mask, "zoneout_mask", {s.T, B, H}, x);
  if (hyper_zoneout_mask) check_arg(*hyper_zoneout_mask, "hyper_zoneout_mask", {s.T, B, Hh}, x);
  return s;
}

// [a ; b] in a pooled buffer: a call with gradients builds the recurrent weight anew (18 MB at H = 1000).
at::Tensor pooled_rows(const at::Tensor& a, const at::Tensor& b) {
  auto out = pooled_empty({a.size(0) + b.size(0), a.size(1)}, a.options());
  return at::cat_out(out, {a, b}, 0);
}

// dst[j·ld + i] = src[i·cols + j] for a row-major (rows, cols) src: its transpose, into rows of ld values. One
// pass with contiguous writes (the source's columns come from cache); on the CPU ATen's cat and then a strided
// copy of the transposed view took ~3x as long, which a decode step pays on every call.
template <typename T>
void transpose_into(const T* __restrict src, int64_t rows, int64_t cols, T* __restrict dst, int64_t ld) {
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) dst[j * ld + i] = src[i * cols + j];
}

// [a ; b]ᵀ for row-major a (m, n) and b (k, n): (n, m + k).
at::Tensor rows_transposed(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_cpu()) return at::cat({a, b}, 0).t().contiguous();
  const int64_t m = a.size(0), k = b.size(0), n = a.size(1);
  auto out = at::empty({n, m + k}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rows_transposed", [&] {
    transpose_into(a.data_ptr<scalar_t>(), m, n, out.data_ptr<scalar_t>(), m + k);
    transpose_into(b.data_ptr<scalar_t>(), k, n, out.data_ptr<scalar_t>() + m, m + k);
  });
  return out;
}

// The scaling weights [scale_weight ; bias_scale_weight] ((2, 4H, N_z) and (4H, N_z)) as (3, 4, N_z, H): each
// (kind, gate)'s (H, N_z) block transposed.
at::Tensor scale_weight_transposed(const at::Tensor& sw, const at::Tensor& bsw, int64_t H, int64_t Nz) {
  if (!sw.is_cpu())
    return at::cat({sw, bsw.unsqueeze(0)}, 0).view({3, 4, H, Nz}).transpose(2, 3).contiguous();
  auto out = at::empty({3, 4, Nz, H}, sw.options());
  AT_DISPATCH_FLOATING_TYPES(sw.scalar_type(), "scale_weight_transposed", [&] {
    for (int64_t q = 0; q < 12; ++q) {
      const scalar_t* w = q < 8 ? sw.data_ptr<scalar_t>() + q * H * Nz : bsw.data_ptr<scalar_t>() + (q - 8) * H * Nz;
      transpose_into(w, H, Nz, out.data_ptr<scalar_t>() + q * Nz * H, H);
    }
  });
  return out;
}

// What a call uses the weight copies for: the sequence forward, its backward, or a decode step.
enum class Use { Forward, Backward, Decode };

// Whether a call's recurrent products run on [W_h ; Ŵ_x,h] as one copied block (one GEMM per step) or on the two
// parameters themselves (two GEMMs per step). The copy reads and writes both weights once per call, which a
// single step does not earn back: at T = 1 (a HyperLSTMCell trained step by step, a projected layer's first
// step) it cost more than the product that reads the block (1.6 ms against 1.3-1.6 ms at B = 8, H = 1000).
bool concat_recurrent(int64_t T) { return T > 1; }

// Ŵ_x's columns on h, (4Ĥ, P): the hyper cell's share of the recurrent product (P = H but in a projected decode)
at::Tensor hyper_h_columns(at::TensorList p, const Sizes& s) { return p[HYPER_WEIGHT_IH].narrow(1, s.X, s.P); }

// Owns the transposed weight copies that the one-kernel step (StepPhase::Whole) reads through StepParams, and
// the recurrent weight [W_h ; Ŵ_x[:, X:]] (4H+4Ĥ, H) as one contiguous block where the call runs several steps
// (concat_rec: concat_recurrent), each made only where the call uses it; the GEMM-shaped step's projections run
// on the parameters themselves (ScaleGemms) and need no copy.
// Made on every call, never kept across calls: a kept copy is only as current as what tells it that its source
// changed, and an in-place change through a parameter's .data (manual SGD, EMA and clipping code do this)
// bumps no version counter, so a kept copy would silently give the previous weights' results.
struct Transposed {
  // z_weight_t: [z_weight ; bias_z_weight]ᵀ (Ĥ, 12N_z); scale_weight_t: [scale_weight ; bias_scale_weight]
  // as (3, 4, N_z, H).
  at::Tensor z_weight_t, scale_weight_t, w_rec;
  // The decode step's GEMMs, each run once (so that a StepGemm does not pack its weight), all on the parameters
  // themselves: W_h h and Ŵ_x,h h (two products, no concatenated copy), Ŵ_h ĥ, W_x x, Ŵ_x[:, :X] x + b̂.
  std::optional<StepGemm> input, hyper_input, rec, rec_hyper, hyper;
  Transposed(at::TensorList p, const Sizes& s, Use use, bool split, bool concat_rec = true) {
    if (!split) {
      if (use != Use::Backward) z_weight_t = rows_transposed(p[Z_WEIGHT], p[BIAS_Z_WEIGHT]);
      scale_weight_t = scale_weight_transposed(p[SCALE_WEIGHT], p[BIAS_SCALE_WEIGHT], s.H, s.Nz);
    }
    if (use != Use::Decode && concat_rec)
      w_rec = pooled_rows(p[WEIGHT_HH], hyper_h_columns(p, s));
    if (use != Use::Decode) return;
    rec.emplace(p[WEIGHT_HH].t(), at::Tensor(), GemmPrecision{}, 1);
    rec_hyper.emplace(hyper_h_columns(p, s).t(), at::Tensor(), GemmPrecision{}, 1);
    hyper.emplace(p[HYPER_WEIGHT_HH].t(), at::Tensor(), GemmPrecision{}, 1);
    input.emplace(p[WEIGHT_IH].t(), at::Tensor(), GemmPrecision{}, 1);
    hyper_input.emplace(p[HYPER_WEIGHT_IH].narrow(1, 0, s.X).t(), p[HYPER_BIAS], GemmPrecision{}, 1);
  }
};

// The GEMM-shaped step's projections, their weights in the parameters' own layouts (a BLAS reads the
// transposes it needs in place). Over several steps the kinds' weights are concatenated once per call, so that
// each projection is one GEMM per step; a single step (decoding) runs them on the parameters themselves, two
// GEMMs each (kinds h and x from z_weight and scale_weight, kind b from bias_z_weight and bias_scale_weight),
// since a copy costs more than a step's second GEMM there. z and dz (B, 12N_z) hold the (kind, gate) blocks in
// that order; d and dd are (12, B, H), kind-major.
class ScaleGemms {
 public:
  // used: the call's step is GEMM-shaped (the one-kernel step reads Transposed's copies: nothing made here)
  ScaleGemms(at::TensorList p, const Sizes& s, bool used) : Nz_(s.Nz) {
    if (!used) return;
    const auto sw = p[SCALE_WEIGHT].view({8, s.H, s.Nz}), bsw = p[BIAS_SCALE_WEIGHT].view({4, s.H, s.Nz});
    if (s.T == 1) {
      parts_ = {{0, 8, p[Z_WEIGHT], p[Z_BIAS], sw}, {8, 4, p[BIAS_Z_WEIGHT], at::Tensor(), bsw}};
      return;
    }
    const auto zb = at::cat({p[Z_BIAS], at::zeros({4 * s.Nz}, p[Z_BIAS].options())});
    parts_ = {{0, 12, at::cat({p[Z_WEIGHT], p[BIAS_Z_WEIGHT]}), zb, at::cat({sw, bsw})}};
  }
  // z = [z_bias ; 0] + ĥ·[z_weight ; bias_z_weight]ᵀ, into z (a (B, 12N_z) view with unit column stride)
  void embeddings(const at::Tensor& z, const at::Tensor& hh) const {
    for (const Part& q : parts_) {
      auto out = z.narrow(1, q.first * Nz_, q.count * Nz_);
      if (q.zb.defined())
        at::addmm_out(out, q.zb, hh, q.zw.t());
      else
        at::mm_out(out, hh, q.zw.t());
    }
  }
  // d = z_kz·W_kzᵀ for the first `blocks` (kind, gate) blocks (12, or 4 for the backward's d_h), into d
  // (blocks, B, H) from z (B, ≥ blocks·N_z)
  void scales(const at::Tensor& d, const at::Tensor& z, int64_t blocks = 12) const {
    const int64_t B = z.size(0);
    for (const Part& q : parts_) {
      const int64_t n = std::min(q.count, blocks - q.first);
      if (n <= 0) continue;
      auto out = d.narrow(0, q.first, n);
      at::bmm_out(out, z.narrow(1, q.first * Nz_, n * Nz_).view({B, n, Nz_}).transpose(0, 1),
                  q.sw.narrow(0, 0, n).transpose(1, 2));
    }
  }
  // dz = dd·W_kz per (kind, gate), into dz (12, B, N_z) from dd (12, B, H)
  void scale_grads(const at::Tensor& dz, const at::Tensor& dd) const {
    for (const Part& q : parts_) {
      auto out = dz.narrow(0, q.first, q.count);
      at::bmm_out(out, dd.narrow(0, q.first, q.count), q.sw);
    }
  }
  // dĥ's share dz·[z_weight ; bias_z_weight], into out (B, Ĥ), from dz (B, 12N_z)
  void embedding_grads(at::Tensor& out, const at::Tensor& dz) const {
    for (size_t i = 0; i < parts_.size(); ++i) {
      const Part& q = parts_[i];
      const auto dzq = dz.narrow(1, q.first * Nz_, q.count * Nz_);
      if (i == 0)
        at::mm_out(out, dzq, q.zw);
      else
        out.addmm_(dzq, q.zw);
    }
  }

 private:
  struct Part {
    int64_t first, count;  // the (kind, gate) blocks it holds
    at::Tensor zw, zb;     // (count·N_z, Ĥ), (count·N_z) or undefined
    at::Tensor sw;         // (count, H, N_z)
  };
  int64_t Nz_;
  std::vector<Part> parts_;
};

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// The kernels' pointers to the parameters, and to tr's transposed copies (null without tr: the GEMM-shaped step).
StepParams step_params(at::TensorList p, const Transposed* tr = nullptr) {
  return StepParams{p[BIAS].data_ptr(),           p[Z_WEIGHT].data_ptr(),         p[Z_BIAS].data_ptr(),
                    p[BIAS_Z_WEIGHT].data_ptr(),  p[SCALE_WEIGHT].data_ptr(),     p[BIAS_SCALE_WEIGHT].data_ptr(),
                    p[LN_WEIGHT].data_ptr(),      p[LN_BIAS].data_ptr(),          p[LN_CELL_WEIGHT].data_ptr(),
                    p[LN_CELL_BIAS].data_ptr(),   p[HYPER_LN_WEIGHT].data_ptr(),  p[HYPER_LN_BIAS].data_ptr(),
                    p[HYPER_LN_CELL_WEIGHT].data_ptr(), p[HYPER_LN_CELL_BIAS].data_ptr(),
                    tr ? data_or_null(tr->z_weight_t) : nullptr, tr ? data_or_null(tr->scale_weight_t) : nullptr};
}

ScalarKind kind_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? ScalarKind::Float64 : ScalarKind::Float32; }

// Step t's (B, ·) slice of a contiguous (T, B, ·) tensor by address arithmetic, so that the time loops make no
// tensor views for the kernels' pointers (host time per step; nothing in the loop allocates or syncs). An
// absent optional tensor gives null.
class Steps {
 public:
  explicit Steps(const at::Tensor& t)
      : base_(t.defined() ? static_cast<char*>(t.data_ptr()) : nullptr),
        stride_(t.defined() ? t.stride(0) * t.element_size() : 0) {}
  explicit Steps(const std::optional<at::Tensor>& t) : Steps(t ? *t : at::Tensor()) {}
  void* at(int64_t step) const { return base_ ? base_ + step * stride_ : nullptr; }
  // step - 1, or the initial state's data at step 0
  const void* prev(int64_t step, const at::Tensor& initial) const { return step ? at(step - 1) : initial.data_ptr(); }

 private:
  char* base_;
  int64_t stride_;
};

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  if (!t || !t->defined()) return std::nullopt;
  return t->contiguous();
}

// Σ_t dA_t^T v_{t-1} over all steps, with v_{-1} = v0: dA (T·B, n) against the states shifted by one step,
// as the GEMM over steps 1..T-1 with step 0's product against v0 added in place: no concatenated copy of the
// states, and no copy of a partial sum (addmm would copy its first term).
at::Tensor times_prev(const GemmPrecision& P, const at::Tensor& dA, const at::Tensor& v0, const at::Tensor& vs) {
  const int64_t B = v0.size(0), M = dA.size(0);
  auto out = pooled_empty({dA.size(1), v0.size(1)}, v0.options());  // 18 MB for W_h's at H = 1000
  if (M == B) {
    P.mm_out(out, dA.t(), P.operand(v0));
    return out;
  }
  const auto prev = vs.narrow(0, 0, vs.size(0) - 1).reshape({M - B, v0.size(1)});
  P.mm_out(out, dA.narrow(0, B, M - B).t(), P.operand(prev));
  P.add_mm_(out, dA.narrow(0, 0, B).t(), P.operand(v0));
  return out;
}

// The op's gemm_dtype argument: bfloat16/float16 GEMM operands (float32 ops only), or none.
GemmPrecision gemm_precision(const std::optional<at::ScalarType>& gemm_dtype, const at::Tensor& x) {
  if (!gemm_dtype) return {};
  TORCH_CHECK(*gemm_dtype == at::kBFloat16 || *gemm_dtype == at::kHalf,
              "hyperfused::hyper_lstm: 'gemm_dtype' must be bfloat16, float16 or None, got ", *gemm_dtype);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "hyperfused::hyper_lstm: 'gemm_dtype' (", *gemm_dtype,
              ") needs float32 inputs, got ", x.scalar_type());
  return {gemm_dtype};
}

// x2 · w (+ bias) as a tensor of `out_opts` (the op's dtype), with operands in P's precision: the input
// projections over all T·B rows, in a pooled buffer. x2 may be an operand already (rounded once for several
// GEMMs).
at::Tensor input_gemm(const GemmPrecision& P, const at::Tensor& x2, const at::Tensor& w,
                      const at::TensorOptions& out_opts, const at::Tensor& bias = at::Tensor()) {
  auto out = pooled_empty({x2.size(0), w.size(1)}, out_opts);
  if (!P.low) {  // the bias joins the product (oneDNN's bias, or addmm's)
    sequence_mm(out, x2, w, bias);
    return out;
  }
  P.mm_out(out, x2, P.operand(w));
  return bias.defined() ? out.add_(bias) : out;
}

// Whether this call runs the GEMM-shaped step (StepPhase): HYPERFUSED_STEP_DESIGN, or else the device's
// default for sequences, and for a decode step the GEMM-shaped one on every device: its projections then run on
// the parameters themselves (ScaleGemms), where the one-kernel step needs transposed copies made per call,
// which on the CPU cost more than the GEMMs save (30% of a step at B = 1, H = 256).
bool gemm_shaped(const StepKernels& k, bool decode = false) {
  const char* v = std::getenv("HYPERFUSED_STEP_DESIGN");
  if (!v || !*v) return decode || k.gemm_shaped_forward;
  TORCH_CHECK(std::string(v) == "gemm" || std::string(v) == "fused",
              "hyperfused: HYPERFUSED_STEP_DESIGN must be 'gemm', 'fused' or unset, got '", v, "'");
  return std::string(v) == "gemm";
}

// A launch-shape setting of the CUDA step kernels: the environment variable's value, one of `allowed`, or 0
// (the launch decides) when it is unset. They exist so that the shapes can be timed against each other on one
// GPU: HYPERFUSED_CUDA_THREAD_GROUPS=1|4 (thread groups per block) and HYPERFUSED_CUDA_CLUSTER=1|2|4|8 (blocks
// per row, on GPUs with thread-block clusters; hyper_lstm_simt.h).
int launch_setting(const char* name, std::initializer_list<int> allowed) {
  const char* v = std::getenv(name);
  if (!v || !*v) return 0;
  std::string expected;
  for (int a : allowed) {
    if (std::to_string(a) == v) return a;
    expected += (expected.empty() ? "'" : "', '") + std::to_string(a);
  }
  TORCH_CHECK(false, "hyperfused: ", name, " must be ", expected, "' or unset, got '", v, "'");
  return 0;
}

struct LaunchShape {
  int groups = launch_setting("HYPERFUSED_CUDA_THREAD_GROUPS", {1, 4});
  int cluster = launch_setting("HYPERFUSED_CUDA_CLUSTER", {1, 2, 4, 8});
  template <class Step>
  void apply(Step& st) const {
    st.thread_groups = groups;
    st.cluster = cluster;
  }
};

// Whether the backward kernel sums the per-row weight gradients itself. HYPERFUSED_ATEN_REDUCTIONS=1 makes
// the CPU leave them to ATen as CUDA does, so that the tests can check that path without a GPU.
bool sums_in_kernel(const StepKernels& k) {
  const char* v = std::getenv("HYPERFUSED_ATEN_REDUCTIONS");
  return k.accumulates && !(v && *v && std::string(v) != "0");
}

// The forward's work for one step once a ForwardStep holds its pointers: the recurrent GEMMs (into g_t and
// ghh), then the step kernel, or the GEMM-shaped step's phases around the projections.
struct ForwardStepper {
  const StepKernels& k;
  const ScaleGemms& proj;
  // rec: [W_h ; Ŵ_x,h] h_{t-1} into all of g_t, or with rec_hyper, W_h h_{t-1} and Ŵ_x,h h_{t-1} into its parts
  const StepGemm &rec, *rec_hyper, &hyper;
  const Dims dims;
  const bool split;
  const LaunchShape shape;
  const int64_t z_slot = WsLayout(dims).z;
  at::Tensor ghh;    // (B, 4Ĥ) Ŵ_h ĥ_{t-1}, the step's scratch
  at::Tensor d_all;  // the GEMM-shaped step's scaling vectors, (12, B, H)

  ForwardStepper(const StepKernels& k, const ScaleGemms& proj, bool split, const StepGemm& rec,
                 const StepGemm* rec_hyper, const StepGemm& hyper, const Dims& dims, const at::TensorOptions& opts)
      : k(k), proj(proj), rec(rec), rec_hyper(rec_hyper), hyper(hyper), dims(dims), split(split),
        ghh(at::empty({dims.B, 4 * dims.Hh}, opts)),
        d_all(split ? at::empty({12, dims.B, dims.H}, opts) : at::Tensor()) {}

  // g_t (B, 4H+4Ĥ) and ws_t (B, WsLayout.width) are st.g and st.ws; hh_t (B, Ĥ) is st.hh.
  void run(ForwardStep& st, at::Tensor g_t, const at::Tensor& h_prev, const at::Tensor& hh_prev,
           const at::Tensor& hh_t, const at::Tensor& ws_t) {
    if (rec_hyper) {
      auto main = g_t.narrow(1, 0, 4 * dims.H), hyper_x = g_t.narrow(1, 4 * dims.H, 4 * dims.Hh);
      rec.run(main, h_prev);
      rec_hyper->run(hyper_x, h_prev);
    } else {
      rec.run(g_t, h_prev);
    }
    hyper.run(ghh, hh_prev);
    st.ghh = ghh.data_ptr();
    shape.apply(st);
    if (!split) {
      k.forward(st);
      return;
    }
    st.phase = StepPhase::Hyper;
    k.forward(st);
    // z (B, 12N_z), written into the workspace's z slot (the backward reads it there), then d = z·W_kz per
    // (kind, gate): each weight read once for all B rows.
    auto z = ws_t.narrow(1, z_slot, 12 * dims.Nz);
    proj.embeddings(z, hh_t);
    proj.scales(d_all, z);
    st.phase = StepPhase::Main;
    st.scale = d_all.data_ptr();
    k.forward(st);
  }
};

}  // namespace

ForwardOut hyper_lstm_forward(const StepKernels& k, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                              const at::Tensor& hh0, const at::Tensor& hc0, at::TensorList p,
                              const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& hyper_mask,
                              bool layer_norm, double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
                              const std::optional<at::Tensor>& hyper_zoneout_mask, bool save_for_backward,
                              const std::optional<at::ScalarType>& gemm_dtype) {
  const Sizes s = check_inputs(x, h0, c0, hh0, hc0, p, mask, hyper_mask, zoneout_mask, hyper_zoneout_mask);
  const GemmPrecision P = gemm_precision(gemm_dtype, x);
  const c10::DeviceGuard guard(x.device());
  const NoAutocast no_autocast;
  const Dims dims = s.dims();
  const int64_t T = s.T, B = s.B, X = s.X, H = s.H, Hh = s.Hh;
  const auto x2 = P.operand(x.reshape({T * B, X}));  // rounded once for both projections
  const auto opts = x.options();
  const auto gx = input_gemm(P, x2, p[WEIGHT_IH].t(), opts).view({T, B, 4 * H});
  const auto ghx =
      input_gemm(P, x2, p[HYPER_WEIGHT_IH].narrow(1, 0, X).t(), opts, p[HYPER_BIAS]).view({T, B, 4 * Hh});
  const bool split = gemm_shaped(k), concat = concat_recurrent(T);
  const Transposed tr(p, s, Use::Forward, split, concat);
  auto hs = pooled_empty({T, B, H}, opts), cs = pooled_empty({T, B, H}, opts);
  auto hhs = pooled_empty({T, B, Hh}, opts), hcs = pooled_empty({T, B, Hh}, opts);
  const int64_t kept = save_for_backward ? T : 1;  // steps of g and ws held at once
  auto g = pooled_empty({kept, B, dims.g_width()}, opts);
  auto ws = pooled_empty({kept, B, WsLayout(dims).width}, opts);
  const StepParams sp = step_params(p, &tr);
  // [W_h ; Ŵ_x,h] h_{t-1} (w_rec transposed, (H, 4H+4Ĥ)), or W_h h_{t-1} and Ŵ_x,h h_{t-1}, and Ŵ_h ĥ_{t-1},
  // each run T times
  const StepGemm rec(concat ? tr.w_rec.t() : p[WEIGHT_HH].t(), at::Tensor(), P, T);
  const StepGemm hyper(p[HYPER_WEIGHT_HH].t(), at::Tensor(), P, T);
  std::optional<StepGemm> rec_hyper;
  if (!concat) rec_hyper.emplace(hyper_h_columns(p, s).t(), at::Tensor(), P, T);
  const ScaleGemms proj(p, s, split);
  ForwardStepper stepper(k, proj, split, rec, rec_hyper ? &*rec_hyper : nullptr, hyper, dims, opts);
  // The GEMMs' per-step operands as views made once; every other per-step pointer by arithmetic (Steps).
  const auto hs_t = hs.unbind(0), hhs_t = hhs.unbind(0), g_t = g.unbind(0), ws_t = ws.unbind(0);
  const Steps Hs(hs), Cs(cs), HHs(hhs), HCs(hcs), Gx(gx), GHx(ghx);
  const Steps Mask(mask), HMask(hyper_mask), ZMask(zoneout_mask), HZMask(hyper_zoneout_mask);
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& h_prev = t ? hs_t[t - 1] : h0;
    const at::Tensor& hh_prev = t ? hhs_t[t - 1] : hh0;
    const at::Tensor &g_now = g_t[t % kept], &ws_now = ws_t[t % kept];
    ForwardStep st{dims, kind_of(x), layer_norm, forget_bias, sp,
                   g_now.data_ptr(), nullptr, Gx.at(t), GHx.at(t), Cs.prev(t, c0), HCs.prev(t, hc0),
                   Mask.at(t), HMask.at(t), ZMask.at(t), HZMask.at(t), h_prev.data_ptr(), hh_prev.data_ptr(),
                   Hs.at(t), Cs.at(t), HHs.at(t), HCs.at(t), ws_now.data_ptr(), k.stream()};
    stepper.run(st, g_now, h_prev, hh_prev, hhs_t[t], ws_now);
  }
  if (!save_for_backward)
    return {hs, cs, hhs, hcs, at::empty({0, B, g.size(2)}, opts), at::empty({0, B, ws.size(2)}, opts)};
  return {hs, cs, hhs, hcs, g, ws};
}

namespace {

// A decode step's scratch, (B, ·) blocks: gx, ghx, g, ghh, ws and the 12 scaling vectors (12, B, H), then
// xh_width more values ([x, h], B × (X + P)). Kept per thread for the thread's life, so that a step allocates
// none of it.
float* decode_scratch(const Dims& d, const WsLayout& L, int64_t xh_width) {
  static thread_local std::vector<float> scratch;
  const size_t n = size_t(d.B) * (4 * d.H + 4 * d.Hh + d.g_width() + 4 * d.Hh + L.width + 12 * d.H) + xh_width;
  if (scratch.size() < n) scratch.resize(n);
  return scratch.data();
}

// The decode step of the CPU in float32 with MKL: the GEMM-shaped step's products as seven direct calls on the
// memory of the parameters and states, around the hyper-cell and main-cell kernels. As ATen ops
// (ForwardStepper) the same products took ~60 views, allocations and dispatches per step, more time than the
// products themselves at B = 1, H = 256. The four input and recurrent products and the two embeddings go one per
// call (in one batch MKL gave each product a single thread, and at H = 1000 W_h h alone then took longer than
// the step had), each in MKL, oneDNN or the few-rows kernel as measured (StepGemm::decode_gemm), on whole
// weights: Ŵ_x's two products as one, on [x, h]. A bfloat16 cell's four large weights are read as they are.
// The 12 scaling vectors, small products (k = N_z), go in one call of MKL's batch GEMM or in the few-rows
// kernel, on one thread or spread over the threads, as measured (StepGemm::decode_batch).
StepOut decode_step_raw(const StepKernels& k, const Sizes& s, const at::Tensor& x, const at::Tensor& h,
                        const at::Tensor& c, const at::Tensor& hh, const at::Tensor& hc, at::TensorList p,
                        bool layer_norm, double forget_bias) {
  const Dims d = s.dims();
  const WsLayout L(d);
  const int64_t B = s.B, X = s.X, H = s.H, Hh = s.Hh, Nz = s.Nz, P = s.P, GW = d.g_width();
  const auto f = [](const at::Tensor& t) { return t.data_ptr<float>(); };
  float* const gx = decode_scratch(d, L, B * (X + P));
  float *const ghx = gx + B * 4 * H, *const g = ghx + B * 4 * Hh, *const ghh = g + B * GW;
  float *const ws = ghh + B * 4 * Hh, *const scale = ws + B * L.width, *const z = ws + L.z;
  float* const xh = scale + 12 * B * H;  // [x, h] rows, for one product with the whole of Ŵ_x
  for (int64_t b = 0; b < B; ++b) {
    std::copy_n(f(x) + b * X, X, xh + b * (X + P));
    std::copy_n(f(h) + b * P, P, xh + b * (X + P) + X);
  }
  const auto opts = x.options();
  auto h1 = at::empty({B, H}, opts), c1 = at::empty({B, H}, opts);
  auto hh1 = at::empty({B, Hh}, opts), hc1 = at::empty({B, Hh}, opts);
  // The hyper cell sums ghx + g[4H:] + ghh: b̂ in ghx, and Ŵ_x [x, h] (both of Ŵ_x's products) in g[4H:].
  for (int64_t b = 0; b < B; ++b) std::copy_n(f(p[HYPER_BIAS]), 4 * Hh, ghx + b * 4 * Hh);
  // out (B, n) = a (B, k) · p[i]ᵀ (+ out with beta 1): every weight is a whole (n, k) parameter, float32 or
  // (a half-precision cell's) bfloat16 or float16, read transposed in place, so that oneDNN can run any float32
  // or bfloat16 one too.
  // A half-precision weight of a small product (the embeddings) is widened as it is loaded: its float32 product
  // is what float32 copies of it gave, and at N_z = 16 the copies cost as much as the products.
  const auto product = [&](const float* a, int64_t lda, int i, float* out, int64_t ldo, float beta = 0.0f) {
    const at::Tensor& w = p[i];
    const int64_t n = w.size(0), k = w.size(1);
    StepGemm::decode_gemm({a, lda, w.data_ptr(), k, /*w_transposed=*/true, out, ldo, B, n, k, beta,
                           w.scalar_type(), /*widen=*/!is_large_weight(i)}, w);
  };
  product(f(x), X, WEIGHT_IH, gx, 4 * H);              // W_x x
  product(xh, X + P, HYPER_WEIGHT_IH, g + 4 * H, GW);  // Ŵ_x [x, h]
  product(f(h), P, WEIGHT_HH, g, GW);                  // W_h h
  product(f(hh), Hh, HYPER_WEIGHT_HH, ghh, 4 * Hh);    // Ŵ_h ĥ
  ForwardStep st{d, ScalarKind::Float32, layer_norm, forget_bias, step_params(p),
                 g, ghh, gx, ghx, c.data_ptr(), hc.data_ptr(), nullptr, nullptr, nullptr, nullptr, h.data_ptr(),
                 hh.data_ptr(), h1.data_ptr(), c1.data_ptr(), hh1.data_ptr(), hc1.data_ptr(), ws, k.stream()};
  st.phase = StepPhase::Hyper;
  k.forward(st);
  // z = [z_bias ; 0] + ĥ_t·[z_weight ; bias_z_weight]ᵀ into the workspace's z slot
  for (int64_t b = 0; b < B; ++b) std::copy_n(f(p[Z_BIAS]), 8 * Nz, z + b * L.width);
  product(f(hh1), Hh, Z_WEIGHT, z, L.width, /*beta=*/1.0f);
  product(f(hh1), Hh, BIAS_Z_WEIGHT, z + 8 * Nz, L.width);
  // d[q] = z_q·W_qᵀ for the 12 (kind, gate) blocks q, W_q (H, N_z) from scale_weight (8 blocks) and
  // bias_scale_weight (4)
  RawGemm scales[12];
  for (int64_t q = 0; q < 12; ++q) {
    const at::Tensor& sw = q < 8 ? p[SCALE_WEIGHT] : p[BIAS_SCALE_WEIGHT];
    const auto* w = static_cast<const char*>(sw.data_ptr()) + (q % 8) * H * Nz * sw.element_size();
    scales[q] = {z + q * Nz, L.width, w, Nz, true, scale + q * B * H, H, B, H, Nz, 0.0f, sw.scalar_type(),
                 /*widen=*/true};
  }
  StepGemm::decode_batch(scales, 12);
  st.phase = StepPhase::Main;
  st.scale = scale;
  k.forward(st);
  return {h1, c1, hh1, hc1};
}

}  // namespace

// The sequence forward with T = 1 and nothing saved, minus what a decode step does not need: its per-call
// views and reshapes cost as much as the step's GEMMs at B = 1, H = 256. All its GEMMs run on the parameters
// themselves, with no copy made.
StepOut hyper_lstm_step(const StepKernels& k, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                        const at::Tensor& hh, const at::Tensor& hc, at::TensorList p, bool layer_norm,
                        double forget_bias) {
  TORCH_CHECK(x.dim() == 2, "hyperfused::hyper_lstm_step: 'x' must have shape (B, input_size), got ", x.sizes());
  const Sizes s = check_inputs(x.unsqueeze(0), h, c, hh, hc, p, std::nullopt, std::nullopt, std::nullopt,
                               std::nullopt, /*half_gemm_weights=*/true, /*projected_h=*/true);
  const c10::DeviceGuard guard(x.device());
  const NoAutocast no_autocast;
  const Dims dims = s.dims();
  const int64_t B = s.B, H = s.H, Hh = s.Hh;
  const bool split = gemm_shaped(k, /*decode=*/true);
  bool half_weights = false;
  for (int i = 0; i < NUM_PARAMS; ++i)
    half_weights = half_weights || p[i].scalar_type() == at::kBFloat16 || p[i].scalar_type() == at::kHalf;
  if (split && k.raw_blas && x.scalar_type() == at::kFloat && StepGemm::batch_allowed()) {
    // The direct products read half-precision weights as they are where they can: the large ones in a library
    // or the few-rows kernel, the small ones widened by the kernel (which needs H a multiple of 4); the rest
    // are float32 copies made here.
    std::vector<at::Tensor> q(p.begin(), p.end());
    bool raw = true;
    for (int i = 0; i < NUM_PARAMS; ++i) {
      const at::ScalarType dtype = q[i].scalar_type();
      if (dtype != at::kBFloat16 && dtype != at::kHalf) continue;
      if (is_large_weight(i))
        raw = raw && (dtype == at::kBFloat16 ? StepGemm::bf16_allowed() : StepGemm::f16_allowed());
      else if (!StepGemm::small_products_read(dtype) || s.H % 4 != 0)
        q[i] = q[i].to(at::kFloat);
    }
    if (raw) return decode_step_raw(k, s, x, h, c, hh, hc, q, layer_norm, forget_bias);
  }
  if (half_weights) {  // elsewhere half-precision weights are read as float32 copies made here
    std::vector<at::Tensor> q(p.begin(), p.end());
    for (auto& t : q) t = t.to(at::kFloat);
    return hyper_lstm_step(k, x, h, c, hh, hc, q, layer_norm, forget_bias);
  }
  const Transposed tr(p, s, Use::Decode, split);
  const auto opts = x.options();
  auto gx = at::empty({B, 4 * H}, opts), ghx = at::empty({B, 4 * Hh}, opts);
  auto g = at::empty({B, dims.g_width()}, opts), ws = at::empty({B, WsLayout(dims).width}, opts);
  auto h1 = at::empty({B, H}, opts), c1 = at::empty({B, H}, opts);
  auto hh1 = at::empty({B, Hh}, opts), hc1 = at::empty({B, Hh}, opts);
  tr.input->run(gx, x);
  tr.hyper_input->run(ghx, x);
  ForwardStep st{dims, kind_of(x), layer_norm, forget_bias, step_params(p, &tr),
                 g.data_ptr(), nullptr, gx.data_ptr(), ghx.data_ptr(), c.data_ptr(), hc.data_ptr(),
                 nullptr, nullptr, nullptr, nullptr, h.data_ptr(), hh.data_ptr(),
                 h1.data_ptr(), c1.data_ptr(), hh1.data_ptr(), hc1.data_ptr(), ws.data_ptr(), k.stream()};
  const ScaleGemms proj(p, s, split);
  ForwardStepper(k, proj, split, *tr.rec, &*tr.rec_hyper, *tr.hyper, dims, opts).run(st, g, h, hh, hh1, ws);
  return {h1, c1, hh1, hc1};
}

namespace {

// The backward's work for one step once a BackwardStep holds its pointers: the step kernel, or the GEMM-shaped
// step's phases around the projections' gradients; then the recurrent GEMMs that carry dh and dĥ to t − 1.
struct BackwardStepper {
  const StepKernels& k;
  const ScaleGemms& proj;
  // (4H+4Ĥ, H), or (4H, H) with rec_hyper (4Ĥ, H), and (4Ĥ, Ĥ): the transposed recurrent products
  const StepGemm &rec, *rec_hyper, &hyper;
  const bool split;
  const int64_t z_slot;
  const LaunchShape shape;
  // The GEMM-shaped step's buffers: d_h (4, B, H), dd (12, B, H), dz (12, B, N_z), dz·Z (B, Ĥ); with rec_hyper,
  // dh's share through Ŵ_x,h (B, H).
  at::Tensor dh_all, dd_all, dz_all, dhh_extra, dh_hyper;

  BackwardStepper(const StepKernels& k, const ScaleGemms& proj, bool split, const StepGemm& rec,
                  const StepGemm* rec_hyper, const StepGemm& hyper, const Dims& d, const at::TensorOptions& opts)
      : k(k), proj(proj), rec(rec), rec_hyper(rec_hyper), hyper(hyper), split(split), z_slot(WsLayout(d).z),
        dh_all(split ? at::empty({4, d.B, d.H}, opts) : at::Tensor()),
        dd_all(split ? at::empty({12, d.B, d.H}, opts) : at::Tensor()),
        dz_all(split ? at::empty({12, d.B, d.Nz}, opts) : at::Tensor()),
        dhh_extra(split ? at::empty({d.B, d.Hh}, opts) : at::Tensor()),
        dh_hyper(rec_hyper ? at::empty({d.B, d.H}, opts) : at::Tensor()) {}

  // ws_t (B, WsLayout.width) and dz_t (B, 12N_z), the backward workspace's dz slot, are read only by the
  // GEMM-shaped step; dg_t (B, 4H+4Ĥ) is st.dg, its hyper part (B, 4Ĥ) dg_hyper_t.
  void run(BackwardStep& st, const at::Tensor& ws_t, const at::Tensor& dz_t, const at::Tensor& dg_t,
           const at::Tensor& dg_hyper_t, at::Tensor& dh_rec, at::Tensor& dhh_rec) {
    shape.apply(st);
    if (split) {
      // d_h from the saved z (kind h), then the main cell; dz = dd·W_z for all rows at once, into the backward
      // workspace; dĥ's share dz·Z; then the hyper cell.
      const int64_t Nz = dz_all.size(2);
      proj.scales(dh_all, ws_t.narrow(1, z_slot, 4 * Nz), /*blocks=*/4);
      st.phase = StepPhase::Main;
      st.scale = dh_all.data_ptr();
      st.dd = dd_all.data_ptr();
      k.backward(st);
      proj.scale_grads(dz_all, dd_all);
      dz_t.view({dz_t.size(0), 12, Nz}).copy_(dz_all.transpose(0, 1));
      proj.embedding_grads(dhh_extra, dz_t);
      st.phase = StepPhase::Hyper;
      st.dhh_extra = dhh_extra.data_ptr();
    }
    k.backward(st);
    if (rec_hyper) {
      rec.run(dh_rec, dg_t.narrow(1, 0, dg_t.size(1) - dg_hyper_t.size(1)));
      rec_hyper->run(dh_hyper, dg_hyper_t);
      dh_rec.add_(dh_hyper);
    } else {
      rec.run(dh_rec, dg_t);
    }
    hyper.run(dhh_rec, dg_hyper_t);
  }
};

// What the backward kept or computed for all M = T·B rows, each as an (M, width) matrix: the operands of the
// weight gradients, which reduce over the rows after the time loop.
struct Rows {
  DwsLayout D;                    // the backward workspace's layout (with or without the layer norms' rows)
  at::Tensor g, gx, ws, dg, dws;  // widths g_width(), 4H, WsLayout.width, g_width(), D.width
};

// The elementwise gradients (b_0, b̂, the layer norms', the 12 scaling weights') from the step kernel's
// per-thread sums, `accum` (threads, AccumLayout.width). gp: the parameters' gradients, in PARAM order.
void grads_from_thread_sums(const at::Tensor& accum, const Dims& d, bool layer_norm, at::Tensor* gp) {
  const AccumLayout A(d);
  const auto sums = accum.sum(0);
  const auto take = [&](int64_t offset, int64_t n) {  // clones: no two parameters' grads share storage
    return sums.narrow(0, offset, n).clone();
  };
  for (const auto& [cell, C, n, bias, lnw] : {std::make_tuple(A.main, A.main_cell, d.H, BIAS, LN_WEIGHT),
                                            std::make_tuple(A.hyper, A.hyper_cell, d.Hh, HYPER_BIAS, HYPER_LN_WEIGHT)}) {
    gp[bias] = take(cell + C.bias, 4 * n);
    if (!layer_norm) continue;
    gp[lnw] = take(cell + C.ln_w, 4 * n);
    gp[lnw + 1] = take(cell + C.ln_b, 4 * n);
    gp[lnw + 2] = take(cell + C.lnc_w, n);
    gp[lnw + 3] = take(cell + C.lnc_b, n);
  }
  // (3, 4, N_z, H) → the (2, 4H, N_z) and (4H, N_z) layouts of the weights
  const auto scale = sums.narrow(0, A.scale, 12 * d.Nz * d.H).view({3, 4, d.Nz, d.H}).transpose(2, 3);
  gp[SCALE_WEIGHT] = scale.narrow(0, 0, 2).reshape({2, 4 * d.H, d.Nz});
  gp[BIAS_SCALE_WEIGHT] = scale.select(0, 2).reshape({4 * d.H, d.Nz});
}

// The same gradients reduced by ATen from the rows; returns dgx = da ⊙ d_x, the gradient of W_x x_t (which the
// step kernel that sums leaves in da's slot instead).
at::Tensor grads_from_rows(at::TensorList p, const Rows& r, const Dims& d, bool layer_norm, at::Tensor* gp) {
  const WsLayout L(d);
  const DwsLayout& D = r.D;
  const int64_t M = r.g.size(0), H = d.H, Nz = d.Nz;
  const auto da = r.dws.narrow(1, D.da, 4 * H);
  const auto z3 = r.ws.narrow(1, L.z, 12 * Nz).reshape({M, 3, 4, Nz});
  const auto w_scale = p[SCALE_WEIGHT].view({2, 4, H, Nz});
  const auto dgx = da * at::einsum("myn,yhn->myh", {z3.select(1, 1), w_scale.select(0, 1)}).reshape({M, 4 * H});
  gp[BIAS] = da.sum(0);
  gp[HYPER_BIAS] = r.dg.narrow(1, 4 * H, 4 * d.Hh).sum(0);
  const auto dd_h = (da * r.g.narrow(1, 0, 4 * H)).view({M, 4, H});
  const auto dd_x = (da * r.gx).view({M, 4, H});
  const auto dd_b = da.reshape({M, 4, H});
  gp[SCALE_WEIGHT] = at::stack({at::einsum("myh,myn->yhn", {dd_h, z3.select(1, 0)}),
                                at::einsum("myh,myn->yhn", {dd_x, z3.select(1, 1)})})
                         .reshape({2, 4 * H, Nz});
  gp[BIAS_SCALE_WEIGHT] = at::einsum("myh,myn->yhn", {dd_b, z3.select(1, 2)}).reshape({4 * H, Nz});
  if (!layer_norm) return dgx;
  // A layer norm's gain and bias gradients (parameters lnw .. lnw + 3) from the per-row dy and dcout slots.
  const auto ln_grads = [&](int64_t dy, int64_t dcout, int64_t nrm, int64_t cn, int64_t n, int lnw) {
    const auto dy_rows = r.dws.narrow(1, dy, 4 * n), dcout_rows = r.dws.narrow(1, dcout, n);
    gp[lnw] = (dy_rows * r.ws.narrow(1, nrm, 4 * n)).sum(0);
    gp[lnw + 1] = dy_rows.sum(0);
    gp[lnw + 2] = (dcout_rows * r.ws.narrow(1, cn, n)).sum(0);
    gp[lnw + 3] = dcout_rows.sum(0);
  };
  ln_grads(D.dy, D.dcout, L.n, L.cn, H, LN_WEIGHT);
  ln_grads(D.dyh, D.dhcout, L.hn, L.hcn, d.Hh, HYPER_LN_WEIGHT);
  return dgx;
}

// The gradients that are products over the rows: dx (returned, (M, X)) and the weights' (into gp), each
// operand rounded once (a no-op without a low precision: dgx, dg and hs feed several GEMMs each). x2_op: x as
// (M, X), rounded.
at::Tensor grads_from_products(const GemmPrecision& P, at::TensorList p, const Rows& r, const Dims& d,
                               const at::Tensor& x2_op, const at::Tensor& dgx, const at::Tensor& h0,
                               const at::Tensor& hs, const at::Tensor& hh0, const at::Tensor& hhs, at::Tensor* gp) {
  const auto dtype = hs.scalar_type();  // the op's (x's)
  const int64_t H = d.H, Hh = d.Hh, X = x2_op.size(1), Nz = d.Nz;
  const auto dgx_op = P.operand(dgx), dg_op = P.operand(r.dg), hs_op = P.operand(hs);
  const auto dah_op = dg_op.narrow(1, 4 * H, 4 * Hh);
  gp[WEIGHT_IH] = P.mm(dgx_op.t(), x2_op, dtype);
  // [dW_h ; dŴ_x,h] (4H+4Ĥ, H), the gradient of the recurrent product's weight, in one pass over dg
  const auto d_rec = times_prev(P, dg_op, h0, hs_op);
  gp[WEIGHT_HH] = d_rec.narrow(0, 0, 4 * H);
  gp[HYPER_WEIGHT_IH] = at::cat({P.mm(dah_op.t(), x2_op, dtype), d_rec.narrow(0, 4 * H, 4 * Hh)}, 1);
  gp[HYPER_WEIGHT_HH] = times_prev(P, dah_op, hh0, hhs);
  const auto dz = r.dws.narrow(1, r.D.dz, 12 * Nz);
  const auto hh_all = hhs.view({-1, Hh});
  // (two products, not one split: an op's outputs must not share storage)
  gp[Z_WEIGHT] = sequence_product(dz.narrow(1, 0, 8 * Nz).t(), hh_all);
  gp[Z_BIAS] = dz.narrow(1, 0, 8 * Nz).sum(0);
  gp[BIAS_Z_WEIGHT] = sequence_product(dz.narrow(1, 8 * Nz, 4 * Nz).t(), hh_all);
  return P.mm(dgx_op, P.operand(p[WEIGHT_IH]), dtype)
      .add_(P.mm(dah_op, P.operand(p[HYPER_WEIGHT_IH].narrow(1, 0, X)), dtype));
}

}  // namespace

std::vector<at::Tensor> hyper_lstm_backward(
    const StepKernels& k, const std::optional<at::Tensor>& grad_hs_in, const std::optional<at::Tensor>& grad_cs_in,
    const std::optional<at::Tensor>& grad_hhs_in, const std::optional<at::Tensor>& grad_hcs_in, const at::Tensor& x,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& hh0, const at::Tensor& hc0, at::TensorList p,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& hyper_mask, const at::Tensor& hs,
    const at::Tensor& cs, const at::Tensor& hhs, const at::Tensor& hcs, const at::Tensor& g, const at::Tensor& ws,
    bool layer_norm, double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
    const std::optional<at::Tensor>& hyper_zoneout_mask, const std::optional<at::ScalarType>& gemm_dtype) {
  const Sizes s = check_inputs(x, h0, c0, hh0, hc0, p, mask, hyper_mask, zoneout_mask, hyper_zoneout_mask);
  const GemmPrecision P = gemm_precision(gemm_dtype, x);
  const c10::DeviceGuard guard(x.device());
  const NoAutocast no_autocast;
  const Dims dims = s.dims();
  const WsLayout L(dims);
  const bool split = gemm_shaped(k);
  const bool in_kernel = sums_in_kernel(k) && !split;
  const DwsLayout D(dims, /*ln_rows=*/!in_kernel);
  const int64_t T = s.T, B = s.B, X = s.X, H = s.H, Hh = s.Hh, Nz = s.Nz, M = T * B, GW = dims.g_width();
  check_arg(hs, "hs", {T, B, H}, x);
  check_arg(cs, "cs", {T, B, H}, x);
  check_arg(hhs, "hhs", {T, B, Hh}, x);
  check_arg(hcs, "hcs", {T, B, Hh}, x);
  check_arg(g, "g", {T, B, GW}, x);
  check_arg(ws, "ws", {T, B, L.width}, x);
  const auto grad_hs = contiguous_or_none(grad_hs_in), grad_cs = contiguous_or_none(grad_cs_in);
  const auto grad_hhs = contiguous_or_none(grad_hhs_in), grad_hcs = contiguous_or_none(grad_hcs_in);
  for (const auto& [gr, name, width] : {std::make_tuple(&grad_hs, "grad_hs", H), std::make_tuple(&grad_cs, "grad_cs", H),
                                        std::make_tuple(&grad_hhs, "grad_hhs", Hh),
                                        std::make_tuple(&grad_hcs, "grad_hcs", Hh)})
    if (*gr) check_arg(**gr, name, {T, B, width}, x);

  const auto x2_op = P.operand(x.reshape({M, X}));  // rounded once for gx and the weight gradients
  const auto opts = x.options();
  const auto gx = input_gemm(P, x2_op, p[WEIGHT_IH].t(), opts).view({T, B, 4 * H});  // recomputed, not stored
  auto dg = pooled_empty({T, B, GW}, opts);
  auto dws = pooled_empty({T, B, D.width}, opts);
  auto dc = at::zeros({B, H}, opts), dhc = at::zeros({B, Hh}, opts);
  auto dh_rec = at::empty({B, H}, opts), dhh_rec = at::empty({B, Hh}, opts);
  // With zoneout the kernel leaves the share of dh_t that skips the cell here; it joins dh_{t-1} after the GEMM.
  const bool zone = zoneout_mask.has_value() && zoneout_mask->defined();
  const bool hzone = hyper_zoneout_mask.has_value() && hyper_zoneout_mask->defined();
  auto dh_zone = zone ? at::empty({B, H}, opts) : at::Tensor();
  auto dhh_zone = hzone ? at::empty({B, Hh}, opts) : at::Tensor();
  const bool concat = concat_recurrent(T);
  const Transposed tr(p, s, Use::Backward, split, concat);
  const StepParams sp = step_params(p, &tr);
  const StepGemm rec(concat ? tr.w_rec : p[WEIGHT_HH], {}, P, T), hyper(p[HYPER_WEIGHT_HH], {}, P, T);
  std::optional<StepGemm> rec_hyper;
  if (!concat) rec_hyper.emplace(hyper_h_columns(p, s), at::Tensor(), P, T);
  // the kernel's per-thread sums (~0.8 MB per thread at H = 1000, N_z = 16), zeroed, from the cache
  auto accum = in_kernel ? pooled_empty({int64_t(at::get_num_threads()), AccumLayout(dims).width}, opts).zero_()
                         : at::Tensor();
  const ScaleGemms proj(p, s, split);
  BackwardStepper stepper(k, proj, split, rec, rec_hyper ? &*rec_hyper : nullptr, hyper, dims, opts);
  // The GEMMs' per-step operands as views made once; every other per-step pointer by arithmetic (Steps).
  const auto dg_t = dg.unbind(0), dg_hyper_t = dg.narrow(2, 4 * H, 4 * Hh).unbind(0);
  const auto ws_t = split ? ws.unbind(0) : std::vector<at::Tensor>(T);
  const auto dz_t = split ? dws.narrow(2, D.dz, 12 * Nz).unbind(0) : std::vector<at::Tensor>(T);
  const Steps G(g), Gx(gx), Cs(cs), HCs(hcs), Ws(ws), DG(dg), DWs(dws);
  const Steps Mask(mask), HMask(hyper_mask), ZMask(zoneout_mask), HZMask(hyper_zoneout_mask);
  const Steps GradHs(grad_hs), GradCs(grad_cs), GradHHs(grad_hhs), GradHCs(grad_hcs);
  for (int64_t t = T - 1; t >= 0; --t) {
    const bool last = t == T - 1;
    BackwardStep st{dims, kind_of(x), layer_norm, forget_bias, sp,
                    G.at(t), Gx.at(t), Cs.at(t), Cs.prev(t, c0), HCs.at(t), HCs.prev(t, hc0), Ws.at(t),
                    Mask.at(t), HMask.at(t), ZMask.at(t), HZMask.at(t),
                    GradHs.at(t), last ? nullptr : dh_rec.data_ptr(), GradCs.at(t),
                    GradHHs.at(t), last ? nullptr : dhh_rec.data_ptr(), GradHCs.at(t),
                    dc.data_ptr(), dhc.data_ptr(), zone ? dh_zone.data_ptr() : nullptr,
                    hzone ? dhh_zone.data_ptr() : nullptr, DG.at(t), DWs.at(t),
                    in_kernel ? accum.data_ptr() : nullptr, k.stream()};
    stepper.run(st, ws_t[t], dz_t[t], dg_t[t], dg_hyper_t[t], dh_rec, dhh_rec);
    if (zone) dh_rec.add_(dh_zone);
    if (hzone) dhh_rec.add_(dhh_zone);
  }

  // Weight gradients: each a reduction over all T·B rows. The elementwise ones (and dgx, the gradient of
  // W_x x_t) the kernel summed per thread, leaving dgx in da's slot, or ATen reduces them here.
  const Rows rows{D, g.view({M, GW}), gx.view({M, 4 * H}), ws.view({M, L.width}), dg.view({M, GW}),
                  dws.view({M, D.width})};
  std::vector<at::Tensor> grads(5 + NUM_PARAMS);
  at::Tensor* gp = grads.data() + 5;
  at::Tensor dgx;
  if (in_kernel) {
    grads_from_thread_sums(accum, dims, layer_norm, gp);
    dgx = rows.dws.narrow(1, D.da, 4 * H);
  } else {
    dgx = grads_from_rows(p, rows, dims, layer_norm, gp);
  }
  if (!layer_norm)
    for (int i = LN_WEIGHT; i <= HYPER_LN_CELL_BIAS; ++i) gp[i] = at::zeros_like(p[i]);
  grads[0] = grads_from_products(P, p, rows, dims, x2_op, dgx, h0, hs, hh0, hhs, gp).view({T, B, X});
  grads[1] = dh_rec;
  grads[2] = dc;
  grads[3] = dhh_rec;
  grads[4] = dhc;
  return grads;
}

namespace {

// What besides the tensors fixes what a recorded op does: its flags, and the settings its body reads when it
// runs (the environment's step design and launch shape, torch's GEMM precision).
std::vector<int64_t> recorded_settings(const StepKernels& k, std::initializer_list<int64_t> flags) {
  const LaunchShape shape;
  const auto& ctx = at::globalContext();
  std::vector<int64_t> v(flags);
  v.insert(v.end(), {gemm_shaped(k), shape.groups, shape.cluster, sums_in_kernel(k), ctx.allowTF32CuBLAS(),
                     static_cast<int64_t>(ctx.allowFP16ReductionCuBLAS()),
                     static_cast<int64_t>(ctx.allowBF16ReductionCuBLAS())});
  return v;
}

int64_t bits_of(double v) {
  int64_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

// The parameters a recording reads in place, keyed by address, and b_0 (bias), which it copies like an input:
// the layer derives b_0 = bias_ih + bias_hh on every call, in memory at a new address each time.
std::vector<at::Tensor> in_place_params(at::TensorList p) {
  TORCH_CHECK(p.size() == NUM_PARAMS, "hyperfused::hyper_lstm: 'params' must hold ", int(NUM_PARAMS),
              " tensors, got ", p.size());
  std::vector<at::Tensor> kept(p.begin(), p.end());
  kept.erase(kept.begin() + BIAS);
  return kept;
}
std::vector<at::Tensor> with_bias(std::vector<at::Tensor> kept, const at::Tensor& bias) {
  kept.insert(kept.begin() + BIAS, bias);
  return kept;
}

}  // namespace

ForwardOut hyper_lstm_forward_recorded(const StepKernels& k, const at::Tensor& x, const at::Tensor& h0,
                                       const at::Tensor& c0, const at::Tensor& hh0, const at::Tensor& hc0,
                                       at::TensorList p, const std::optional<at::Tensor>& mask,
                                       const std::optional<at::Tensor>& hyper_mask, bool layer_norm,
                                       double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
                                       const std::optional<at::Tensor>& hyper_zoneout_mask, bool save_for_backward,
                                       const std::optional<at::ScalarType>& gemm_dtype) {
  const c10::DeviceGuard guard(x.device());  // the streams a recording is keyed by and captured on are x's device's
  const StepKernels* kp = &k;
  const auto kept = in_place_params(p);
  const auto body = [kp, kept, layer_norm, forget_bias, save_for_backward, gemm_dtype](
                        const std::vector<at::Tensor>& in) {
    const auto [hs, cs, hhs, hcs, g, ws] =
        hyper_lstm_forward(*kp, in[0], in[1], in[2], in[3], in[4], with_bias(kept, in[9]), or_none(in[5]),
                           or_none(in[6]), layer_norm, forget_bias, or_none(in[7]), or_none(in[8]), save_for_backward,
                           gemm_dtype);
    return std::vector<at::Tensor>{hs, cs, hhs, hcs, g, ws};
  };
  const auto out = run_recorded(
      *k.graphs, /*op=*/0,
      {x, h0, c0, hh0, hc0, or_undefined(mask), or_undefined(hyper_mask), or_undefined(zoneout_mask),
       or_undefined(hyper_zoneout_mask), p[BIAS]},
      kept, recorded_settings(k, {layer_norm, bits_of(forget_bias), save_for_backward, dtype_code(gemm_dtype)}),
      body);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

std::vector<at::Tensor> hyper_lstm_backward_recorded(
    const StepKernels& k, const std::optional<at::Tensor>& grad_hs, const std::optional<at::Tensor>& grad_cs,
    const std::optional<at::Tensor>& grad_hhs, const std::optional<at::Tensor>& grad_hcs, const at::Tensor& x,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& hh0, const at::Tensor& hc0, at::TensorList p,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& hyper_mask, const at::Tensor& hs,
    const at::Tensor& cs, const at::Tensor& hhs, const at::Tensor& hcs, const at::Tensor& g, const at::Tensor& ws,
    bool layer_norm, double forget_bias, const std::optional<at::Tensor>& zoneout_mask,
    const std::optional<at::Tensor>& hyper_zoneout_mask, const std::optional<at::ScalarType>& gemm_dtype) {
  const c10::DeviceGuard guard(x.device());
  const StepKernels* kp = &k;
  const auto kept = in_place_params(p);
  const auto body = [kp, kept, layer_norm, forget_bias, gemm_dtype](const std::vector<at::Tensor>& in) {
    return hyper_lstm_backward(*kp, or_none(in[0]), or_none(in[1]), or_none(in[2]), or_none(in[3]), in[4], in[5],
                               in[6], in[7], in[8], with_bias(kept, in[19]), or_none(in[9]), or_none(in[10]), in[11],
                               in[12], in[13], in[14], in[15], in[16], layer_norm, forget_bias, or_none(in[17]),
                               or_none(in[18]), gemm_dtype);
  };
  return run_recorded(*k.graphs, /*op=*/1,
                      {or_undefined(grad_hs), or_undefined(grad_cs), or_undefined(grad_hhs), or_undefined(grad_hcs),
                       x, h0, c0, hh0, hc0, or_undefined(mask), or_undefined(hyper_mask), hs, cs, hhs, hcs, g, ws,
                       or_undefined(zoneout_mask), or_undefined(hyper_zoneout_mask), p[BIAS]},
                      kept, recorded_settings(k, {layer_norm, bits_of(forget_bias), dtype_code(gemm_dtype)}), body);
}

StepOut hyper_lstm_step_recorded(const StepKernels& k, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                 const at::Tensor& hh, const at::Tensor& hc, at::TensorList p, bool layer_norm,
                                 double forget_bias) {
  const c10::DeviceGuard guard(x.device());
  const StepKernels* kp = &k;
  const auto kept = in_place_params(p);
  const auto body = [kp, kept, layer_norm, forget_bias](const std::vector<at::Tensor>& in) {
    const auto [h1, c1, hh1, hc1] =
        hyper_lstm_step(*kp, in[0], in[1], in[2], in[3], in[4], with_bias(kept, in[5]), layer_norm, forget_bias);
    return std::vector<at::Tensor>{h1, c1, hh1, hc1};
  };
  const auto out = run_recorded(*k.graphs, /*op=*/2, {x, h, c, hh, hc, p[BIAS]}, kept,
                                recorded_settings(k, {layer_norm, bits_of(forget_bias), gemm_shaped(k, true)}), body);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace hyperfused
