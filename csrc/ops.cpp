// The hyperfused operator library: schemas and the CPU implementations. CUDA implementations of the same
// schemas are registered from cuda/register_cuda.cpp when the extension is built with CUDA. Fake (meta)
// implementations are registered from Python (hyperfused/ops/), and so is autograd, except the sequence op's
// (autograd.cpp).
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "cpu/buffer_pool.h"
#include "cpu/few_rows_gemm.h"
#include "hyper_lstm.h"
#include "static_hypernet.h"

namespace {
// A Python list of `values`, each made by `item` (PyLong_FromLongLong, PyFloat_FromDouble).
template <typename V, typename Item>
PyObject* py_list(const std::vector<V>& values, Item item) {
  PyObject* list = PyList_New(Py_ssize_t(values.size()));
  if (!list) return nullptr;
  for (size_t i = 0; i < values.size(); ++i) PyList_SET_ITEM(list, Py_ssize_t(i), item(values[i]));
  return list;
}

// Runs fn for a test hook: true, or false with Python's RuntimeError set to the message of the c10::Error it threw
// (a TORCH_CHECK's), so that a refusal reaches the test as an exception rather than ending the process.
template <typename Fn>
bool ran(Fn&& fn) {
  try {
    fn();
    return true;
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return false;
  }
}

// The weights the CPU's few-rows kernel may read, by their torch names ("bfloat16-widened": bfloat16 weights
// widened to float32, RawGemm::widen).
struct FewRowsWeights {
  const char* name;
  at::ScalarType dtype;
  bool widen;
};
const FewRowsWeights kFewRowsWeights[] = {{"float32", at::kFloat, false},
                                          {"bfloat16", at::kBFloat16, false},
                                          {"bfloat16-widened", at::kBFloat16, true},
                                          {"float16", at::kHalf, false}};
}  // namespace

