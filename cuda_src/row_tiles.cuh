// The thread-block tile of x that columnwise.cu's one-pass kernel and
// quantize.cu's 16x16-tile kernel work on: kTileRows rows x RowTile::kCols
// columns (kTileRowBytes of each row), four threads a row. Loading its row
// blocks, the amax of each of its 16x16 tiles (TE's 2-D tiles,
// docs/te_numerics.md section 4) and one block's outputs.
#pragma once

#include "numerics.cuh"
#include "load.cuh"
#include "layouts.cuh"
#include "blocks.cuh"

namespace nvfp4 {

constexpr int kTileRows = 64;  // four column blocks of x^T a tile column (ops/columnwise.py's tile_shape reads this)
constexpr int kTileRowBytes = 512;  // of each row: 32 KiB of x a tile (ops/columnwise.py's tile_shape reads this)
constexpr int kThreadsPerRow = 4;  // rowwise: threads sharing a row of the tile

template <typename Input>
struct RowTile {
  typedef typename Input::raw_t raw_t;
  static constexpr int kCols = kTileRowBytes / sizeof(raw_t);  // 256 16-bit or 128 float32 values
  // 16 bytes of padding a row: a quarter warp's 16-byte stores of four rows
  // land in different banks.
  static constexpr int kPitch = kCols + 16 / sizeof(raw_t);
  static constexpr int kWords = 4 * sizeof(raw_t);  // u32 words of a 16-value block
  // Blocks a thread quantizes in each direction (the tile has kTileRows *
  // kCols / 16 of each, shared by kThreadsPerBlock threads).
  static constexpr int kBlocksPerThread = kTileRows * kCols / kBlockSize / kThreadsPerBlock;
};

// Where a thread of a thread block sits in the block's tile (grid x over
// tiles of rows, grid y over tiles of columns): the tile's first row and
// column of x, the thread t, its tile row r = t / kThreadsPerRow and that
// row of x.
struct TileThread {
  int first_row, first_col, t, r, row;
};

template <typename Input>
__device__ __forceinline__ TileThread tile_thread() {
  const int first_row = blockIdx.x * kTileRows;
  const int first_col = blockIdx.y * RowTile<Input>::kCols;
  const int t = threadIdx.x;
  const int r = t / kThreadsPerRow;
  return TileThread{first_row, first_col, t, r, first_row + r};
}

// A thread's row blocks of the tile: tile row t / kThreadsPerRow, blocks
// t % kThreadsPerRow, + kThreadsPerRow, ... of it (each load instruction of
// a warp contiguous in a row); rows past m (and columns past n) read as zeros.
template <typename Input, bool kVectorLoads>
__device__ __forceinline__ void load_tile_row(const typename Input::raw_t* __restrict__ x, long long row_stride,
                                              int m, int n, int first_row, int first_col,
                                              u32 (&words)[RowTile<Input>::kBlocksPerThread][RowTile<Input>::kWords]) {
  typedef RowTile<Input> Tile;
  const int t = threadIdx.x;
  const int row = first_row + t / kThreadsPerRow;
#pragma unroll
  for (int b = 0; b < Tile::kBlocksPerThread; ++b) {
    const int column = first_col + (t % kThreadsPerRow + b * kThreadsPerRow) * kBlockSize;
    if (row < m) {
      load_block<Input, kVectorLoads>(x + row * row_stride, column, n, words[b]);
    } else {
#pragma unroll
      for (int w = 0; w < Tile::kWords; ++w) words[b][w] = 0;
    }
  }
}

// The amax of every 16x16 tile of the thread block's kTileRows x kCols
// values (TE's 2-D tiles, docs/te_numerics.md section 4; rows past m and
// columns past n are zeros in the tile, as the golden model pads them): each
// thread's row blocks' amaxes, then a thread a tile reduces its 16 rows.
// Both barriers are reached by the whole thread block. The tiles never cross
// a thread block: kTileRows and kCols are multiples of 16.
template <typename Input>
struct SquareTileAmax {
  typedef RowTile<Input> Tile;
  static constexpr int kColumnBlocks = Tile::kCols / kBlockSize;
  u32 blocks[kTileRows][kColumnBlocks];
  u32 tiles[kTileRows / kBlockSize][kColumnBlocks];

  __device__ __forceinline__ void reduce(const u32 (&words)[Tile::kBlocksPerThread][Tile::kWords], int r, int t) {
#pragma unroll
    for (int b = 0; b < Tile::kBlocksPerThread; ++b) {
      blocks[r][t % kThreadsPerRow + b * kThreadsPerRow] = Input::abs_max_bits(words[b]);
    }
    __syncthreads();
    if (t < (kTileRows / kBlockSize) * kColumnBlocks) {
      const int tile_row = t / kColumnBlocks, tile_column = t % kColumnBlocks;
      u32 amax = 0;
#pragma unroll
      for (int i = 0; i < kBlockSize; ++i) amax = max(amax, blocks[tile_row * kBlockSize + i][tile_column]);
      tiles[tile_row][tile_column] = amax;
    }
    __syncthreads();
  }
};

// The 16x16-tile kernels' prologue (quantize.cu's, fake_quantize.cu's): the
// thread's row blocks of the tile loaded into `words`, and every 16x16
// tile's amax reduced into `square` (every thread of the thread block: two
// barriers). Returns where the thread sits.
template <typename Input, bool kVectorLoads>
__device__ __forceinline__ TileThread load_square_tiles(
    const typename Input::raw_t* __restrict__ x, long long row_stride, int m, int n,
    u32 (&words)[RowTile<Input>::kBlocksPerThread][RowTile<Input>::kWords], SquareTileAmax<Input>& square) {
  const TileThread at = tile_thread<Input>();
  load_tile_row<Input, kVectorLoads>(x, row_stride, m, n, at.first_row, at.first_col, words);
  square.reduce(words, at.r, at.t);
  return at;
}

// One block's outputs: its codes at packed[row * (padded_k / 16) + k] and
// its scale byte, when the block lies in [0, padded_k) of a row < rows;
// else only the scale byte a layout pads in (0), where the scale tensor
// (scale_rows x scale_cols) has one. amax_bits: the block's own amax, or
// its 16x16 tile's.
template <typename Input, typename Layout>
__device__ __forceinline__ void store_block(const Nvfp4TeBlocks& blocks, const u32 (&words)[4 * sizeof(typename Input::raw_t)],
                                            u32 amax_bits, int row, int k, int rows, int padded_k, int scale_rows,
                                            int scale_cols, uint2* __restrict__ packed, u8* __restrict__ scales) {
  if (row < rows && k * kBlockSize < padded_k) {
    const BlockScale scale = blocks.scale(amax_bits);
    packed[(long long)row * (padded_k / kBlockSize) + k] = pack_block<Input, Nvfp4TeBlocks::Codes>(words, scale);
    scales[Layout::row_offset(row, scale_cols) + Layout::column_offset(k)] = scale.scale_byte;
  } else if (row < scale_rows && k < scale_cols) {
    scales[Layout::row_offset(row, scale_cols) + Layout::column_offset(k)] = 0;
  }
}

}  // namespace nvfp4
