// NVFP4 / MXFP4 -> float16 / bfloat16 / float32, the inverse of quantize.cu
// for every scale layout (docs/format.md, Dequantization): value = e2m1 * float(e4m3) / global_scale in IEEE
// float32 (round-to-nearest-even, subnormals kept), then one rounding to the
// output type. A NaN result is written as the output type's canonical quiet
// NaN, so that the bytes are defined. One thread per 16-value block.
#include "numerics.cuh"
#include "layouts.cuh"

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

// Values j and j + 1 (j even) into the output words: 32-bit words hold one
// value each, 16-bit outputs two. Only results that can be NaN need the
// canonical-NaN check.
template <typename Output, bool kMayBeNaN>
__device__ __forceinline__ void put_pair(u32* words, int j, float lo, float hi) {
  if constexpr (sizeof(typename Output::raw_t) == 4 || kMayBeNaN) {
    u32 bits[2];
    const float values[2] = {lo, hi};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool nan = kMayBeNaN && (__float_as_uint(values[i]) & kF32AbsMask) > kF32InfBits;
      bits[i] = nan ? Output::kCanonicalNaN : Output::from_f32(values[i]);
    }
    if constexpr (sizeof(typename Output::raw_t) == 4) {
      words[j] = bits[0];
      words[j + 1] = bits[1];
    } else {
      words[j >> 1] = bits[0] | (bits[1] << 16);
    }
  } else {
    words[j >> 1] = Output::from_f32x2(lo, hi);
  }
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 selector) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

// A block's 16 values for a 16-bit output, when its 8 possible magnitudes
// (by E2M1 magnitude code, with the sign of sf / gs) are known: round each
// once, then look values up four at a time with byte permutes, the codes
// themselves being the selectors. Rounding commutes with the code's sign.
template <typename Output>
__device__ __forceinline__ void lookup_values(u32* words, uint2 codes, const float (&magnitudes)[8]) {
  u32 pairs[4];  // entries 2i (low half) and 2i + 1, in the output type
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = Output::from_f32x2(magnitudes[2 * i], magnitudes[2 * i + 1]);
  // Byte planes: low bytes of entries 0-3 | 4-7, high bytes likewise.
  const u32 low03 = prmt(pairs[0], pairs[1], 0x6420u), low47 = prmt(pairs[2], pairs[3], 0x6420u);
  const u32 high03 = prmt(pairs[0], pairs[1], 0x7531u), high47 = prmt(pairs[2], pairs[3], 0x7531u);
#pragma unroll
  for (int h = 0; h < 4; ++h) {  // values 4h .. 4h + 3
    const u32 word = h < 2 ? codes.x : codes.y;
    const u32 selector = (word >> (16 * (h & 1))) & 0x7777u;  // four magnitude codes
    const u32 low = prmt(low03, low47, selector), high = prmt(high03, high47, selector);
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      // Values 2k and 2k + 1 of `word`: their sign bits (bits 8k + 3 and 8k + 7) are the top
      // bits of byte k of word << 4 and of word; prmt's sign-replicating selectors (8 | byte)
      // spread them over bytes 1 and 3, i.e. onto bits 15 and 31.
      const u32 k = 2 * (h & 1) + pair;
      const u32 signs = prmt(word << 4, word, ((12u + k) << 12) | ((8u + k) << 4)) & 0x80008000u;
      words[2 * h + pair] = prmt(low, high, pair ? 0x7362u : 0x5140u) ^ signs;
    }
  }
}

