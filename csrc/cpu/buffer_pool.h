// at::empty for the large buffers the ops allocate on every call (the HyperLSTM's input projections, saved
// workspaces g and ws, outputs, and the backward's dg and dws; the tile generation's tiles and kernel buffer),
// with the memory of freed ones kept for the next call. On CUDA PyTorch's caching allocator does this already. On the CPU, freed memory goes back to glibc,
// which hands buffers of more than a few MB back to the OS, so every call faulted its buffers in again, page
// by page: 15-50 MB of page faults per forward+backward at T = 100, B = 32, H = 256, about 10% of its time on a
// 2-core Xeon VM (alternating processes, with and without glibc's trimming turned off).
//
// Blocks of at least 1 MB, in multiples of 2 MB, are reused for a request they hold with at most a quarter to
// spare (the smallest such); at most HYPERFUSED_CPU_BUFFER_CACHE_MB megabytes (default 1024; 0 turns the reuse off) stay
// cached while unused, the least recently freed given back first. empty_cpu_buffer_cache() gives them all back.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace hyperfused {

// An uninitialised tensor, like at::empty(sizes, opts); on the CPU, large ones come from the pool.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts);

// Frees every cached block; returns the bytes given back.
int64_t empty_cpu_buffer_cache();
// Bytes held in cached blocks now.
int64_t cpu_buffer_cache_bytes();
// For tests: holds the cache's lock for a while, as a thread inside it does, to check what fork() does then.
void hold_cpu_buffer_cache_lock(int64_t milliseconds);

}  // namespace hyperfused
