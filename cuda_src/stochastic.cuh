// Stochastic rounding of the E2M1 codes (docs/stochastic_rounding_and_mx_rules.md,
// sections 1, 2 and 4): the random words of an element group from
// Philox4x32-10, and the rounding of one product with 8 random bits, the
// integer form of cvt.rs.satfinite.e2m1x4.f32. The golden model is
// nvfp4_cupy/reference/philox.py and stochastic.py.
#pragma once

#include "numerics.cuh"

namespace nvfp4 {

enum PhiloxConstants : u32 {
  kPhiloxM0 = 0xD2511F53u,  // round multipliers
  kPhiloxM1 = 0xCD9E8D57u,
  kPhiloxW0 = 0x9E3779B9u,  // key increments
  kPhiloxW1 = 0xBB67AE85u,
};

// Philox4x32-10 of `counter` under the key (k0, k1): 10 rounds, the key
// bumped between rounds (9 bumps). One round, with 64-bit products split in
// hi/lo halves: hi0:lo0 = M0 * c0, hi1:lo1 = M1 * c2,
// (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, u32 k0, u32 k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const u32 hi0 = __umulhi(kPhiloxM0, c.x), lo0 = kPhiloxM0 * c.x;
    const u32 hi1 = __umulhi(kPhiloxM1, c.z), lo1 = kPhiloxM1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
  }
  return c;
}

// The E2M1 magnitude code of a = |y| rounded stochastically with the random
// byte R (section 2.4, reference.stochastic.sr_e2m1), plus kSrBias:
// a is clamped to 6 (a NaN too: its bits lie above 6's), u = E2M1's ulp at a
// = 2^(k-1) with k = 0, 1, 2 below 2, below 4, else, T = floor(a * 256 / u),
// and the code is ((T + R) >> 8) + 2k. With top = max(biased exponent, 127)
// = 127 + k (a <= 6 keeps k <= 2), a * 256 / u = a * 2^(9 - k) is a's
// significand (implicit bit included) shifted right by 14 + top - biased
// exponent: 14 in E2M1's binades, more below 1, and 32 or more (shr clamps:
// 0) for zero and subnormals. The code + 2 * 127 is what is returned.
enum SrBias : u32 { kSrBias = 254u };

__device__ __forceinline__ u32 shift_right(u32 value, u32 shift) {
  u32 d;
  asm("shr.b32 %0, %1, %2;" : "=r"(d) : "r"(value), "r"(shift));  // PTX: shifts past 31 give 0
  return d;
}

__device__ __forceinline__ u32 e2m1_sr_biased_magnitude_code(float magnitude, u32 random_byte) {
  const u32 a = min(__float_as_uint(magnitude), 0x40c00000u);
  const u32 biased = a >> 23;
  const u32 top = max(biased, 127u);
  const u32 fixed = shift_right((a & 0x7fffffu) | 0x800000u, top - biased + 14u);
  return ((fixed + random_byte) >> 8) + 2u * top;
}

// The bit position in word x_j of element 4j + i's random byte
// (reference.stochastic.RBITS_SHIFT: operands f, e, b, a of one
// cvt.rs.satfinite.e2m1x4.f32).
__device__ __forceinline__ u32 random_byte(uint4 words, int element) {
  const u32 word = (element >> 2) == 0 ? words.x : (element >> 2) == 1 ? words.y : (element >> 2) == 2 ? words.z
                                                                                                        : words.w;
  constexpr u32 kShifts = (0u << 0) | (16u << 8) | (8u << 16) | (24u << 24);
  return (word >> ((kShifts >> (8 * (element & 3))) & 0xffu)) & 0xffu;
}

// Values 8h..8h+7 of a block times r, as eight stochastically rounded E2M1
// codes (value 8h + i in nibble i), as e2m1x8_from_magnitudes does it for
// round-to-nearest: the biases add up to kSrBias * 0x11111111 (mod 2^32),
// and the nibble bits 3 are left for the signs. y's sign is v's (r >= 0),
// except for inf * 0 = NaN, which the caller unsigns (drop_nan_signs).
template <typename Input>
__device__ __forceinline__ u32 e2m1x8_sr(const u32* words, int h, float r, uint4 random) {
  u32 sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float magnitude = mul_rn(abs_f32(Input::element(words, 8 * h + i)), r);
    sum += e2m1_sr_biased_magnitude_code(magnitude, random_byte(random, 8 * h + i)) << (4 * i);
  }
  return (sum - kSrBias * 0x11111111u) | Input::sign_nibbles(words, h);
}

// One block of 16 values -> 64 bits of packed codes (element 2j in the low
// nibble of byte j), every code rounded stochastically with the block's
// Philox words; the scale, the products y = RN(v * r) and the special blocks
// are pack_block's: zero codes for a NaN block or an invalid global scale,
// and for r = 0 with an inf in the block, code 0x7 for the inf (sr_e2m1's
// NaN rule: inf * 0 is NaN) and 0x0/0x8 for the rest.
template <typename Input>
__device__ __forceinline__ uint2 pack_block_sr(const u32* words, const BlockScale& scale, uint4 random) {
  if (scale.zero_codes) return make_uint2(0u, 0u);
  uint2 codes = make_uint2(e2m1x8_sr<Input>(words, 0, scale.reciprocal, random),
                           e2m1x8_sr<Input>(words, 1, scale.reciprocal, random));
  if (scale.inf_times_zero) codes = make_uint2(drop_nan_signs(codes.x), drop_nan_signs(codes.y));
  return codes;
}

}  // namespace nvfp4
