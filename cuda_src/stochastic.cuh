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

// The E2M1 code of product y rounded stochastically with the random byte R
// (section 2.4, reference.stochastic.sr_e2m1): a = min(|y|, 6), u = E2M1's
// ulp at a (2^(k-1), k = 0, 1, 2 for a < 2, < 4, else), T = floor(a * 256 / u),
// magnitude ((T + R) >> 8) * u, which is code ((T + R) >> 8) + 2k; y's sign
// bit (so -0.0 gives 0x8); NaN gives 0x7 (+6, as satfinite does).
// a * 256 / u = a * 2^(9 - k) is a's significand (implicit bit included)
// shifted right by 14 in the E2M1 binades; below 1 by 14 more for each
// binade down, which a shift of 24 or more (subnormals, zero) makes 0.
__device__ __forceinline__ u32 e2m1_sr_code(float y, u32 random_byte) {
  const u32 bits = __float_as_uint(y);
  if ((bits & kF32AbsMask) > kF32InfBits) return 0x7u;
  const u32 a = min(bits & kF32AbsMask, 0x40c00000u);
  const u32 biased = a >> 23;
  const u32 k = min(max(biased, 127u), 129u) - 127u;
  const u32 fixed = ((a & 0x7fffffu) | 0x800000u) >> min(141u + k - biased, 31u);
  return (((fixed + random_byte) >> 8) + 2u * k) | ((bits >> 28) & 0x8u);
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

// One block of 16 values -> 64 bits of packed codes (element 2j in the low
// nibble of byte j), every code rounded stochastically with the block's
// Philox words; the scale, the products y = RN(v * r) and the special blocks
// (zero codes) are pack_block's.
template <typename Input>
__device__ __forceinline__ uint2 pack_block_sr(const u32* words, const BlockScale& scale, uint4 random) {
  if (scale.zero_codes) return make_uint2(0u, 0u);
  u32 halves[2] = {0u, 0u};
#pragma unroll
  for (int e = 0; e < kBlockSize; ++e) {
    const float y = mul_rn(Input::element(words, e), scale.reciprocal);
    halves[e >> 3] |= e2m1_sr_code(y, random_byte(random, e)) << (4 * (e & 7));
  }
  return make_uint2(halves[0], halves[1]);
}

}  // namespace nvfp4
