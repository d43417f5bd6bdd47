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

#include "division.cuh"

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

// |a| (no .ftz: subnormals kept). Folds into the consuming instruction's
// operand modifier.
__device__ __forceinline__ float abs_f32(float a) {
  float d;
  asm("abs.f32 %0, %1;" : "=f"(d) : "f"(a));
  return d;
}

// -a (no .ftz: subnormals kept; a plain sign flip can become neg.ftz under -ftz=true).
__device__ __forceinline__ float neg_f32(float a) {
  float d;
  asm("neg.f32 %0, %1;" : "=f"(d) : "f"(a));
  return d;
}

__device__ __forceinline__ float add_rn(float a, float b) {
  float d;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// (a - b as add_rn(a, -b) lets the compiler write neg.ftz under -ftz=true.)
__device__ __forceinline__ float sub_rn(float a, float b) {
  float d;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// ---------------------------------------------------------------------------
// Input element types. Each knows its raw storage, how to widen one value to
// float32 exactly, and how to find the float32 bits of a block's max |v| from
// the raw bits: |x| is a mask, and a max over masked bits is an exact,
// NaN-propagating amax (NaN bit patterns sort above infinity).
// A block of 16 values arrives as 4 * sizeof(raw_t) 32-bit words.
//
// For the software E2M1 path each also gives the signs of values 8h..8h+7 at
// bit 3 of their nibbles (`sign_nibbles`), so that the rounding works on
// magnitudes only.
//
// For the casts whose zero products give code 0x0 whatever their sign
// (TeCodes below), each also turns the -0.0 values of a word into +0.0 and
// keeps every other value's bits (`positive_zeros`: x + (+0.0) in RN), and
// gives kNonzeroProductsFrom, the bits of the least r for which RN(|v| * r)
// is nonzero for every nonzero value v of the type: its least magnitude
// times that r is 2^-149, above the 2^-150 that rounds to zero.
// ---------------------------------------------------------------------------
__device__ __forceinline__ u32 raw_half(const u32* words, int j) {
  return (words[j >> 1] >> (16 * (j & 1))) & 0xffffu;
}

// prmt.b32: bytes of {b, a} chosen by the selector's nibbles; a nibble with
// bit 3 set replicates the chosen byte's sign bit over the whole byte.
__device__ __forceinline__ u32 byte_perm_signed(u32 a, u32 b, u32 selector) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

// even: one byte per value 8h, 8h+2, .., 8h+6, 0xff where negative; odd: the
// same for 8h+1, .., 8h+7. Returns their sign bits at nibble bit 3.
__device__ __forceinline__ u32 sign_nibbles_from_bytes(u32 even, u32 odd) {
  return ((even & 0x0f0f0f0fu) | (odd & 0xf0f0f0f0u)) & 0x88888888u;
}

// Two values a word: word w holds value 2w in bits 0..15 (sign bit 15) and
// value 2w + 1 in bits 16..31 (sign bit 31).
__device__ __forceinline__ u32 sign_nibbles_16(const u32* words, int h) {
  const u32 first = byte_perm_signed(words[4 * h], words[4 * h + 1], 0xFBD9u);       // s0 s2 s1 s3
  const u32 second = byte_perm_signed(words[4 * h + 2], words[4 * h + 3], 0xFBD9u);  // s4 s6 s5 s7
  return sign_nibbles_from_bytes(byte_perm_signed(first, second, 0x5410u), byte_perm_signed(first, second, 0x7632u));
}

// amax of 16 values stored two to a word, two lanes at a time: on
// non-negative halves a max.NaN orders like the bits do and keeps NaN a NaN.
// (max(max v, -min v) by max.NaN and min.NaN chains needs no mask a word,
// two instructions less a block, but cost ptxas registers, and spills, in
// the element-load kernels.)
template <typename Input>
__device__ __forceinline__ u32 abs_max_bits_16x2(const u32 (&words)[8]) {
  u32 pair = words[0] & 0x7fff7fffu;
#pragma unroll
  for (int w = 1; w < 8; ++w) pair = Input::max_nan_x2(pair, words[w] & 0x7fff7fffu);
  return __float_as_uint(Input::to_f32(max(pair & 0xffffu, pair >> 16)));
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
  __device__ static u32 sign_nibbles(const u32* words, int h) { return sign_nibbles_16(words, h); }
  __device__ static u32 abs_max_bits(const u32 (&words)[8]) { return abs_max_bits_16x2<Float16Input>(words); }
  __device__ static u32 positive_zeros(u32 word) {
    asm("add.rn.f16x2 %0, %0, %1;" : "+r"(word) : "r"(0u));  // no .ftz: subnormals kept
    return word;
  }
  static constexpr u32 kNonzeroProductsFrom = 2u << 23;  // 2^-125, least value 2^-24
};

struct BFloat16Input {
  typedef u16 raw_t;
  __device__ static float to_f32(u32 raw) { return __uint_as_float(raw << 16); }
  __device__ static u32 max_nan_x2(u32 a, u32 b) {
    asm("max.NaN.bf16x2 %0, %0, %1;" : "+r"(a) : "r"(b));
    return a;
  }
  __device__ static float element(const u32* words, int j) { return to_f32(raw_half(words, j)); }
  __device__ static u32 sign_nibbles(const u32* words, int h) { return sign_nibbles_16(words, h); }
  __device__ static u32 abs_max_bits(const u32 (&words)[8]) { return abs_max_bits_16x2<BFloat16Input>(words); }
  __device__ static u32 positive_zeros(u32 word) {
    // x * 1 + (+0.0): sm_80 has bf16x2 fma but no bf16x2 add; subnormals kept.
    asm("fma.rn.bf16x2 %0, %0, %1, %2;" : "+r"(word) : "r"(0x3f803f80u), "r"(0u));
    return word;
  }
  static constexpr u32 kNonzeroProductsFrom = 111u << 23;  // 2^-16, least value 2^-133
};

struct Float32Input {
  typedef u32 raw_t;
  __device__ static float element(const u32* words, int j) { return __uint_as_float(words[j]); }
  // One value a word, sign bit 31.
  __device__ static u32 sign_nibbles(const u32* words, int h) {
    const u32* w = words + 8 * h;
    const u32 even = byte_perm_signed(byte_perm_signed(w[0], w[2], 0xFBFBu), byte_perm_signed(w[4], w[6], 0xFBFBu),
                                      0x5410u);
    const u32 odd = byte_perm_signed(byte_perm_signed(w[1], w[3], 0xFBFBu), byte_perm_signed(w[5], w[7], 0xFBFBu),
                                     0x5410u);
    return sign_nibbles_from_bytes(even, odd);
  }
  __device__ static u32 abs_max_bits(const u32 (&words)[16]) {
    u32 amax = 0;
#pragma unroll
    for (int j = 0; j < kBlockSize; ++j) amax = max(amax, words[j] & kF32AbsMask);
    return amax;
  }
  __device__ static u32 positive_zeros(u32 word) { return __float_as_uint(add_rn(__uint_as_float(word), 0.0f)); }
  static constexpr u32 kNonzeroProductsFrom = 127u << 23;  // 1.0, least value 2^-149
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
#if NVFP4_HW_E4M3
  // sm_89+: to float16 (which holds every E4M3 value exactly), then float32.
  u32 pair;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(pair) : "h"((u16)code));
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)pair));
  return f;