extern "C" {
static PyObject* empty_cpu_buffer_cache(PyObject*, PyObject*) {
  return PyLong_FromLongLong(hyperfused::empty_cpu_buffer_cache());
}
static PyObject* cpu_buffer_cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(hyperfused::cpu_buffer_cache_bytes());
}
static PyObject* hold_cpu_buffer_cache_lock(PyObject*, PyObject* ms) {
  const long long milliseconds = PyLong_AsLongLong(ms);
  if (milliseconds == -1 && PyErr_Occurred()) return nullptr;
  Py_BEGIN_ALLOW_THREADS hyperfused::hold_cpu_buffer_cache_lock(milliseconds);
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}
static PyObject* take_emulated_step_widths(PyObject*, PyObject*) {
  return py_list(hyperfused::take_emulated_step_widths(), PyLong_FromLongLong);
}
static PyObject* emulator_probe(PyObject*, PyObject* args) {
  const char* kind = nullptr;
  int blocks = 0, threads = 0, groups = 0, reverse = 0;
  if (!PyArg_ParseTuple(args, "siiip", &kind, &blocks, &threads, &groups, &reverse)) return nullptr;
  std::vector<double> out;
  if (!ran([&] { out = hyperfused::emulator_probe(kind, blocks, threads, groups, reverse); })) return nullptr;
  return py_list(out, PyFloat_FromDouble);
}
static PyObject* few_rows_gemm_weights(PyObject*, PyObject*) {
  std::vector<std::string> names;
  for (const auto& [name, dtype, widen] : kFewRowsWeights)
    if (hyperfused::few_rows_gemm_covers(dtype, widen)) names.emplace_back(name);
  return py_list(names, [](const std::string& s) { return PyUnicode_FromString(s.c_str()); });
}
// One product by the few-rows kernel on the memory of tensors the caller keeps alive: (a, lda, w, ldw, w_dtype,
// out, ldo, m, n, k, beta), pointers as ints, w_dtype a name of kFewRowsWeights. Returns whether the kernel could
// run it (else out is untouched).
static PyObject* few_rows_gemm(PyObject*, PyObject* args) {
  unsigned long long a = 0, w = 0, out = 0;
  long long lda = 0, ldw = 0, ldo = 0, m = 0, n = 0, k = 0;
  const char* name = nullptr;
  float beta = 0.0f;
  if (!PyArg_ParseTuple(args, "KLKLsKLLLLf", &a, &lda, &w, &ldw, &name, &out, &ldo, &m, &n, &k, &beta))
    return nullptr;
  const auto* entry = std::find_if(std::begin(kFewRowsWeights), std::end(kFewRowsWeights),
                                   [&](const auto& e) { return std::string(e.name) == name; });
  if (entry == std::end(kFewRowsWeights)) {
    PyErr_Format(PyExc_ValueError,
                 "w_dtype: expected 'float32', 'bfloat16', 'bfloat16-widened' or 'float16', got '%s'", name);
    return nullptr;
  }
  const hyperfused::RawGemm g{reinterpret_cast<const float*>(a), lda, reinterpret_cast<const void*>(w), ldw, true,
                              reinterpret_cast<float*>(out), ldo, m, n, k, beta, entry->dtype, entry->widen};
  if (!hyperfused::few_rows_gemm_runs(g)) Py_RETURN_FALSE;
  hyperfused::few_rows_gemm(g);
  Py_RETURN_TRUE;
}
// out (m, n) = a (m, k) · w (+ bias) in float32 by a StepGemm made for `runs` runs (its library forced by
// HYPERFUSED_STEP_GEMM, or measured), on the memory of contiguous tensors the caller keeps alive, pointers as
// ints: w as (k, n) rows, or (w_nk) as the transposed view of (n, k) rows, as the backward's and the forward's
// products read their weights; bias (n), or 0 for none.
static PyObject* step_gemm(PyObject*, PyObject* args) {
  unsigned long long a = 0, w = 0, bias = 0, out = 0;
  int w_nk = 0;
  long long m = 0, n = 0, k = 0, runs = 0;
  if (!PyArg_ParseTuple(args, "KKpKKLLLL", &a, &w, &w_nk, &bias, &out, &m, &n, &k, &runs)) return nullptr;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const auto blob = [&](unsigned long long p, at::IntArrayRef sizes) {
    return at::from_blob(reinterpret_cast<float*>(p), sizes, f32);
  };
  const bool done = ran([&] {
    const auto weight = w_nk ? blob(w, {n, k}).t() : blob(w, {k, n});
    const hyperfused::StepGemm gemm(weight, bias ? blob(bias, {n}) : at::Tensor(), {}, runs);
    auto result = blob(out, {m, n});
    gemm.run(result, blob(a, {m, k}));
  });
  if (!done) return nullptr;
  Py_RETURN_NONE;
}
static PyObject* recording_counts(PyObject*, PyObject*) {
  const auto [recorded, replayed] = hyperfused::recording_counts();
  return Py_BuildValue("(LL)", static_cast<long long>(recorded), static_cast<long long>(replayed));
}
#ifdef WITH_CUDA
static PyObject* cuda_step_device(PyObject*, PyObject*) {
  int multiprocessors = 0;
  bool clusters = false;
  hyperfused::cuda_step_device(&multiprocessors, &clusters);
  return Py_BuildValue("(iO)", multiprocessors, clusters ? Py_True : Py_False);
}
#endif
static PyMethodDef methods[] = {
    {"empty_cpu_buffer_cache", empty_cpu_buffer_cache, METH_NOARGS, "Frees the cached CPU buffers; returns bytes."},
    {"cpu_buffer_cache_bytes", cpu_buffer_cache_bytes, METH_NOARGS, "Bytes held in cached CPU buffers."},
    {"_hold_cpu_buffer_cache_lock", hold_cpu_buffer_cache_lock, METH_O, "Tests: holds the cache's lock (ms)."},
    {"_take_emulated_step_widths", take_emulated_step_widths, METH_NOARGS,
     "Tests: threads per row of each emulated CUDA step launch since the last call."},
    {"_emulator_probe", emulator_probe, METH_VARARGS, "Tests: the CUDA emulator's barriers and sums."},
    {"_few_rows_gemm_weights", few_rows_gemm_weights, METH_NOARGS,
     "Tests: the weight dtypes the CPU's few-rows kernel reads in this build, by name ('float32', ...)."},
    {"_few_rows_gemm", few_rows_gemm, METH_VARARGS, "Tests: one product by the CPU's few-rows kernel."},
    {"_step_gemm", step_gemm, METH_VARARGS, "Tests: one product by a CPU StepGemm, with or without a bias."},
    {"_recording_counts", recording_counts, METH_NOARGS,
     "Tests: (recordings made, replays run) of the sequence ops (HYPERFUSED_CUDA_GRAPHS)."},
#ifdef WITH_CUDA
    {"_cuda_step_device", cuda_step_device, METH_NOARGS,
     "Tests: (multiprocessors, clusters) of the current CUDA device, as the step launches see them."},
#endif
    {nullptr, nullptr, 0, nullptr}};
// A bare module: importing hyperfused._C runs the TORCH_LIBRARY registrations below (no pybind needed), plus
// the CPU buffer cache's functions and the test hooks.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

