// A deterministic SIMT emulator for the CUDA kernels, so that their code (hyper_lstm_simt.h and
// static_hypernet_simt.h, the bodies the .cu files launch) is tested on machines without a GPU: with
// HYPERFUSED_EMULATE_CUDA set, the CPU ops run the CUDA backend's configuration with these kernels in place of
// the CPU ones.
//
// Each CUDA thread is a fiber (ucontext) on the calling thread. The blocks of a launch run one after
// another, and within a block every thread runs up to its next barrier before any thread passes it, in
// ascending thread order (or descending, to expose a read that depends on which thread wrote first). A
// barrier that some threads skip or reach more often than others, undefined on a GPU, is an error here.
//
// HYPERFUSED_EMULATE_CUDA = "<multiprocessors>[,reverse]": the emulated GPU's multiprocessor count, which
// picks the launch configuration as the CUDA launch does (simt::launch_groups, simt::launch_cluster) on a GPU
// with thread-block clusters.
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../hyper_lstm.h"
#include "../hyper_lstm_simt.h"
#include "../static_hypernet_simt.h"

namespace hyperfused {
namespace {

struct EmulatedGpu {
  int multiprocessors = 0;  // 0: not emulating
  bool reverse = false;
};

EmulatedGpu emulated_gpu() {
  const char* v = std::getenv("HYPERFUSED_EMULATE_CUDA");
  EmulatedGpu gpu;
  if (!v || !*v || std::string(v) == "0") return gpu;
  const std::string s(v);
  const auto comma = s.find(',');
  const std::string count = s.substr(0, comma), order = comma == std::string::npos ? "" : s.substr(comma + 1);
  char* end = nullptr;
  const long n = std::strtol(count.c_str(), &end, 10);
  TORCH_CHECK(!count.empty() && *end == '\0' && n > 0 && n <= 100000 && (order.empty() || order == "reverse"),
              "hyperfused: HYPERFUSED_EMULATE_CUDA must be '<multiprocessors>' or '<multiprocessors>,reverse' "
              "(e.g. '132'), got '", v, "'");
  gpu.multiprocessors = int(n);
  gpu.reverse = order == "reverse";
  return gpu;
}

enum class Fiber { Ready, AtBarrier, Done };

// One block's threads as fibers.
class Block {
 public:
  static constexpr size_t kStackBytes = 64 * 1024;

  Block(int64_t threads, int groups, bool reverse, size_t shared_bytes)
      : threads_(threads), groups_(groups), reverse_(reverse), ctx_(threads), state_(threads), barriers_(threads),
        stacks_(new char[threads * kStackBytes]), red_(threads), shared_((shared_bytes + 7) / 8) {}

  // Runs body(thread) for every thread of block `row` to completion.
  void run(int64_t row, const std::function<void(int64_t)>& body) {
    row_ = row;
    body_ = &body;
    for (int64_t t = 0; t < threads_; ++t) {
      getcontext(&ctx_[t]);
      ctx_[t].uc_stack.ss_sp = stacks_.get() + t * kStackBytes;
      ctx_[t].uc_stack.ss_size = kStackBytes;
      ctx_[t].uc_link = &scheduler_;
      makecontext(&ctx_[t], &Block::entry, 0);
      state_[t] = Fiber::Ready;
      barriers_[t] = 0;
    }
    for (;;) {
      int64_t done = 0;
      for (int64_t i = 0; i < threads_; ++i) {
        const int64_t t = reverse_ ? threads_ - 1 - i : i;
        if (state_[t] == Fiber::Done) {
          ++done;
          continue;
        }
        current_ = t;
        running_ = this;
        swapcontext(&scheduler_, &ctx_[t]);
        done += state_[t] == Fiber::Done;
      }
      // Every thread has passed as many barriers as every other (and ends after the same number): a
      // __syncthreads() that only some threads reach, or that they reach a different number of times, is
      // undefined on a GPU.
      const auto [lo, hi] = std::minmax_element(barriers_.begin(), barriers_.end());
      TORCH_CHECK(*lo == *hi, "hyperfused (CUDA emulator): in block ", row, ", threads ",
                  lo - barriers_.begin(), " and ", hi - barriers_.begin(), " have reached ", *lo, " and ", *hi,
                  " barriers (a __syncthreads() not every thread reaches)");
      if (done == threads_) return;
      TORCH_CHECK(done == 0, "hyperfused (CUDA emulator): in block ", row, ", ", done, " of ", threads_,
                  " threads finished while the others wait at a barrier (a __syncthreads() not every thread "
                  "reaches)");
    }
  }

  int64_t threads() const { return threads_; }
  int groups() const { return groups_; }
  int64_t row() const { return row_; }
  void sync(int64_t t) {
    state_[t] = Fiber::AtBarrier;
    ++barriers_[t];
    swapcontext(&ctx_[t], &scheduler_);
  }
  double* red() { return red_.data(); }
  void* shared() { return shared_.data(); }

 private:
  static void entry() {
    Block* self = running_;
    const int64_t t = self->current_;
    (*self->body_)(t);
    self->state_[t] = Fiber::Done;  // returning resumes the scheduler (uc_link)
  }