#else
  const u32 exponent = code >> 3;
  const u32 mantissa = code & 7u;
  if (exponent == 0) return mul_rn((float)mantissa, 0x1p-9f);  // subnormal: m * 2^-9, exact
  return __uint_as_float(((exponent + 120u) << 23) | (mantissa << 20));
#endif
}

// ---------------------------------------------------------------------------
// FP4 E2M1 (values). Codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is sign.
// ---------------------------------------------------------------------------
// The software E2M1 path of the quantizer: the magnitude code of
// a = RN(|v| * r), plus kE2M1Bias. With a clamped to 6 (NaN, which is only
// inf * 0, too), adding 2^22 * 2^k, k = max(floor(log2 a), 0), lands a on
// the grid of that sum's ulp, 2^(k-1): E2M1's spacing in a's binade (0.5
// below 2, 1 in [2, 4), 2 in [4, 6]), rounded to nearest even by the FADD
// itself. The sum's low bits are then q = a / 2^(k-1) rounded, and the code
// is q + 2k; subtracting binade * (2^23 - 2) from the sum's bits leaves
// q + 2k + kE2M1Bias. Even q is even code, so ties go to the even code.
// tests/test_numerics_gpu.py compares it with the table of docs/format.md
// section 2.1 for every float32 a >= 0.
enum E2M1Bias : u32 { kE2M1Bias = (22u << 23) + 254u };  // an enumerator: see BlockSizes

