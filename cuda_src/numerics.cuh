// Bit-exact NVFP4 numerics: the one device-side implementation of the
// per-block arithmetic of docs/format.md, and the encoders and decoders of
// E2M1, E4M3 and E8M0, shared by every kernel.
//
// The result must not depend on -ftz (docs/format.md): CuPy adds -ftz=true to the
// compiles it does, and anyone may build these files that way. Under it the
// compiler turns plain C++ float arithmetic into .ftz instructions, which
// flush subnormal inputs and results and would break bit-exactness for tiny
// blocks. So every
// float operation whose operands can be subnormal is written as inline PTX
// without .ftz (inline asm is passed to ptxas verbatim), and comparisons,
// abs and max are done on the raw bits. tests/test_compile.py checks that the
// PTX generated with -ftz=true holds no .ftz instruction.
#pragma once

namespace nvfp4 {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#ifndef NVFP4_THREADS_PER_BLOCK
#error "compile with -DNVFP4_THREADS_PER_BLOCK (the launcher's nvfp4_cupy._runtime.compile.THREADS_PER_BLOCK)"
#endif
constexpr int kThreadsPerBlock = NVFP4_THREADS_PER_BLOCK;
// Values per block scale. Enumerators, not variables: a file that uses one
// of them only must not get NVRTC's unused-variable warning (which on NVRTC
// 13 also hides ptxas's -v report from the log).
enum BlockSizes : int {
  kBlockSize = 16,    // NVFP4: values per E4M3 scale
  kMxBlockSize = 32,  // MXFP4: values per E8M0 scale
};

constexpr u32 kF32AbsMask = 0x7fffffffu;
constexpr u32 kF32InfBits = 0x7f800000u;
constexpr u32 kF32MaxBits = 0x7f7fffffu;       // FLT_MAX
constexpr u32 kF32CanonicalNaN = 0x7fc00000u;  // the quiet NaN every kernel writes
constexpr u32 kF32HalfBits = 0x3f000000u;      // 0.5
constexpr u8 kE4M3NaN = 0x7f;
constexpr u8 kE4M3Max = 0x7e;  // 448.0

// Which global scale a block uses (a kernel template argument).
enum GlobalScales : int { kOneScale = 0, kScalePerExpert = 1, kScalePerRow = 2 };

// ---------------------------------------------------------------------------
// IEEE float32 operations, round-to-nearest-even, subnormals kept.
// ---------------------------------------------------------------------------
__device__ __forceinline__ float mul_rn(float a, float b) {
  float d;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

__device__ __forceinline__ float div_rn(float a, float b) {
  float d;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// ---------------------------------------------------------------------------
// Input element types. Each knows its raw storage, how to widen one value to
// float32 exactly, and how to find the float32 bits of a block's max |v| from
// the raw bits: |x| is a mask, and a max over masked bits is an exact,
// NaN-propagating amax (NaN bit patterns sort above infinity).
// A block of 16 values arrives as 4 * sizeof(raw_t) 32-bit words.
// ---------------------------------------------------------------------------
__device__ __forceinline__ u32 raw_half(const u32* words, int j) {
  return (words[j >> 1] >> (16 * (j & 1))) & 0xffffu;
}

// amax of 16 values stored two to a word, two lanes at a time: on
// non-negative halves a max.NaN orders like the bits do and keeps NaN a NaN.
template <typename Input>
__device__ __forceinline__ u32 abs_max_bits_16x2(const u32 (&words)[8]) {
  u32 pair = words[0] & 0x7fff7fffu;
#pragma unroll
  for (int w = 1; w < 8; ++w) pair = Input::max_nan_x2(pair, words[w] & 0x7fff7fffu);
  return __float_as_uint(Input::to_f32(max(pair & 0xffffu, pair >> 16))) & kF32AbsMask;
}

struct Float16Input {
  typedef u16 raw_t;
  __device__ static float to_f32(u32 raw) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)raw));
    return f;
  }
  __device__ static u32 max_nan_x2(u32 a, u32 b) {
    asm("max.NaN.f16x2 %0, %0, %1;" : "+r"(a) : "r"(b));
    return a;
  }
  __device__ static float element(const u32* words, int j) { return to_f32(raw_half(words, j)); }
  __device__ static u32 abs_max_bits(const u32 (&words)[8]) { return abs_max_bits_16x2<Float16Input>(words); }
};

struct BFloat16Input {
  typedef u16 raw_t;
  __device__ static float to_f32(u32 raw) { return __uint_as_float(raw << 16); }
  __device__ static u32 max_nan_x2(u32 a, u32 b) {
    asm("max.NaN.bf16x2 %0, %0, %1;" : "+r"(a) : "r"(b));
    return a;
  }
  __device__ static float element(const u32* words, int j) { return to_f32(raw_half(words, j)); }
  __device__ static u32 abs_max_bits(const u32 (&words)[8]) { return abs_max_bits_16x2<BFloat16Input>(words); }
};

