// Decoding NVFP4 / MXFP4 blocks in registers: the arithmetic of
// docs/format.md, section 8, shared by dequantize.cu and fake_quantize.cu (a
// value = e2m1 * float(scale) / global_scale in IEEE float32, then one
// rounding to the output type, NaN as its canonical quiet NaN).
//
// The fast path (docs/format.md, section 8.1): a block's values are its scale
// byte's two quotients q1 = sf / gs and q3 = 3 sf / gs times powers of two;
// the quotients take a multiply by gs's correctly rounded reciprocal and one
// correction each, and give a table of the 8 possible magnitudes, in which
// the 16 values are byte-permute lookups (decode_block). Blocks outside that
// range take the formula value by value (exact_block). BlockDecoder holds
// what a thread's blocks share: the global scale and its reciprocal.
//
// Also the plain global stores and the staging-buffer swizzle both kernels
// use to write whole 32-byte sectors.
#pragma once

#include "numerics.cuh"
#include "output.cuh"

namespace nvfp4 {

// A block's 16 output values as 32-bit words: word j holds values 2j (low
// half) and 2j + 1 for 16-bit outputs, value j for float32.
template <typename Output>
struct BlockWords {
  u32 w[4 * sizeof(typename Output::raw_t)];
};

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 selector) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

// ---------------------------------------------------------------------------
// The exact path: the formula value by value. Taken for blocks outside the
// fast range below (NaN scales, quotients near the subnormal or overflow
// range, global scales of 0, inf, NaN or beyond 2^+-100); out of line, so
// that it costs the common path nothing.
// ---------------------------------------------------------------------------
// 16 float32 values rounded once each to Output, every NaN as Output's
// canonical quiet NaN.
template <typename Output>
__device__ __forceinline__ BlockWords<Output> round_block(const float (&v)[kBlockSize]) {
  BlockWords<Output> out;
#pragma unroll
  for (int j = 0; j < kBlockSize; ++j) {
    const u32 bits =
        (__float_as_uint(v[j]) & kF32AbsMask) > kF32InfBits ? Output::kCanonicalNaN : Output::from_f32(v[j]);
    if constexpr (sizeof(typename Output::raw_t) == 4) {
      out.w[j] = bits;
    } else if (j & 1) {
      out.w[j >> 1] |= bits << 16;
    } else {
      out.w[j >> 1] = bits;
    }
  }
  return out;
}

template <typename Output>
__device__ __noinline__ BlockWords<Output> exact_block(uint2 codes, float sf, float gs) {
  float v[kBlockSize];
#pragma unroll
  for (int j = 0; j < kBlockSize; ++j) {
    const u32 code = ((j < 8 ? codes.x : codes.y) >> (4 * (j & 7))) & 0xfu;
    v[j] = div_rn(mul_rn(e2m1_to_f32(code), sf), gs);
  }
  return round_block<Output>(v);
}

// ---------------------------------------------------------------------------
// The fast path.
// ---------------------------------------------------------------------------

// RN(a / b) for a = 0 or |a| an E4M3 value or 3 times one, given
// y = RN(1 / b), for 2^-100 <= |b| <= 2^100 (in_quotient_range):
// q0 = RN(a * y), then one correction with the remainder
// a - b * q0. tests/test_dequantize_math.py checks this sequence against
// the IEEE quotient for every divisor significand and every such dividend;
// the range keeps every intermediate normal, so that the significands are all
// that matters. The sign of a zero a is restored at the end: the
// correction turns -0 into +0.
// (Function-local constants: a namespace-scope constexpr that a translation
// unit never odr-uses is an NVRTC 13 warning, and warnings fail the build test.)
__device__ __forceinline__ bool in_quotient_range(float b) {
  constexpr u32 kMin = 0x0d800000u;  // 2^-100
  constexpr u32 kMax = 0x71800000u;  // 2^100
  return (__float_as_uint(b) & kF32AbsMask) - kMin <= kMax - kMin;
}

__device__ __forceinline__ float quotient(float a, float b, float y) {
  const float q0 = mul_rn(a, y);
  const float q = fma_rn(fnma_rn(b, q0, a), y, q0);
  return __uint_as_float(__float_as_uint(q) | (__float_as_uint(q0) & 0x80000000u));
}

// A block whose q1 = RN(sf / gs) is 0 or has 2^-125 <= |q1| < 2^124: then
// each value is q1 or q3 = RN(3 sf / gs) times a power of two, all normal
// (section 8.1). The block's 8 magnitudes by E2M1 magnitude code, with the
// sign of sf / gs: 0, q1 / 2, q1, q3 / 2, 2 q1, q3, 4 q1, 2 q3 (the products
// are exact; for a zero block all are zeros of that sign).
__device__ __forceinline__ bool takes_fast_path(float q1) {
  const u32 a = __float_as_uint(q1) & kF32AbsMask;
  return a - 0x01000000u < 0x7d800000u - 0x01000000u || a == 0u;
}

