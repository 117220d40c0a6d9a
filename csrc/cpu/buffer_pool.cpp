#include "buffer_pool.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <chrono>
#include <cstdlib>
#include <list>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

namespace hyperfused {
namespace {

constexpr int64_t kMinBytes = int64_t(1) << 20;    // below this glibc keeps freed memory itself
constexpr int64_t kRoundBytes = int64_t(2) << 20;  // sizes a few steps of T apart share blocks

// HYPERFUSED_CPU_BUFFER_CACHE_MB, read on each call so that a process can change it as it goes.
int64_t limit_bytes() {
  const char* v = std::getenv("HYPERFUSED_CPU_BUFFER_CACHE_MB");
  if (!v || !*v) return int64_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end && *end == '\0' && mb >= 0,
              "hyperfused: HYPERFUSED_CPU_BUFFER_CACHE_MB must be a non-negative integer (megabytes), got '", v, "'");
  return int64_t(mb) << 20;
}

// Whether a request of `bytes` goes to the pool: large enough, and the cache not turned off.
bool pooled(int64_t bytes) { return bytes >= kMinBytes && limit_bytes() > 0; }

// A block of memory and its size in the pool (at least what was asked for).
struct Block {
  void* ptr;
  int64_t bytes;
};

class Pool {
 public:
  // A block of at least `bytes` and its size: the smallest cached one up to a quarter larger (a shorter
  // sequence, a smaller last batch), else a new one.
  std::pair<void*, int64_t> take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->bytes >= bytes && it->bytes <= bytes + bytes / 4 && (best == free_.end() || it->bytes < best->bytes))
          best = it;
      if (best != free_.end()) {
        const Block b = *best;
        cached_ -= b.bytes;
        free_.erase(best);
        return {b.ptr, b.bytes};
      }
    }
    return {c10::alloc_cpu(bytes), bytes};
  }

  void give_back(void* p, int64_t bytes) {
    const int64_t limit = limit_bytes_or_zero();
    std::list<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes <= limit) {
        free_.push_front({p, bytes});
        cached_ += bytes;
        p = nullptr;
      }
      while (cached_ > limit) {  // the least recently freed first
        cached_ -= free_.back().bytes;
        evicted.splice(evicted.begin(), free_, std::prev(free_.end()));
      }
    }
    if (p) c10::free_cpu(p);
    for (const Block& b : evicted) c10::free_cpu(b.ptr);
  }

  int64_t release() {
    std::list<Block> all;
    int64_t bytes;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(free_);
      bytes = cached_;
      cached_ = 0;
    }
    for (const Block& b : all) c10::free_cpu(b.ptr);
    return bytes;
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  // Held across fork() (pthread_atfork), so that a child never inherits the lock taken by a thread that
  // does not exist there; the child keeps the cached blocks, its copies of the parent's memory.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

 private:
  // A tensor freed while its deleter runs must not throw out of it: a malformed setting caches nothing.
  static int64_t limit_bytes_or_zero() {
    try {
      return limit_bytes();
    } catch (const c10::Error&) {
      return 0;
    }
  }
  std::mutex mutex_;
  std::list<Block> free_;  // most recently freed first
  int64_t cached_ = 0;
};

// Never destroyed: tensors from the pool may be freed during the interpreter's exit, after static destructors.
Pool& pool() {
  static Pool* p = [] {
    Pool* created = new Pool();
    pthread_atfork([] { pool().lock_for_fork(); }, [] { pool().unlock_after_fork(); },
                   [] { pool().unlock_after_fork(); });
    return created;
  }();
  return *p;
}

// A block handed out, the context of its DataPtr.
void give_back_block(void* ctx) {
  const Block* b = static_cast<const Block*>(ctx);
  pool().give_back(b->ptr, b->bytes);
  delete b;
}

// The pool as an allocator, so that its tensors have ordinary, resizable storages (a resize takes a new block
// from it and gives the old one back); small requests go to the CPU allocator's functions directly.
class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const int64_t bytes = int64_t(n);
    if (!pooled(bytes)) {
      void* p = c10::alloc_cpu(n);
      return {p, p, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    const auto [p, held] = pool().take((bytes + kRoundBytes - 1) / kRoundBytes * kRoundBytes);
    return {p, new Block{p, held}, &give_back_block, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator& pool_allocator() {
  static PoolAllocator* a = new PoolAllocator();
  return *a;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (!opts.device().is_cpu()) return at::empty(sizes, opts);
  if (!pooled(c10::multiply_integers(sizes) * int64_t(opts.dtype().itemsize()))) return at::empty(sizes, opts);
  return at::detail::empty_generic(sizes, &pool_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), std::nullopt);
}

void hold_cpu_buffer_cache_lock(int64_t milliseconds) {
  pool().lock_for_fork();
  std::this_thread::sleep_for(std::chrono::milliseconds(milliseconds));
  pool().unlock_after_fork();
}

int64_t empty_cpu_buffer_cache() { return pool().release(); }

int64_t cpu_buffer_cache_bytes() { return pool().cached(); }

}  // namespace hyperfused
