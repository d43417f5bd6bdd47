// NVFP4 quantization with in-kernel K padding, one kernel for every input
// dtype and scale layout.
//
// Thread mapping: the grid covers the whole scale tensor, layout padding
// included, so that every byte of both outputs is written here. threadIdx.y /
// blockIdx.x walk rows (kRows per thread), threadIdx.x / blockIdx.y walk
// "half blocks" of 8 columns; the two halves of one 16-element block sit in adjacent lanes and
// swap their amax with one shuffle. A thread whose half block lies in the
// data reads 8 values (one 16-byte load for 16-bit input on the vector path);
// one in the K padding (n <= column < padded_n) writes zero codes and the
// scale byte of an empty block; one outside [m, padded_n) only zeroes the
// scale byte its layout pads in.
#include "nvfp4_numerics.cuh"
#include "scale_layouts.cuh"

namespace nvfp4 {

// Raw bits of element j of eight values packed into 32-bit words.
template <typename Input>
__device__ __forceinline__ u32 raw_element(const u32 (&words)[2 * sizeof(typename Input::raw_t)], int j) {
  if (sizeof(typename Input::raw_t) == 4) return words[j];
  return (words[j >> 1] >> (16 * (j & 1))) & 0xffffu;
}

// Loads the raw bits of the up to 8 values at columns [col, col + 8) of a row
// (columns >= n read as +0).
template <typename Input, bool kVectorLoads>
__device__ __forceinline__ void load_eight(const typename Input::raw_t* __restrict__ row_ptr, int col, int n,
                                           u32 (&words)[2 * sizeof(typename Input::raw_t)]) {
  typedef typename Input::raw_t raw_t;
  if (kVectorLoads) {
    // The launcher guarantees 16-byte alignment and n % 8 == 0 on this path.
    const uint4* src = reinterpret_cast<const uint4*>(row_ptr + col);
#pragma unroll
    for (int q = 0; q < (int)sizeof(raw_t) / 2; ++q) {
      const uint4 vec = __ldg(src + q);
      words[4 * q + 0] = vec.x;
      words[4 * q + 1] = vec.y;
      words[4 * q + 2] = vec.z;
      words[4 * q + 3] = vec.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
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

// Widens eight raw values into v and returns the float32 bits of their
// largest |v| (NaN-propagating: NaN bit patterns sort above infinity).
template <typename Input>
__device__ __forceinline__ u32 widen_eight(const u32 (&words)[2 * sizeof(typename Input::raw_t)], float (&v)[8]) {
  u32 amax_raw = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const u32 raw = raw_element<Input>(words, j);
    amax_raw = max(amax_raw, raw & Input::kAbsMask);
    v[j] = Input::to_f32(raw);
  }
  // Widening is exact and keeps NaN a NaN, so the order survives.
  return __float_as_uint(Input::to_f32(amax_raw)) & kF32AbsMask;
}

// kRows: rows per thread (threadIdx.y + i * blockDim.y). All their loads are
// issued before any arithmetic, so each thread keeps kRows loads in flight.
template <typename Input, typename Layout, bool kVectorLoads, int kRows>
__global__ void __launch_bounds__(256)
quantize_nvfp4(const typename Input::raw_t* __restrict__ x, long long row_stride, int m, int n,
               int padded_n, const float* __restrict__ global_scale_ptr, float global_scale_value,
               u32* __restrict__ packed, u8* __restrict__ scales, int scale_rows, int scale_cols) {
  const int first_row = blockIdx.x * blockDim.y * kRows + threadIdx.y;
  const int half_block = blockIdx.y * blockDim.x + threadIdx.x;
  const int k = half_block >> 1;
  const int col = half_block * 8;
  const bool in_data_columns = col < n;
  const bool in_padded_columns = col < padded_n;

  u32 words[kRows][2 * sizeof(typename Input::raw_t)];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = first_row + i * blockDim.y;
    if (row < m && in_data_columns) {
      load_eight<Input, kVectorLoads>(x + row * row_stride, col, n, words[i]);
    } else {
#pragma unroll
      for (int w = 0; w < 2 * (int)sizeof(typename Input::raw_t); ++w) words[i][w] = 0;
    }
  }

  const float gs = global_scale_ptr ? __ldg(global_scale_ptr) : global_scale_value;
  const bool writes_scale = (half_block & 1) == 0;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = first_row + i * blockDim.y;
    float v[8];
    u32 amax_bits = widen_eight<Input>(words[i], v);
    // Every lane reaches the shuffle: the launcher sizes blocks in whole warps.
    amax_bits = max(amax_bits, __shfl_xor_sync(0xffffffffu, amax_bits, 1));
    if (row < m && in_padded_columns) {
      const BlockScale scale = block_scale(amax_bits, gs);
      packed[(long long)row * (padded_n >> 3) + half_block] = pack_eight(v, scale);
      if (writes_scale) scales[Layout::offset(row, k, scale_cols)] = scale.scale_byte;
    } else if (writes_scale && row < scale_rows && k < scale_cols) {
      scales[Layout::offset(row, k, scale_cols)] = 0;
    }
  }
}

}  // namespace nvfp4
