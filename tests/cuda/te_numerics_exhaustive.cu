// Exhaustive checks of numerics="te" and of the MXFP4 scale rules "rceil" and
// "te_pow2" (tests/test_te_gpu.py): each shortcut of cuda_src/numerics.cuh
// against the plain IEEE formula it stands for (docs/te_numerics.md, section
// 11), over every operand of its domain, one per thread, grid-stride; and a
// kernel that evaluates the scalar functions on given operands, for the
// comparison with the golden model. Appended to cuda_src/numerics.cuh.
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

#define FOR_EVERY_WORD(i, limit)                                                                        \
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (limit); \
       i += gridDim.x * (unsigned long long)blockDim.x)

// Global encode scales the block-scale check runs under: ordinary ones (the
// two of docs/te_numerics.md's section 8 examples), both ends of the fast
// range of d = RN(1 / S) and just outside them, FLT_MAX (amax 0: d = 2^-128),
// the least compute_global_scale_te gives, 1e-37 (RN(448 * d) overflows:
// r = 0), a subnormal, and invalid ones (0, negative, inf, NaN).
__constant__ unsigned kTeScaleBits[] = {
    0x3f800000u,  // 1
    0x4308c7c2u,  // 136.7803
    0x44219650u,  // 646.34863
    0x5d800000u,  // 2^60
    0x5d800001u,  // 2^60 (1 + 2^-23): d just below 2^-60
    0x21800000u,  // 2^-60
    0x217fffffu,  // just below 2^-60: d just above 2^60
    0x7f7fffffu,  // FLT_MAX
    0x05280001u,  // 7.899323e-36 = RN(2688 / FLT_MAX)
    0x02081ceau,  // 1e-37
    0x00000001u,  // 2^-149
    0x00000000u,  // 0: invalid
    0xbf800000u,  // -1: invalid
    0x7f800000u,  // inf: invalid
    0x7fc00000u,  // NaN: invalid
};
constexpr int kTeScaleCount = sizeof(kTeScaleBits) / sizeof(kTeScaleBits[0]);

// te_global_scale(S) == (RN(S * RN(1/6)), RN(1 / S) by div.rn, validity, the
// fast-range flag) for every float32 bit pattern S.
extern "C" __global__ void check_te_global_scale(unsigned long long* counts, unsigned* first) {
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  FOR_EVERY_WORD(i, 0x100000000ull) {
    const u32 bits = (u32)i;
    const float gs = __uint_as_float(bits);
    const TeGlobalScale got = te_global_scale(gs);
    const float decode = div_rn(1.0f, gs);
    const u32 decode_bits = __float_as_uint(decode);
    const bool valid = bits >= 1u && bits <= kF32MaxBits;
    const bool fast = decode_bits >= 0x21800000u && decode_bits <= 0x5d800000u;  // 2^-60 <= d <= 2^60
    const bool nan_decode = (decode_bits & kF32AbsMask) > kF32InfBits;
    ++checked;
    if (got.valid != valid || (valid && got.fast != fast) ||
        (!nan_decode && __float_as_uint(got.decode) != decode_bits) ||
        (!nan_decode && __float_as_uint(got.multiplier) != __float_as_uint(mul_rn(gs, kSixth)))) {
      ++bad;
      first_bad = min(first_bad, bits);
    }
  }
  report(counts, first, bad, checked, first_bad);
}

