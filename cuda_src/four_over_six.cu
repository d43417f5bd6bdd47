// TransformerEngine's Four Over Six (nvfp4_use_4over6) NVFP4 quantization
// (docs/te_rht_and_4over6.md, parts B and E.3) of x [m, n] along n: every
// 16-value block is quantized twice with TE's numerics, its scale mapped to
// 6 (the usual scale) and to 4 (the scale times 1.5), and the candidate whose
// error (MAE or MSE, a float32 sum in element order) is strictly smaller is
// kept, ties and NaN errors going to map-to-6. The global amax A (per tensor
// or per row) comes from a device array (computed by global_scale.cu's
// "amax" step, or given) or a host value; S_enc = RN(6E / A) with E = 448 or
// 256. One thread a block; the grid covers the scale tensor, layout padding
// included, as rht.cu's quantizer does.
#include "numerics.cuh"
#include "load.cuh"
#include "layouts.cuh"
#include "blocks.cuh"
#include "output.cuh"

namespace nvfp4 {

// What every block under one global amax shares, worked out once a thread.
struct FourOverSixGlobal {
  TeGlobalScale te;      // S_enc's decode scale S_dec = RN(1 / S_enc), valid, fast
  float encode;          // S_enc
  float amax;            // A, as given: the error's RN(q sf A) uses it raw
  Divisor denominator;   // D = 6E (2688 or 1536), for divide()
  bool divide_is_exact;  // divide(y, D) == div.rn(y, D) for every y of the error loop
};

// A = 0 or 2^-90 <= A <= 2^100 (on the bits: a negative or NaN A is neither):
// every nonzero q sf lies in [2^-10, 2688], so every RN(q sf A) is 0 or in
// [2^-100, 2^112), where divide() by 2688 or 1536 is div.rn's fast path
// (tests/test_numerics_gpu.py checks that domain exhaustively).
__device__ __forceinline__ bool error_division_is_fast(float amax) {
  const u32 bits = __float_as_uint(amax);
  return bits == 0u || bits - 0x12800000u <= 0x71800000u - 0x12800000u;
}

__device__ __forceinline__ FourOverSixGlobal four_over_six_global(float amax, float denominator) {
  const float encode = te_encode_scale(amax, denominator);
  return FourOverSixGlobal{te_global_scale(encode), encode, amax, divisor(denominator),
                           error_division_is_fast(amax)};
}

// q * sf, exactly, signed (code 0x8 gives -0.0): the E2M1 value of `code`
// times the candidate's scale, from sf / 2 and 2|q|, a small integer (0, 1,
// 2, 3, 4, 6, 8, 12) read from a nibble table and made a float by the 2^23
// trick. At most 6 significant bits: float32 holds every product.
__device__ __forceinline__ float e2m1_times_scale(u32 code, float half_scale) {
  const u32 doubled = (0xC8643210u >> ((code & 7u) << 2)) & 15u;
  const float magnitude = sub_rn(__uint_as_float(0x4B000000u | doubled), 8388608.0f);
  return __uint_as_float(__float_as_uint(mul_rn(magnitude, half_scale)) | ((code & 8u) << 28));
}

// A candidate's error (B.2 step 8): err = RN(err + e(diff_i)) from +0 over
// i = 0..15, e = |d| (MAE) or RN(d * d) (MSE), with
// diff = RN(RN(RN(q sf * A) / D) - v) by default, or with fast math
// diff = RN(q sf - RN(v * S_enc)): TE's float16 candidate, whose sign of a
// zero product (the scale's, always +) changes neither |diff| nor diff^2,
// and whose NaN case (a NaN scale byte) never reaches here. Separate
// mul.rn, div.rn, sub.rn and add.rn: nothing contracts into an FMA.
template <typename Input>
__device__ __forceinline__ float candidate_error(const u32 (&words)[4 * sizeof(typename Input::raw_t)], uint2 codes, u8 scale_byte,
                                                 const FourOverSixGlobal& g, bool mse, bool fast_math) {
  const float half_scale = mul_rn(e4m3_to_f32(scale_byte), 0.5f);
  float err = 0.0f;
#pragma unroll
  for (int i = 0; i < kBlockSize; ++i) {
    const u32 code = ((i < 8 ? codes.x : codes.y) >> (4 * (i & 7))) & 15u;
    const float candidate = e2m1_times_scale(code, half_scale);
    const float v = Input::element(words, i);
    float diff;
    if (fast_math) {
      diff = sub_rn(candidate, mul_rn(v, g.encode));
    } else {
      const float y = mul_rn(candidate, g.amax);
      diff = sub_rn(g.divide_is_exact ? divide(y, g.denominator) : div_rn(y, g.denominator.value), v);
    }
    err = add_rn(err, mse ? mul_rn(diff, diff) : abs_f32(diff));
  }
  return err;
}

// One block: its packed codes, and its scale byte in `scale_byte` (B.2
// steps 4-10). A NaN block, or an invalid S_enc, is NaN-scaled as in TE's
// basic numerics (both candidates would be that block, with NaN errors).
template <typename Input>
__device__ __forceinline__ uint2 four_over_six_block(const u32 (&words)[4 * sizeof(typename Input::raw_t)], const FourOverSixGlobal& g, bool mse,
                                                     bool fast_math, u8& scale_byte) {
  const u32 amax_bits = Input::abs_max_bits(words);
  if (!g.te.valid || amax_bits > kF32InfBits) {
    scale_byte = kE4M3NaN;
    return make_uint2(TeCodes::kSpecialBlock, TeCodes::kSpecialBlock);
  }
  const float amax = __uint_as_float(amax_bits);
  // base = RN(RN(amax / 6) * S_enc): a true division, not TE's basic multiplier.
  const float base = mul_rn(sixth_is_fast(amax_bits) ? divide_by_six(amax) : divide_by_six_exact(amax), g.encode);
  const BlockScale six = te_scale_from_byte(e4m3_from_f32(base), g.te);
  const BlockScale four = te_scale_from_byte(e4m3_from_f32(mul_rn(base, 1.5f)), g.te);
  const uint2 codes_six = pack_block<Input, TeCodes>(words, six);
  const uint2 codes_four = pack_block<Input, TeCodes>(words, four);
  const u32 err_six = __float_as_uint(candidate_error<Input>(words, codes_six, six.scale_byte, g, mse, fast_math));
  const u32 err_four = __float_as_uint(candidate_error<Input>(words, codes_four, four.scale_byte, g, mse, fast_math));
  // err >= +0 or NaN: on the bits (no .ftz compare), map to 4 only when
  // err_four < err_six and err_six is not NaN.
  const bool map_to_four = err_four < err_six && err_six <= kF32InfBits;
  scale_byte = map_to_four ? four.scale_byte : six.scale_byte;
  return map_to_four ? codes_four : codes_six;
}

// The grid covers the scale tensor (scale_rows x scale_cols), one block a
// thread (threads x over a row's blocks, y over rows): blocks of rows < m and
// columns < padded_n are quantized (those past n read as zeros), every other
// scale byte is 0x00. A comes from amax_ptr ([1], or [m] with kPerRow) or,
// without it, amax_value; denominator = 6E; mse and fast_math are TE's
// err_mode "MSE" and err_use_fast_math.
template <typename Input, typename Layout, bool kVectorLoads, bool kPerRow>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_nvfp4_4over6(const typename Input::raw_t* __restrict__ x, const float* __restrict__ amax_ptr,
                      float amax_value, uint2* __restrict__ packed, u8* __restrict__ scales, long long row_stride,
                      int m, int n, int padded_n, int scale_rows, int scale_cols, float denominator, int mse,
                      int fast_math) {
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  if (row >= scale_rows || k >= scale_cols) return;
  u8* scale_at = scales + Layout::row_offset(row, scale_cols) + Layout::column_offset(k);
  if (row >= m || k * kBlockSize >= padded_n) {
    *scale_at = 0;
    return;
  }
  u32 words[4 * sizeof(typename Input::raw_t)];
  load_block<Input, kVectorLoads>(x + row * row_stride, k * kBlockSize, n, words);
  const float amax = amax_ptr ? __ldg(amax_ptr + (kPerRow ? row : 0)) : amax_value;
  u8 scale_byte;
  packed[(long long)row * (padded_n / kBlockSize) + k] =
      four_over_six_block<Input>(words, four_over_six_global(amax, denominator), mse != 0, fast_math != 0, scale_byte);
  *scale_at = scale_byte;
}

}  // namespace nvfp4
