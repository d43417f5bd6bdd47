// TransformerEngine's Four Over Six (nvfp4_use_4over6) NVFP4 quantization
// (docs/te_rht_and_4over6.md, parts B and E.3) of x [m, n] along n: every
// 16-value block is quantized twice with TE's numerics, its scale mapped to
// 6 (the usual scale) and to 4 (the scale times 1.5), and the candidate whose
// error (MAE or MSE, a float32 sum in element order) is strictly smaller is
// kept, ties and NaN errors going to map-to-6. The global amax A (per tensor
// or per row) comes from a device array (computed by global_scale.cu's
// "amax" step, or given) or a host value; S_enc = RN(6E / A) with E = 448 or
// 256. Four blocks a thread; the grid covers the scale tensor, layout
// padding included, as rht.cu's quantizer does.
#include "four_over_six.cuh"
#include "load.cuh"
#include "layouts.cuh"
#include "output.cuh"

namespace nvfp4 {

// Blocks a thread quantizes, blockDim.x apart along its row (so that each
// step's loads are coalesced): the per-thread work of S_enc, S_dec and D's
// divisor is shared by them (ops/four_over_six.py reads this constant).
constexpr int k4over6BlocksPerThread = 4;
// At most 64 registers a thread (4 thread blocks of 256 threads an SM): the
// kernel is issue-bound, and needs the warps to hide its loads.
constexpr int k4over6ThreadBlocksPerSM = 4;

// Threads x over a row's blocks, each taking k4over6BlocksPerThread of them
// blockDim.x apart, y over rows; the grid covers the scale tensor
// (scale_rows x scale_cols): blocks of rows < m and columns < padded_n are
// quantized (those past n read as zeros), every other scale byte is 0x00.
// A comes from amax_ptr ([1], or [m] with per_row: a run-time argument) or, without it,
// amax_value; denominator = 6E; kMse is TE's err_mode "MSE" (else "MAE"),
// fast_math its err_use_fast_math.
template <typename Input, typename Layout, bool kVectorLoads, bool kMse>
__global__ void __launch_bounds__(kThreadsPerBlock, k4over6ThreadBlocksPerSM)
quantize_nvfp4_4over6(const typename Input::raw_t* __restrict__ x, const float* __restrict__ amax_ptr,
                      float amax_value, uint2* __restrict__ packed, u8* __restrict__ scales, long long row_stride,
                      int m, int n, int padded_n, int scale_rows, int scale_cols, float denominator, int fast_math,
                      int per_row) {
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= scale_rows) return;
  const int first = blockIdx.y * blockDim.x * k4over6BlocksPerThread + threadIdx.x;
  const int blocks = row < m ? padded_n / kBlockSize : 0;  // the row's quantized blocks
  const float amax = row < m ? (amax_ptr ? __ldg(amax_ptr + (per_row ? row : 0)) : amax_value) : 0.0f;
  const FourOverSixGlobal g = four_over_six_global(amax, denominator);
  const ErrorDivision division = error_division(g, fast_math);
#pragma unroll 1
  for (int j = 0; j < k4over6BlocksPerThread; ++j) {
    const int k = first + j * blockDim.x;
    if (k >= scale_cols) return;
    u8* scale_at = scales + Layout::row_offset(row, scale_cols) + Layout::column_offset(k);
    if (k >= blocks) {
      *scale_at = 0;
      continue;
    }
    u32 words[4 * sizeof(typename Input::raw_t)];
    load_block<Input, kVectorLoads>(x + row * row_stride, k * kBlockSize, n, words);
    u8 scale_byte;
    const uint2 codes = four_over_six_block<Input, kMse>(words, g, division, scale_byte);
    packed[(long long)row * blocks + k] = codes;
    *scale_at = scale_byte;
  }
}

}  // namespace nvfp4
