// Exhaustive checks of the quantizer's shortcuts against the operations they
// replace (tests/test_numerics_gpu.py): every operand of each shortcut's
// domain, one per thread, grid-stride. Appended to cuda_src/numerics.cuh.
// counts[0]: mismatches, counts[1]: operands checked; first: the smallest
// operand bits that mismatched (0xffffffff if none).
using namespace nvfp4;

__device__ __forceinline__ void report(unsigned long long* counts, unsigned* first, unsigned long long bad,
                                       unsigned long long checked, unsigned first_bad) {
  if (bad) {
    atomicAdd(counts, bad);
    atomicMin(first, first_bad);
  }
  atomicAdd(counts + 1, checked);
}

// divide_by_six == div.rn(a, 6) for every amax sixth_is_fast accepts.
extern "C" __global__ void check_divide_by_six(unsigned long long* counts, unsigned* first) {
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i <= kF32InfBits;
       i += gridDim.x * (unsigned long long)blockDim.x) {
    const u32 bits = (u32)i;
    if (!sixth_is_fast(bits)) continue;
    const float a = __uint_as_float(bits);
    ++checked;
    if (__float_as_uint(divide_by_six(a)) != __float_as_uint(div_rn(a, 6.0f))) {
      ++bad;
      first_bad = min(first_bad, bits);
    }
  }
  report(counts, first, bad, checked, first_bad);
}

// Four Over Six's error step (cuda_src/four_over_six.cu): divide(y, divisor(D))
// == div.rn(y, D) for D = 2688 and 1536 (6 * e4m3_max) and every y of either
// sign with 2^-100 <= |y| <= 2^112 (bits 0x0D800000..0x77800000), and y = +0:
// the range error_division_is_fast keeps the error loop's y in. (-0 gives
// +0, not -0: that changes no |diff| and no diff^2, so the loop allows it.)
extern "C" __global__ void check_divide_by_4over6_denominators(unsigned long long* counts, unsigned* first) {
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  const Divisor divisors[2] = {divisor(2688.0f), divisor(1536.0f)};
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i <= 0x77800000ull;
       i += gridDim.x * (unsigned long long)blockDim.x) {
    const u32 bits = (u32)i;
    if (bits != 0u && bits < 0x0D800000u) continue;
#pragma unroll
    for (int d = 0; d < 2; ++d) {
#pragma unroll
      for (u32 sign = 0; sign < 2; ++sign) {
        if (bits == 0u && sign) continue;
        const float y = __uint_as_float(bits | (sign << 31));
        ++checked;
        if (__float_as_uint(divide(y, divisors[d])) != __float_as_uint(div_rn(y, divisors[d].value))) {
          ++bad;
          first_bad = min(first_bad, bits);
        }
      }
    }
  }
  report(counts, first, bad, checked, first_bad);
}

// For every global scale in_fast_division_range accepts and every positive
// E4M3 value sf: divide(sf, divisor(gs)) == div.rn(sf, gs), and the
// reciprocal of that quotient == div.rn(1, q). first: the gs bits.
extern "C" __global__ void check_scale_divisions(unsigned long long* counts, unsigned* first) {
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i <= kF32InfBits;
       i += gridDim.x * (unsigned long long)blockDim.x) {
    const u32 bits = (u32)i;
    const float gs = __uint_as_float(bits);
    if (!in_fast_division_range(gs)) continue;
    const Divisor d = divisor(gs);
    for (u32 code = 1; code <= kE4M3Max; ++code) {
      const float sf = e4m3_to_f32((u8)code);
      const float q = div_rn(sf, gs);
      ++checked;
      if (__float_as_uint(divide(sf, d)) != __float_as_uint(q) ||
          __float_as_uint(reciprocal_rn(q)) != __float_as_uint(div_rn(1.0f, q))) {
        ++bad;
        first_bad = min(first_bad, bits);
      }
    }
  }
  report(counts, first, bad, checked, first_bad);
}

// reciprocal_rn(q) == div.rn(1, q) for every q in [2^-69, 2^69].
extern "C" __global__ void check_reciprocal(unsigned long long* counts, unsigned* first) {
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  for (unsigned long long i = 0x1d000000ull + blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
       i <= 0x62000000ull; i += gridDim.x * (unsigned long long)blockDim.x) {
    const u32 bits = (u32)i;
    const float q = __uint_as_float(bits);
    ++checked;
    if (__float_as_uint(reciprocal_rn(q)) != __float_as_uint(div_rn(1.0f, q))) {
      ++bad;
      first_bad = min(first_bad, bits);
    }
  }
  report(counts, first, bad, checked, first_bad);
}

