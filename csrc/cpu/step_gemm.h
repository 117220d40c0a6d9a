// out = a · w (+ bias) for a weight w used on every step of the time loop, with few rows in a (the batch).
// On the CPU in float32 this runs oneDNN's matmul (torch's mkldnn::_linear_pointwise op, which caches the
// primitive per shape; the library behind nn.LSTM on the CPU), the same against the weight reordered once
// into oneDNN's blocked layout for the batch size (mkldnn::_reorder_linear_weight, as nn.LSTM's RNN primitive
// keeps its weights), MKL's sgemm (at::mm_out, which packs the weight on every call), or MKL's sgemm against
// the weight packed once for the batch size and writing into out (cblas_sgemm_compute), or hyperfused's own
// few-rows kernel (few_rows_gemm.h, where the build has it), whichever is fastest on this machine for this
// shape: measured once per shape and process. None wins everywhere (oneDNN by up to 1.5x on an AMD EPYC and its
// reordered weight by 1.1-1.6x more there, MKL on an Intel Xeon and its packed weight by 1.3-1.6x more there,
// the own kernel by ~2x at B = 8 on an AMD EPYC with AVX-512 (Zen 4) where both libraries ran these products
// at a third of its speed). Elsewhere (CUDA, float64, a torch built without oneDNN and MKL) it is
// at::mm_out; with torch.backends.mkldnn disabled, oneDNN is ruled out.
//
// With a GemmPrecision of bfloat16/float16 the operands are rounded to it and the products accumulated in
// float32 (the library's low-precision GEMM: on the CPU oneDNN's, ATen's, or MKL's bfloat16 GEMM, which
// returns float32; cuBLAS returning float32 on CUDA), while out, and everything the step kernels compute from
// it, stays in the op's dtype.
#pragma once
#include <ATen/core/Tensor.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>

namespace hyperfused {

// The precision of an op's GEMM operands: none (the op's dtype) or bfloat16/float16.
struct GemmPrecision {
  std::optional<at::ScalarType> low;
  // t as a GEMM operand
  at::Tensor operand(const at::Tensor& t) const;
  // a · b in the op's dtype `out_dtype`, b already an operand
  at::Tensor mm(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) const;
  // out += a · b in out's dtype (addmm_ in place without a low precision), b already an operand
  void add_mm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const;
  // out = a · b, b already an operand
  void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const;
};

struct RawGemm;

// out = a · b (+ bias (N), added to every row), or with accumulate out += a · b: a product over a whole sequence's
// rows (the input projections, the input's and the weights' gradients). On the CPU in float32 it runs at::mm (MKL)
// or oneDNN's matmul, whichever measured faster for the shape and the operands' layouts on this machine, once per
// process (a, b may be transposed views: oneDNN, which reads its input as rows, makes the product as (bᵀ · aᵀ)ᵀ
// where that is faster). Neither wins everywhere: oneDNN took 0.43-0.57x MKL's time for these products on an AMD
// EPYC with AVX-512, where MKL runs its AVX2 kernels. HYPERFUSED_STEP_GEMM=onednn or onednn-packed forces oneDNN;
// mkl, mm and own (a kernel for few rows, not for these products) force at::mm. Elsewhere (CUDA, other dtypes,
// oneDNN disabled) at::mm.
void sequence_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = at::Tensor(),
                 bool accumulate = false);
// a · b as a new tensor (not pooled: it may be returned), made as sequence_mm makes it.
at::Tensor sequence_product(const at::Tensor& a, const at::Tensor& b);

class StepGemm {
 public:
  // w: (K, N); a strided view is fine (MKL reads either row-major layout as it is; oneDNN and the few-rows
  // kernel, which need (N, K) rows, get a copy made the first time either runs).
  // bias: (N), added to every row, or undefined.
  // runs: how many times run() will be called (a sequence's T steps), which weighs the one-time cost of
  // preparing a library (packing the weight) in the choice; 1: at::mm, unmeasured; 0: many.
  explicit StepGemm(const at::Tensor& w, const at::Tensor& bias = at::Tensor(), GemmPrecision precision = {},
                    int64_t runs = 0);
  // out (m, N) and a (m, K), each with contiguous rows, in the op's dtype.
  void run(at::Tensor& out, const at::Tensor& a) const;
  // Whether a decode step may make its products directly (mkl_batch, decode_gemm): torch has MKL's batch GEMM,
  // and HYPERFUSED_STEP_GEMM is not mm (which keeps the ATen ops). Under deterministic algorithms they are made
  // directly, each in a fixed library (the few-rows kernel where it runs, else MKL): nothing is measured.
  static bool batch_allowed();
  // One product of a decode step: by MKL straight into g.out, by oneDNN's matmul (the result copied into
  // g.out), or by hyperfused's own few-rows kernel (few_rows_gemm.h) straight into g.out, whichever measured
  // fastest for the shape and weight dtype on this machine, once per process. oneDNN only where `w` is the
  // tensor (float32 or bfloat16, g.w_dtype) whose contiguous (n, k) rows g reads transposed and g.beta is 0
  // or 1; the own kernel where g reads w transposed and the build has it for w's dtype. None wins everywhere:
  // on an AMD EPYC MKL took 2.5x oneDNN's time for W_h h at B = 1, H = 1000, and oneDNN up to 4x MKL's for
  // the small products. HYPERFUSED_STEP_GEMM=mkl, onednn or own forces one (MKL where the forced one cannot run
  // g). With a bfloat16 weight each rounds a to bfloat16 and accumulates in float32 (MKL and the own kernel
  // return float32, oneDNN bfloat16). A float16 weight only the own kernel reads (bf16_allowed says whether
  // the op may pass one).
  static void decode_gemm(const RawGemm& g, const at::Tensor& w);
  // A decode step's products of one shape (the 12 scaling vectors: n = H, k = N_z): in one call of MKL's batch
  // GEMM (float32 weights), or (where the few-rows kernel can run them) in the kernel on one thread or with the
  // products shared out among the threads, whichever measured fastest for the shape and count on this machine,
  // once per process. HYPERFUSED_STEP_GEMM=own forces the kernel (shared out), mkl and onednn MKL's (for
  // float32 weights; half-precision ones, widened, only the kernel reads).
  static void decode_batch(const RawGemm* gemms, int count);
  // Whether MKL's bfloat16 GEMM can run (torch exports it).
  static bool bf16_allowed();
  // Whether a decode step's products can read float16 weights (the few-rows kernel has them in this build).
  static bool f16_allowed();
  // Whether a decode step's small products (the embeddings and the scaling vectors) can read weights of `dtype`
  // as they are: float32, or half precision widened by the few-rows kernel where this build has it.
  static bool small_products_read(at::ScalarType dtype);

