// Writing float32 results as an output dtype T (dequantize, fake quantization,
// and the fused ops' T outputs): round to nearest even, subnormals kept, and
// the canonical quiet NaN that every kernel writes for a NaN.
#pragma once

#include "numerics.cuh"

namespace nvfp4 {

// from_f32: one value to the output's bits; from_f32x2: two, lo in the low half.
struct Float16Output {
  typedef u16 raw_t;
  static constexpr u32 kCanonicalNaN = 0x7e00u;
  __device__ static u32 from_f32(float v) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
  __device__ static u32 from_f32x2(float lo, float hi) {
    u32 pair;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(hi), "f"(lo));
    return pair;
  }
};

struct BFloat16Output {
  typedef u16 raw_t;
  static constexpr u32 kCanonicalNaN = 0x7fc0u;
  __device__ static u32 from_f32(float v) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
  __device__ static u32 from_f32x2(float lo, float hi) {
    u32 pair;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(hi), "f"(lo));
    return pair;
  }
};

struct Float32Output {
  typedef u32 raw_t;
  static constexpr u32 kCanonicalNaN = kF32CanonicalNaN;
  __device__ static u32 from_f32(float v) { return __float_as_uint(v); }
};

// The Output struct of an Input struct's dtype: the fused ops round their
// intermediate values to x's own dtype.
template <typename Input>
struct OutputOf;

template <>
struct OutputOf<Float16Input> {
  typedef Float16Output type;
};

template <>
struct OutputOf<BFloat16Input> {
  typedef BFloat16Output type;
};

template <>
struct OutputOf<Float32Input> {
  typedef Float32Output type;
};

}  // namespace nvfp4
