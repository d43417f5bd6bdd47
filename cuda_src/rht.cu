// TransformerEngine's random Hadamard transform (RHT) before NVFP4
// quantization with numerics="te" (docs/te_rht_and_4over6.md, part A and
// E.1-E.2), for x [m, K] with K (a multiple of 16) last: the operand as the
// GEMM reads it. Two kernels:
// - rht_amax: max |y| over the transformed values, per tensor or per row,
//   as float32 bits atomically maxed into a zeroed device array (a bit max
//   over |y|: exact and NaN-propagating, NaN bit patterns sort above inf);
// - quantize_nvfp4_rht: each 16-value block is one chunk: loaded, transformed,
//   rounded to x's dtype (kToInput) or kept in float32, and quantized with
//   numerics="te" under S_enc = encode(amax) (A.4). The grid covers the
//   scale tensor, layout padding included, as quantize.cu's does.
#include "rht.cuh"
#include "layouts.cuh"
#include "blocks.cuh"

namespace nvfp4 {

// Threads x over a row's chunks (a power of two, so that a warp never spans
// part of a row), y over rows; grid y over a row's chunks, grid x over row
// groups, each thread block looping over rows gridDim.x * blockDim.y apart
// (the host caps grid x: fewer atomics on one address). The max over a row's
// lanes is a shuffle reduction within the warp's row segment; then one
// atomicMax a warp a row (per_row), or one a thread block for the tensor.
// amax: [1] (per_row = 0) or [m], zeroed before the launch.
template <typename Input, bool kVectorLoads, bool kToInput>
__global__ void __launch_bounds__(kThreadsPerBlock)
rht_amax(const typename Input::raw_t* __restrict__ x, u32* __restrict__ amax, long long row_stride, int m, int n,
         int per_row) {
  __shared__ u32 warp_max[kThreadsPerBlock / 32];
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  const int segment = blockDim.x < 32 ? blockDim.x : 32;  // lanes of one row in a warp
  const int lane = threadIdx.x & (segment - 1);
  u32 tensor_bits = 0;
  for (int first = blockIdx.x * blockDim.y; first < m; first += gridDim.x * blockDim.y) {
    const int row = first + threadIdx.y;
    u32 bits = 0;
    if (row < m && k * kBlockSize < n) {
      RhtChunk<Input, kToInput> chunk;
      chunk.template load<kVectorLoads>(x + row * row_stride, k * kBlockSize, n);
      bits = RhtChunk<Input, kToInput>::Quantized::abs_max_bits(chunk.words);
    }
    if (per_row) {  // every lane is here: the loop bound is the block's
      for (int offset = 1; offset < segment; offset <<= 1) bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, offset));
      if (lane == 0 && row < m && bits) atomicMax(amax + row, bits);
    } else {
      tensor_bits = max(tensor_bits, bits);
    }
  }
  if (per_row) return;
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  tensor_bits = __reduce_max_sync(0xffffffffu, tensor_bits);
  if ((thread & 31) == 0) warp_max[thread >> 5] = tensor_bits;
  __syncthreads();
  if (thread < 32) {
    tensor_bits = thread < (int)(blockDim.x * blockDim.y) / 32 ? warp_max[thread] : 0u;
    tensor_bits = __reduce_max_sync(0xffffffffu, tensor_bits);
    if (thread == 0 && tensor_bits) atomicMax(amax, tensor_bits);
  }
}

// Blocks (= chunks) a quantizer thread takes, blockDim.x apart along its row
// (each step's loads coalesced): S_enc and TE's per-tensor constants are
// worked out once for them (ops/rht.py reads this constant).
constexpr int kRhtBlocksPerThread = 4;

// Threads x over a row's blocks, each taking kRhtBlocksPerThread of them,
// y over rows; the grid covers the scale tensor (scale_rows x scale_cols):
// blocks of rows < m and columns < padded_n are quantized (those past n are
// zeros, which the transform keeps), every other scale byte is 0x00. The
// amax comes from amax_ptr ([1], or [m] with per_row) or, without it,
// amax_value. per_row is a run-time argument: it only picks the amax's
// index, once a thread.
template <typename Input, typename Layout, bool kVectorLoads, bool kToInput>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_nvfp4_rht(const typename Input::raw_t* __restrict__ x, const float* __restrict__ amax_ptr,
                   float amax_value, uint2* __restrict__ packed, u8* __restrict__ scales, long long row_stride, int m,
                   int n, int padded_n, int scale_rows, int scale_cols, int per_row) {
  typedef RhtChunk<Input, kToInput> Chunk;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= scale_rows) return;
  const int first = blockIdx.y * blockDim.x * kRhtBlocksPerThread + threadIdx.x;
  const int blocks_in_row = row < m ? padded_n / kBlockSize : 0;  // the row's quantized blocks
  const float amax = row < m ? (amax_ptr ? __ldg(amax_ptr + (per_row ? row : 0)) : amax_value) : 0.0f;
  const Nvfp4TeBlocks blocks = Nvfp4TeBlocks::from_global_scale(te_encode_scale(amax, 448.0f * 6.0f));
#pragma unroll 1
  for (int j = 0; j < kRhtBlocksPerThread; ++j) {
    const int k = first + j * blockDim.x;
    if (k >= scale_cols) return;
    u8* scale_at = scales + Layout::row_offset(row, scale_cols) + Layout::column_offset(k);
    if (k >= blocks_in_row) {
      *scale_at = 0;
      continue;
    }
    Chunk chunk;
    chunk.template load<kVectorLoads>(x + row * row_stride, k * kBlockSize, n);
    const BlockScale scale = blocks.scale(Chunk::Quantized::abs_max_bits(chunk.words));
    packed[(long long)row * blocks_in_row + k] =
        pack_block<typename Chunk::Quantized, Nvfp4TeBlocks::Codes>(chunk.words, scale);
    *scale_at = scale.scale_byte;
  }
}

}  // namespace nvfp4
