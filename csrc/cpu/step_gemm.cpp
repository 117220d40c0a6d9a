#include "step_gemm.h"
#include "buffer_pool.h"
#include "few_rows_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace hyperfused {
namespace {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

// The operator `name` of type Fn, or none where this torch lacks it (built without oneDNN, or older).
template <typename Fn>
std::optional<c10::TypedOperatorHandle<Fn>> find_op(const char* name) {
  const auto h = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!h) return std::nullopt;
  return h->typed<Fn>();
}

// mkldnn::_linear_pointwise(input, weight (N, K), bias?, attr, scalars, algorithm): y = input · weightᵀ.
// Looked up once; absent when torch was built without oneDNN.
const c10::TypedOperatorHandle<LinearFn>* onednn_linear() {
  static const auto handle = find_op<LinearFn>("mkldnn::_linear_pointwise");
  return handle ? &*handle : nullptr;
}

using ReorderFn = at::Tensor(const at::Tensor&, std::optional<int64_t>);

// mkldnn::_reorder_linear_weight(weight (N, K), batch_size?): the weight in oneDNN's blocked layout for a GEMM
// of batch_size rows (an opaque tensor _linear_pointwise takes as its weight). Absent without oneDNN.
const c10::TypedOperatorHandle<ReorderFn>* onednn_reorder() {
  static const auto handle = find_op<ReorderFn>("mkldnn::_reorder_linear_weight");
  return handle ? &*handle : nullptr;
}

// Whether oneDNN has bfloat16 GEMM kernels on this CPU (AVX-512 or AVX-NE-CONVERT): elsewhere (an AVX2-only
// CPU) its reorder and linear ops refuse a bfloat16 weight, so it is no candidate for one.
bool onednn_bf16() {
  static const bool supported = [] {
    const auto handle = find_op<bool()>("mkldnn::_is_mkldnn_bf16_supported");
    return handle && handle->call();
  }();
  return supported;
}

// Whether oneDNN has GEMM kernels for weights of this dtype on this CPU: float32 always, bfloat16 per onednn_bf16.
bool onednn_takes(at::ScalarType dtype) {
  return dtype == at::kFloat || (dtype == at::kBFloat16 && onednn_bf16());
}

// Whether oneDNN may make a product with weights of this dtype: torch has oneDNN, the user has not turned it off
// (torch.backends.mkldnn.enabled = False rules it out), and it has kernels for the dtype on this CPU.
bool onednn_usable(at::ScalarType dtype) {
  return onednn_linear() && at::globalContext().userEnabledMkldnn() && onednn_takes(dtype);
}

// MKL's CBLAS entry points (LP64: 32-bit MKL_INT), looked up at run time in the library holding ATen's CPU
// kernels, which links MKL in and exports them when torch is built with MKL; null otherwise. Called directly
// rather than through torch's mkl::_mkl_linear so that the product lands in `out` (a step's slice of the
// saved g, say) with the caller's row strides: that op returns a fresh tensor, which cost an allocation and a
// copy per step, as long as the GEMM itself at B = 8.
enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };
struct MklBlas {
  size_t (*sgemm_pack_get_size)(int identifier, int m, int n, int k);
  void (*sgemm_pack)(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                     int ld, float* dest);
  void (*sgemm_compute)(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                        const float* b, int ldb, float beta, float* c, int ldc);
  // bfloat16 operands (raw 16-bit values), float32 accumulation and result
  void (*gemm_bf16bf16f32)(int layout, int transa, int transb, int m, int n, int k, float alpha, const void* a,
                           int lda, const void* b, int ldb, float beta, float* c, int ldc);
};

// A function that the library holding ATen's CPU kernels exports (MKL's, when torch is built with MKL), or null.
void* torch_cpu_symbol(const char* name) {
  Dl_info info{};
  // any function defined in libtorch_cpu locates it
  if (!dladdr(reinterpret_cast<void*>(&at::_ops::mm::call), &info) || !info.dli_fname) return nullptr;
  void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (!lib) return nullptr;
  void* fn = dlsym(lib, name);
  dlclose(lib);  // RTLD_NOLOAD took a reference to a library that stays loaded; give it back
  return fn;
}

const MklBlas* mkl_blas() {
  static const auto blas = []() -> std::optional<MklBlas> {
    MklBlas b{};
    const std::pair<void**, const char*> symbols[] = {
        {reinterpret_cast<void**>(&b.sgemm_pack_get_size), "cblas_sgemm_pack_get_size"},
        {reinterpret_cast<void**>(&b.sgemm_pack), "cblas_sgemm_pack"},
        {reinterpret_cast<void**>(&b.sgemm_compute), "cblas_sgemm_compute"},
        {reinterpret_cast<void**>(&b.gemm_bf16bf16f32), "cblas_gemm_bf16bf16f32"}};
    bool found = true;
    for (const auto& [fn, name] : symbols) found = (*fn = torch_cpu_symbol(name)) != nullptr && found;
    if (!found) return std::nullopt;
    return b;
  }();
  return blas ? &*blas : nullptr;
}