// The rounding's sum: a = min(product, 6) plus 2^22 * 2^k, as bits, and k's binade.
struct E2m1Sum {
  u32 bits;
  u32 binade;
};

__device__ __forceinline__ E2m1Sum e2m1_sum(float product) {
  const u32 a = min(__float_as_uint(product), 0x40c00000u);
  const u32 binade = max(a >> 23, 127u);
  return E2m1Sum{__float_as_uint(add_rn(__uint_as_float(a), __uint_as_float((binade + 22u) << 23))), binade};
}

__device__ __forceinline__ u32 e2m1_biased_code_of(const E2m1Sum& sum) {
  return sum.bits - sum.binade * ((1u << 23) - 2u);
}

__device__ __forceinline__ u32 e2m1_biased_magnitude_code(float product) { return e2m1_biased_code_of(e2m1_sum(product)); }

// The same rounding as a value: E2M1's magnitude of a product >= +0 (never
// NaN; +inf gives 6), the sum minus its 2^22 * 2^k, exactly.
__device__ __forceinline__ float e2m1_magnitude_of(const E2m1Sum& sum) {
  return sub_rn(__uint_as_float(sum.bits), __uint_as_float((sum.binade + 22u) << 23));
}

#if NVFP4_PACKED_E2M1
// The same rounding, two products a time in 16-bit lanes (sm_90: min.u16x2,
// max.u16x2; docs/format.md section 11): a's biased magnitude code in bits
// 0..15, b's in bits 16..31, each the code plus kE2M1PairBias. a, b >= +0
// (or NaN, which is only inf * 0).
// 1. Round to odd to bfloat16: each float32's upper half, its lowest bit set
//    where any bit of the lower half is. The E2M1 rounding that follows keeps
//    at most 2 of bfloat16's 8 significant bits, so this first rounding
//    cannot move a value onto one of its midpoints: it changes nothing.
// 2. Clamp to 6 (inf and NaN too): non-negative bfloat16 order like their bits.
// 3. e2m1_sum's addition in bfloat16: m = 2^k with k = max(floor(log2 t), 0)
//    (the bits of max(t, 1) with the mantissa cleared), and RN(m * 2^6 + t)
//    = 2^(k+6) + q * 2^(k-1), bfloat16's ulp in that binade, one rounding,
//    ties to even.
// 4. With m's bits e * 2^7 (e = k + 127), the sum's bits are (e + 6) * 2^7 + q,
//    and sum - m + m / 2^6 = q + 2e + 768 = q + 2k + kE2M1PairBias. No lane
//    borrows from or carries into the other.
enum E2M1PairBias : u32 { kE2M1PairBias = 1022u };

__device__ __forceinline__ u32 min_u16x2(u32 a, u32 b) {
  asm("min.u16x2 %0, %0, %1;" : "+r"(a) : "r"(b));
  return a;
}

__device__ __forceinline__ u32 max_u16x2(u32 a, u32 b) {
  asm("max.u16x2 %0, %0, %1;" : "+r"(a) : "r"(b));
  return a;
}

__device__ __forceinline__ u32 e2m1x2_biased_magnitude_codes(float a, float b) {
  const u32 a_bits = __float_as_uint(a);
  const u32 b_bits = __float_as_uint(b);
  const u32 sticky = min_u16x2(__byte_perm(a_bits, b_bits, 0x5410u), 0x00010001u);
  const u32 t = min_u16x2(__byte_perm(a_bits, b_bits, 0x7632u) | sticky, 0x40c040c0u);
  const u32 m = max_u16x2(t, 0x3f803f80u) & 0x7f807f80u;
  u32 sum;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(sum) : "r"(m), "r"(0x42804280u), "r"(t));  // m * 64 + t
  return sum - m + (m >> 6);
}
#endif

// Values 8h..8h+7 of a block times r, as eight E2M1 codes (value 8h + i in
// nibble i). The biases add up to the bias times 0x11111111 (mod 2^32); the
// nibble bits 3 are then free for the signs. kUnsignZeroProducts: a value
// whose product is exactly zero gets code 0x0 whatever its sign (TeCodes).
template <typename Input, bool kUnsignZeroProducts = false>
__device__ __forceinline__ u32 e2m1x8_from_magnitudes(const u32* words, int h, float r) {
  float products[8];
  u32 nonzero = 0;  // bit 3 of nibble i: value 8h + i has a nonzero product
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    products[i] = mul_rn(abs_f32(Input::element(words, 8 * h + i)), r);
    if (kUnsignZeroProducts) nonzero |= min(__float_as_uint(products[i]), 1u) << (4 * i + 3);
  }
  u32 sum = 0;