// NVFP4 or, with kMx, MXFP4 (32-value blocks, E8M0 scales; the launcher
// passes a global scale of 1, so one formula serves both formats). One thread
// per 16 values. blockIdx.z is the expert of an [E, m, K/2] batch, each with
// its own packed rows, complete scale tensor and output rows; the global
// scale of (expert, row) is global_scale_ptr[expert * expert_step + row *
// row_step] (steps 0 for one scale, 1 and 0 for one per expert, m and 1 for
// one per row).
template <typename Output, typename Layout, bool kVectorStores, bool kMx>
__global__ void __launch_bounds__(kThreadsPerBlock)
dequantize_fp4(const uint2* __restrict__ packed, const u8* __restrict__ scales, int m, int n, int padded_n,
               const float* __restrict__ global_scale_ptr, float global_scale_value, long long global_scale_expert_step,
               long long global_scale_row_step, typename Output::raw_t* __restrict__ out, int scale_rows,
               int scale_cols) {
  typedef typename Output::raw_t raw_t;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  const int col = k * kBlockSize;
  if (row >= m || col >= n) return;
  const long long expert = blockIdx.z;
  packed += expert * m * (padded_n / kBlockSize);
  scales += expert * scale_rows * scale_cols;
  out += expert * m * n;

  const uint2 codes = packed[(long long)row * (padded_n / kBlockSize) + k];
  const u8 scale_byte = scales[Layout::offset(row, kMx ? k >> 1 : k, scale_cols)];
  const float sf = kMx ? e8m0_to_f32(scale_byte) : e4m3_to_f32_signed(scale_byte);
  const float gs = global_scale_ptr
                       ? __ldg(global_scale_ptr + expert * global_scale_expert_step + row * global_scale_row_step)
                       : global_scale_value;
  // Exact shortcut: e2m1 * sf / gs takes only two quotients per block. Every
  // E2M1 magnitude is 1 or 3 times a power of two (0.5 = 1/2, 1.5 = 3/2, ...),
  // and scaling by 2^k commutes with rounding while results stay normal, so
  // q1 = sf / gs and q3 = 3 sf / gs, times 2^k, are the per-value quotients.
  // Blocks where q1 / 2 could be subnormal or 4 q1 overflow (and NaN / inf
  // quotients) divide per value, as the formula says. The branch is taken
  // once per block, outside the value loops.
  const float q1 = div_rn(sf, gs);
  const float q3 = div_rn(mul_rn(3.0f, sf), gs);
  const float zero = div_rn(mul_rn(0.0f, sf), gs);  // +-0: the shortcut never sees a NaN scale or zero gs
  const u32 q1_bits = __float_as_uint(q1) & kF32AbsMask;
  u32 words[4 * sizeof(raw_t)];
  const auto code_of = [&](int j) { return ((j < 8 ? codes.x : codes.y) >> (4 * (j & 7))) & 0xfu; };
  if (q1_bits >= 0x01000000u && q1_bits < 0x7d800000u) {  // 2^-125 <= |q1| < 2^124: all results normal
    // Magnitude code -> q * 2^k: 1 -> q1 / 2, 2 -> q1, 3 -> q3 / 2, 4 -> 2 q1, 5 -> q3, 6 -> 4 q1,
    // 7 -> 2 q3. Adding k to the exponent field multiplies exactly, as every result is normal.
    const u32 q1_raw = __float_as_uint(q1), q3_raw = __float_as_uint(q3);
    constexpr u32 kTwo = 1u << 23;  // +1 in the exponent field
    if constexpr (sizeof(raw_t) == 2) {
      const float magnitudes[8] = {zero, __uint_as_float(q1_raw - kTwo), q1, __uint_as_float(q3_raw - kTwo),
                                   __uint_as_float(q1_raw + kTwo), q3, __uint_as_float(q1_raw + 2 * kTwo),
                                   __uint_as_float(q3_raw + kTwo)};
      lookup_values<Output>(words, codes, magnitudes);
    } else {
      constexpr u32 kExponents = 0x23120100u;  // nibble c: k + 1 for code c, as listed above
      const u32 half_q1 = q1_raw - kTwo, half_q3 = q3_raw - kTwo;
      const auto value = [&](u32 code) {
        const u32 magnitude = code & 7u;
        const u32 base = (magnitude & 1u) && magnitude >= 3u ? half_q3 : half_q1;
        const u32 bits = magnitude ? base + (((kExponents >> (4 * magnitude)) & 0xfu) << 23) : __float_as_uint(zero);
        return __uint_as_float(bits ^ ((code & 8u) << 28));  // (-a) / b = -(a / b)
      };
#pragma unroll
      for (int j = 0; j < kBlockSize; j += 2) put_pair<Output, false>(words, j, value(code_of(j)), value(code_of(j + 1)));
    }
  } else {
    const auto value = [&](u32 code) { return div_rn(mul_rn(e2m1_to_f32(code), sf), gs); };
#pragma unroll
    for (int j = 0; j < kBlockSize; j += 2) put_pair<Output, true>(words, j, value(code_of(j)), value(code_of(j + 1)));
  }
  raw_t* dst = out + (long long)row * n + col;
  if (kVectorStores) {
    // The launcher guarantees 16-byte alignment and n % 8 == 0 on this path:
    // each 16-byte piece lies wholly inside or outside [0, n).
    constexpr int kValuesPerVector = 16 / sizeof(raw_t);
#pragma unroll
    for (int q = 0; q < (int)sizeof(raw_t); ++q) {
      if (col + q * kValuesPerVector < n) {
        reinterpret_cast<uint4*>(dst)[q] = make_uint4(words[4 * q], words[4 * q + 1], words[4 * q + 2], words[4 * q + 3]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kBlockSize; ++j) {
      if (col + j < n) dst[j] = (raw_t)(sizeof(raw_t) == 4 ? words[j] : (words[j >> 1] >> (16 * (j & 1))));
    }
  }
}

}  // namespace nvfp4
