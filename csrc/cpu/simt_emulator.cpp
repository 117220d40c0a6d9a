// A deterministic SIMT emulator for the CUDA kernels, so that their code (hyper_lstm_simt.h and
// static_hypernet_simt.h, the bodies the .cu files launch) is tested on machines without a GPU: with
// HYPERFUSED_EMULATE_CUDA set, the CPU ops run the CUDA backend's configuration with these kernels in place of
// the CPU ones.
//
// Each CUDA thread is a fiber (ucontext) on the calling thread. A launch's rows (a block each, or a cluster of
// blocks) run one after another. Barriers have scopes, as on a GPU: a warp (the shuffles of a warp sum), a
// block (__syncthreads) and a cluster (its barrier; with one block per row, the block's). A fiber at a barrier
// waits until every thread of its scope is at one of the same scope. Each block of a cluster runs as far as
// it can before the next starts, each warp of a block likewise, and a warp's threads run to their next
// barrier in ascending order (or all of it descending, to expose a read that depends on which thread, warp
// or block wrote first). A barrier that some threads skip or reach more often than others, undefined on a
// GPU, is an error here. The sums are simt_sum (simt_sum.h), the same code as on the GPU, with each block's
// shared slots its own.
//
// HYPERFUSED_EMULATE_CUDA = "<multiprocessors>[,reverse][,sm80]": the emulated GPU's multiprocessor count, which
// picks the launch configuration as the CUDA launch does (simt::launch_groups, simt::launch_cluster), on a GPU
// with thread-block clusters (compute capability 9.0), or with `sm80` one without them (8.0).
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
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
  int compute_capability = 90;
};

EmulatedGpu emulated_gpu() {
  const char* v = std::getenv("HYPERFUSED_EMULATE_CUDA");
  EmulatedGpu gpu;
  if (!v || !*v || std::string(v) == "0") return gpu;
  const std::string spec(v);
  std::vector<std::string> parts;
  size_t from = 0;
  for (size_t comma; (comma = spec.find(',', from)) != std::string::npos; from = comma + 1)
    parts.push_back(spec.substr(from, comma - from));
  parts.push_back(spec.substr(from));
  char* end = nullptr;
  const long n = std::strtol(parts[0].c_str(), &end, 10);
  bool ok = !parts[0].empty() && *end == '\0' && n > 0 && n <= 100000;
  for (size_t i = 1; i < parts.size(); ++i) {
    const bool repeated = std::find(parts.begin() + 1, parts.begin() + i, parts[i]) != parts.begin() + i;
    ok = ok && !repeated && (parts[i] == "reverse" || parts[i] == "sm80");
  }
  TORCH_CHECK(ok, "hyperfused: HYPERFUSED_EMULATE_CUDA must be '<multiprocessors>' followed by ',reverse' and/or "
              "',sm80' (e.g. '132' or '108,sm80'), got '", v, "'");
  gpu.multiprocessors = int(n);
  gpu.reverse = std::find(parts.begin() + 1, parts.end(), "reverse") != parts.end();
  if (std::find(parts.begin() + 1, parts.end(), "sm80") != parts.end()) gpu.compute_capability = 80;
  return gpu;
}

// Where a fiber stands: running or ready to, waiting at a barrier of a scope (its warp, its block, its
// cluster), or finished.
enum class Fiber { Ready, AtWarp, AtBlock, AtCluster, Done };

// One launch unit's threads as fibers: a cluster of `blocks` blocks (one block without clusters), each with
// its own shared memory.
class Cluster {
 public:
  static constexpr size_t kStackBytes = 64 * 1024;

  Cluster(int blocks, int64_t block_threads, int groups, bool reverse, size_t shared_bytes)
      : blocks_(blocks), block_threads_(block_threads), threads_(blocks * block_threads), groups_(groups),
        reverse_(reverse), ctx_(threads_), state_(threads_),
        stacks_(new char[threads_ * kStackBytes]), slots_(blocks * simt::kSumSlots), lanes_(threads_),
        shared_words_((shared_bytes + 7) / 8), shared_(blocks * shared_words_) {}