// block_scale's fast path == block_scale_exact for every nonzero amax below
// 2^-100 (outside divide_by_six's exact range, which the fast path takes
// too), under global scales at both ends of the fast division range and
// between: scale byte 0 and r = 0 on both.
extern "C" __global__ void check_tiny_amax_blocks(unsigned long long* counts, unsigned* first) {
  const float scales[4] = {0x1p-60f, 1.0f, 2688.0f / 3.0f, 0x1p60f};
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
       i < 4ull * (kSixthFastMinBits - 1u); i += gridDim.x * (unsigned long long)blockDim.x) {
    const u32 amax_bits = 1u + (u32)(i % (kSixthFastMinBits - 1u));
    const float gs = scales[i / (kSixthFastMinBits - 1u)];
    const BlockScale fast = block_scale(amax_bits, global_scale(gs));
    const BlockScale exact = block_scale_exact(amax_bits, gs);
    ++checked;
    if (fast.scale_byte != exact.scale_byte || __float_as_uint(fast.reciprocal) != __float_as_uint(exact.reciprocal) ||
        fast.zero_codes != exact.zero_codes || fast.inf_times_zero != exact.inf_times_zero) {
      ++bad;
      first_bad = min(first_bad, amax_bits);
    }
  }
  report(counts, first, bad, checked, first_bad);
}

// docs/format.md section 2.1's table, read literally: the magnitude code of
// a >= 0 (NaN, as the quantizer meets it, is 0x7).
__device__ u32 e2m1_code_from_table(float a) {
  const u32 bits = __float_as_uint(a);  // a >= 0: bit order is value order, NaN above inf
  const float upper[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
  const bool inclusive[7] = {true, false, true, false, true, false, true};  // "<=" or "<"
  for (u32 code = 0; code < 7; ++code) {
    const u32 limit = __float_as_uint(upper[code]);
    if (inclusive[code] ? bits <= limit : bits < limit) return code;
  }
  return 7;
}

// The magnitude code of e2m1_biased_magnitude_code == the table's, for every
// non-negative float32 bit pattern, inf and NaN too.
extern "C" __global__ void check_e2m1_magnitude(unsigned long long* counts, unsigned* first) {
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < 0x80000000ull;
       i += gridDim.x * (unsigned long long)blockDim.x) {
    const u32 bits = (u32)i;
    const float a = __uint_as_float(bits);
    ++checked;
    if (e2m1_biased_magnitude_code(a) - kE2M1Bias != e2m1_code_from_table(a)) {
      ++bad;
      first_bad = min(first_bad, bits);
    }
  }
  report(counts, first, bad, checked, first_bad);
}

#if NVFP4_PACKED_E2M1
// Both lanes of e2m1x2_biased_magnitude_codes == the table's, for every
// non-negative float32 bit pattern in each lane: lane 0 takes pattern i, lane 1
// pattern (i * 0x9e3779b1 + 0x2545f491) mod 2^31, a permutation, so that
// each lane meets every pattern once, next to an unrelated one.
extern "C" __global__ void check_e2m1_magnitude_pairs(unsigned long long* counts, unsigned* first) {
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < 0x80000000ull;
       i += gridDim.x * (unsigned long long)blockDim.x) {
    const u32 low_bits = (u32)i;
    const u32 high_bits = ((u32)i * 0x9e3779b1u + 0x2545f491u) & 0x7fffffffu;
    const float a = __uint_as_float(low_bits);
    const float b = __uint_as_float(high_bits);
    const u32 codes = e2m1x2_biased_magnitude_codes(a, b);
    ++checked;
    if ((codes & 0xffffu) - kE2M1PairBias != e2m1_code_from_table(a)) {
      ++bad;
      first_bad = min(first_bad, low_bits);
    }
    if ((codes >> 16) - kE2M1PairBias != e2m1_code_from_table(b)) {
      ++bad;
      first_bad = min(first_bad, high_bits);
    }
  }
  report(counts, first, bad, checked, first_bad);
}
#endif