struct Float32Input {
  typedef u32 raw_t;
  __device__ static float element(const u32* words, int j) { return __uint_as_float(words[j]); }
  __device__ static u32 abs_max_bits(const u32 (&words)[16]) {
    u32 amax = 0;
#pragma unroll
    for (int j = 0; j < kBlockSize; ++j) amax = max(amax, words[j] & kF32AbsMask);
    return amax;
  }
};

// ---------------------------------------------------------------------------
// FP8 E4M3 (scale bytes).
// ---------------------------------------------------------------------------

// Round-to-nearest-even on a right shift of an integer significand.
__device__ __forceinline__ u32 shift_right_rne(u32 value, u32 shift) {
  const u32 kept = value >> shift;
  const u32 rest = value & ((1u << shift) - 1u);
  const u32 half = 1u << (shift - 1u);
  return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
}

// s >= +0 (or +inf), never NaN: RNE to E4M3, saturating at 448.
__device__ __forceinline__ u8 e4m3_from_f32_software(float s) {
  const u32 bits = __float_as_uint(s);
  if (bits >= 0x43e00000u) return kE4M3Max;  // s >= 448 rounds or saturates to 448
  const int exponent = (int)(bits >> 23) - 127;
  if (exponent >= -6) {
    // Normal E4M3: keep 3 mantissa bits, rebias 127 -> 7. A carry out of the
    // mantissa moves into the exponent, which is exactly the right result.
    return (u8)(shift_right_rne(bits, 20) - (120u << 3));
  }
  if (exponent < -10) return 0;  // s < 2^-10: below half the smallest subnormal
  // Subnormal E4M3, value m * 2^-9: m = RNE(s * 2^9) from the 24-bit significand.
  const u32 significand = (bits & 0x7fffffu) | 0x800000u;
  return (u8)shift_right_rne(significand, (u32)(14 - exponent));
}

__device__ __forceinline__ u8 e4m3_from_f32(float s) {
#if NVFP4_HW_E4M3
  // sm_89+: the hardware conversion, same rounding and saturation.
  u16 pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(s));
  return (u8)(pair & 0xffu);
#else
  return e4m3_from_f32_software(s);
#endif
}

// Exact value of a non-negative, non-NaN E4M3 byte.
__device__ __forceinline__ float e4m3_to_f32(u8 code) {
  const u32 exponent = code >> 3;
  const u32 mantissa = code & 7u;
  if (exponent == 0) return mul_rn((float)mantissa, 0x1p-9f);  // subnormal: m * 2^-9, exact
  return __uint_as_float(((exponent + 120u) << 23) | (mantissa << 20));
}

// ---------------------------------------------------------------------------
// FP4 E2M1 (values). Codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is sign.
// ---------------------------------------------------------------------------
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  float d;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
  return d;
}

__device__ __forceinline__ u32 e2m1_from_f32_software(float y) {
  const u32 bits = __float_as_uint(y);
  const u32 a = bits & kF32AbsMask;
  // |y| >= 1: E2M1 is a float with one mantissa bit, so round the float32
  // bits to nearest-even at mantissa bit 22; what is left above it is
  // (biased exponent << 1 | mantissa bit), 254 for 1.0 (code 2). Codes past
  // 7 (above 6, including inf) saturate.
  const u32 rounded = (a + 0x1fffffu + ((a >> 22) & 1u)) >> 22;
  const u32 from_one = min(rounded - 252u, 7u);
  // |y| < 1: codes 0, 1, 2 step by 0.5, so the code is 2|y| rounded to an
  // integer, nearest-even (0.25 -> 0, 0.75 -> 2). One fma does that rounding:
  // 2|y| + 2^23 lands on the integer grid of 2^23's ulp.
  const u32 below_one = __float_as_uint(fma_rn(__uint_as_float(a), 2.0f, 8388608.0f)) - 0x4b000000u;
  const u32 magnitude = (a >= 0x3f800000u) ? from_one : below_one;
  return magnitude | ((bits >> 28) & 8u);
}

// Two values to one byte: lo in bits 0..3, hi in bits 4..7.
__device__ __forceinline__ u32 e2m1x2_from_f32(float lo, float hi) {
#if NVFP4_HW_E2M1
  // sm_100a/sm_120a family: the hardware conversion (first operand -> high nibble).
  u16 pair;
  asm("{\n\t.reg .b8 byte;\n\t"
      "cvt.rn.satfinite.e2m1x2.f32 byte, %1, %2;\n\t"
      "cvt.u16.u8 %0, byte;\n\t}"
      : "=h"(pair)
      : "f"(hi), "f"(lo));
  return pair;
#else
  return e2m1_from_f32_software(lo) | (e2m1_from_f32_software(hi) << 4);
#endif
}