__device__ __forceinline__ void block_magnitudes(float (&m)[8], float q1, float q3) {
  m[0] = __uint_as_float(__float_as_uint(q1) & 0x80000000u);
  m[1] = mul_rn(q1, 0.5f);
  m[2] = q1;
  m[3] = mul_rn(q3, 0.5f);
  m[4] = mul_rn(q1, 2.0f);
  m[5] = q3;
  m[6] = mul_rn(q1, 4.0f);
  m[7] = mul_rn(q3, 2.0f);
}

// The codes of values 8h'..8h'+7 (nibble i: value i, bit 3 its sign) give
// the selectors of four byte lookups at a time: `magnitudes` holds the
// magnitude codes (bits 3 cleared, as prmt reads bit 3 as a mode bit).
// sign_bytes(word, half) is 0xff in byte i where value 4 half + i is
// negative: the sign bits of values 2t and 2t + 1 are bits 7 of byte t of
// word << 4 and of word, and prmt's sign-replicating selectors (8 | byte)
// spread each over a byte.
__device__ __forceinline__ u32 sign_bytes(u32 word, int half) {
  return prmt(word << 4, word, half ? 0xfbeau : 0xd9c8u);
}

// A fast block's 8 magnitudes as byte planes: plane[2 p + e] holds byte p
// (of sizeof(raw_t)) of entries 0-3 (e = 0) or 4-7 (e = 1), so that one
// byte permute looks up byte p of four values, their magnitude codes being
// the selectors. kSlow in plane[0] marks a scale byte outside the fast path
// (entry 0, a zero, has a zero low byte in every real table).
template <typename Output>
struct MagnitudeTable {
  u32 plane[2 * sizeof(typename Output::raw_t)];
};
constexpr u32 kSlow = 0xffffffffu;

// 16-bit outputs: the 8 magnitudes rounded once each to the output type.
// float32: the low two bytes of a magnitude are q1's or q3's (scaling by 2^k
// moves only the exponent), 0 for code 0; the high two come from the
// magnitudes themselves.
template <typename Output>
__device__ __forceinline__ MagnitudeTable<Output> magnitude_table(float q1, float q3) {
  float m[8];
  block_magnitudes(m, q1, q3);
  MagnitudeTable<Output> t;
  u32 pairs[4];  // entries 2i and 2i + 1: 16-bit outputs, or float32's high halves
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(typename Output::raw_t) == 2) {
      pairs[i] = Output::from_f32x2(m[2 * i], m[2 * i + 1]);
    } else {
      pairs[i] = prmt(__float_as_uint(m[2 * i]), __float_as_uint(m[2 * i + 1]), 0x7632u);
    }
  }
  u32* high = t.plane + (sizeof(typename Output::raw_t) == 2 ? 0 : 4);  // planes of the pairs' bytes
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    high[e] = prmt(pairs[2 * e], pairs[2 * e + 1], 0x6420u);
    high[2 + e] = prmt(pairs[2 * e], pairs[2 * e + 1], 0x7531u);
  }
  if constexpr (sizeof(typename Output::raw_t) == 4) {
    const u32 a = __float_as_uint(q1), b = __float_as_uint(q3);
    t.plane[0] = prmt(a, b, 0x4000u) & 0xffffff00u;  // 0, q1, q1, q3
    t.plane[1] = prmt(a, b, 0x4040u);                // q1, q3, q1, q3
    t.plane[2] = prmt(a, b, 0x5111u) & 0xffffff00u;
    t.plane[3] = prmt(a, b, 0x5151u);
  }
  return t;
}