#if NVFP4_PACKED_E2M1
  // Values i and i + 4 share a word: lane 0 lands in nibble i, lane 1 in nibble i + 4.
#pragma unroll
  for (int i = 0; i < 4; ++i) sum += e2m1x2_biased_magnitude_codes(products[i], products[i + 4]) << (4 * i);
  constexpr u32 kBias = kE2M1PairBias;
#else
#pragma unroll
  for (int i = 0; i < 8; ++i) sum += e2m1_biased_magnitude_code(products[i]) << (4 * i);
  constexpr u32 kBias = kE2M1Bias;
#endif
  const u32 signs = Input::sign_nibbles(words, h);
  return (sum - kBias * 0x11111111u) | (kUnsignZeroProducts ? signs & nonzero : signs);
}

#if NVFP4_HW_E2M1
// Two values to one byte, lo in bits 0..3 and hi in bits 4..7: the sm_100a /
// sm_120a family's conversion (first operand -> high nibble).
__device__ __forceinline__ u32 e2m1x2_from_f32(float lo, float hi) {
  u16 pair;
  asm("{\n\t.reg .b8 byte;\n\t"
      "cvt.rn.satfinite.e2m1x2.f32 byte, %1, %2;\n\t"
      "cvt.u16.u8 %0, byte;\n\t}"
      : "=h"(pair)
      : "f"(hi), "f"(lo));
  return pair;
}
#endif

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
// Whole registers, not u8 and bool: byte-sized fields cost the quantizer
// byte moves (PRMT) at every block.
struct BlockScale {
  u32 scale_byte;      // E4M3 (or E8M0) bits written to the scale tensor, 0 .. 0xFF
  float reciprocal;    // r: multiply the block's values by this
  u32 zero_codes;      // 1: NaN block or invalid global scale, all 16 codes are 0
  u32 inf_times_zero;  // 1: r = 0 and the block holds an inf: inf * 0 is NaN, code 0x7 whatever the sign
};

__device__ __forceinline__ bool is_valid_global_scale(float gs) {
  // Finite and > 0 (positive subnormals included).
  const u32 bits = __float_as_uint(gs);
  return bits - 1u < kF32MaxBits;
}

// What every block under one global scale shares, worked out once a thread.
struct GlobalScale {
  float value;
  bool valid;          // finite and > 0
  bool fast_division;  // in the range where divide() by it is div.rn (so valid)
  Divisor divisor;
};

__device__ __forceinline__ GlobalScale global_scale(float gs) {
  return GlobalScale{gs, is_valid_global_scale(gs), in_fast_division_range(gs), divisor(gs)};
}

// A NaN-scaled block: scale byte 0x7F, every code 0x0.
__device__ __forceinline__ BlockScale nan_block() {
  BlockScale out;
  out.inf_times_zero = false;
  out.scale_byte = kE4M3NaN;
  out.reciprocal = 0.0f;
  out.zero_codes = true;
  return out;
}

// amax bits -> the float32 global scale (compute_global_scale, and quantize()'s
// one-launch kernel): 0 (all zeros, or no values) -> 1;
// NaN -> NaN and inf -> 0, both invalid scales that make every block of the
// quantized tensor NaN-scaled, so bad calibration data cannot pass unnoticed;
// a tiny amax clamps the scale to FLT_MAX. The one place this is computed.
__device__ __forceinline__ float global_scale_from_amax(u32 amax) {
  if (amax == 0) return 1.0f;
  if (amax > kF32InfBits) return __uint_as_float(kF32CanonicalNaN);
  const float gs = div_rn(448.0f * 6.0f, __uint_as_float(amax));
  return __float_as_uint(gs) > kF32MaxBits ? __uint_as_float(kF32MaxBits) : gs;
}

// Steps 3-5 with div.rn throughout, and the special blocks, for what
// block_scale's fast path does not cover: a global scale outside the fast
// division range (an invalid one too), or an amax that is inf or NaN. Out of
// line: it is rare, and long.
__device__ __noinline__ BlockScale block_scale_exact(u32 amax_bits, float gs) {
  if (!is_valid_global_scale(gs) || amax_bits > kF32InfBits) return nan_block();
  BlockScale out;
  out.zero_codes = false;
  out.scale_byte = e4m3_from_f32(mul_rn(gs, div_rn(__uint_as_float(amax_bits), 6.0f)));
  const float r = out.scale_byte ? div_rn(1.0f, div_rn(e4m3_to_f32(out.scale_byte), gs)) : 0.0f;
  out.reciprocal = (__float_as_uint(r) > kF32MaxBits) ? __uint_as_float(kF32MaxBits) : r;
  out.inf_times_zero = __float_as_uint(r) == 0u && amax_bits == kF32InfBits;
  return out;
}