// te_block_scale(amax, te_global_scale(S)) against docs/te_numerics.md,
// section 2, steps 3 to 5 written out with div.rn and the clamps, for every
// amax bit pattern (NaN ones included) under each of kTeScaleBits.
extern "C" __global__ void check_te_block_scale(unsigned long long* counts, unsigned* first) {
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  FOR_EVERY_WORD(i, 0x80000000ull * kTeScaleCount) {
    const u32 amax_bits = (u32)(i & 0x7fffffffull);
    const float gs = __uint_as_float(kTeScaleBits[i >> 31]);
    const BlockScale got = te_block_scale(amax_bits, te_global_scale(gs));
    u8 byte;
    u32 r_bits;
    bool zero_codes;
    const float s = mul_rn(__uint_as_float(amax_bits), mul_rn(gs, kSixth));  // NaN: inf * 0 for S <= 2^-148
    if (!is_valid_global_scale(gs) || __float_as_uint(s) > kF32InfBits) {
      byte = kE4M3NaN;
      zero_codes = true;
      r_bits = __float_as_uint(got.reciprocal);  // not used for such a block
    } else {
      const float clamped = __uint_as_float(min(min(__float_as_uint(s), kF32MaxBits), 0x43e00000u));  // FLT_MAX, 448
      byte = e4m3_from_f32(clamped);
      const float r = div_rn(1.0f, mul_rn(e4m3_to_f32(byte), div_rn(1.0f, gs)));
      r_bits = min(__float_as_uint(r), kF32MaxBits);  // r = NaN (0 * inf) reads as FLT_MAX with zero codes
      zero_codes = __float_as_uint(r) == 0u || __float_as_uint(r) > kF32InfBits;
    }
    ++checked;
    if (got.scale_byte != byte || __float_as_uint(got.reciprocal) != r_bits || got.zero_codes != zero_codes ||
        got.inf_times_zero) {
      ++bad;
      first_bad = min(first_bad, amax_bits);
    }
  }
  report(counts, first, bad, checked, first_bad);
}

// Input::positive_zeros: -0.0 becomes +0.0, every other non-NaN value keeps
// its bits (NaN stays a NaN), for every 32-bit word. kExponent: the bits of
// +inf in the type (two values a word for 16-bit types).

template <typename Input, u32 kExponent>
__device__ void check_positive_zeros(unsigned long long* counts, unsigned* first) {
  constexpr int kValues = 4 / sizeof(typename Input::raw_t);  // values a word
  constexpr u32 kMask = kValues == 1 ? 0xffffffffu : 0xffffu;
  constexpr u32 kNegativeZero = kValues == 1 ? 0x80000000u : 0x8000u;
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  FOR_EVERY_WORD(i, 0x100000000ull) {
    const u32 word = (u32)i;
    const u32 got = Input::positive_zeros(word);
    bool ok = true;
    for (int h = 0; h < kValues; ++h) {
      const u32 in = (word >> (16 * h)) & kMask;
      const u32 out = (got >> (16 * h)) & kMask;
      const u32 magnitude_mask = kMask >> 1;
      const bool nan = (in & magnitude_mask) > kExponent;  // exponent all ones, mantissa not zero
      ok = ok && (nan ? (out & magnitude_mask) > kExponent : out == (in == kNegativeZero ? 0u : in));
    }
    ++checked;
    if (!ok) {
      ++bad;
      first_bad = min(first_bad, word);
    }
  }
  report(counts, first, bad, checked, first_bad);
}

extern "C" __global__ void check_positive_zeros_f16(unsigned long long* counts, unsigned* first) {
  check_positive_zeros<Float16Input, 0x7c00u>(counts, first);
}
extern "C" __global__ void check_positive_zeros_bf16(unsigned long long* counts, unsigned* first) {
  check_positive_zeros<BFloat16Input, 0x7f80u>(counts, first);
}
extern "C" __global__ void check_positive_zeros_f32(unsigned long long* counts, unsigned* first) {
  check_positive_zeros<Float32Input, 0x7f800000u>(counts, first);
}

// Input::kNonzeroProductsFrom: every nonzero, non-NaN value of the type times
// that r rounds to a nonzero float32 (so, RN being monotonic, times any
// larger r too), for every bit pattern of the type.
template <typename Input>
__device__ void check_nonzero_products(unsigned long long* counts, unsigned* first) {
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  const float r = __uint_as_float(Input::kNonzeroProductsFrom);
  constexpr unsigned long long kPatterns = 1ull << (8 * sizeof(typename Input::raw_t));
  FOR_EVERY_WORD(i, kPatterns) {
    const u32 raw = (u32)i;
    u32 word[4 * sizeof(typename Input::raw_t)] = {raw};
    const float v = abs_f32(Input::element(word, 0));
    const u32 v_bits = __float_as_uint(v);
    if (v_bits == 0u || v_bits > kF32InfBits) continue;
    ++checked;
    if (__float_as_uint(mul_rn(v, r)) == 0u) {
      ++bad;
      first_bad = min(first_bad, raw);
    }
  }
  report(counts, first, bad, checked, first_bad);
}