  // Runs body(thread) for every thread of the cluster that owns batch row `row` to completion. Each block
  // runs as far as it can (through its warps' and its own barriers) before the next block starts, in
  // ascending order or (reverse) descending, threads likewise, so that a read of another thread's or
  // block's write that lacks the barrier between them sees stale data in one order or the other.
  void run(int64_t row, const std::function<void(int64_t)>& body) {
    row_ = row;
    body_ = &body;
    for (int64_t t = 0; t < threads_; ++t) {
      getcontext(&ctx_[t]);
      ctx_[t].uc_stack.ss_sp = stacks_.get() + t * kStackBytes;
      ctx_[t].uc_stack.ss_size = kStackBytes;
      ctx_[t].uc_link = &scheduler_;
      makecontext(&ctx_[t], &Cluster::entry, 0);
      state_[t] = Fiber::Ready;
    }
    for (;;) {
      for (int i = 0; i < blocks_; ++i) run_block(reverse_ ? blocks_ - 1 - i : i);
      const int64_t done = std::count(state_.begin(), state_.end(), Fiber::Done);
      const int64_t waiting = std::count(state_.begin(), state_.end(), Fiber::AtCluster);
      if (done == threads_) return;
      // A barrier is released only when every thread of its scope waits at one, so a thread that skips one
      // leaves the others waiting while it runs on or finishes: undefined on a GPU, an error here.
      TORCH_CHECK(waiting == threads_, "hyperfused (CUDA emulator): row ", row, ": ", stuck_message());
      std::fill(state_.begin(), state_.end(), Fiber::Ready);
    }
  }

  int64_t threads() const { return threads_; }
  int64_t block_threads() const { return block_threads_; }
  int groups() const { return groups_; }
  int64_t row() const { return row_; }
  // A barrier of this thread's warp, block or cluster: the fiber waits until every thread of that scope has
  // reached one of the same scope.
  void wait(int64_t t, Fiber scope) {
    state_[t] = scope;
    swapcontext(&ctx_[t], &scheduler_);
  }
  template <typename T>
  T* slots(int64_t block) { return reinterpret_cast<T*>(slots_.data() + block * simt::kSumSlots); }
  double* lanes() { return lanes_.data(); }
  void* shared(int64_t block) { return shared_.data() + block * shared_words_; }

 private:
  static void entry() {
    Cluster* self = running_;
    const int64_t t = self->current_;
    (*self->body_)(t);
    self->state_[t] = Fiber::Done;  // returning resumes the scheduler (uc_link)
  }

  // Runs block b's ready threads, releasing its warps and the block at their barriers, until none is ready.
  // Each warp runs as far as it can before the next, so that a warp that races ahead (into the next sum, say)
  // does so before the others have read what it overwrites.
  void run_block(int b) {
    const int64_t first = b * block_threads_, warps = block_threads_ / 32;
    for (bool progress = true; progress;) {
      progress = false;
      for (int64_t i = 0; i < warps; ++i) {
        const int64_t w = first + 32 * (reverse_ ? warps - 1 - i : i);
        for (bool more = true; more;) {
          more = false;
          for (int64_t j = 0; j < 32; ++j) {
            const int64_t t = w + (reverse_ ? 31 - j : j);
            if (state_[t] != Fiber::Ready) continue;
            current_ = t;
            running_ = this;
            swapcontext(&scheduler_, &ctx_[t]);
            more = true;
          }
          more |= release(w, 32, Fiber::AtWarp);
          progress |= more;
        }
      }
      progress |= release(first, block_threads_, Fiber::AtBlock);
    }
  }

