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
#include "nvfp4_numerics.cuh"
#include "scale_layouts.cuh"

namespace nvfp4 {

// Loads the raw bits of the 16 values at columns [col, col + 16) of a row
// (columns >= n read as +0).
template <typename Input, bool kVectorLoads>
__device__ __forceinline__ void load_block(const typename Input::raw_t* __restrict__ row_ptr, int col, int n,
                                           u32 (&words)[4 * sizeof(typename Input::raw_t)]) {
  typedef typename Input::raw_t raw_t;
  if (kVectorLoads) {
    // The launcher guarantees 16-byte alignment and n % 8 == 0 on this path:
    // each 16-byte piece lies wholly inside or outside [0, n).
    const uint4* src = reinterpret_cast<const uint4*>(row_ptr + col);
    constexpr int kValuesPerVector = 16 / sizeof(raw_t);
#pragma unroll
    for (int q = 0; q < (int)sizeof(raw_t); ++q) {
      const uint4 vec = (col + q * kValuesPerVector < n) ? __ldg(src + q) : make_uint4(0u, 0u, 0u, 0u);
      words[4 * q + 0] = vec.x;
      words[4 * q + 1] = vec.y;
      words[4 * q + 2] = vec.z;
      words[4 * q + 3] = vec.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const u32 raw = (col + j < n) ? (u32)__ldg(row_ptr + col + j) : 0u;
      if (sizeof(raw_t) == 4) {
        words[j] = raw;
      } else if (j & 1) {
        words[j >> 1] |= raw << 16;
      } else {
        words[j >> 1] = raw;
      }
    }
  }
}

// One thread per 16-value block. With kExperts, blockIdx.z is the expert of a
// [E, m, n] batch: its own rows of x, its own global scale (one per expert on
// the device), its own packed rows and its own complete scale tensor. (A
// template flag, not a runtime branch: the flat kernel is issue-bound on
// 16-bit input, and the expert offsets cost it 2.6% on an H100.)
template <typename Input, typename Layout, bool kVectorLoads, bool kExperts>
__global__ void __launch_bounds__(256)
quantize_nvfp4(const typename Input::raw_t* __restrict__ x, long long row_stride, long long expert_stride, int m,
               int n, int padded_n, const float* __restrict__ global_scale_ptr, float global_scale_value,
               uint2* __restrict__ packed, u8* __restrict__ scales, int scale_rows, int scale_cols) {
  if (kExperts) {
    const long long expert = blockIdx.z;
    x += expert * expert_stride;
    packed += expert * m * (padded_n >> 4);
    scales += expert * scale_rows * scale_cols;
    if (global_scale_ptr) global_scale_ptr += expert;
  }
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  const int col = k * 16;

  if (row < m && col < padded_n) {
    u32 words[4 * sizeof(typename Input::raw_t)];
    if (col < n) {
      load_block<Input, kVectorLoads>(x + row * row_stride, col, n, words);
    } else {
#pragma unroll
      for (int w = 0; w < 4 * (int)sizeof(typename Input::raw_t); ++w) words[w] = 0;
    }
    const float gs = global_scale_ptr ? __ldg(global_scale_ptr) : global_scale_value;
    const BlockScale scale = block_scale(Input::abs_max_bits(words), gs);
    packed[(long long)row * (padded_n >> 4) + k] = pack_block<Input>(words, scale);
    scales[Layout::offset(row, k, scale_cols)] = scale.scale_byte;
  } else if (row < scale_rows && k < scale_cols) {
    scales[Layout::offset(row, k, scale_cols)] = 0;
  }
}

}  // namespace nvfp4
