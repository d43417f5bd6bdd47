// NVFP4 quantization with in-kernel K padding, one kernel for every input
// dtype and scale layout.
//
// Thread mapping: the grid covers the whole scale tensor, layout padding
// included, so that every byte of both outputs is written here. threadIdx.y /
// blockIdx.x walk rows, threadIdx.x / blockIdx.y walk blocks, several a thread
// (quantize_rows). A block that lies in the data is read (16-byte loads for
// 16-bit input on the vector path); one in the K padding
// (n <= column < padded_n) gets zero codes and the scale byte of an empty
// block; one outside [m, padded_n) only zeroes the scale byte its layout pads
// in.
#include "numerics.cuh"
#include "load.cuh"
#include "layouts.cuh"
#include "blocks.cuh"
#include "row_tiles.cuh"

namespace nvfp4 {

// kPerThread blocks of one row per thread, blockDim.x blocks apart (so each
// load and store instruction of a warp stays contiguous): the per-thread work
// (indices, the global scale and its divisor) is paid once for all of them,
// and all their loads are in flight before the first block is worked on.
// make_blocks() gives the Blocks; every thread of the thread block calls it
// (padding rows too, which then use nothing of it), so it may hold a barrier.
template <typename Input, typename Layout, bool kVectorLoads, int kPerThread, typename MakeBlocks>
__device__ __forceinline__ void quantize_rows(const typename Input::raw_t* __restrict__ x, long long row_stride,
                                              int m, int n, int padded_n, uint2* __restrict__ packed,
                                              u8* __restrict__ scales, int scale_rows, int scale_cols,
                                              MakeBlocks make_blocks) {
  typedef decltype(make_blocks()) Blocks;
  constexpr int kHalves = Blocks::kValues / kBlockSize;  // 16-value pieces of a block
  constexpr int kWords = 4 * sizeof(typename Input::raw_t);
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int first_k = blockIdx.y * (blockDim.x * kPerThread) + threadIdx.x;
  const bool has_row = row < m;
  if (!has_row && row < scale_rows) {
    // Rows that exist only in the scale layout's padding.
    u8* scale_row = scales + Layout::row_offset(row, scale_cols);
#pragma unroll 1  // a few bytes: not worth kPerThread copies of the address arithmetic
    for (int b = 0; b < kPerThread; ++b) {
      const int k = first_k + b * blockDim.x;
      if (k < scale_cols) scale_row[Layout::column_offset(k)] = 0;
    }
  }

  // load_block reads columns >= n (K padding, or past padded_n) as +0, so
  // every load is issued here, predicated, before any block is worked on.
  const typename Input::raw_t* x_row = x + (has_row ? row : 0) * row_stride;
  const int columns = has_row ? n : 0;  // a padding row loads nothing
  u32 words[kPerThread][kHalves][kWords];
#pragma unroll
  for (int b = 0; b < kPerThread; ++b) {
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      load_block<Input, kVectorLoads>(x_row, (first_k + b * blockDim.x) * Blocks::kValues + h * kBlockSize, columns,
                                      words[b][h]);
    }
  }
  // Every thread of the thread block gets here, its loads in flight:
  // make_blocks may hold a barrier (fill_reciprocal_table).
  const Blocks blocks = make_blocks();
  if (!has_row) return;
  long long packed_offset = (long long)row * (padded_n / Blocks::kValues) * kHalves;
  long long scale_offset = Layout::row_offset(row, scale_cols);
  // Opaque to the compiler, so that it keeps the row's offsets in registers
  // instead of recomputing them for every block's stores.
  asm("" : "+l"(packed_offset), "+l"(scale_offset));
  uint2* packed_row = packed + packed_offset;
  u8* scale_row = scales + scale_offset;
#pragma unroll
  for (int b = 0, k = first_k; b < kPerThread; ++b, k += blockDim.x) {
    if (k >= scale_cols) break;  // k grows with b
    u8 scale_byte = 0;  // blocks past padded_n exist only in the scale layout's padding
    if (k * Blocks::kValues < padded_n) {
      u32 amax_bits = Input::abs_max_bits(words[b][0]);
#pragma unroll
      for (int h = 1; h < kHalves; ++h) amax_bits = max(amax_bits, Input::abs_max_bits(words[b][h]));
      const BlockScale scale = blocks.scale(amax_bits);
      if constexpr (kHalves == 1) {
        packed_row[k] = pack_piece<Input>(blocks, words[b][0], scale, k);
      } else {
        const uint2 low = pack_piece<Input>(blocks, words[b][0], scale, k);
        const uint2 high = pack_piece<Input>(blocks, words[b][1], scale, k);
        reinterpret_cast<uint4*>(packed_row)[k] = make_uint4(low.x, low.y, high.x, high.y);
      }
      scale_byte = scale.scale_byte;
    }
    scale_row[Layout::column_offset(k)] = scale_byte;
  }
}

