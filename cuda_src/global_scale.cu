// The global scale from the data: 448 * 6 / amax(|x|), over the whole tensor
// or per row, computed on the device so that quantization needs no host sync.
//
// block_amax folds the exact, NaN-propagating block amax of
// nvfp4_numerics.cuh into one uint32 per output (float32 bits: for
// non-negative floats, and NaN above infinity, integer order is float order)
// with atomicMax; global_scale_from_amax then turns those bits into scales in
// place.
#include "nvfp4_numerics.cuh"
#include "nvfp4_load.cuh"

namespace nvfp4 {

template <typename Input, bool kVectorLoads>
__global__ void __launch_bounds__(256)
block_amax(const typename Input::raw_t* __restrict__ x, long long row_stride, int m, int n, int per_row,
           u32* __restrict__ amax_bits) {
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int col = (blockIdx.y * blockDim.x + threadIdx.x) * 16;
  u32 amax = 0;
  if (row < m && col < n) {
    u32 words[4 * sizeof(typename Input::raw_t)];
    load_block<Input, kVectorLoads>(x + row * row_stride, col, n, words);
    amax = Input::abs_max_bits(words);
  }
  // One atomic per warp wherever a warp's lanes share their target.
  if (!per_row || blockDim.x >= 32) amax = __reduce_max_sync(0xffffffffu, amax);
  const bool leader = (!per_row || blockDim.x >= 32) ? (threadIdx.x & 31) == 0 : true;
  if (leader && amax && row < m) atomicMax(amax_bits + (per_row ? row : 0), amax);
}

// In place: amax bits -> float32 global scale. 0 (all zeros, or no values)
// -> 1; NaN -> NaN and inf -> 0, both invalid scales that make every block
// of the quantized tensor NaN-scaled, so bad calibration data cannot pass
// unnoticed; a tiny amax clamps the scale to FLT_MAX.
__global__ void global_scale_from_amax(u32* __restrict__ values, int count) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const u32 amax = values[i];
  float gs;
  if (amax == 0) {
    gs = 1.0f;
  } else if (amax > kF32InfBits) {
    gs = __uint_as_float(0x7fc00000u);
  } else {
    gs = div_rn(448.0f * 6.0f, __uint_as_float(amax));
    if (__float_as_uint(gs) > kF32MaxBits) gs = __uint_as_float(kF32MaxBits);
  }
  values[i] = __float_as_uint(gs);
}

}  // namespace nvfp4