// E2M1 code (bit 3 sign) -> float32: codes 2..7 are 1.m * 2^(e - 1) with
// e = code >> 1 and one mantissa bit; code 1 is 0.5.
__device__ __forceinline__ float e2m1_to_f32(u32 code) {
  const u32 magnitude = code & 7u;
  const u32 bits = magnitude >= 2u ? ((((magnitude >> 1) + 126u) << 23) | ((magnitude & 1u) << 22))
                                   : (magnitude ? kF32HalfBits : 0u);
  return __uint_as_float(bits | ((code & 8u) << 28));
}

// Any E4M3 byte -> float32 (0x7f / 0xff are NaN).
__device__ __forceinline__ float e4m3_to_f32_signed(u8 byte) {
  if ((byte & 0x7fu) == 0x7fu) return __uint_as_float(kF32CanonicalNaN);
  return __uint_as_float(__float_as_uint(e4m3_to_f32((u8)(byte & 0x7fu))) | ((u32)(byte & 0x80u) << 24));
}

// ---------------------------------------------------------------------------
// The per-block arithmetic of docs/format.md, steps 3-5 and the special cases.
// ---------------------------------------------------------------------------
struct BlockScale {
  u8 scale_byte;    // E4M3 bits written to the scale tensor
  float reciprocal;  // r: multiply the block's values by this
  bool zero_codes;   // NaN block or invalid global scale: all 16 codes are 0
};

__device__ __forceinline__ bool is_valid_global_scale(float gs) {
  // Finite and > 0 (positive subnormals included).
  const u32 bits = __float_as_uint(gs);
  return bits - 1u < kF32MaxBits;
}

// amax_bits: float32 bits of max |v_i| over the block (NaN bit patterns above inf).
__device__ __forceinline__ BlockScale block_scale(u32 amax_bits, float gs) {
  BlockScale out;
  if (!is_valid_global_scale(gs) || amax_bits > kF32InfBits) {
    out.scale_byte = kE4M3NaN;
    out.reciprocal = 0.0f;
    out.zero_codes = true;
    return out;
  }
  const float amax = __uint_as_float(amax_bits);
  const float s = mul_rn(gs, div_rn(amax, 6.0f));
  out.scale_byte = e4m3_from_f32(s);
  out.zero_codes = false;
  if (out.scale_byte == 0) {
    out.reciprocal = 0.0f;
  } else {
    const float r = div_rn(1.0f, div_rn(e4m3_to_f32(out.scale_byte), gs));
    out.reciprocal = (__float_as_uint(r) > kF32MaxBits) ? __uint_as_float(kF32MaxBits) : r;
  }
  return out;
}

// ---------------------------------------------------------------------------
// MXFP4 (OCP MX v1.0): 32-value blocks, E8M0 (power-of-two) scales, no global
// scale. X = 2^(floor(log2(amax)) - 2) (2 = E2M1's largest exponent), clamped
// to E8M0's 2^-127..2^127; a block of zeros gets 2^-127 (byte 0); a NaN or inf
// in the block gives the NaN byte 0xff and zero codes.
// ---------------------------------------------------------------------------
constexpr u8 kE8M0NaN = 0xff;

__device__ __forceinline__ BlockScale mx_block_scale(u32 amax_bits) {
  BlockScale out;
  out.zero_codes = amax_bits >= kF32InfBits;
  if (out.zero_codes) {
    out.scale_byte = kE8M0NaN;
    out.reciprocal = 0.0f;
    return out;
  }
  const int biased = (int)(amax_bits >> 23);
  // floor(log2(amax)): the exponent, or for a subnormal amax its top bit - 149.
  const int floor_log2 = biased ? biased - 127 : (31 - __clz((int)amax_bits)) - 149;
  const int byte = amax_bits ? min(max(floor_log2 - 2 + 127, 0), 254) : 0;
  out.scale_byte = (u8)byte;
  // 1 / X = 2^(127 - byte), exactly; byte <= 252 for finite amax, so normal.
  out.reciprocal = __uint_as_float((u32)(254 - byte) << 23);
  return out;
}

// E8M0 byte -> float32: 2^(byte - 127), 0xff is NaN.
__device__ __forceinline__ float e8m0_to_f32(u8 byte) {
  if (byte == kE8M0NaN) return __uint_as_float(kF32CanonicalNaN);
  return __uint_as_float(byte ? (u32)byte << 23 : 0x00400000u);
}

// One block of 16 values -> 64 bits of packed codes (element 2j in the low
// nibble of byte j).
template <typename Input>
__device__ __forceinline__ uint2 pack_block(const u32* words, const BlockScale& scale) {
  u32 halves[2] = {0u, 0u};
  if (!scale.zero_codes) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float lo = mul_rn(Input::element(words, 2 * j), scale.reciprocal);
      const float hi = mul_rn(Input::element(words, 2 * j + 1), scale.reciprocal);
      halves[j >> 2] |= e2m1x2_from_f32(lo, hi) << (8 * (j & 3));
    }
  }
  return make_uint2(halves[0], halves[1]);
}

}  // namespace nvfp4