  // Releases threads [first, first + n) if all of them wait at a barrier of `scope`.
  bool release(int64_t first, int64_t n, Fiber scope) {
    for (int64_t t = first; t < first + n; ++t)
      if (state_[t] != scope) return false;
    std::fill(state_.begin() + first, state_.begin() + first + n, Fiber::Ready);
    return true;
  }

  std::string stuck_message() const {
    const char* names[] = {"running", "at a warp barrier", "at __syncthreads()", "at the cluster barrier", "finished"};
    for (int64_t t = 1; t < threads_; ++t)
      if (state_[t] != state_[0])
        return "thread 0 is " + std::string(names[int(state_[0])]) + " while thread " + std::to_string(t) + " is " +
               names[int(state_[t])] + " (a barrier not every thread reaches)";
    return "no thread can go on";
  }

  int blocks_;
  int64_t block_threads_, threads_;
  int groups_;
  bool reverse_;
  int64_t row_ = 0, current_ = 0;
  const std::function<void(int64_t)>* body_ = nullptr;
  ucontext_t scheduler_;
  std::vector<ucontext_t> ctx_;
  std::vector<Fiber> state_;
  std::unique_ptr<char[]> stacks_;
  std::vector<double> slots_;  // each block's simt::kSumSlots sum slots (shared memory)
  std::vector<double> lanes_;  // one value per thread: the warp sums' exchange (the shuffles' registers)
  size_t shared_words_;
  std::vector<double> shared_;  // each block's dynamic shared memory (8-byte aligned)
  static thread_local Cluster* running_;
};

thread_local Cluster* Cluster::running_ = nullptr;

// One emulated thread as hyper_lstm_simt.h's Blk (a cluster's blocks presented as one block, as CudaCluster
// does), and as simt_sum's Thr: the same sums as on a GPU, warp sums exchanged through a per-thread slot
// between two warp barriers instead of shuffles.
template <typename T>
struct EmulatedThread {
  Cluster* cluster;
  int64_t t;
  int64_t tid() const { return t; }
  int64_t threads() const { return cluster->threads(); }
  int64_t row() const { return cluster->row(); }
  int groups() const { return cluster->groups(); }
  int group() const { return int(t / group_threads()); }
  int64_t group_threads() const { return cluster->threads() / cluster->groups(); }
  int64_t lane() const { return t % group_threads(); }
  void sync() { cluster->wait(t, Fiber::AtCluster); }
  T* shared() { return static_cast<T*>(cluster->shared(rank())); }
  T reduce(T v, bool in_group) { return simt::simt_sum(*this, v, in_group); }
  // simt_sum's primitives
  int64_t thread() const { return t % cluster->block_threads(); }
  int64_t block_threads() const { return cluster->block_threads(); }
  unsigned rank() const { return unsigned(t / cluster->block_threads()); }
  T warp_sum(T v) {
    double* lanes = cluster->lanes();
    lanes[t] = double(v);
    cluster->wait(t, Fiber::AtWarp);
    T total = 0;
    for (int64_t i = t / 32 * 32; i < t / 32 * 32 + 32; ++i) total += T(lanes[i]);
    cluster->wait(t, Fiber::AtWarp);  // every lane has read before any writes again
    return total;
  }
  void block_sync() { cluster->wait(t, Fiber::AtBlock); }
  void cluster_sync() { cluster->wait(t, Fiber::AtCluster); }
  T* slots() { return cluster->slots<T>(rank()); }
  T block_total(unsigned r) { return cluster->slots<T>(r)[simt::kSumSlots - 1]; }
};