// MKL's cblas_sgemm_batch: group i holds group_size[i] products of one shape, op(a)·op(b) scaled by alpha[i]
// plus beta[i]·c; the arrays of pointers list every product of every group in order.
using SgemmBatch = void(int layout, const int* transa, const int* transb, const int* m, const int* n, const int* k,
                        const float* alpha, const float** a, const int* lda, const float** b, const int* ldb,
                        const float* beta, float** c, const int* ldc, int group_count, const int* group_size);
SgemmBatch* mkl_sgemm_batch() {
  static auto* const fn = reinterpret_cast<SgemmBatch*>(torch_cpu_symbol("cblas_sgemm_batch"));
  return fn;
}

// a (m, K) rounded to bfloat16 as a contiguous (m, K) block in this thread's scratch, valid until its next
// call: a plain loop, where at::Tensor::to took ~50 µs per step at B = 32 (a dispatch, an allocation, and a
// copy kernel parallelised over the threads the GEMM had just left).
const c10::BFloat16* to_bfloat16(const float* src, int64_t m, int64_t k, int64_t lda) {
  static thread_local std::vector<c10::BFloat16> scratch;
  if (int64_t(scratch.size()) < m * k) scratch.resize(m * k);
  c10::BFloat16* __restrict dst = scratch.data();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) dst[i * k + j] = c10::BFloat16(src[i * lda + j]);  // round to nearest even
  return scratch.data();
}

const c10::BFloat16* to_bfloat16(const at::Tensor& a) {
  return to_bfloat16(a.data_ptr<float>(), a.size(0), a.size(1), a.stride(0));
}

// The wall time of fn() in seconds.
template <typename Fn>
double seconds_of(Fn&& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// How the candidates for one product are timed: `timed` turns each, the best kept, after one untimed run of each
// candidate from `warm_from` on (the first call of oneDNN's op creates its primitive, of MKL's its buffers).
// With a cutoff, only the candidates within cutoff x the fastest take the turns after the first: a clear loser
// at H = 1000 costs ~50 ms a run.
struct Rounds {
  int timed;
  size_t warm_from = 0;
  double cutoff = 0.0;  // none
};

// Per candidate, the best time of run(i), which runs candidate i on the call's own operands.
template <typename Run>
std::vector<double> best_seconds(size_t count, const Rounds& rounds, Run&& run) {
  for (size_t i = rounds.warm_from; i < count; ++i) run(i);
  std::vector<double> best(count, std::numeric_limits<double>::infinity());
  for (int turn = 0; turn < rounds.timed; ++turn) {
    const double limit = rounds.cutoff * *std::min_element(best.begin(), best.end());
    for (size_t i = 0; i < count; ++i)
      if (turn == 0 || rounds.cutoff <= 0.0 || best[i] < limit)
        best[i] = std::min(best[i], seconds_of([&] { run(i); }));
  }
  return best;
}

// The index of the fastest of candidates timed as best_seconds times them.
template <typename Run>
size_t fastest_of(size_t count, const Rounds& rounds, Run&& run) {
  const auto best = best_seconds(count, rounds, run);
  return std::min_element(best.begin(), best.end()) - best.begin();
}

// Values made once per key and process and then kept: a measured choice of library. Made under the lock, so two
// threads never measure at once (each would slow the other's timings).
template <typename Key, typename Value>
class Remembered {
 public:
  template <typename Make>
  const Value& get(const Key& key, Make&& make) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = values_.find(key);
    if (it == values_.end()) it = values_.emplace(key, make()).first;
    return it->second;  // std::map never moves its values; they are never changed once made
  }

 private:
  std::mutex mutex_;
  std::map<Key, Value> values_;
};

// MKL's LP64 interface takes sizes as int.
int mkl_int(int64_t v) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "hyperfused: a GEMM dimension (", v, ") exceeds MKL's int");
  return static_cast<int>(v);
}

// g's weight and output leading dimensions for MKL, which wants each at least its row's length, whatever
// stride a single row carries.
int mkl_ldw(const RawGemm& g) { return mkl_int(std::max(g.ldw, g.w_transposed ? g.k : g.n)); }
int mkl_ldo(const RawGemm& g) { return mkl_int(std::max(g.ldo, g.n)); }

}  // namespace

at::Tensor GemmPrecision::operand(const at::Tensor& t) const {
  if (!low) return t;
  // Rows of a CPU activation (x, dg, the states: MBs per call) into the buffer cache; anything else, a
  // transposed weight view say, keeps its layout through Tensor::to.
  const bool rows = t.is_contiguous() || (t.dim() == 2 && t.stride(1) == 1);
  if (!t.is_cpu() || !rows) return t.to(*low);
  return pooled_empty(t.sizes(), t.options().dtype(*low)).copy_(t);
}

at::Tensor GemmPrecision::mm(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) const {
  if (!low) return sequence_product(a, b);
  // cuBLAS accumulates in float32 and returns it; the CPU's low-precision GEMMs accumulate in float32 too but
  // return their inputs' dtype (as nn.Linear under autocast does), cast back here.
  if (a.is_cuda()) return at::mm(operand(a), b, out_dtype);
  auto out = pooled_empty({a.size(0), b.size(1)}, a.options().dtype(out_dtype));
  mm_out(out, a, b);
  return out;
}