// amax_bits: float32 bits of max |v_i| over the block (NaN bit patterns above
// inf). The fast path takes every finite amax: one below 2^-100, outside
// divide_by_six's exact range, still gets scale byte 0 there, as div.rn's
// quotient does (docs/format.md section 11).
__device__ __forceinline__ bool block_scale_is_fast(u32 amax_bits, const GlobalScale& gs) {
  return gs.fast_division && amax_bits < kF32InfBits;
}

// Steps 3-4 on the fast path: the scale byte (0 .. 0x7E).
__device__ __forceinline__ u8 fast_scale_byte(u32 amax_bits, const GlobalScale& gs) {
  return e4m3_from_f32(mul_rn(gs.value, divide_by_six(__uint_as_float(amax_bits))));
}

// Step 5 on the fast path: sf / gs lies in [2^-69, 2^69], so both divisions
// are div.rn's fast path, and 1 / q cannot overflow.
__device__ __forceinline__ float fast_reciprocal(u8 scale_byte, const GlobalScale& gs) {
  return scale_byte ? reciprocal_rn(divide(e4m3_to_f32(scale_byte), gs.divisor)) : 0.0f;
}

__device__ __forceinline__ BlockScale fast_block_scale(u8 scale_byte, float reciprocal) {
  BlockScale out;
  out.inf_times_zero = false;
  out.zero_codes = false;
  out.scale_byte = scale_byte;
  out.reciprocal = reciprocal;
  return out;
}

// NaN blocks are told apart inline, although block_scale_exact knows them
// too: a call for each costs the fused kernels registers (ptxas spilled).
__device__ __forceinline__ BlockScale block_scale(u32 amax_bits, const GlobalScale& gs) {
  if (!gs.valid || amax_bits > kF32InfBits) return nan_block();
  if (!block_scale_is_fast(amax_bits, gs)) return block_scale_exact(amax_bits, gs.value);
  const u8 scale_byte = fast_scale_byte(amax_bits, gs);
  return fast_block_scale(scale_byte, fast_reciprocal(scale_byte, gs));
}

// Step 5 of every scale byte the fast path gives, for a thread block that
// shares one global scale (Nvfp4TableBlocks): one entry a thread, then a
// barrier that the whole thread block must reach. The entries are unused
// (and harmless) for a global scale outside the fast range.
constexpr int kReciprocalTableSize = kE4M3Max + 1;

