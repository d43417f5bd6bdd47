// TransformerEngine's Four Over Six block quantization (docs/te_rht_and_4over6.md,
// parts B and E.3): a 16-value block quantized twice with TE's numerics, its
// scale mapped to 6 and to 4, the candidate with the smaller error kept.
// Shared by four_over_six.cu's quantizer and fake_quantize.cu's.
#pragma once

#include "numerics.cuh"
#include "blocks.cuh"

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

// four_over_six_block with the error's division chosen at run time (ErrorDivision).
template <typename Input, bool kMse>
__device__ __forceinline__ uint2 four_over_six_block(const u32 (&words)[4 * sizeof(typename Input::raw_t)],
                                                     const FourOverSixGlobal& g, ErrorDivision division,
                                                     u8& scale_byte) {
  if (division == kFastMath) return four_over_six_block<Input, kFastMath, kMse>(words, g, scale_byte);
  if (division == kDivide) return four_over_six_block<Input, kDivide, kMse>(words, g, scale_byte);
  return four_over_six_block<Input, kDivRn, kMse>(words, g, scale_byte);
}

// How a thread's blocks compute the error's diff: TE's fast math, or RN(y / D)
// by divide() where that is exact, else by div.rn.
__device__ __forceinline__ ErrorDivision error_division(const FourOverSixGlobal& g, bool fast_math) {
  return fast_math ? kFastMath : g.divide_is_exact ? kDivide : kDivRn;
}

}  // namespace nvfp4