void GemmPrecision::add_mm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
  if (!low)
    sequence_mm(out, a, b, at::Tensor(), true);
  else
    out.add_(mm(a, b, out.scalar_type()));
}

void GemmPrecision::mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
  if (!low)
    sequence_mm(out, a, b);
  else if (out.is_cuda())  // cuBLAS accumulates in float32 and writes it into out
    at::mm_out(out, operand(a), b, out.scalar_type());
  else {  // the low-precision result into a cached buffer, converted into out
    auto low_out = pooled_empty(out.sizes(), out.options().dtype(*low));
    at::mm_out(low_out, operand(a), b);
    out.copy_(low_out);
  }
}

StepGemm::StepGemm(const at::Tensor& w, const at::Tensor& bias, GemmPrecision precision, int64_t runs)
    : precision_(precision), w_(precision.operand(w)), bias_(bias), runs_(runs) {
  const Library force = forced();
  onednn_ = w.is_cpu() && onednn_usable(w_.scalar_type()) &&
            (force == Library::Measure || force == Library::OneDnn || force == Library::OneDnnPacked);
  onednn_packed_ = onednn_ && onednn_reorder() && force != Library::OneDnn;
  // MKL: its packed sgemm for float32 operands, its bfloat16 GEMM (float32 out) for bfloat16 ones
  const bool mkl_dtype = (w_.scalar_type() == at::kFloat && !precision_.low) || w_.scalar_type() == at::kBFloat16;
  mkl_ = w.is_cpu() && mkl_dtype && mkl_blas() && (force == Library::Measure || force == Library::Mkl);
  // Run once, a product gains nothing from a library that prepares its weight (MKL's packing, oneDNN's
  // transposed copy or reorder) and pays for the preparation: a decode step's GEMMs took up to 1.45x as long measured.
  // The own kernel: float32, or bfloat16 operands (it rounds a to bfloat16 as it reads it, and accumulates and
  // returns float32, as MKL does), for a product whose N it covers.
  RawGemm probe{};
  probe.w_transposed = true, probe.n = w_.size(1), probe.w_dtype = w_.scalar_type();
  const bool own_dtype = precision_.low ? *precision_.low == at::kBFloat16 : w_.scalar_type() == at::kFloat;
  own_ = w.is_cpu() && own_dtype && few_rows_gemm_runs(probe) &&
         (force == Library::Measure || force == Library::Own);
  if (runs == 1 && force == Library::Measure) onednn_ = onednn_packed_ = mkl_ = own_ = false;
  if (onednn_ || mkl_) {
    if (bias_.defined()) bias_nk_ = bias_.to(w_.scalar_type());  // oneDNN takes the bias in the weight's dtype
  }
  if (mkl_) {
    // MKL takes op(B) = w as (K, N) rows or, transposed, as (N, K) rows, each with a leading dimension
    if (w_.stride(1) != 1 && w_.stride(0) != 1) w_ = w_.contiguous();
    mkl_trans_ = w_.stride(1) != 1;
    // (a dimension of size 1 may carry any stride; MKL wants the leading dimension at least the row's length)
    mkl_ld_ = mkl_trans_ ? std::max(w_.stride(1), w_.size(0)) : std::max(w_.stride(0), w_.size(1));
  }
}

const at::Tensor& StepGemm::weight_nk() const {
  std::lock_guard<std::mutex> lock(prepared_->mutex);
  if (!prepared_->w_nk.defined()) {
    const auto nk = w_.t();
    // a transposed copy where w_ is (K, N) rows (the backward's products), into the buffer cache: a fresh 1.5 MB
    // at H = 256 faulted its pages in on every call, and the copy took ~1 ms where it took 0.2 ms warm
    prepared_->w_nk = nk.is_contiguous() ? nk : pooled_empty(nk.sizes(), nk.options()).copy_(nk);
  }
  return prepared_->w_nk;
}

// The weight in oneDNN's layout for `rows` rows of a: reordered at the first step, again if a caller runs it
// with another batch size.
at::Tensor StepGemm::onednn_packed_for(int64_t rows) const {
  const at::Tensor& w_nk = weight_nk();
  Prepared& p = *prepared_;
  std::lock_guard<std::mutex> lock(p.mutex);
  if (p.onednn_rows != rows) {
    RECORD_FUNCTION("hyperfused::onednn_pack", std::vector<c10::IValue>());
    p.onednn_packed = onednn_reorder()->call(w_nk, rows);
    p.onednn_rows = rows;
  }
  return p.onednn_packed;
}