  int64_t threads_;
  int groups_;
  bool reverse_;
  int64_t row_ = 0, current_ = 0;
  const std::function<void(int64_t)>* body_ = nullptr;
  ucontext_t scheduler_;
  std::vector<ucontext_t> ctx_;
  std::vector<Fiber> state_;
  std::vector<int64_t> barriers_;  // barriers each thread has reached
  std::unique_ptr<char[]> stacks_;
  std::vector<double> red_;     // one slot per thread: the reductions' shared memory
  std::vector<double> shared_;  // the launch's dynamic shared memory (8-byte aligned)
  static thread_local Block* running_;
};

thread_local Block* Block::running_ = nullptr;

// One emulated thread as hyper_lstm_simt.h's Blk. A reduction's sum runs in a fixed order, the same in
// every thread, so that all threads get the same value (as the shared-memory sum on the GPU does).
template <typename T>
struct EmulatedThread {
  Block* block;
  int64_t t;
  int64_t tid() const { return t; }
  int64_t threads() const { return block->threads(); }
  int64_t row() const { return block->row(); }
  int groups() const { return block->groups(); }
  int group() const { return int(t / group_threads()); }
  int64_t group_threads() const { return block->threads() / block->groups(); }
  int64_t lane() const { return t % group_threads(); }
  void sync() { block->sync(t); }
  T* shared() { return static_cast<T*>(block->shared()); }
  T reduce(T v, bool in_group) {
    sync();  // earlier readers of the shared slots are done
    block->red()[t] = double(v);
    sync();
    const int64_t n = in_group ? group_threads() : threads(), first = t / n * n;
    T total = 0;
    for (int64_t i = first; i < first + n; ++i) total += T(block->red()[i]);
    return total;
  }
};

// A launch: `blocks` blocks (run one after another) of `groups` thread groups of `group_threads` threads, with
// `shared_bytes` of dynamic shared memory; kernel(thread, args) is the body of one thread.
template <typename T, class Args>
void launch(int64_t blocks, int64_t group_threads, int groups, size_t shared_bytes, const Args& args,
            void (*kernel)(EmulatedThread<T>&, const Args&)) {
  const EmulatedGpu gpu = emulated_gpu();
  TORCH_CHECK(gpu.multiprocessors > 0, "hyperfused: the CUDA emulator runs only with HYPERFUSED_EMULATE_CUDA set");
  Block block(group_threads * groups, groups, gpu.reverse, shared_bytes);
  const std::function<void(int64_t)> body = [&](int64_t t) {
    EmulatedThread<T> thread{&block, t};
    kernel(thread, args);
  };
  for (int64_t row = 0; row < blocks; ++row) block.run(row, body);
}

// The step kernels as cuda/hyper_lstm_cuda.cu configures them on a GPU with thread-block clusters (sm_90):
// per batch row simt::launch_cluster blocks of simt::launch_groups groups of simt::kGroupThreads threads. A
// cluster's blocks are one Blk there (every barrier cluster-wide, sums over all its threads), so here they
// are one emulated block of that many threads, each group cluster-size times as wide.
std::mutex widths_mutex;
std::vector<int64_t> widths;  // threads per row of each step launch, for take_emulated_step_widths

template <typename T, class Step>
void launch_step(const Step& s, void (*kernel)(EmulatedThread<T>&, const Step&)) {
  const int multiprocessors = emulated_gpu().multiprocessors;
  const int groups = simt::launch_groups(s, multiprocessors);
  const int cluster = simt::launch_cluster(s, multiprocessors, /*clusters=*/true);
  {
    const std::lock_guard<std::mutex> lock(widths_mutex);
    widths.push_back(int64_t(simt::kGroupThreads) * cluster * groups);
  }
  launch<T>(s.dims.B, simt::kGroupThreads * cluster, groups, 0, s, kernel);
}

template <typename T>
void forward_kernel(EmulatedThread<T>& blk, const ForwardStep& s) { simt::forward_step<T>(blk, s); }

template <typename T>
void backward_kernel(EmulatedThread<T>& blk, const BackwardStep& s) { simt::backward_step<T>(blk, s); }

template <typename T>
void generate_kernel(EmulatedThread<T>& blk, const TileGenArgs& a) { simt::generate_tile<T>(blk, a, blk.shared()); }

template <typename T>
void gather_kernel(EmulatedThread<T>& blk, const TileLayoutArgs& a) { simt::gather_tile<T>(blk, a); }

}  // namespace

bool emulating_cuda() { return emulated_gpu().multiprocessors > 0; }

std::vector<int64_t> take_emulated_step_widths() {
  const std::lock_guard<std::mutex> lock(widths_mutex);
  return std::exchange(widths, {});
}

void forward_step_emulated(const ForwardStep& s) {
  if (s.kind == ScalarKind::Float64) launch_step<double>(s, &forward_kernel<double>);
  else launch_step<float>(s, &forward_kernel<float>);
}

void backward_step_emulated(const BackwardStep& s) {
  if (s.kind == ScalarKind::Float64) launch_step<double>(s, &backward_kernel<double>);
  else launch_step<float>(s, &backward_kernel<float>);
}

// The tile kernels as cuda/static_hypernet_cuda.cu configures them: one block of simt::kTileThreads per tile.
void generate_tiles_emulated(const TileGenArgs& a) {
  const size_t shared = generate_shared_bytes(a.z_dim, a.in_tile, a.hidden, a.is_double);
  if (a.is_double) launch<double>(a.tiles, simt::kTileThreads, 1, shared, a, &generate_kernel<double>);
  else launch<float>(a.tiles, simt::kTileThreads, 1, shared, a, &generate_kernel<float>);
}

void gather_tiles_emulated(const TileLayoutArgs& a) {
  if (a.is_double) launch<double>(a.tiles, simt::kTileThreads, 1, 0, a, &gather_kernel<double>);
  else launch<float>(a.tiles, simt::kTileThreads, 1, 0, a, &gather_kernel<float>);
}

}  // namespace hyperfused
