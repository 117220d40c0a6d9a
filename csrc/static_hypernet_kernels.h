// Framework-independent interface for the static-hypernetwork tile generator (docs/design.md, "Static
// hypernetwork"): from the embeddings of every tile of every layer to every layer's kernel, written straight
// into conv layout.
#pragma once
#include <cstddef>
#include <cstdint>

#include "hd.h"

namespace hyperfused {

// Tile t lands at out + meta[2t] with rows (one per output channel of the tile) meta[2t+1] elements apart;
// each row holds the tile's in_tile·k·k weights contiguously (conv layout (N_out, N_in, k, k)).
struct TileGenArgs {
  int64_t tiles, z_dim, hidden, in_tile, out_tile, kk;  // kk = k·k
  bool is_double;
  const void* z;       // (tiles, z_dim)
  const void* w_in;    // (in_tile, hidden, z_dim)
  const void* b_in;    // (in_tile, hidden)
  const void* w_out;   // (out_tile·kk, hidden)
  const void* b_out;   // (out_tile·kk)
  const int64_t* meta; // (tiles, 2) on the device of the data
  void* out;           // flat buffer of every layer's kernel, numel elements
  int64_t numel;
  void* stream;
};

// The layout step alone, either way between the flat kernels and tiles of shape (tiles, in_tile, out_tile·kk)
// ordered as the second GEMM produces them.
struct TileLayoutArgs {
  int64_t tiles, in_tile, out_tile, kk;
  bool is_double;
  const int64_t* meta;
  void* flat;   // flat buffer of every layer's kernel, numel elements
  void* tiled;  // (tiles, in_tile, out_tile·kk)
  int64_t numel;
  void* stream;
};

// Whether a tile at `offset` with `out_tile` rows `stride` apart, each `row` = in_tile·k² elements long,
// lies inside a buffer of `numel` elements without overlapping rows. Written so that nothing overflows
// int64 whatever the inputs (offsets or strides near 2^63 must not wrap into a passing check). The host
// checks every tile of a CPU tile_meta with it; the GPU kernels check their own tile before touching memory
// (a tile_meta on the GPU is not read back: that would be a host sync per call).
HF_HD bool tile_in_bounds(int64_t offset, int64_t stride, int64_t out_tile, int64_t row, int64_t numel) {
  if (offset < 0 || row <= 0 || out_tile <= 0 || stride < row || row > numel || offset > numel - row) return false;
  return out_tile == 1 || stride <= (numel - row - offset) / (out_tile - 1);
}

// Dynamic shared memory of the CUDA generation kernel: one tile's embedding and hidden layer.
HF_HD size_t generate_shared_bytes(int64_t z_dim, int64_t in_tile, int64_t hidden, bool is_double) {
  return size_t(z_dim + in_tile * hidden) * (is_double ? sizeof(double) : sizeof(float));
}

// The CUDA entry points return the cudaError_t of their launches as an int (0: launched).
int generate_tiles_cuda(const TileGenArgs& a);
int gather_tiles_cuda(const TileLayoutArgs& a);    // flat -> tiled
void scatter_tiles_cpu(const TileLayoutArgs& a);   // tiled -> flat
void gather_tiles_cpu(const TileLayoutArgs& a);    // flat -> tiled
// The CUDA kernels' code under the CPU's SIMT emulator (cpu/simt_emulator.cpp), for the tests.
void generate_tiles_emulated(const TileGenArgs& a);
void gather_tiles_emulated(const TileLayoutArgs& a);

}  // namespace hyperfused