// HYPERFUSED_STEP_GEMM=onednn|onednn-packed|mkl|mm|own forces a library (the tests run each); unset or empty,
// the library is measured. own is hyperfused's few-rows kernel. The products over a whole sequence follow it too
// (sequence_mm: onednn and onednn-packed force oneDNN, mkl, mm and own at::mm). Anything else is refused: a
// mistyped value must not silently measure.
StepGemm::Library StepGemm::requested() {
  const char* v = std::getenv("HYPERFUSED_STEP_GEMM");
  if (!v || !*v) return Library::Measure;
  const std::string s(v);
  if (s == "onednn") return Library::OneDnn;
  if (s == "onednn-packed") return Library::OneDnnPacked;
  if (s == "mkl") return Library::Mkl;
  if (s == "mm") return Library::Mm;
  if (s == "own") return Library::Own;
  TORCH_CHECK(false, "hyperfused: HYPERFUSED_STEP_GEMM must be 'onednn', 'onednn-packed', 'mkl', 'mm', 'own' or ",
              "unset, got '", s, "'");
  return Library::Measure;
}

// Unset under torch.use_deterministic_algorithms(True): mm. A measured choice is made per process, and two
// near-equal libraries, which sum in different orders, can be chosen differently by two processes; deterministic
// algorithms promise the same bits from run to run.
StepGemm::Library StepGemm::forced() {
  const Library r = requested();
  return r == Library::Measure && at::globalContext().deterministicAlgorithms() ? Library::Mm : r;
}

// Below this many multiply-adds a product takes a microsecond or two in every library, and timing cannot tell them
// apart: a measurement would choose at random from one process to the next, and the libraries sum in different
// orders, so a run resumed from a checkpoint in a new process would drift from the one that wrote it in the last
// bits. Such a product runs at::mm, unmeasured, in both choosers that time one product (StepGemm::choose and
// sequence_mm); the decode choosers time a step's batch of such products, and keep forced()'s answer.
constexpr int64_t kMeasuredMacs = 64 * 1024;

StepGemm::Library StepGemm::forced(int64_t m, int64_t k, int64_t n) {
  const Library force = forced();
  return force == Library::Measure && m * k * n < kMeasuredMacs ? Library::Mm : force;
}

void StepGemm::run_with(Library lib, at::Tensor& out, const at::Tensor& a) const {
  if (lib == Library::OneDnn || lib == Library::OneDnnPacked) {
    const auto bias = bias_nk_.defined() ? std::optional<at::Tensor>(bias_nk_) : std::nullopt;
    const at::Tensor w = lib == Library::OneDnn ? weight_nk() : onednn_packed_for(a.size(0));
    out.copy_(onednn_linear()->call(precision_.operand(a), w, bias, "none", c10::List<std::optional<at::Scalar>>(),
                                    std::nullopt));
  } else if (lib == Library::Mkl) {
    mkl_out(out, a);
  } else if (lib == Library::Own) {
    own_out(out, a);
  } else {
    mm_out(out, a);
  }
}

// out = a · w (+ bias) by MKL straight into out's rows: float32 against the weight packed for a's row count,
// or bfloat16 operands with float32 accumulation and result.
void StepGemm::mkl_out(at::Tensor& out, const at::Tensor& a) const {
  RECORD_FUNCTION("hyperfused::mkl_gemm", std::vector<c10::IValue>());
  const MklBlas& blas = *mkl_blas();
  const int m = mkl_int(a.size(0)), n = mkl_int(w_.size(1)), k = mkl_int(w_.size(0));
  float beta = 0.0f;
  if (bias_.defined()) {
    out.copy_(bias_.expand_as(out));
    beta = 1.0f;
  }
  float* c = out.data_ptr<float>();
  const int ldc = mkl_int(out.stride(0));
  if (precision_.low) {
    blas.gemm_bf16bf16f32(kRowMajor, kNoTrans, mkl_trans_ ? kTrans : kNoTrans, m, n, k, 1.0f, to_bfloat16(a), k,
                          w_.data_ptr(), mkl_int(mkl_ld_), beta, c, ldc);
  } else {
    blas.sgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, a.data_ptr<float>(), mkl_int(a.stride(0)),
                       packed_for(m).data_ptr<float>(), n, beta, c, ldc);
  }
}

// out = a · w (+ bias) by the few-rows kernel, which reads w as its (N, K) rows: w_ itself where it is a
// transposed view of such rows (the forward's products), else the transposed copy oneDNN reads too.
void StepGemm::own_out(at::Tensor& out, const at::Tensor& a) const {
  const at::Tensor& w_nk = weight_nk();
  float beta = 0.0f;
  if (bias_.defined()) {
    out.copy_(bias_.expand_as(out));
    beta = 1.0f;
  }
  const int64_t n = w_nk.size(0), k = w_nk.size(1);
  // (a dimension of size 1 may carry any stride: each leading dimension at least its row's length)
  few_rows_gemm({a.data_ptr<float>(), std::max(a.stride(0), k), w_nk.data_ptr(), std::max(w_nk.stride(0), k), true,
                 out.data_ptr<float>(), std::max(out.stride(0), n), a.size(0), n, k, beta, w_nk.scalar_type(), false});
}