// A launch: `rows` clusters (run one after another) of `cluster` blocks of `groups` thread groups of
// `group_threads` threads, with `shared_bytes` of dynamic shared memory per block; kernel(thread, args) is the
// body of one thread.
template <typename T, class Args>
void launch(int64_t rows, int cluster, int64_t group_threads, int groups, size_t shared_bytes, const Args& args,
            void (*kernel)(EmulatedThread<T>&, const Args&)) {
  const EmulatedGpu gpu = emulated_gpu();
  TORCH_CHECK(gpu.multiprocessors > 0, "hyperfused: the CUDA emulator runs only with HYPERFUSED_EMULATE_CUDA set");
  Cluster unit(cluster, group_threads * groups, groups, gpu.reverse, shared_bytes);
  const std::function<void(int64_t)> body = [&](int64_t t) {
    EmulatedThread<T> thread{&unit, t};
    kernel(thread, args);
  };
  for (int64_t row = 0; row < rows; ++row) unit.run(row, body);
}

std::mutex widths_mutex;
std::vector<int64_t> widths;  // threads per row of each step launch, for take_emulated_step_widths

template <typename T, class Step>
void launch_step(const Step& s, void (*kernel)(EmulatedThread<T>&, const Step&)) {
  const EmulatedGpu gpu = emulated_gpu();
  const int groups = simt::launch_groups(s, gpu.multiprocessors);
  // the emulated kernels are the code for every target
  const bool clusters = simt::clusters_runnable(gpu.compute_capability, gpu.compute_capability);
  const int cluster = simt::launch_cluster(s, gpu.multiprocessors, clusters);
  {
    const std::lock_guard<std::mutex> lock(widths_mutex);
    widths.push_back(int64_t(simt::kGroupThreads) * cluster * groups);
  }
  launch<T>(s.dims.B, cluster, simt::kGroupThreads, groups, 0, s, kernel);
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
  if (a.is_double) launch<double>(a.tiles, 1, simt::kTileThreads, 1, shared, a, &generate_kernel<double>);
  else launch<float>(a.tiles, 1, simt::kTileThreads, 1, shared, a, &generate_kernel<float>);
}

std::vector<double> emulator_probe(const std::string& kind, int blocks, int64_t block_threads, int groups,
                                   bool reverse) {
  TORCH_CHECK(blocks >= 1 && blocks <= 8 && block_threads >= 32 && block_threads <= 1024 && block_threads % 32 == 0 &&
                  (groups == 1 || groups == 2 || groups == 4) && block_threads * blocks % (32 * groups) == 0,
              "hyperfused: emulator_probe: bad launch shape");
  // checked here, not in the body: an error thrown on an emulated thread would end the process
  const char* const kinds[] = {"sum", "group_sum", "skip_block_barrier", "skip_cluster_barrier", "read_next_block",
                               "read_next_block_after_cluster_barrier"};
  TORCH_CHECK(std::find(std::begin(kinds), std::end(kinds), kind) != std::end(kinds),
              "hyperfused: emulator_probe: unknown kind '", kind, "'");
  Cluster unit(blocks, block_threads, groups, reverse, 0);
  std::vector<double> out(unit.threads(), 0.0), global(blocks, -1.0);
  const std::function<void(int64_t)> body = [&](int64_t t) {
    EmulatedThread<double> th{&unit, t};
    const int64_t r = th.rank();
    if (kind == "sum" || kind == "group_sum") {
      out[t] = th.reduce(double(t + 1), kind == "group_sum");
    } else if (kind == "skip_block_barrier") {
      if (t != 3) th.block_sync();
    } else if (kind == "skip_cluster_barrier") {
      if (t != 3) th.sync();
    } else {  // read_next_block, read_next_block_after_cluster_barrier
      if (th.thread() == 0) global[r] = double(r);
      if (kind == "read_next_block") th.block_sync();
      else th.sync();
      out[t] = global[(r + 1) % blocks];
    }
  };
  unit.run(0, body);
  return out;
}

void gather_tiles_emulated(const TileLayoutArgs& a) {
  if (a.is_double) launch<double>(a.tiles, 1, simt::kTileThreads, 1, 0, a, &gather_kernel<double>);
  else launch<float>(a.tiles, 1, simt::kTileThreads, 1, 0, a, &gather_kernel<float>);
}

}  // namespace hyperfused
