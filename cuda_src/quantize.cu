// NVFP4 quantization with in-kernel K padding, one kernel for every input
// dtype and scale layout.
//
// Thread mapping: the grid covers the whole scale tensor, layout padding
// included, so that every byte of both outputs is written here. threadIdx.y /
// blockIdx.x walk rows, threadIdx.x / blockIdx.y walk
// 16-value blocks. A thread whose block lies in the data reads its 16 values
// (two 16-byte loads for 16-bit input on the vector path); one in the K
// padding (n <= column < padded_n) writes zero codes and the scale byte of an
// empty block; one outside [m, padded_n) only zeroes the scale byte its
// layout pads in.
#include "numerics.cuh"
#include "load.cuh"
#include "layouts.cuh"

namespace nvfp4 {

// One thread per 16-value block. kGlobalScales (GlobalScales) says which
// global scale a block uses: the one scale, its expert's (blockIdx.z is the
// expert of a [E, m, n] batch, with its own rows of x, packed rows and
// complete scale tensor), or its row's. Template flags, not runtime branches:
// the one-scale kernel is issue-bound on 16-bit input, and expert offsets
// computed at run time cost it 2.6% on an H100.
template <typename Input, typename Layout, bool kVectorLoads, int kGlobalScales>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_nvfp4(const typename Input::raw_t* __restrict__ x, long long row_stride, long long expert_stride, int m,
               int n, int padded_n, const float* __restrict__ global_scale_ptr, float global_scale_value,
               uint2* __restrict__ packed, u8* __restrict__ scales, int scale_rows, int scale_cols) {
  if (kGlobalScales == kScalePerExpert) {
    const long long expert = blockIdx.z;
    x += expert * expert_stride;
    packed += expert * m * (padded_n / kBlockSize);
    scales += expert * scale_rows * scale_cols;
    global_scale_ptr += expert;
  }
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  const int col = k * kBlockSize;

  if (row < m && col < padded_n) {
    u32 words[4 * sizeof(typename Input::raw_t)];
    if (col < n) {
      load_block<Input, kVectorLoads>(x + row * row_stride, col, n, words);
    } else {
#pragma unroll
      for (int w = 0; w < 4 * (int)sizeof(typename Input::raw_t); ++w) words[w] = 0;
    }
    const float gs = global_scale_ptr ? __ldg(global_scale_ptr + (kGlobalScales == kScalePerRow ? row : 0))
                                      : global_scale_value;
    const BlockScale scale = block_scale(Input::abs_max_bits(words), gs);
    packed[(long long)row * (padded_n / kBlockSize) + k] = pack_block<Input>(words, scale);
    scales[Layout::offset(row, k, scale_cols)] = scale.scale_byte;
  } else if (row < scale_rows && k < scale_cols) {
    scales[Layout::offset(row, k, scale_cols)] = 0;
  }
}

// MXFP4: one thread per 32-value block (two 16-value halves, one E8M0 scale).
template <typename Input, typename Layout, bool kVectorLoads>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_mxfp4(const typename Input::raw_t* __restrict__ x, long long row_stride, int m, int n, int padded_n,
               uint4* __restrict__ packed, u8* __restrict__ scales, int scale_rows, int scale_cols) {
  constexpr int kWords = 4 * sizeof(typename Input::raw_t);
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  const int col = k * kMxBlockSize;

  if (row < m && col < padded_n) {
    u32 halves[2][kWords];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (col + kBlockSize * h < n) {
        load_block<Input, kVectorLoads>(x + row * row_stride, col + kBlockSize * h, n, halves[h]);
      } else {
#pragma unroll
        for (int w = 0; w < kWords; ++w) halves[h][w] = 0;
      }
    }
    const BlockScale scale = mx_block_scale(max(Input::abs_max_bits(halves[0]), Input::abs_max_bits(halves[1])));
    const uint2 low = pack_block<Input>(halves[0], scale);
    const uint2 high = pack_block<Input>(halves[1], scale);
    packed[(long long)row * (padded_n / kMxBlockSize) + k] = make_uint4(low.x, low.y, high.x, high.y);
    scales[Layout::offset(row, k, scale_cols)] = scale.scale_byte;
  } else if (row < scale_rows && k < scale_cols) {
    scales[Layout::offset(row, k, scale_cols)] = 0;
  }
}

}  // namespace nvfp4
