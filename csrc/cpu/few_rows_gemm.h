// hyperfused's own kernel for a product with few rows: a decode step's out (m, n) = a (m, k) · wᵀ (+ beta·out),
// m the batch (often 1), w a whole weight read as its (n, k) rows. Each output is a dot product of a row of a
// with a row of w, computed in a register tile of up to 4 rows of a by 4 rows of w, so that at m <= 4 every
// weight is read once, straight from its rows, with no call into a library around it. At m = 1 the libraries'
// per-call work outweighs the arithmetic: on an AMD EPYC at H = 256 the decode step's four products took 3-14 µs
// each here, 7-26 µs in MKL (float32 weights) and 27-42 µs in oneDNN (bfloat16), under the profiler. It is one
// of the candidates StepGemm measures, for a decode step's products (decode_gemm) and for the time loop's
// (run; float32, and bfloat16 under autocast): at m = 8 it was level with the libraries on a Zen 5 EPYC and took
// half their time on a Zen 4 one.
// With float32 weights and k <= 16 (the 12 scaling vectors' N_z) it works 16 outputs of a row at a time
// instead, from 16 rows of w transposed in registers: a dot product would spend a 16-lane sum on each few
// multiply-adds (StepGemm::decode_batch measures it against MKL's batch GEMM).
//
// float32 weights: AVX-512 FMAs. bfloat16 weights: a is rounded to bfloat16 (nearest even) and each pair of
// products summed into float32 by AVX512-BF16's dot instruction, as MKL's and oneDNN's bfloat16 GEMMs round
// and accumulate; or (RawGemm::widen, the decode step's small products) each weight widened to float32 as it is
// loaded, a as it is. float16 weights (AVX-512 BW and VL): widened likewise. Built
// for the build machine's vector extensions (-march=native): where it lacks them, the kernel is absent and the
// libraries run every product (a float16 cell's decode step then reads float32 copies of its weights).
#pragma once
#include "step_gemm.h"

namespace hyperfused {

// Whether this build has the kernel for g: w read transposed (as (n, k) rows), n a multiple of 4 (every
// product a decode step makes: n is 4H or 4Ĥ), beta 0 or 1, and the weight's dtype one the build's vector
// extensions cover (few_rows_gemm_covers).
bool few_rows_gemm_runs(const RawGemm& g);

// g by the kernel; few_rows_gemm_runs(g) must hold. Spreads the columns over threads where there is enough
// work for each.
void few_rows_gemm(const RawGemm& g);

// The `count` products, each as few_rows_gemm(gemms[i]) runs it (few_rows_gemm_runs must hold for each): one
// after another on this thread, or (spread) the products shared out among the threads. Which is faster depends
// on the machine's threads and the products' size, so StepGemm::decode_batch measures.
void few_rows_gemm_batch(const RawGemm* gemms, int count, bool spread);

// Whether the kernel reads weights of `dtype` in this build: float32 with AVX-512, bfloat16 with AVX512-BF16 and
// BW (a rounded to bfloat16) or, widened (RawGemm::widen), with AVX-512 BW and VL, float16 with AVX-512 BW and VL.
bool few_rows_gemm_covers(at::ScalarType dtype, bool widen = false);

}  // namespace hyperfused
