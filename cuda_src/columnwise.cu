// Rowwise and columnwise NVFP4 in one pass (numerics="te", 1x16 blocks or
// 16x16 tiles: docs/te_numerics.md sections 4, 5 and 12): x [m, n] is read once and gives
// both the quantized x (packed [m, padded_n / 2], scales for m rows) and the
// quantized x^T (packed_t [n, padded_m / 2], scales_t for n rows,
// padded_m = round_up(m, 16)), each in the same scale layout.
//
// A thread block owns a tile of kTileRows rows x Tile::kCols columns of x
// (row_tiles.cuh). Its threads load the tile's row blocks (4 threads a row,
// each 16-byte load of a warp contiguous in a row), quantize them as rows and put their
// raw bits in shared memory; after the barrier each thread gathers column
// blocks (16 rows of one column) from there and quantizes them as rows of
// x^T. The grid covers the larger of the two outputs' extents in both
// directions, so that every byte of all four outputs is written here: a tile
// past x reads zeros, and only writes the scale bytes its layouts pad in.
#include "row_tiles.cuh"

namespace nvfp4 {

// The raw bits of rows [16 * g, 16 * g + 16) of column c of the tile, as
// load_block would have read them along a row (16-bit values two a word,
// the lower index in the low half).
template <typename Input>
__device__ __forceinline__ void gather_column_block(const typename Input::raw_t* tile, int c, int g,
                                                    u32 (&words)[RowTile<Input>::kWords]) {
  typedef RowTile<Input> Tile;
  const typename Input::raw_t* column = tile + (kBlockSize * g) * Tile::kPitch + c;
#pragma unroll
  for (int j = 0; j < kBlockSize; ++j) {
    const u32 raw = column[j * Tile::kPitch];
    if (sizeof(typename Input::raw_t) == 4) {
      words[j] = raw;
    } else if (j & 1) {
      words[j >> 1] |= raw << 16;
    } else {
      words[j >> 1] = raw;
    }
  }
}

// kGlobalScales: kOneScale (global_scale_ptr[0] or the host value, and
// global_scale_t_ptr[0] or its host value for x^T) or kScalePerRow
// (row-scaled NVFP4: global_scale_ptr[row], global_scale_t_ptr[column]).
// kSquareTiles: TE's 16x16 tiles, one scale a tile in both outputs (one
// global scale each; TE has no row-scaled form of them).
template <typename Input, typename Layout, bool kVectorLoads, int kGlobalScales, bool kSquareTiles>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_nvfp4_te_columnwise(const typename Input::raw_t* __restrict__ x, const float* __restrict__ global_scale_ptr,
                             float global_scale_value, const float* __restrict__ global_scale_t_ptr,
                             float global_scale_t_value, uint2* __restrict__ packed, u8* __restrict__ scales,
                             uint2* __restrict__ packed_t, u8* __restrict__ scales_t, long long row_stride, int m,
                             int n, int padded_n, int scale_rows, int scale_cols, int padded_m, int scale_rows_t,
                             int scale_cols_t) {
  typedef RowTile<Input> Tile;
  typedef typename Input::raw_t raw_t;
  __shared__ __align__(16) raw_t tile[kTileRows * Tile::kPitch];
  const int first_row = blockIdx.x * kTileRows;
  const int first_col = blockIdx.y * Tile::kCols;
  const int t = threadIdx.x;

  // Rowwise: tile row t / 4, blocks t % 4, t % 4 + 4, ... of it.
  const int r = t / kThreadsPerRow;
  const int row = first_row + r;
  u32 words[Tile::kBlocksPerThread][Tile::kWords];
  load_tile_row<Input, kVectorLoads>(x, row_stride, m, n, first_row, first_col, words);
#pragma unroll
  for (int b = 0; b < Tile::kBlocksPerThread; ++b) {
    uint4* to = reinterpret_cast<uint4*>(tile + r * Tile::kPitch + (t % kThreadsPerRow + b * kThreadsPerRow) * kBlockSize);
#pragma unroll
    for (int q = 0; q < Tile::kWords / 4; ++q) {
      to[q] = make_uint4(words[b][4 * q], words[b][4 * q + 1], words[b][4 * q + 2], words[b][4 * q + 3]);
    }
  }
  __shared__ SquareTileAmax<Input> square;
  if constexpr (kSquareTiles) square.reduce(words, r, t);
  if (row < scale_rows) {
    const float gs = row >= m ? 0.0f
                     : global_scale_ptr ? __ldg(global_scale_ptr + (kGlobalScales == kScalePerRow ? row : 0))
                                        : global_scale_value;
    const Nvfp4TeBlocks blocks = Nvfp4TeBlocks::from_global_scale(gs);
#pragma unroll
    for (int b = 0; b < Tile::kBlocksPerThread; ++b) {
      const int k_local = t % kThreadsPerRow + b * kThreadsPerRow;
      const u32 amax = kSquareTiles ? square.tiles[r / kBlockSize][k_local] : Input::abs_max_bits(words[b]);
      store_block<Input, Layout>(blocks, words[b], amax, row, first_col / kBlockSize + k_local, m, padded_n,
                                 scale_rows, scale_cols, packed, scales);
    }
  }
  if constexpr (!kSquareTiles) __syncthreads();  // (square.reduce's barriers come after the tile's stores)

  // Columnwise: tile column t % kCols is row first_col + t % kCols of x^T;
  // its column blocks g = (t / kCols) * kBlocksPerThread, ... are blocks
  // first_row / 16 + g of that row: contiguous in packed_t, so that the
  // thread writes their codes with 16-byte stores where the row allows it
  // (a warp's store touches 32 rows of x^T: one wide store instead of two or
  // four narrow ones).
  const int c = t % Tile::kCols;
  const int row_t = first_col + c;
  if (row_t >= scale_rows_t) return;
  const float gs_t = row_t >= n ? 0.0f
                     : global_scale_t_ptr ? __ldg(global_scale_t_ptr + (kGlobalScales == kScalePerRow ? row_t : 0))
                                          : global_scale_t_value;
  const Nvfp4TeBlocks blocks_t = Nvfp4TeBlocks::from_global_scale(gs_t);
  const int first_g = (t / Tile::kCols) * Tile::kBlocksPerThread;
  const int first_k_t = first_row / kBlockSize + first_g;
  uint2 codes[Tile::kBlocksPerThread];
#pragma unroll
  for (int i = 0; i < Tile::kBlocksPerThread; ++i) {
    const int k_t = first_k_t + i;
    codes[i] = make_uint2(0u, 0u);
    if (row_t < n && k_t * kBlockSize < padded_m) {
      u32 column_words[Tile::kWords];
      gather_column_block<Input>(tile, c, first_g + i, column_words);
      const BlockScale scale = blocks_t.scale(kSquareTiles ? square.tiles[first_g + i][c / kBlockSize]
                                                           : Input::abs_max_bits(column_words));
      codes[i] = pack_block<Input, Nvfp4TeBlocks::Codes>(column_words, scale);
      scales_t[Layout::row_offset(row_t, scale_cols_t) + Layout::column_offset(k_t)] = scale.scale_byte;
    } else if (k_t < scale_cols_t) {
      scales_t[Layout::row_offset(row_t, scale_cols_t) + Layout::column_offset(k_t)] = 0;
    }
  }
  if (row_t >= n) return;
  uint2* codes_t = packed_t + (long long)row_t * (padded_m / kBlockSize) + first_k_t;
  if ((padded_m / 2) % 16 == 0 && (first_k_t + Tile::kBlocksPerThread) * kBlockSize <= padded_m) {
#pragma unroll
    for (int i = 0; i < Tile::kBlocksPerThread; i += 2) {
      reinterpret_cast<uint4*>(codes_t)[i / 2] = make_uint4(codes[i].x, codes[i].y, codes[i + 1].x, codes[i + 1].y);
    }
  } else {
#pragma unroll
    for (int i = 0; i < Tile::kBlocksPerThread; ++i) {
      if ((first_k_t + i) * kBlockSize < padded_m) codes_t[i] = codes[i];
    }
  }
}

}  // namespace nvfp4