// The weight packed for `rows` rows of a: packed at the first step, again if a caller runs it with another
// batch size.
at::Tensor StepGemm::packed_for(int rows) const {
  Prepared& p = *prepared_;
  std::lock_guard<std::mutex> lock(p.mutex);
  if (p.rows != rows) {
    RECORD_FUNCTION("hyperfused::mkl_pack", std::vector<c10::IValue>());
    const MklBlas& blas = *mkl_blas();
    const int n = mkl_int(w_.size(1)), k = mkl_int(w_.size(0));
    const auto bytes = int64_t(blas.sgemm_pack_get_size(kBMatrix, rows, n, k));
    p.weight = at::empty({(bytes + 3) / 4}, w_.options());
    blas.sgemm_pack(kRowMajor, kBMatrix, mkl_trans_ ? kTrans : kNoTrans, rows, n, k, 1.0f, w_.data_ptr<float>(),
                    mkl_int(mkl_ld_), p.weight.data_ptr<float>());
    p.rows = rows;
  }
  return p.weight;
}

// Which library is faster for this GEMM shape differs from CPU to CPU (oneDNN's kernels won by 1.5x on an AMD
// EPYC where MKL took a generic path; MKL won on an Intel Xeon with AMX, and its packed sgemm by 1.1-1.7x
// more there), so it is measured, once per shape, set of candidates and process: the best of a few runs of
// each, on the call's own operands, and the time each takes to prepare the weight (MKL's packing; oneDNN's
// transposed copy, where w_ is (K, N) rows, and its reorder). A StepGemm that will run `runs` times (a
// sequence's T steps) prepares once, so it counts a 1/runs share: at H = 1000 packing costs as much as ~15
// steps save, and a short sequence is faster unprepared.
StepGemm::Library StepGemm::choose(at::Tensor& out, const at::Tensor& a) const {
  const Library force = forced(a.size(0), w_.size(0), w_.size(1));
  if (force == Library::OneDnnPacked && !onednn_packed_ && onednn_) return Library::OneDnn;  // no reorder op
  // A forced library that cannot run this product (oneDNN without bfloat16 kernels on this CPU, MKL without
  // its CBLAS): at::mm, which runs every product.
  const bool cannot = (force == Library::OneDnn || force == Library::OneDnnPacked) ? !onednn_
                      : force == Library::Mkl ? !mkl_
                                              : force == Library::Own && !own_;
  if (cannot) return Library::Mm;
  if (force != Library::Measure) return force;
  struct Measured {
    std::vector<Library> candidates;
    std::vector<double> seconds;  // per run
    std::vector<double> setup;    // preparing the weight (MKL's packing, oneDNN's copy and reorder), per call
  };
  static Remembered<std::tuple<int64_t, int64_t, int64_t, bool, int, bool, bool, bool>, Measured> measured;
  const auto key = std::make_tuple(a.size(0), w_.size(0), w_.size(1), bias_.defined(), int(w_.scalar_type()),
                                   onednn_, mkl_, own_);
  const Measured& m = measured.get(key, [&] {
    Measured made;
    made.candidates = {Library::Mm};
    if (onednn_) made.candidates.push_back(Library::OneDnn);
    if (onednn_packed_) made.candidates.push_back(Library::OneDnnPacked);
    if (mkl_) made.candidates.push_back(Library::Mkl);
    if (own_) made.candidates.push_back(Library::Own);
    // oneDNN and the own kernel read (N, K) rows: where w_ is (K, N) rows, each call makes a transposed copy first
    const double transpose = onednn_ || own_ ? seconds_of([&] { weight_nk(); }) : 0.0;
    for (const Library lib : made.candidates) {
      if (lib == Library::OneDnn || lib == Library::Own) {
        made.setup.push_back(transpose);
      } else if (lib == Library::OneDnnPacked) {
        made.setup.push_back(transpose + seconds_of([&] { onednn_packed_for(a.size(0)); }));
      } else if (lib == Library::Mkl && !precision_.low) {
        made.setup.push_back(seconds_of([&] { packed_for(mkl_int(a.size(0))); }));
      } else {
        made.setup.push_back(0.0);
      }
    }
    made.seconds = best_seconds(made.candidates.size(), Rounds{15},
                                [&](size_t i) { run_with(made.candidates[i], out, a); });
    return made;
  });
  size_t best = 0;
  double best_cost = std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < m.candidates.size(); ++i) {
    const double setup = runs_ > 0 ? m.setup[i] / double(runs_) : 0.0;
    if (m.seconds[i] + setup < best_cost) best = i, best_cost = m.seconds[i] + setup;
  }
  return m.candidates[best];
}

void StepGemm::mm_out(at::Tensor& out, const at::Tensor& a) const {
  if (precision_.low) {
    precision_.mm_out(out, a, w_);
    if (bias_.defined()) out.add_(bias_);
  } else if (bias_.defined()) {
    at::addmm_out(out, bias_, a, w_);
  } else {
    at::mm_out(out, a, w_);
  }
}

