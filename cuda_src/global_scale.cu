// The global scale from the data: 448 * 6 / amax(|x|), over the whole tensor
// or per row, computed on the device so that quantization needs no host sync.
//
// block_amax folds the exact, NaN-propagating block amax of
// numerics.cuh into one uint32 per output (float32 bits: for
// non-negative floats, and NaN above infinity, integer order is float order)
// with atomicMax; global_scale_from_amax then turns those bits into scales in
// place.
#include "numerics.cuh"
#include "load.cuh"

namespace nvfp4 {

template <typename Input, bool kVectorLoads>
__global__ void __launch_bounds__(kThreadsPerBlock)
block_amax(const typename Input::raw_t* __restrict__ x, long long row_stride, int m, int n, int per_row,
           u32* __restrict__ amax_bits) {
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int col = (blockIdx.y * blockDim.x + threadIdx.x) * kBlockSize;
  u32 amax = 0;
  if (row < m && col < n) {
    u32 words[4 * sizeof(typename Input::raw_t)];
    load_block<Input, kVectorLoads>(x + row * row_stride, col, n, words);
    amax = Input::abs_max_bits(words);
  }
  // Fold before the atomics: hundreds of thousands of atomics on one address
  // serialize in L2 (a per-warp version ran at 26% of copy bandwidth).
  // Whole thread block when all its threads share the target (global, or one
  // row per block), else whole warp when its lanes share a row, else per lane.
  const bool block_shares_target = !per_row || blockDim.y == 1;
  const bool warp_shares_target = block_shares_target || blockDim.x >= 32;
  if (warp_shares_target) amax = __reduce_max_sync(0xffffffffu, amax);
  if (block_shares_target) {
    constexpr int kWarps = kThreadsPerBlock / 32;
    __shared__ u32 warp_amax[kWarps];
    const int linear = threadIdx.y * blockDim.x + threadIdx.x;
    const int lane = linear & 31, warp = linear >> 5;
    if (lane == 0) warp_amax[warp] = amax;
    __syncthreads();
    if (warp != 0) return;
    amax = lane < kWarps ? warp_amax[lane] : 0u;
    amax = __reduce_max_sync(0xffffffffu, amax);
    if (lane == 0 && amax) atomicMax(amax_bits + (per_row ? blockIdx.x : 0), amax);
    return;
  }
  const bool leader = warp_shares_target ? (threadIdx.x & 31) == 0 : true;
  if (leader && amax && row < m) atomicMax(amax_bits + row, amax);
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
    gs = __uint_as_float(kF32CanonicalNaN);
  } else {
    gs = div_rn(448.0f * 6.0f, __uint_as_float(amax));
    if (__float_as_uint(gs) > kF32MaxBits) gs = __uint_as_float(kF32MaxBits);
  }
  values[i] = __float_as_uint(gs);
}

}  // namespace nvfp4
