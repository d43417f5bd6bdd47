// The float32 primitives of the fused operations, exactly as
// docs/fused_ops.md, sections 2.2 and 2.3 define them: exp32 (a clamp, a
// shifter FMA for k, a two-FMA Cody-Waite reduction, a degree-7 Horner
// polynomial, 2^k applied in two multiplications) and silu32 (an IEEE
// division). The NumPy golden model (reference/fused.py) executes the same
// IEEE operations, so the bits agree; tests/test_fused_math_gpu.py checks
// every float16 and bfloat16 input and millions of float32 ones.
//
// Every float operation is inline PTX without .ftz (CuPy compiles with
// -ftz=true, and C++'s -x, fminf and a * b + c would flush or contract under
// it): fma_rn (division.cuh), add_rn, mul_rn, div_rn (numerics.cuh), and the
// min/max/negation below.
#pragma once

#include "numerics.cuh"

namespace nvfp4 {

// exp32's constants (docs/fused_ops.md, section 2.2), as float32 bit patterns.
enum Exp32Bits : u32 {
  kExpLowBits = 0xC2D00000u,      // -104
  kExpHighBits = 0x42B20000u,     // 89
  kLog2eBits = 0x3FB8AA3Bu,       // RN(1 / ln 2)
  kShifterBits = 0x4B400000u,     // 1.5 * 2^23
  kMinusShifterBits = 0xCB400000u,
  kMinusLn2HiBits = 0xBF318000u,  // -LN2_HI = -355 / 512
  kMinusLn2LoBits = 0x395E8083u,  // -LN2_LO
  kC7Bits = 0x39500D01u,
  kC6Bits = 0x3AB60B61u,
  kC5Bits = 0x3C088889u,
  kC4Bits = 0x3D2AAAABu,
  kC3Bits = 0x3E2AAAABu,
  kC2Bits = 0x3F000000u,
  kOneBits = 0x3F800000u,  // C1 and C0
};

__device__ __forceinline__ float f32_from_bits(u32 bits) { return __uint_as_float(bits); }

// IEEE maxNum/minNum without .ftz: a NaN operand gives the other operand
// (exp32 tests NaN before the clamp, as the spec says).
__device__ __forceinline__ float max_f32(float a, float b) {
  float d;
  asm("max.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

__device__ __forceinline__ float min_f32(float a, float b) {
  float d;
  asm("min.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// -a, exactly (subnormals kept). Inline PTX: the compiler turns a C++ -a,
// and even a flip of the sign bit, into neg.ftz.f32 under -ftz=true.
__device__ __forceinline__ float negate_f32(float a) {
  float d;
  asm("neg.f32 %0, %1;" : "=f"(d) : "f"(a));
  return d;
}

__device__ __forceinline__ bool is_nan_f32(float a) { return (__float_as_uint(a) & kF32AbsMask) > kF32InfBits; }

// 2^e as float32 for -126 <= e <= 127, from the exponent field.
__device__ __forceinline__ float pow2_f32(int e) { return __uint_as_float((u32)(e + 127) << 23); }

// docs/fused_ops.md, section 2.2, step by step.
__device__ __forceinline__ float exp32(float t) {
  // 2. The clamp (-inf -> +0 and +inf -> +inf through the steps).
  const float tc = min_f32(max_f32(t, f32_from_bits(kExpLowBits)), f32_from_bits(kExpHighBits));
  // 3. j = FMA(tc, LOG2E, SHIFTER) lies in [2^23, 2^24), where the spacing is
  //    1: j = SHIFTER + k exactly, so kf = RN(j - SHIFTER) = k, and k is also
  //    the difference of the bit patterns (the same integer as int(kf), one
  //    integer subtraction instead of a float-to-int conversion).
  const float j = fma_rn(tc, f32_from_bits(kLog2eBits), f32_from_bits(kShifterBits));
  const float kf = add_rn(j, f32_from_bits(kMinusShifterBits));
  const int k = (int)(__float_as_uint(j) - kShifterBits);
  // 4. Cody and Waite: r = tc - k ln2 in two FMAs.
  float r = fma_rn(kf, f32_from_bits(kMinusLn2HiBits), tc);
  r = fma_rn(kf, f32_from_bits(kMinusLn2LoBits), r);
  // 5. Horner, C7 down to C0.
  float p = f32_from_bits(kC7Bits);
  p = fma_rn(p, r, f32_from_bits(kC6Bits));
  p = fma_rn(p, r, f32_from_bits(kC5Bits));
  p = fma_rn(p, r, f32_from_bits(kC4Bits));
  p = fma_rn(p, r, f32_from_bits(kC3Bits));
  p = fma_rn(p, r, f32_from_bits(kC2Bits));
  p = fma_rn(p, r, f32_from_bits(kOneBits));
  p = fma_rn(p, r, f32_from_bits(kOneBits));
  // 6-7. p * 2^e1 (exact), then * 2^e2 (the one rounding of the scaling).
  const int e1 = k >> 1;  // floor(k / 2): an arithmetic shift
  const float result = mul_rn(mul_rn(p, pow2_f32(e1)), pow2_f32(k - e1));
  // 1. NaN gives NaN (tested on the input; the clamp above dropped it).
  return is_nan_f32(t) ? __uint_as_float(kF32CanonicalNaN) : result;
}

// docs/fused_ops.md, section 2.3: RN(x / RN(1 + exp32(-x))), div.rn.
__device__ __forceinline__ float silu32(float x) {
  return div_rn(x, add_rn(f32_from_bits(kOneBits), exp32(negate_f32(x))));
}

}  // namespace nvfp4
