// IEEE float32 division, correctly rounded, split so that what depends only
// on the divisor is done once: the quantizer divides by the same global scale
// for a whole row or tensor, and by the constant 6 for every block.
//
// The GPU's own div.rn.f32 is this sequence (MUFU.RCP and one Newton step,
// two FFMAs, for the divisor's reciprocal y, then q0 = a*y, rem = a - b*q0, q = q0 + rem*y)
// preceded by FCHK, which sends operands outside a safe exponent range to a
// 117-instruction out-of-line path. Here the divisor's part is hoisted and
// the range check is made once per divisor, conservatively: inside the
// ranges below the sequence is exactly div.rn's fast path, and
// tests/test_numerics_gpu.py checks every operand in them against div.rn,
// exhaustively, on the GPU.
#pragma once

namespace nvfp4 {

// Inline PTX without .ftz, like every float operation of numerics.cuh: the
// results must not depend on -ftz (C++'s unary minus becomes neg.ftz under it).
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  float d;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
  return d;
}

// RN(c - a * b), one rounding.
__device__ __forceinline__ float fnma_rn(float a, float b, float c) {
  float d;
  asm("{\n\t.reg .f32 negated;\n\tneg.f32 negated, %1;\n\tfma.rn.f32 %0, negated, %2, %3;\n\t}"
      : "=f"(d)
      : "f"(a), "f"(b), "f"(c));
  return d;
}

// The reciprocal estimate div.rn works with: MUFU.RCP and one Newton step.
struct Divisor {
  float value;
  float reciprocal;
};

__device__ __forceinline__ Divisor divisor(float b) {
  // .ftz, as div.rn's fast path has it: the estimate is used only for
  // divisors in the ranges below (normal floats), and without .ftz ptxas
  // adds a rescaling for subnormals.
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(b));
  const float e = fnma_rn(b, y, 1.0f);
  return Divisor{b, fma_rn(y, e, y)};
}

// RN(a / b) for the operands of the ranges below (in_fast_division_range).
__device__ __forceinline__ float divide(float a, const Divisor& b) {
  const float q0 = fma_rn(a, b.reciprocal, 0.0f);
  const float rem = fnma_rn(b.value, q0, a);
  return fma_rn(b.reciprocal, rem, q0);
}

// Divisors whose quotients by every E4M3 value (2^-9 .. 448) and whose own
// reciprocals stay far from the subnormal and overflow ranges: 2^-60 <= b <= 2^60.
__device__ __forceinline__ bool in_fast_division_range(float b) {
  return __float_as_uint(b) - 0x21800000u <= 0x5d800000u - 0x21800000u;
}

// RN(1 / q) for 2^-69 <= q <= 2^69 (what divide() gives for those
// divisors): divide(1, divisor(q)), whose q0 = 1 * y is y itself.
__device__ __forceinline__ float reciprocal_rn(float q) {
  const Divisor d = divisor(q);
  return fma_rn(d.reciprocal, fnma_rn(q, d.reciprocal, 1.0f), d.reciprocal);
}

// RN(amax / 6) for amax = 0 and 2^-100 <= amax < inf. 1/6 rounded to float32
// is the reciprocal div.rn's Newton step reaches for 6.
constexpr float kSixth = 0x1.555556p-3f;
constexpr unsigned kSixthFastMinBits = 0x0d800000u;  // 2^-100

__device__ __forceinline__ bool sixth_is_fast(unsigned amax_bits) {
  return amax_bits == 0u || amax_bits - kSixthFastMinBits < 0x7f800000u - kSixthFastMinBits;
}

__device__ __forceinline__ float divide_by_six(float amax) {
  return divide(amax, Divisor{6.0f, kSixth});
}

}  // namespace nvfp4