__device__ __forceinline__ void fill_reciprocal_table(float* __restrict__ table, const GlobalScale& gs) {
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  for (int byte = thread; byte < kReciprocalTableSize; byte += blockDim.x * blockDim.y) {
    table[byte] = fast_reciprocal((u8)byte, gs);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------
// numerics="te": TransformerEngine's per-block arithmetic (docs/te_numerics.md,
// sections 2 and 3; the argument for the shortcuts is its section 11):
// s = RN(amax * p) with p = RN(S * RN(1/6)), sf = e4m3(s), and
// r = min(RN(1 / RN(sf * d)), FLT_MAX) with d = RN(1 / S). The codes are
// TeCodes'.
// ---------------------------------------------------------------------------
// RN(1 / q) is reciprocal_rn's for q in [2^-69, 2^69] (division.cuh).
__device__ __forceinline__ bool in_reciprocal_range(float q) {
  return __float_as_uint(q) - 0x1d000000u <= 0x62000000u - 0x1d000000u;
}

// What every block under one global encode scale S shares, once a thread.
struct TeGlobalScale {
  float multiplier;  // p = RN(S * RN(1/6)); RN(1/6) is division.cuh's kSixth
  float decode;      // d = RN(1 / S), TE's global decode scale
  bool valid;        // S finite and > 0
  bool fast;         // d in [2^-60, 2^60]: every sf > 0 has RN(sf * d) in reciprocal_rn's range
};

__device__ __forceinline__ TeGlobalScale te_global_scale(float gs) {
  const float decode = in_reciprocal_range(gs) ? reciprocal_rn(gs) : div_rn(1.0f, gs);
  return TeGlobalScale{mul_rn(gs, kSixth), decode, is_valid_global_scale(gs), in_fast_division_range(decode)};
}

// Step 5 for a global scale outside the fast range (S outside about
// [2^-60, 2^60]: all-zero tensors get FLT_MAX), with div.rn. RN(sf * d) may
// be 0 (sf = 0x00: r = 1 / 0 = inf, clamped), subnormal, or overflow: then
// r = 0 and every product is +-0 or inf * 0 = NaN, all code 0x0. A
// subnormal S below 2^-128 has d = inf: r is 0, or NaN (0 * inf) for
// sf = 0x00, and every code is 0x0 too.
__device__ __noinline__ BlockScale te_scale_from_byte_exact(u8 scale_byte, float decode) {
  BlockScale out;
  out.inf_times_zero = false;
  out.scale_byte = scale_byte;
  const u32 r = __float_as_uint(div_rn(1.0f, mul_rn(e4m3_to_f32(scale_byte), decode)));  // +0 .. +inf, or NaN
  out.reciprocal = __uint_as_float(min(r, kF32MaxBits));
  out.zero_codes = r == 0u || r > kF32InfBits;
  return out;
}

// Step 5 in the fast range (TeGlobalScale::fast): r = RN(1 / RN(sf * d)),
// FLT_MAX for sf = 0.
__device__ __forceinline__ BlockScale te_scale_from_byte_fast(u8 scale_byte, float decode) {
  BlockScale out;
  out.inf_times_zero = false;
  out.zero_codes = false;
  out.scale_byte = scale_byte;
  out.reciprocal = scale_byte ? reciprocal_rn(mul_rn(e4m3_to_f32(scale_byte), decode)) : __uint_as_float(kF32MaxBits);
  return out;
}

// Step 5: the encode factor r = min(RN(1 / RN(sf * d)), FLT_MAX) of a scale
// byte (never NaN) under a valid S. Four Over Six (four_over_six.cu) makes
// its two candidates' bytes its own way and shares this step.
__device__ __forceinline__ BlockScale te_scale_from_byte(u8 scale_byte, const TeGlobalScale& gs) {
  return gs.fast ? te_scale_from_byte_fast(scale_byte, gs.decode) : te_scale_from_byte_exact(scale_byte, gs.decode);
}

// Steps 3-5 outside the fast range. There S of 2^-149 or 2^-148 has p = 0:
// an inf block then has s = inf * 0 = NaN, a NaN-scaled block (in the fast
// range p is finite and > 0, and s never NaN).
__device__ __noinline__ BlockScale te_block_scale_exact(u32 amax_bits, float multiplier, float decode) {
  const float s = mul_rn(__uint_as_float(amax_bits), multiplier);
  if (__float_as_uint(s) > kF32InfBits) return nan_block();
  return te_scale_from_byte_exact(e4m3_from_f32(s), decode);
}

// amax_bits: float32 bits of max |v_i| over the block (NaN bit patterns above
// inf). s's clamp to FLT_MAX is left out: e4m3_from_f32 saturates inf to 448.
__device__ __forceinline__ BlockScale te_block_scale(u32 amax_bits, const TeGlobalScale& gs) {
  if (!gs.valid || amax_bits > kF32InfBits) return nan_block();
  if (!gs.fast) return te_block_scale_exact(amax_bits, gs.multiplier, gs.decode);
  return te_scale_from_byte_fast(e4m3_from_f32(mul_rn(__uint_as_float(amax_bits), gs.multiplier)), gs.decode);
}

// amax bits -> TE's global encode scale (compute_global_scale_te):
// min(RN(2688 / amax), FLT_MAX), so amax 0 gives FLT_MAX; 1 where that is 0
// (amax inf); a NaN amax gives NaN (the canonical quiet NaN).
__device__ __forceinline__ float global_scale_from_amax_te(u32 amax) {
  if (amax > kF32InfBits) return __uint_as_float(kF32CanonicalNaN);
  if (amax == kF32InfBits) return 1.0f;
  const float gs = div_rn(448.0f * 6.0f, __uint_as_float(amax));
  return __uint_as_float(min(__float_as_uint(gs), kF32MaxBits));
}

// S_enc = min(RN(numerator / A), FLT_MAX) (NaN-propagating), 1 where that is
// 0, from a global amax A as given (docs/te_rht_and_4over6.md, A.4 and B.2;
// reference.te.encode_scale_from_amax_te): numerator = 6 * e4m3_max, 2688
// or 1536. Any float32 A: a negative or NaN one gives an invalid S_enc. On
// the bits (float compares would take .ftz under -ftz=true): only +inf lies
// above FLT_MAX, and +-0 (A = +-inf) becomes 1; a NaN stays.
__device__ __forceinline__ float te_encode_scale(float amax, float numerator) {
  const float s = div_rn(numerator, amax);
  const u32 bits = __float_as_uint(s);
  if ((bits & kF32AbsMask) == 0u) return 1.0f;
  return bits == kF32InfBits ? __uint_as_float(kF32MaxBits) : s;
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
  out.inf_times_zero = false;
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

// The scale rules "rceil" and "te_pow2" (docs/stochastic_rounding_and_mx_rules.md,
// section 3): X = 2^clamp(ceil(log2(d)), -127, 127), d = RN(amax / 6), as an
// E8M0 byte, exactly (cvt.rp.satfinite.ue8m0x2.f32's rule): the exponent of d,
// plus one unless d is a power of two; a subnormal d is 2^-126 above 2^-127,
// else 2^-127 (byte 0). inf gives 254 (0xFE). NaN is the caller's.
// Inline: a call (the ABI's saved registers) made ptxas spill in the MXFP4
// element-load kernels; div.rn's own slow path stays out of line anyway.
__device__ __forceinline__ float divide_by_six_exact(float amax) { return div_rn(amax, 6.0f); }

__device__ __forceinline__ u32 mx_ceil_scale_byte(u32 amax_bits) {
  const float amax = __uint_as_float(amax_bits);
  const u32 d = __float_as_uint(sixth_is_fast(amax_bits) ? divide_by_six(amax) : divide_by_six_exact(amax));
  const u32 exponent = d >> 23;
  const u32 mantissa = d & 0x7fffffu;
  const bool round_up = exponent ? mantissa != 0u : mantissa > 0x400000u;
  return min(exponent + (round_up ? 1u : 0u), 254u);
}

// 2^(127 - byte), exact, for byte 1..254 (2^-127, subnormal, for 0xFE).
__device__ __forceinline__ float mx_inverse_scale(u32 byte) {
  return __uint_as_float(byte == 254u ? 0x00400000u : (254u - byte) << 23);
}

// "rceil" (torchao's RCEIL): r = 2^(127 - byte), but 1 for byte 0; a NaN
// block is 0xFF with every code 0x3 (RceilCodes), an inf block 0xFE and
// quantized.
__device__ __forceinline__ BlockScale mx_block_scale_rceil(u32 amax_bits) {
  BlockScale out;
  out.inf_times_zero = false;
  out.zero_codes = amax_bits > kF32InfBits;
  if (out.zero_codes) {
    out.scale_byte = kE8M0NaN;
    out.reciprocal = 0.0f;
    return out;
  }
  const u32 byte = mx_ceil_scale_byte(amax_bits);
  out.scale_byte = (u8)byte;
  out.reciprocal = byte ? mx_inverse_scale(byte) : 1.0f;
  return out;
}

// "te_pow2" (TE's pow_2_scales reference, 1x32): r = 2^(127 - byte) always
// (2^127 for byte 0), codes TeCodes'; a NaN block is 0xFF with codes 0x0.
__device__ __forceinline__ BlockScale mx_block_scale_te_pow2(u32 amax_bits) {
  BlockScale out = mx_block_scale_rceil(amax_bits);
  if (!out.zero_codes) out.reciprocal = mx_inverse_scale(out.scale_byte);
  return out;
}

// E8M0 byte -> float32: 2^(byte - 127), 0xff is NaN.
__device__ __forceinline__ float e8m0_to_f32(u8 byte) {
  if (byte == kE8M0NaN) return __uint_as_float(kF32CanonicalNaN);
  return __uint_as_float(byte ? (u32)byte << 23 : 0x00400000u);
}

// r = 0 with an inf in the block (BlockScale::inf_times_zero): the finite
// values give codes 0x0/0x8, and an inf gives inf * 0 = NaN, code 0x7 whatever
// its sign. Clears the sign of every 0xF nibble.
__device__ __forceinline__ u32 drop_nan_signs(u32 codes) {
  return codes & ~(((codes & (codes >> 1) & (codes >> 2)) & 0x11111111u) << 3);
}

// How pack_block turns products into codes beyond the E2M1 rounding, a
// policy per numerics (a template argument, so each kernel gets only its own):
// - kZeroIsUnsigned: an exact zero product, +0.0 or -0.0, gives code 0x0
//   (TransformerEngine's cast_to_fp4x2 tests y < -0.0 for the negative codes;
//   a negative product that rounds to zero still gives 0x8). Its NaN
//   products give 0x0 too, which the block scales of those numerics see to
//   (no such cast ever meets a NaN product: te_block_scale).
// - kSpecialBlock: the eight codes of a word of a block whose BlockScale has
//   zero_codes (a NaN block, or an invalid global scale).
struct IeeeCodes {  // docs/format.md; MXFP4 "floor"
  static constexpr bool kZeroIsUnsigned = false;
  static constexpr u32 kSpecialBlock = 0u;
};
struct TeCodes {  // numerics="te" (docs/te_numerics.md, section 2, step 6); MXFP4 "te_pow2"
  static constexpr bool kZeroIsUnsigned = true;
  static constexpr u32 kSpecialBlock = 0u;
};
struct RceilCodes {  // MXFP4 "rceil": torchao gives every value of a NaN block code 0x3
  static constexpr bool kZeroIsUnsigned = false;
  static constexpr u32 kSpecialBlock = 0x33333333u;
};

// The codes of one block of 16 values from its words (element 2j in the low
// nibble of byte j). kUnsignZeroProducts: a zero product gives 0x0, tested
// value by value.
template <typename Input, bool kUnsignZeroProducts>
__device__ __forceinline__ uint2 pack_products(const u32* words, const BlockScale& scale) {
#if NVFP4_HW_E2M1
  // The hardware conversion, on the signed product (inf * 0 is NaN there,
  // which satfinite makes +6). -0.0 + (+0.0) is +0.0, which it makes 0x0.
  u32 halves[2] = {0u, 0u};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float lo = mul_rn(Input::element(words, 2 * j), scale.reciprocal);
    float hi = mul_rn(Input::element(words, 2 * j + 1), scale.reciprocal);
    if (kUnsignZeroProducts) {
      lo = add_rn(lo, 0.0f);
      hi = add_rn(hi, 0.0f);
    }
    halves[j >> 2] |= e2m1x2_from_f32(lo, hi) << (8 * (j & 3));
  }
  return make_uint2(halves[0], halves[1]);
#else
  uint2 codes = make_uint2(e2m1x8_from_magnitudes<Input, kUnsignZeroProducts>(words, 0, scale.reciprocal),
                           e2m1x8_from_magnitudes<Input, kUnsignZeroProducts>(words, 1, scale.reciprocal));
  if (scale.inf_times_zero) codes = make_uint2(drop_nan_signs(codes.x), drop_nan_signs(codes.y));
  return codes;
#endif
}

// One block of 16 values -> 64 bits of packed codes (element 2j in the low
// nibble of byte j), the codes as Codes has them.
template <typename Input, typename Codes = IeeeCodes>
__device__ __forceinline__ uint2 pack_block(const u32* words, const BlockScale& scale) {
  if (scale.zero_codes) return make_uint2(Codes::kSpecialBlock, Codes::kSpecialBlock);
  if constexpr (Codes::kZeroIsUnsigned) {
    // With -0.0 made +0.0 up front, a zero product keeps a sign only where a
    // nonzero value underflows, which needs r below Input::kNonzeroProductsFrom:
    // only those blocks test every product (docs/te_numerics.md, section 11).
    constexpr int kWords = 4 * sizeof(typename Input::raw_t);
    u32 values[kWords];
#pragma unroll
    for (int w = 0; w < kWords; ++w) values[w] = Input::positive_zeros(words[w]);
    if (__float_as_uint(scale.reciprocal) < Input::kNonzeroProductsFrom) return pack_products<Input, true>(values, scale);
    return pack_products<Input, false>(values, scale);
  } else {
    return pack_products<Input, false>(words, scale);
  }
}

// RN(sqrt(a)), correctly rounded, subnormals kept (no .ftz, not rsqrt or
// sqrt.approx): RMSNorm's 1 / sqrt is div.rn of this (docs/fused_ops.md, 3.1).
__device__ __forceinline__ float sqrt_rn(float a) {
  float d;
  asm("sqrt.rn.f32 %0, %1;" : "=f"(d) : "f"(a));
  return d;
}

}  // namespace nvfp4