namespace hyperfused {
namespace {

void* no_stream() { return nullptr; }

// The emulated CUDA backend's recordings: a replay runs the body again and writes the outputs a CUDA graph would
// write, in place; so the tests check the recordings' keys, input copies and output clones without a GPU.
struct Rerun : Recording {
  Body body;
  std::vector<at::Tensor> outputs;
  void replay() override {
    const auto fresh = body();
    for (size_t i = 0; i < outputs.size(); ++i)
      if (outputs[i].defined()) outputs[i].copy_(fresh[i]);
  }
};
bool never_capturing() { return false; }
std::unique_ptr<Recording> rerun(const Body& body, std::vector<at::Tensor>& outputs) {
  auto r = std::make_unique<Rerun>();
  r->body = body;
  outputs = body();
  r->outputs = outputs;
  return r;
}
const GraphBackend kEmulatedGraphs{&never_capturing, &rerun, &no_stream};
// One pass per batch row reads the projections from cache on the CPU: the whole step in one kernel.
const StepKernels kCpuKernels{&forward_step_cpu, &backward_step_cpu, &no_stream, true, false, nullptr, true};
// The CUDA backend's configuration (cuda/register_cuda.cpp) with its kernels' code under the SIMT emulator.
const StepKernels kEmulatedCudaKernels{&forward_step_emulated, &backward_step_emulated, &no_stream, false, true,
                                        &kEmulatedGraphs};
const StepKernels& cpu_kernels() { return emulating_cuda() ? kEmulatedCudaKernels : kCpuKernels; }
// The CPU generates tiles with two BLAS GEMMs over all tiles, then the layout kernel.
const TileKernels kCpuTileKernels{nullptr, &scatter_tiles_cpu, &gather_tiles_cpu, &no_stream, nullptr};
// The CUDA backend's configuration with its kernels' code under the SIMT emulator; an H100's opt-in shared
// memory per block (227 KB) stands in for the device's.
int64_t emulated_shared_bytes() { return 227 * 1024; }
const TileKernels kEmulatedCudaTileKernels{&generate_tiles_emulated, nullptr, &gather_tiles_emulated, &no_stream,
                                           &emulated_shared_bytes};
const TileKernels& cpu_tile_kernels() { return emulating_cuda() ? kEmulatedCudaTileKernels : kCpuTileKernels; }

}  // namespace

TORCH_LIBRARY(hyperfused, m) {
  m.def(
      "hyper_lstm_forward(Tensor x, Tensor h0, Tensor c0, Tensor hh0, Tensor hc0, Tensor[] params, Tensor? mask, "
      "Tensor? hyper_mask, bool layer_norm, float forget_bias, Tensor? zoneout_mask=None, "
      "Tensor? hyper_zoneout_mask=None, bool save_for_backward=True, ScalarType? gemm_dtype=None) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "hyper_lstm_backward(Tensor? grad_hs, Tensor? grad_cs, Tensor? grad_hhs, Tensor? grad_hcs, Tensor x, "
      "Tensor h0, Tensor c0, Tensor hh0, Tensor hc0, Tensor[] params, Tensor? mask, Tensor? hyper_mask, "
      "Tensor hs, Tensor cs, Tensor hhs, Tensor hcs, Tensor g, Tensor ws, bool layer_norm, float forget_bias, "
      "Tensor? zoneout_mask=None, Tensor? hyper_zoneout_mask=None, ScalarType? gemm_dtype=None) -> Tensor[]");
  m.def(
      "hyper_lstm_step(Tensor x, Tensor h, Tensor c, Tensor hh, Tensor hc, Tensor[] params, bool layer_norm, "
      "float forget_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "generate_kernels(Tensor z, Tensor w_in, Tensor b_in, Tensor w_out, Tensor b_out, Tensor tile_meta, "
      "int numel, int kernel_size) -> Tensor");
  m.def(
      "generate_kernels_backward(Tensor grad, Tensor z, Tensor w_in, Tensor b_in, Tensor w_out, "
      "Tensor tile_meta, int kernel_size) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hyperfused, CPU, m) {
  m.impl("hyper_lstm_forward", &forward_on<cpu_kernels>);
  m.impl("hyper_lstm_backward", &backward_on<cpu_kernels>);
  m.impl("hyper_lstm_step", &step_on<cpu_kernels>);
  m.impl("generate_kernels", &generate_kernels_on<cpu_tile_kernels>);
  m.impl("generate_kernels_backward", &generate_kernels_backward_on<cpu_tile_kernels>);
}

}  // namespace hyperfused