extern "C" __global__ void check_nonzero_products_f16(unsigned long long* counts, unsigned* first) {
  check_nonzero_products<Float16Input>(counts, first);
}
extern "C" __global__ void check_nonzero_products_bf16(unsigned long long* counts, unsigned* first) {
  check_nonzero_products<BFloat16Input>(counts, first);
}
extern "C" __global__ void check_nonzero_products_f32(unsigned long long* counts, unsigned* first) {
  check_nonzero_products<Float32Input>(counts, first);
}

// The MXFP4 rules "rceil" and "te_pow2" for every amax bit pattern: the byte
// is the least b in 0..254 with 2^(b - 127) >= RN(amax / 6) (254 for inf),
// 0xFF for NaN with zero_codes; r * 2^(b - 127) == 1 exactly, except rceil's
// r = 1 for b = 0.
__device__ __forceinline__ u32 e8m0_bits(u32 byte) { return byte ? byte << 23 : 0x00400000u; }

extern "C" __global__ void check_mx_ceil_rules(unsigned long long* counts, unsigned* first) {
  unsigned long long bad = 0, checked = 0;
  unsigned first_bad = 0xffffffffu;
  FOR_EVERY_WORD(i, 0x80000000ull) {
    const u32 amax_bits = (u32)i;
    const BlockScale rceil = mx_block_scale_rceil(amax_bits);
    const BlockScale pow2 = mx_block_scale_te_pow2(amax_bits);
    bool ok;
    if (amax_bits > kF32InfBits) {
      ok = rceil.scale_byte == 0xffu && rceil.zero_codes && pow2.scale_byte == 0xffu && pow2.zero_codes;
    } else {
      const u32 d = __float_as_uint(div_rn(__uint_as_float(amax_bits), 6.0f));
      const u32 b = rceil.scale_byte;
      const bool least = d == kF32InfBits ? b == 254u : (b <= 254u && e8m0_bits(b) >= d && (b == 0u || e8m0_bits(b - 1u) < d));
      const float x = __uint_as_float(e8m0_bits(b));
      ok = least && pow2.scale_byte == b && !rceil.zero_codes && !pow2.zero_codes && !rceil.inf_times_zero &&
           !pow2.inf_times_zero && __float_as_uint(mul_rn(pow2.reciprocal, x)) == 0x3f800000u &&
           __float_as_uint(rceil.reciprocal) == (b ? __float_as_uint(pow2.reciprocal) : 0x3f800000u);
    }
    ++checked;
    if (!ok) {
      ++bad;
      first_bad = min(first_bad, amax_bits);
    }
  }
  report(counts, first, bad, checked, first_bad);
}

// The scalar functions on given operands, for the golden model to check
// (tests/test_te_gpu.py): for each of `count` amax bit patterns and each of
// `scale_count` global encode scales (index a * scale_count + s): the te
// block scale's byte and r; per amax: TE's global scale, and the byte and r
// of "rceil" and of "te_pow2".
extern "C" __global__ void te_scalars(const unsigned* amax, int count, const float* scales, int scale_count,
                                      unsigned char* te_bytes, float* te_reciprocals, float* te_global_scales,
                                      unsigned char* mx_bytes, float* rceil_reciprocals, float* pow2_reciprocals) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)count * scale_count;
       i += gridDim.x * (long long)blockDim.x) {
    const int a = (int)(i / scale_count);
    const BlockScale te = te_block_scale(amax[a], te_global_scale(scales[i - (long long)a * scale_count]));
    te_bytes[i] = te.scale_byte;
    te_reciprocals[i] = te.reciprocal;
    if (i - (long long)a * scale_count == 0) {
      te_global_scales[a] = global_scale_from_amax_te(amax[a]);
      const BlockScale rceil = mx_block_scale_rceil(amax[a]);
      mx_bytes[a] = rceil.scale_byte;
      rceil_reciprocals[a] = rceil.reciprocal;
      pow2_reciprocals[a] = mx_block_scale_te_pow2(amax[a]).reciprocal;
    }
  }
}