namespace {

// A sequence's product by at::mm, or by oneDNN's matmul reading a as its input rows (OneDnn) or bᵀ (OneDnnSwapped:
// the result, (bᵀ · aᵀ), transposed back). oneDNN's op makes its input contiguous and reorders its weight itself,
// so which of the two copies less depends on the layouts: a weight gradient Σ dAᵀ·v, say, reads both operands
// transposed, and the swapped product copies the narrower one.
enum class SequenceLibrary { Mm, OneDnn, OneDnnSwapped };

void run_sequence(SequenceLibrary lib, at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& bias, bool accumulate) {
  if (lib == SequenceLibrary::Mm) {
    if (accumulate)
      out.addmm_(a, b);
    else if (bias.defined())
      at::addmm_out(out, bias, a, b);
    else
      at::mm_out(out, a, b);
    return;
  }
  RECORD_FUNCTION("hyperfused::onednn_sequence_gemm", std::vector<c10::IValue>());
  const c10::List<std::optional<at::Scalar>> no_scalars;
  const bool swapped = lib == SequenceLibrary::OneDnnSwapped;
  // oneDNN reads a weight view with gaps between its rows or columns (a narrowed parameter, a slice of dg) through
  // a reference kernel: 2.4-4.7 s, not 3 ms, for a (3200, 512) · (512, 128) product. Such a view is copied first.
  auto w = swapped ? a : b.t();
  if (!w.is_contiguous() && !w.t().is_contiguous()) w = w.contiguous();
  const auto product =
      swapped ? onednn_linear()->call(b.t(), w, std::nullopt, "none", no_scalars, std::nullopt).t()
              : onednn_linear()->call(a, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, "none",
                                      no_scalars, std::nullopt);
  accumulate ? out.add_(product) : out.copy_(product);
}

// 0: contiguous, 1: rows with a gap between them, 2: anything else (a transposed view): what the libraries copy.
int layout_of(const at::Tensor& t) { return t.is_contiguous() ? 0 : t.stride(1) == 1 ? 1 : 2; }

// The fastest library for this product, measured once per shape, layouts and process on the call's operands: the
// best of two runs of each (one, for one 1.5x slower than the fastest), the oneDNN ones after a first run that
// creates their primitive, into a scratch result so that a product that accumulates into out is made once.
SequenceLibrary measured_sequence_library(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                          const at::Tensor& bias, bool accumulate) {
  static Remembered<std::tuple<int64_t, int64_t, int64_t, int, int, bool, bool>, SequenceLibrary> fastest;
  const auto key =
      std::make_tuple(a.size(0), a.size(1), b.size(1), layout_of(a), layout_of(b), bias.defined(), accumulate);
  return fastest.get(key, [&] {
    std::vector<SequenceLibrary> candidates{SequenceLibrary::Mm, SequenceLibrary::OneDnn};
    if (!bias.defined()) candidates.push_back(SequenceLibrary::OneDnnSwapped);  // bias belongs to out's rows
    auto scratch = pooled_empty(out.sizes(), out.options());
    // at::mm has no primitive to create: only the oneDNN candidates (from 1 on) run once untimed
    return candidates[fastest_of(candidates.size(), Rounds{2, 1, 1.5},
                                 [&](size_t i) { run_sequence(candidates[i], scratch, a, b, bias, false); })];
  });
}

}  // namespace

void sequence_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                 bool accumulate) {
  TORCH_INTERNAL_ASSERT(!(accumulate && bias.defined()), "sequence_mm: a bias with accumulate");
  const bool f32 = a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat;
  auto lib = SequenceLibrary::Mm;
  if (out.is_cpu() && f32 && a.dim() == 2 && b.dim() == 2 && onednn_usable(at::kFloat)) {
    switch (StepGemm::forced(a.size(0), a.size(1), b.size(1))) {
      case StepGemm::Library::Measure:
        lib = measured_sequence_library(out, a, b, bias, accumulate);
        break;
      case StepGemm::Library::OneDnn:
      case StepGemm::Library::OneDnnPacked:  // (nothing to reorder once: the op reorders b on each call)
        lib = a.stride(1) == 1 || bias.defined() ? SequenceLibrary::OneDnn : SequenceLibrary::OneDnnSwapped;
        break;
      default:
        break;
    }
  }
  run_sequence(lib, out, a, b, bias, accumulate);
}

at::Tensor sequence_product(const at::Tensor& a, const at::Tensor& b) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  sequence_mm(out, a, b);
  return out;
}

bool StepGemm::batch_allowed() {
  // Under deterministic algorithms forced() is Mm too, but the direct calls stay, each in a fixed library (the
  // few-rows kernel where it runs, else MKL) rather than a measured one: the ATen ops took 1.8-4.9x the measured
  // libraries' time for a decode step on an AMD EPYC.
  return mkl_sgemm_batch() && requested() != Library::Mm;
}

void mkl_batch(const RawGemm* gemms, int count) {
  RECORD_FUNCTION("hyperfused::mkl_batch", std::vector<c10::IValue>());
  constexpr int kMax = 16;
  TORCH_CHECK(count <= kMax, "hyperfused: mkl_batch takes at most ", kMax, " products, got ", count);
  int transa[kMax], transb[kMax], m[kMax], n[kMax], k[kMax], lda[kMax], ldb[kMax], ldc[kMax], one[kMax];
  float alpha[kMax], beta[kMax];
  const float *a[kMax], *b[kMax];
  float* c[kMax];
  for (int i = 0; i < count; ++i) {
    const RawGemm& g = gemms[i];
    transa[i] = kNoTrans;
    transb[i] = g.w_transposed ? kTrans : kNoTrans;
    m[i] = mkl_int(g.m), n[i] = mkl_int(g.n), k[i] = mkl_int(g.k);
    lda[i] = mkl_int(std::max(g.lda, g.k)), ldb[i] = mkl_ldw(g), ldc[i] = mkl_ldo(g);
    TORCH_CHECK(g.w_dtype == at::kFloat, "hyperfused: mkl_batch takes float32 weights");
    a[i] = g.a, b[i] = static_cast<const float*>(g.w), c[i] = g.out;
    alpha[i] = 1.0f, beta[i] = g.beta, one[i] = 1;
  }
  mkl_sgemm_batch()(kRowMajor, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, count, one);
}

