// HF_HD marks a function compiled for the host and, under nvcc, for the device too: the one definition of
// the layouts and the per-element math that the CPU and CUDA kernels share.
#pragma once

#if defined(__CUDACC__)
#define HF_HD __host__ __device__ __forceinline__
#else
#define HF_HD inline
#endif