// The block's 16 values: each looked up by its magnitude code, its sign
// flipped by its code's sign bit (rounding commutes with negation), and the
// bytes of four values put together into their words.
template <typename Output>
__device__ __forceinline__ BlockWords<Output> decode_block(uint2 codes, const MagnitudeTable<Output>& t) {
  constexpr int kBytes = sizeof(typename Output::raw_t);
  BlockWords<Output> out;
#pragma unroll
  for (int w = 0; w < 2; ++w) {
    const u32 word = w ? codes.y : codes.x;
    const u32 magnitudes = word & 0x77777777u;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // values 8w + 4 half + i, i = 0..3
      const u32 selector = magnitudes >> (16 * half);  // prmt reads the low 16 bits
      u32 bytes[kBytes];  // byte p of the four values
#pragma unroll
      for (int p = 0; p < kBytes; ++p) bytes[p] = prmt(t.plane[2 * p], t.plane[2 * p + 1], selector);
      bytes[kBytes - 1] ^= sign_bytes(word, half) & 0x80808080u;
      // Values i and i + 1 interleaved: bytes [b0 of i, b1 of i, b0 of i+1, b1 of i+1].
      const u32 low01 = prmt(bytes[0], bytes[1], 0x5140u), low23 = prmt(bytes[0], bytes[1], 0x7362u);
      u32* dst = out.w + kBytes / 2 * (4 * w + 2 * half);
      if constexpr (kBytes == 2) {
        dst[0] = low01;
        dst[1] = low23;
      } else {
        const u32 high01 = prmt(bytes[2], bytes[3], 0x5140u), high23 = prmt(bytes[2], bytes[3], 0x7362u);
        dst[0] = prmt(low01, high01, 0x5410u);
        dst[1] = prmt(low01, high01, 0x7632u);
        dst[2] = prmt(low23, high23, 0x5410u);
        dst[3] = prmt(low23, high23, 0x7632u);
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Stores.
// ---------------------------------------------------------------------------

// Plain st.global, for pointers the compiler cannot see are global.
__device__ __forceinline__ void store_global(uint4* p, uint4 v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
__device__ __forceinline__ void store_global(u16* p, u32 v) {
  asm volatile("st.global.u16 [%0], %1;" ::"l"(p), "h"((u16)v) : "memory");
}
__device__ __forceinline__ void store_global(u32* p, u32 v) {
  asm volatile("st.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// 16-byte pieces of the staging buffer, swizzled so that neither a lane's
// stores of its own block's pieces nor the coalesced loads back conflict on
// banks: piece p sits at p ^ ((p / 8) % pieces_per_block).
template <int kPieces>
__device__ __forceinline__ int staging_slot(int piece) {
  return piece ^ ((piece >> 3) & (kPieces - 1));
}

// The 16-byte path's stores of one step: the warp's staged pieces back out,
// piece i * span + j of the step to out_step + (i * span + j) * kPieceValues
// (whole 32-byte sectors a warp), those before `limit` values only. The
// launchers guarantee 16-byte alignment and n % 8 == 0 on this path: each
// piece lies wholly inside or outside the row.
template <int kPieces, int kPieceValues, typename T>
__device__ __forceinline__ void store_staged(const uint4* warp_staging, int first_piece, int span, int j, int limit,
                                             T* out_step) {
  __syncwarp();
#pragma unroll
  for (int i = 0; i < kPieces; ++i) {
    const int value = (i * span + j) * kPieceValues;
    const uint4 v = warp_staging[staging_slot<kPieces>(first_piece + i * span)];
    if (value < limit) store_global(reinterpret_cast<uint4*>(out_step + value), v);
  }
  __syncwarp();  // before the next step's writes
}


// What the blocks under one global scale share, and the table of a scale
// byte (MagnitudeTable, kSlow where the block must take exact_block). NVFP4,
// or with kMx MXFP4 (E8M0 scale bytes, no global scale: gs = 1).
template <typename Output, bool kMx>
struct BlockDecoder {
  float gs;
  bool fast_divide;  // gs in quotient()'s range
  float reciprocal;  // RN(1 / gs)

  __device__ explicit BlockDecoder(float global_scale)
      : gs(kMx ? 1.0f : global_scale),
        fast_divide(kMx || in_quotient_range(global_scale)),
        reciprocal(kMx ? 1.0f : div_rn(1.0f, global_scale)) {}

  __device__ static float scale_value(u32 byte) { return kMx ? e8m0_to_f32((u8)byte) : e4m3_to_f32_signed((u8)byte); }

  __device__ MagnitudeTable<Output> table(u32 byte) const {
    const float sf = scale_value(byte);
    float q1, q3;
    if constexpr (kMx) {
      q1 = sf;  // gs = 1
      q3 = mul_rn(3.0f, sf);
    } else {
      q1 = quotient(sf, gs, reciprocal);
      q3 = quotient(mul_rn(3.0f, sf), gs, reciprocal);
    }
    MagnitudeTable<Output> t = magnitude_table<Output>(q1, q3);
    if (!fast_divide || !takes_fast_path(q1)) t.plane[0] = kSlow;
    return t;
  }

  // The block's 16 values by the formula (a table marked kSlow).
  __device__ BlockWords<Output> exact(uint2 codes, u32 byte) const {
    return exact_block<Output>(codes, scale_value(byte), gs);
  }
};

}  // namespace nvfp4