namespace {

// Whether oneDNN can make product g: w is the (n, k) contiguous float32 or bfloat16 tensor g reads transposed,
// g's beta is 0 or 1, and oneDNN is usable for its dtype (onednn_usable).
bool onednn_reads(const RawGemm& g, const at::Tensor& w) {
  return g.w_transposed && onednn_usable(g.w_dtype) && w.scalar_type() == g.w_dtype && w.is_contiguous() &&
         w.dim() == 2 && w.size(0) == g.n && w.size(1) == g.k && w.data_ptr() == g.w &&
         (g.beta == 0.0f || g.beta == 1.0f);
}

// g.out (+)= g.a · wᵀ by oneDNN, its result copied (or added) into g.out's rows. With a bfloat16 weight, a is
// rounded to bfloat16 and oneDNN returns its float32 sums rounded to bfloat16.
void onednn_gemm(const RawGemm& g, const at::Tensor& w) {
  RECORD_FUNCTION("hyperfused::onednn_gemm", std::vector<c10::IValue>());
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const bool bf16 = g.w_dtype == at::kBFloat16;
  const auto a = bf16 ? at::from_blob(const_cast<c10::BFloat16*>(to_bfloat16(g.a, g.m, g.k, g.lda)), {g.m, g.k},
                                      f32.dtype(at::kBFloat16))
                      : at::from_blob(const_cast<float*>(g.a), {g.m, g.k}, {g.lda, 1}, f32);
  auto out = at::from_blob(g.out, {g.m, g.n}, {g.ldo, 1}, f32);
  const auto product =
      onednn_linear()->call(a, w, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  g.beta == 0.0f ? out.copy_(product) : out.add_(product);
}

// g with a bfloat16 weight: a rounded to bfloat16 in this thread's scratch, float32 accumulation and result.
void mkl_bf16(const RawGemm& g) {
  RECORD_FUNCTION("hyperfused::mkl_bf16", std::vector<c10::IValue>());
  mkl_blas()->gemm_bf16bf16f32(kRowMajor, kNoTrans, g.w_transposed ? kTrans : kNoTrans, mkl_int(g.m), mkl_int(g.n),
                               mkl_int(g.k), 1.0f, to_bfloat16(g.a, g.m, g.k, g.lda), mkl_int(g.k), g.w,
                               mkl_ldw(g), g.beta, g.out, mkl_ldo(g));
}

// The decode step's libraries: MKL (its float32 batch GEMM, or its bfloat16 GEMM), oneDNN's matmul, or
// hyperfused's own few-rows kernel.
enum class DecodeLibrary { Mkl, OneDnn, Own };

void run_decode(DecodeLibrary lib, const RawGemm& g, const at::Tensor& w) {
  if (lib == DecodeLibrary::OneDnn)
    onednn_gemm(g, w);
  else if (lib == DecodeLibrary::Own)
    few_rows_gemm(g);
  else if (g.w_dtype == at::kBFloat16)
    mkl_bf16(g);
  else
    mkl_batch(&g, 1);
}

// The fastest for g's product of MKL and, where they can run it (onednn, own), oneDNN and the own kernel:
// measured at the first call with its shape (m, n, k), weight dtype and candidates, the best of 8 runs each,
// taking turns after one to warm each up, into scratch (g.out may hold a bias), and remembered.
DecodeLibrary fastest_decode(const RawGemm& g, const at::Tensor& w, bool onednn, bool own) {
  static Remembered<std::tuple<int64_t, int64_t, int64_t, int, bool, bool>, DecodeLibrary> fastest;
  return fastest.get(std::make_tuple(g.m, g.n, g.k, int(g.w_dtype), onednn, own), [&] {
    std::vector<DecodeLibrary> candidates{DecodeLibrary::Mkl};
    if (onednn) candidates.push_back(DecodeLibrary::OneDnn);
    if (own) candidates.push_back(DecodeLibrary::Own);
    std::vector<float> scratch(size_t(g.m * g.n));
    RawGemm trial = g;
    trial.out = scratch.data(), trial.ldo = g.n, trial.beta = 0.0f;
    return candidates[fastest_of(candidates.size(), Rounds{8},
                                 [&](size_t i) { run_decode(candidates[i], trial, w); })];
  });
}

// How a decode step's batch of products runs: MKL's batch GEMM, or the own kernel on one thread or spread.
enum class BatchLibrary { Mkl, Own, OwnSpread };

void run_batch(BatchLibrary lib, const RawGemm* gemms, int count) {
  if (lib == BatchLibrary::Mkl)
    mkl_batch(gemms, count);
  else
    few_rows_gemm_batch(gemms, count, lib == BatchLibrary::OwnSpread);
}

// The fastest way to run the batch `gemms` (all of one shape and weight dtype), of MKL's batch GEMM (mkl: float32
// weights) and, where it can run them (own), the own kernel on one thread or spread: measured as fastest_decode
// measures, at the first batch of its shape and size, into scratch, and remembered. On a 2-core AMD EPYC the 12
// scaling vectors took 12.2 µs in MKL, 9.7 µs in the kernel on one thread and 5.2 µs spread at B = 1, H = 256;
// 22.6, 19.7 and 11.4 µs at H = 1000. Each of them is under kMeasuredMacs, but the batch is not:
// neither decode chooser applies that rule (torch.use_deterministic_algorithms fixes their choice instead).
BatchLibrary fastest_batch(const RawGemm* gemms, int count, bool own, bool mkl) {
  static Remembered<std::tuple<int64_t, int64_t, int64_t, int, int, bool, bool>, BatchLibrary> fastest;
  const RawGemm& g = gemms[0];
  return fastest.get(std::make_tuple(g.m, g.n, g.k, count, int(g.w_dtype), own, mkl), [&] {
    std::vector<BatchLibrary> candidates;
    if (mkl) candidates.push_back(BatchLibrary::Mkl);
    if (own) candidates.insert(candidates.end(), {BatchLibrary::Own, BatchLibrary::OwnSpread});
    std::vector<float> scratch(size_t(count * g.m * g.n));
    std::vector<RawGemm> trial(gemms, gemms + count);
    for (int i = 0; i < count; ++i)
      trial[i].out = scratch.data() + i * g.m * g.n, trial[i].ldo = g.n, trial[i].beta = 0.0f;
    return candidates[fastest_of(candidates.size(), Rounds{8},
                                 [&](size_t i) { run_batch(candidates[i], trial.data(), count); })];
  });
}

}  // namespace

void StepGemm::decode_batch(const RawGemm* gemms, int count) {
  const Library force = forced();
  bool own = true, mkl = true;
  for (int i = 0; i < count; ++i) {
    own = own && few_rows_gemm_runs(gemms[i]);
    mkl = mkl && gemms[i].w_dtype == at::kFloat;
  }
  TORCH_CHECK(own || mkl, "hyperfused: a decode step's batch of products with half-precision weights needs the "
              "few-rows kernel, which cannot run them in this build");
  BatchLibrary lib = BatchLibrary::Mkl;  // forced (mkl, onednn), or what the own kernel cannot run
  // (Mm: deterministic algorithms, which fix the kernel where it runs; HYPERFUSED_STEP_GEMM=mm never gets here)
  if (own && (force == Library::Own || force == Library::Mm || !mkl))
    lib = force == Library::Measure ? fastest_batch(gemms, count, /*own=*/true, /*mkl=*/false)
                                    : BatchLibrary::OwnSpread;
  else if (force == Library::Measure)
    lib = fastest_batch(gemms, count, own, /*mkl=*/true);
  run_batch(lib, gemms, count);
}

bool StepGemm::bf16_allowed() {
  return mkl_blas() != nullptr;
}

bool StepGemm::f16_allowed() {
  return few_rows_gemm_covers(at::kHalf);
}

bool StepGemm::small_products_read(at::ScalarType dtype) {
  return dtype == at::kFloat || few_rows_gemm_covers(dtype, /*widen=*/true);
}

void StepGemm::decode_gemm(const RawGemm& g, const at::Tensor& w) {
  const Library force = forced();
  const bool onednn = onednn_reads(g, w), own = few_rows_gemm_runs(g);
  // no library takes a float16 weight, or widens a bfloat16 one
  if (g.w_dtype == at::kHalf || (g.widen && g.w_dtype == at::kBFloat16)) {
    few_rows_gemm(g);
    return;
  }
  DecodeLibrary lib = DecodeLibrary::Mkl;  // forced, or what a forced library cannot run
  // (run once, a product gains nothing from oneDNN's reorder: a forced onednn-packed runs it unpacked)
  if (force == Library::OneDnn || force == Library::OneDnnPacked)
    lib = onednn ? DecodeLibrary::OneDnn : DecodeLibrary::Mkl;
  else if (force == Library::Own || force == Library::Mm)  // (Mm: deterministic algorithms, as in decode_batch)
    lib = own ? DecodeLibrary::Own : DecodeLibrary::Mkl;
  else if (force == Library::Measure)
    lib = fastest_decode(g, w, onednn, own);
  run_decode(lib, g, w);
}

void StepGemm::run(at::Tensor& out, const at::Tensor& a) const {
  if (!onednn_ && !mkl_ && !own_) {
    mm_out(out, a);
    return;
  }
  Library lib = lib_.load(std::memory_order_relaxed);
  if (lib == Library::Measure) lib_.store(lib = choose(out, a), std::memory_order_relaxed);
  run_with(lib, out, a);
}

}  // namespace hyperfused