// An [E, m, n] batch with a global scale per expert (kScalePerExpert):
// blockIdx.z is the expert, with its own rows of x, packed rows, complete
// scale tensor and global scale.
template <int kGlobalScales, typename Raw>
__device__ __forceinline__ void to_expert(const Raw* __restrict__& x, uint2* __restrict__& packed,
                                          u8* __restrict__& scales, const float* __restrict__& global_scale_ptr,
                                          long long expert_stride, int m, int padded_n, int scale_rows,
                                          int scale_cols) {
  if (kGlobalScales == kScalePerExpert) {
    const long long expert = blockIdx.z;
    x += expert * expert_stride;
    packed += expert * m * (padded_n / kBlockSize);
    scales += expert * scale_rows * scale_cols;
    global_scale_ptr += expert;
  }
}

// The global scale of the thread's row: the one scale, its expert's
// (global_scale_ptr already at it: to_expert) or its row's; the host value
// without a pointer. A row of the scale layout's padding (row >= m) has none
// of its own and gets row 0's: it quantizes nothing.
template <int kGlobalScales>
__device__ __forceinline__ float row_global_scale(const float* __restrict__ global_scale_ptr, float global_scale_value,
                                                  int m) {
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  return global_scale_ptr ? __ldg(global_scale_ptr + (kGlobalScales == kScalePerRow && row < m ? row : 0))
                          : global_scale_value;
}

// The Blocks of quantize_nvfp4: a thread block with one global scale (one
// for the tensor, or the expert's) and numerics "ieee" reads step 5 from a
// shared table; a global scale a row, or numerics "te", works it out.
template <typename Blocks>
constexpr bool kHasReciprocalTable = false;
template <>
constexpr bool kHasReciprocalTable<Nvfp4Blocks> = true;

template <int kGlobalScales, typename Blocks>
__device__ __forceinline__ auto make_nvfp4_blocks(float gs, float* __restrict__ reciprocals) {
  if constexpr (kGlobalScales != kScalePerRow && kHasReciprocalTable<Blocks>) {
    const GlobalScale global = global_scale(gs);
    fill_reciprocal_table(reciprocals, global);
    return Nvfp4TableBlocks{global, reciprocals};
  } else {
    return Blocks::from_global_scale(gs);
  }
}

// The per-call arguments come first (the launcher packs only those), then
// the ones fixed by the call's shape. kGlobalScales (GlobalScales) says which
// global scale a block uses: the
// one scale, its expert's (blockIdx.z is the expert of a [E, m, n] batch,
// with its own rows of x, packed rows and complete scale tensor), or its
// row's. Template flags, not runtime branches: the one-scale kernel is
// issue-bound on 16-bit input. Blocks: Nvfp4Blocks (numerics "ieee") or
// Nvfp4TeBlocks ("te").
template <typename Input, typename Layout, bool kVectorLoads, int kGlobalScales, int kPerThread,
          typename Blocks = Nvfp4Blocks>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_nvfp4(const typename Input::raw_t* __restrict__ x, const float* __restrict__ global_scale_ptr,
               float global_scale_value, uint2* __restrict__ packed, u8* __restrict__ scales, long long row_stride,
               long long expert_stride, int m, int n, int padded_n, int scale_rows, int scale_cols) {
  to_expert<kGlobalScales>(x, packed, scales, global_scale_ptr, expert_stride, m, padded_n, scale_rows, scale_cols);
  __shared__ float reciprocals[kReciprocalTableSize];
  quantize_rows<Input, Layout, kVectorLoads, kPerThread>(x, row_stride, m, n, padded_n, packed, scales, scale_rows,
                                                         scale_cols, [&] {
    return make_nvfp4_blocks<kGlobalScales, Blocks>(
        row_global_scale<kGlobalScales>(global_scale_ptr, global_scale_value, m), reciprocals);
  });
}

