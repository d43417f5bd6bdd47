// Reading one 16-value block of a row of x: two (16-bit input) or four
// (float32) 16-byte loads when the launcher has checked alignment, element
// loads otherwise. Used by the quantizer.
#pragma once

#include "numerics.cuh"

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
    for (int j = 0; j < kBlockSize; ++j) {
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

}  // namespace nvfp4
