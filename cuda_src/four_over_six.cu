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

// Blocks a thread quantizes, blockDim.x apart along its row (so that each
// step's loads are coalesced): the per-thread work of S_enc, S_dec and D's
// divisor is shared by them (ops/four_over_six.py reads this constant).
constexpr int k4over6BlocksPerThread = 4;
// At most 64 registers a thread (4 thread blocks of 256 threads an SM): the
// kernel is issue-bound, and needs the warps to hide its loads.
constexpr int k4over6ThreadBlocksPerSM = 4;

// A candidate's error (B.2 step 8) from the block's magnitudes |v_i| and
// the candidate's r and sf, with its magnitude codes on the way (as
// e2m1x8_from_magnitudes sums them: biased, value 8h + i in nibble i of
// word h). r is never 0 or NaN here (TE's all-zero codes): S_enc >=
// RN(1536 / FLT_MAX) > 2^-118 for any A >= 0, so RN(sf * S_dec) is finite.
// err = RN(err + e(diff_i)) from +0 over i = 0..15, e = |d| (MAE) or
// RN(d * d) (MSE). The E2M1 value of each product is its code's (the
// software rounding's sum, minus its magic), the candidate q * sf is exact,
// and diff = RN(RN(RN(q sf * A) / D) - |v|) by default, or
// RN(q sf - RN(|v| * S_enc)) with fast math (TE's float16 candidate, whose
// NaN case, a NaN scale byte, never reaches here). On magnitudes: q has v's
// sign (r > 0), and RN is symmetric, so diff only changes sign, but for a
// zero product, where TE's q is -0 or +0 and |diff| and diff^2 do not
// change. Separate mul.rn, division, sub.rn and add.rn: nothing contracts
// into an FMA.
// How the error's diff is computed, chosen once a thread: TE's fast math;
// RN(y / D) by divide() (error_division_is_fast); by div.rn.
enum ErrorDivision { kFastMath, kDivide, kDivRn };

struct CandidateError {
  float err;
  uint2 biased_codes;
};

template <ErrorDivision kDivision, bool kMse>
__device__ __forceinline__ CandidateError candidate_error(const float (&magnitudes)[kBlockSize], float r,
                                                          float scale, const FourOverSixGlobal& g) {
  CandidateError out{0.0f, make_uint2(0u, 0u)};
#pragma unroll
  for (int i = 0; i < kBlockSize; ++i) {
    const E2m1Sum sum = e2m1_sum(mul_rn(magnitudes[i], r));
    (i < 8 ? out.biased_codes.x : out.biased_codes.y) += e2m1_biased_code_of(sum) << (4 * (i & 7));
    const float candidate = mul_rn(e2m1_magnitude_of(sum), scale);
    float diff;
    if constexpr (kDivision == kFastMath) {
      diff = sub_rn(candidate, mul_rn(magnitudes[i], g.encode));
    } else {
      const float y = mul_rn(candidate, g.amax);
      diff = sub_rn(kDivision == kDivide ? divide(y, g.denominator) : div_rn(y, g.denominator.value), magnitudes[i]);
    }
    out.err = add_rn(out.err, kMse ? mul_rn(diff, diff) : abs_f32(diff));
  }
  return out;
}

// One block: its packed codes, and its scale byte in `scale_byte` (B.2
// steps 4-10). A NaN block, or an invalid S_enc, is NaN-scaled as in TE's
// basic numerics (both candidates would be that block, with NaN errors).
// The winner's codes are its magnitude codes with the signs of the nonzero
// values: TE's codes (TeCodes) wherever every nonzero value has a nonzero
// product (r >= Input::kNonzeroProductsFrom); other blocks make them again
// with pack_block, which tests every product.
template <typename Input, ErrorDivision kDivision, bool kMse>
__device__ __forceinline__ uint2 four_over_six_block(const u32 (&words)[4 * sizeof(typename Input::raw_t)],
                                                     const FourOverSixGlobal& g, u8& scale_byte) {
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
  float magnitudes[kBlockSize];  // no NaN; an inf's product saturates to 6, as its code does
#pragma unroll
  for (int i = 0; i < kBlockSize; ++i) magnitudes[i] = abs_f32(Input::element(words, i));
  const CandidateError err_six =
      candidate_error<kDivision, kMse>(magnitudes, six.reciprocal, e4m3_to_f32(six.scale_byte), g);
  const CandidateError err_four =
      candidate_error<kDivision, kMse>(magnitudes, four.reciprocal, e4m3_to_f32(four.scale_byte), g);
  // err >= +0 or NaN: on the bits (no .ftz compare), map to 4 only when
  // err_four < err_six and err_six is not NaN.
  const u32 bits_six = __float_as_uint(err_six.err), bits_four = __float_as_uint(err_four.err);
  const bool map_to_four = bits_four < bits_six && bits_six <= kF32InfBits;
  const BlockScale winner = map_to_four ? four : six;  // by value: no local memory
  scale_byte = winner.scale_byte;
  if (__float_as_uint(winner.reciprocal) < Input::kNonzeroProductsFrom) return pack_block<Input, TeCodes>(words, winner);
  constexpr int kWords = 4 * sizeof(typename Input::raw_t);
  u32 unsigned_zeros[kWords];  // -0.0 made +0.0: a zero gives code 0x0 whatever its sign
#pragma unroll
  for (int w = 0; w < kWords; ++w) unsigned_zeros[w] = Input::positive_zeros(words[w]);
  const uint2 codes = map_to_four ? err_four.biased_codes : err_six.biased_codes;
  return make_uint2((codes.x - kE2M1Bias * 0x11111111u) | Input::sign_nibbles(unsigned_zeros, 0),
                    (codes.y - kE2M1Bias * 0x11111111u) | Input::sign_nibbles(unsigned_zeros, 1));
}

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
  const ErrorDivision division = fast_math ? kFastMath : g.divide_is_exact ? kDivide : kDivRn;
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
    uint2 codes;
    if (division == kFastMath) {
      codes = four_over_six_block<Input, kFastMath, kMse>(words, g, scale_byte);
    } else if (division == kDivide) {
      codes = four_over_six_block<Input, kDivide, kMse>(words, g, scale_byte);
    } else {
      codes = four_over_six_block<Input, kDivRn, kMse>(words, g, scale_byte);
    }
    packed[(long long)row * blocks + k] = codes;
    *scale_at = scale_byte;
  }
}

}  // namespace nvfp4