// numerics="te" with 16x16 tiles (TE's weight recipe, docs/te_numerics.md
// section 4): one E4M3 scale per tile of 16 rows x 16 columns, from the
// tile's amax, written on each of its 16 rows as TE stores it; rows past m
// count as zeros in their tile's amax (the golden model pads them). A thread
// block owns row_tiles.cuh's tile of kTileRows rows x RowTile::kCols columns
// (as columnwise.cu's one-pass kernel, without the columnwise output): its
// threads load the tile's row blocks once, SquareTileAmax reduces each 16x16
// tile's amax in shared memory, and each thread quantizes its row blocks
// with their tile's amax. The grid covers the scale tensor's padded rows and
// columns, as quantize_rows' does, and writes every byte of both outputs.
template <typename Input, typename Layout, bool kVectorLoads>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_nvfp4_te_tiles(const typename Input::raw_t* __restrict__ x, const float* __restrict__ global_scale_ptr,
                        float global_scale_value, uint2* __restrict__ packed, u8* __restrict__ scales,
                        long long row_stride, long long expert_stride, int m, int n, int padded_n, int scale_rows,
                        int scale_cols) {
  typedef RowTile<Input> Tile;
  u32 words[Tile::kBlocksPerThread][Tile::kWords];
  __shared__ SquareTileAmax<Input> square;
  const auto [first_row, first_col, t, r, row] = load_square_tiles<Input, kVectorLoads>(x, row_stride, m, n, words, square);
  if (row >= scale_rows) return;
  const Nvfp4TeBlocks blocks =
      Nvfp4TeBlocks::from_global_scale(global_scale_ptr ? __ldg(global_scale_ptr) : global_scale_value);
#pragma unroll
  for (int b = 0; b < Tile::kBlocksPerThread; ++b) {
    const int k_local = t % kThreadsPerRow + b * kThreadsPerRow;
    store_block<Input, Layout>(blocks, words[b], square.tiles[r / kBlockSize][k_local], row,
                               first_col / kBlockSize + k_local, m, padded_n, scale_rows, scale_cols, packed, scales);
  }
}

// quantize_nvfp4 with stochastic rounding of the codes
// (docs/stochastic_rounding_and_mx_rules.md, sections 2 and 4): the same
// scales and products, each block's codes rounded with the Philox words of
// its element group g = row * (padded_n / 16) + k, rows counted over all
// experts. The seed and the offset arrive as 32-bit halves. A minimum of one
// thread block an SM: with the thread count alone, sm_100a's and sm_120a's
// ptxas capped the element-load kernels of 4 blocks a thread at 128
// registers and spilled; they take ~146.
template <typename Input, typename Layout, bool kVectorLoads, int kGlobalScales, int kPerThread>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
quantize_nvfp4_sr(const typename Input::raw_t* __restrict__ x, const float* __restrict__ global_scale_ptr,
                  float global_scale_value, uint2* __restrict__ packed, u8* __restrict__ scales, unsigned seed_lo,
                  unsigned seed_hi, unsigned offset_lo, unsigned offset_hi, long long row_stride,
                  long long expert_stride, int m, int n, int padded_n, int scale_rows, int scale_cols) {
  to_expert<kGlobalScales>(x, packed, scales, global_scale_ptr, expert_stride, m, padded_n, scale_rows, scale_cols);
  quantize_rows<Input, Layout, kVectorLoads, kPerThread>(x, row_stride, m, n, padded_n, packed, scales, scale_rows,
                                                         scale_cols, [&] {
    const long long row = (kGlobalScales == kScalePerExpert ? (long long)blockIdx.z * m : 0) +
                          blockIdx.x * blockDim.y + threadIdx.y;
    return Nvfp4SrBlocks{global_scale(row_global_scale<kGlobalScales>(global_scale_ptr, global_scale_value, m)),
                         seed_lo, seed_hi, offset_lo, offset_hi,
                         (unsigned long long)row * (unsigned long long)(padded_n / kBlockSize)};
  });
}

