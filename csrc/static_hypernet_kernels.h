// Framework-independent interface for the static-hypernetwork tile generator (DESIGN.md §2): from the
// embeddings of every tile of every layer to every layer's kernel, written straight into conv layout.
#pragma once
#include <cstdint>

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
  void* out;           // flat buffer of every layer's kernel
  void* stream;
};

// The layout step alone, either way between the flat kernels and tiles of shape (tiles, in_tile, out_tile·kk)
// ordered as the second GEMM produces them.
struct TileLayoutArgs {
  int64_t tiles, in_tile, out_tile, kk;
  bool is_double;
  const int64_t* meta;
  void* flat;   // flat buffer of every layer's kernel
  void* tiled;  // (tiles, in_tile, out_tile·kk)
  void* stream;
};

void generate_tiles_cuda(const TileGenArgs& a);
void gather_tiles_cuda(const TileLayoutArgs& a);   // flat -> tiled
void scatter_tiles_cpu(const TileLayoutArgs& a);   // tiled -> flat
void gather_tiles_cpu(const TileLayoutArgs& a);    // flat -> tiled

}  // namespace hyperfused