 private:
  enum class Library { Measure, OneDnn, OneDnnPacked, Mm, Mkl, Own };
  friend void sequence_mm(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
  // HYPERFUSED_STEP_GEMM's library, or Measure where it is unset.
  static Library requested();
  // requested(), or Mm where nothing is requested under torch.use_deterministic_algorithms(True).
  static Library forced();
  // forced(), or at::mm (Mm) for a product of (m, k) · (k, n) too small to time where the library is measured.
  static Library forced(int64_t m, int64_t k, int64_t n);
  Library choose(at::Tensor& out, const at::Tensor& a) const;
  void run_with(Library lib, at::Tensor& out, const at::Tensor& a) const;
  void mm_out(at::Tensor& out, const at::Tensor& a) const;
  void mkl_out(at::Tensor& out, const at::Tensor& a) const;
  void own_out(at::Tensor& out, const at::Tensor& a) const;

  GemmPrecision precision_;
  at::Tensor w_, bias_;  // the operand w, and the bias in the op's dtype
  int64_t runs_;
  bool onednn_ = false, mkl_ = false;  // which of oneDNN and MKL may run the product
  bool onednn_packed_ = false;         // and oneDNN against the weight reordered for the batch size
  bool own_ = false;                   // and the few-rows kernel
  at::Tensor bias_nk_;  // the bias in the weight's dtype, defined when either may
  bool mkl_trans_ = false;  // MKL reads w_ as (N, K) rows (w_ is a transposed view) rather than (K, N) rows
  int64_t mkl_ld_ = 0;      // and its leading dimension
  // chosen at the first run; atomic, as run() is const and a caller may share a StepGemm between threads
  mutable std::atomic<Library> lib_{Library::Measure};
  at::Tensor packed_for(int rows) const;
  const at::Tensor& weight_nk() const;
  at::Tensor onednn_packed_for(int64_t rows) const;
  // Made on first use, under the lock (run() is const: callers may share a StepGemm between threads).
  struct Prepared {
    std::mutex mutex;
    at::Tensor weight;  // w_ packed by MKL for `rows` rows of a
    int rows = -1;
    at::Tensor w_nk;  // wᵀ contiguous, for oneDNN and the few-rows kernel: a copy only their first run makes (a
                      // measured choice of MKL or at::mm never needs it; at H = 256 the copy took ~1.3 ms)
    at::Tensor onednn_packed;  // w_nk in oneDNN's blocked layout for `onednn_rows` rows of a
    int64_t onednn_rows = -1;
  };
  std::shared_ptr<Prepared> prepared_ = std::make_shared<Prepared>();
};

// A product on raw row-major memory, beside any tensor: out (m, n) = a (m, k) · op(w) + beta · out, where op(w)
// is w read as (k, n) rows, or (w_transposed) wᵀ with w read as (n, k) rows. lda, ldw and ldo are the rows'
// strides in elements. a and out are float32; w is float32, bfloat16 (a is then rounded to bfloat16 and the
// products accumulate in float32, as the libraries' bfloat16 GEMMs do; or, with widen, the few-rows kernel
// only, each weight widened to float32 and a read as it is: exactly the float32 product of the weight's
// values), or float16 (the few-rows kernel only, each weight widened to float32).
struct RawGemm {
  const float* a;
  int64_t lda;
  const void* w;
  int64_t ldw;
  bool w_transposed;
  float* out;
  int64_t ldo;
  int64_t m, n, k;
  float beta;
  at::ScalarType w_dtype = at::kFloat;
  bool widen = false;  // (bfloat16 w) widened, a not rounded
};

// Runs up to 16 products in one call of MKL's batch GEMM (StepGemm::batch_allowed() says whether it can): no
// dispatch, view or allocation per product, which at B = 1 cost more than the products themselves.
void mkl_batch(const RawGemm* gemms, int count);

}  // namespace hyperfused