// The largest magnitude of all of x (m rows of n values), in every thread of
// the thread block: NaN-propagating float32 bits, as compute_global_scale's.
template <typename Input, bool kVectorLoads>
__device__ __forceinline__ u32 tensor_abs_max_bits(const typename Input::raw_t* __restrict__ x, long long row_stride,
                                                   int m, int n) {
  const int blocks_per_row = (n + kBlockSize - 1) / kBlockSize;
  const int blocks = m * blocks_per_row;  // the launcher keeps x small
  const int threads = blockDim.x * blockDim.y;
  u32 amax = 0;
  // Not unrolled: x is small (its 16-byte loads are few a thread), and
  // unrolling made ptxas spill around block_scale_exact's call on sm_100/120.
#pragma unroll 1
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < blocks; i += threads) {
    const int row = i / blocks_per_row;
    u32 words[4 * sizeof(typename Input::raw_t)];
    load_block<Input, kVectorLoads>(x + row * row_stride, (i - row * blocks_per_row) * kBlockSize, n, words);
    amax = max(amax, Input::abs_max_bits(words));
  }
  // Thread blocks fit to short rows (launch_geometry's `dense`) can end in a
  // partial warp: its mask names only the lanes that exist.
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  const int lanes = min(32, threads - (thread & ~31));
  amax = __reduce_max_sync(lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u, amax);
  __shared__ u32 warp_amax[kThreadsPerBlock / 32];
  if ((thread & 31) == 0) warp_amax[thread >> 5] = amax;
  __syncthreads();
  for (int w = 0; w < (threads + 31) / 32; ++w) amax = max(amax, warp_amax[w]);
  return amax;
}

// quantize() of a small x in one launch: every thread block with rows of x
// reads all of x (from L2, after the first) for its amax, so that no block
// waits for another, and derives the global scale itself; the first one also
// writes it out. Thread blocks of the scale layout's padding rows only (the
// swizzled layout's 128-row tiles) skip it: they need no scale. A second
// launch, which is what the device-side global scale costs otherwise, is
// most of a small call's time. The launcher uses this kernel only while x is
// small (ops/quantize.py, ONE_LAUNCH_MAX_BLOCKS).
template <typename Input, typename Layout, bool kVectorLoads, int kPerThread>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_nvfp4_own_scale(const typename Input::raw_t* __restrict__ x, float* __restrict__ global_scale_out,
                         uint2* __restrict__ packed, u8* __restrict__ scales, long long row_stride, int m, int n,
                         int padded_n, int scale_rows, int scale_cols) {
  // Uniform across the thread block: tensor_abs_max_bits' barrier is reached by all of it or none.
  const bool has_rows = blockIdx.x * blockDim.y < m;
  const float gs = has_rows ? global_scale_from_amax(tensor_abs_max_bits<Input, kVectorLoads>(x, row_stride, m, n))
                            : 1.0f;  // unused: quantize_rows reads no block of a padding row
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0) *global_scale_out = gs;
  quantize_rows<Input, Layout, kVectorLoads, kPerThread>(x, row_stride, m, n, padded_n, packed, scales, scale_rows,
                                                         scale_cols, [&] { return Nvfp4Blocks{global_scale(gs)}; });
}

// Blocks: Mxfp4Blocks (scale rule "floor"), Mxfp4RceilBlocks or Mxfp4TePow2Blocks.
template <typename Input, typename Layout, bool kVectorLoads, int kPerThread, typename Blocks = Mxfp4Blocks>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_mxfp4(const typename Input::raw_t* __restrict__ x, uint2* __restrict__ packed, u8* __restrict__ scales,
               long long row_stride, int m, int n, int padded_n, int scale_rows, int scale_cols) {
  quantize_rows<Input, Layout, kVectorLoads, kPerThread>(x, row_stride, m, n, padded_n, packed, scales, scale_rows,
                                                         scale_cols, [] { return Blocks{}; });
}

}  // namespace nvfp4
