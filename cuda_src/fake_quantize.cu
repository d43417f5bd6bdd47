// Fake quantization (docs/fused_ops.md, section 6): x -> dequantize(quantize(x))
// in x's dtype, with one read of x and one write of the result; and the
// saturation mask of section 6.3, which the straight-through gradient uses.
//
// A block of x is quantized exactly as quantize.cu quantizes it (numerics.cuh:
// the block scale, then pack_block's codes) and decoded in registers exactly
// as dequantize.cu decodes it (decode.cuh): codes and scale bytes never leave
// the thread. Which quantizer runs is a template argument (the *Quantizer
// structs below); a new variant (Four Over Six) is a new struct, not a new
// kernel. Four Over Six and the random Hadamard transform quantize a block
// their own way (quantize()); with the RHT the decoded float32 values are
// transformed back (docs/fused_ops.md, section 6.2) before their one rounding.
//
// Thread mapping, as dequantize.cu's: threadIdx.y / blockIdx.x walk rows,
// threadIdx.x / blockIdx.y a row's blocks (16 values for NVFP4, 32 for MXFP4),
// `steps` (at most kMaxSteps) blocks a thread. The threads x of a row form
// segments of span = min(blockDim.x, 32) threads; a segment covers
// span * steps consecutive blocks, block j of each step going to thread j.
// All loads are issued before the first block is worked on. On the vector
// path each step's output goes through shared memory (thread j writes its
// block's 16-byte pieces, then reads back piece i * span + j of the step's
// run), so that every store instruction of a warp writes whole 32-byte
// sectors. blockIdx.z is the expert of an [E, m, n] batch; the global scale
// of (expert, row) is global_scale_ptr[expert * expert_step + row * row_step]
// (0 and 0 for one scale, 1 and 0 for one per expert, m and 1 for one per
// row), or global_scale_value where the pointer is null.
#include "decode.cuh"
#include "load.cuh"
#include "blocks.cuh"
#include "four_over_six.cuh"
#include "rht.cuh"
#include "row_tiles.cuh"

namespace nvfp4 {

// ---------------------------------------------------------------------------
// The quantizers: a block format of blocks.cuh (kValues, scale(amax_bits),
// Codes) made once a thread from its row's QuantizerArgs, and what decoding
// and the mask need besides:
//   kMx          whether its scale bytes are E8M0 (how they are decoded);
//   kScaleBytes  scale bytes 0 .. kScaleBytes - 1 are all it can write (the
//                decode tables cover these);
//   codes<Input>(words, scale, k)  the packed codes of a 16-value piece of
//                block k of the row;
//   saturates(scale_byte), largest()  section 6.3's mask: a value of a block
//                whose scale byte saturates() is saturated where its
//                magnitude lies beyond largest() (infinities included).
// A quantizer with kOwnBlocks has quantize<Input>(words, k, codes) instead of
// scale() and codes<Input>(): the whole block at once, returning its scale
// byte. One with kTakesAmax is made from its row's global amax, not its
// global scale, and decodes under its encode_scale(); kInverseRht: its codes
// are of the transformed block, decoded to float32 and transformed back.
// ---------------------------------------------------------------------------

// The defaults of those three (every quantizer derives from this).
struct QuantizerDefaults {
  static constexpr bool kOwnBlocks = false;
  static constexpr bool kTakesAmax = false;
  static constexpr bool kInverseRht = false;
};

// What a thread's quantizer is made from: its row's global scale and, for
// stochastic rounding, the seed and the offset in 32-bit halves and the
// element group of the row's block 0 (block k is group row_group + k); for
// Four Over Six (gs is then the row's global amax) 6 * e4m3_max and
// err_use_fast_math.
struct QuantizerArgs {
  float gs;
  u32 seed_lo, seed_hi, offset_lo, offset_hi;
  unsigned long long row_group;
  float denominator;
  int fast_math;
};

// NVFP4, numerics "ieee", round to nearest (docs/format.md, sections 2 and 3).
struct IeeeNvfp4Quantizer : Nvfp4Blocks, QuantizerDefaults {
  static constexpr bool kMx = false;
  static constexpr int kScaleBytes = 128;  // 0x00 .. 0x7e, and 0x7f for NaN blocks

  __device__ explicit IeeeNvfp4Quantizer(const QuantizerArgs& a) : Nvfp4Blocks(Nvfp4Blocks::from_global_scale(a.gs)) {}
  template <typename Input>
  __device__ uint2 codes(const u32* words, const BlockScale& scale, int) const {
    return pack_block<Input, Codes>(words, scale);
  }
  // Only a block at E4M3's largest scale (448) clips; an invalid global
  // scale makes every block NaN-scaled (0x7f), with nothing saturated.
  __device__ static bool saturates(u32 scale_byte) { return scale_byte == kE4M3Max; }
  // RN(2688 / S): the largest magnitude a block at scale 448 decodes to
  // (2688 = 6 * 448, exact).
  __device__ float largest() const { return div_rn(2688.0f, global.value); }
};

// NVFP4, numerics "te": TransformerEngine's arithmetic (docs/te_numerics.md),
// 1x16 blocks, under the encode scale S_enc. Its scale bytes are E4M3 as
// ieee's (0x00 .. 0x7e, 0x7f for NaN blocks and for every block of an
// invalid S_enc) and decode alike (docs/fused_ops.md, section 6.1), and its
// mask is section 6.3's NVFP4 rule, which holds for every numerics.
struct TeNvfp4Quantizer : Nvfp4TeBlocks, QuantizerDefaults {
  static constexpr bool kMx = false;
  static constexpr int kScaleBytes = 128;
  float encode_scale;

  __device__ explicit TeNvfp4Quantizer(const QuantizerArgs& a)
      : Nvfp4TeBlocks(Nvfp4TeBlocks::from_global_scale(a.gs)), encode_scale(a.gs) {}
  template <typename Input>
  __device__ uint2 codes(const u32* words, const BlockScale& scale, int) const {
    return pack_block<Input, Codes>(words, scale);
  }
  __device__ static bool saturates(u32 scale_byte) { return scale_byte == kE4M3Max; }
  __device__ float largest() const { return div_rn(2688.0f, encode_scale); }
};

// NVFP4 "ieee" with stochastic rounding of the codes
// (docs/stochastic_rounding_and_mx_rules.md, section 2): round to nearest's
// scales and products, each block's codes rounded with the Philox words of
// its element group, rows counted over all experts (docs/fused_ops.md,
// section 6.1). Its scale bytes, and so its mask, are round to nearest's.
struct SrNvfp4Quantizer : Nvfp4SrBlocks, QuantizerDefaults {
  static constexpr bool kMx = false;
  static constexpr int kScaleBytes = 128;

  __device__ explicit SrNvfp4Quantizer(const QuantizerArgs& a)
      : Nvfp4SrBlocks{global_scale(a.gs), a.seed_lo, a.seed_hi, a.offset_lo, a.offset_hi, a.row_group} {}
  template <typename Input>
  __device__ uint2 codes(const u32* words, const BlockScale& scale, int k) const {
    return pack<Input>(words, scale, k);
  }
  __device__ static bool saturates(u32 scale_byte) { return scale_byte == kE4M3Max; }
  __device__ float largest() const { return div_rn(2688.0f, global.value); }
};

// MXFP4 with one of blocks.cuh's scale rules: "floor" (docs/format.md,
// section 9), "rceil" and "te_pow2" (docs/stochastic_rounding_and_mx_rules.md,
// section 3). Each writes E8M0 bytes, decoded alike.
template <typename Blocks>
struct Mxfp4Quantizer : Blocks, QuantizerDefaults {
  static constexpr bool kMx = true;
  static constexpr int kScaleBytes = 256;  // 0x00 .. 0xfe, and 0xff for NaN
  __device__ explicit Mxfp4Quantizer(const QuantizerArgs&) {}
  template <typename Input>
  __device__ uint2 codes(const u32* words, const BlockScale& scale, int) const {
    return pack_block<Input, typename Blocks::Codes>(words, scale);
  }
  // E8M0 reaches 2^127: no finite value is beyond MXFP4's range, only +-inf.
  __device__ static bool saturates(u32) { return true; }
  __device__ float largest() const { return __uint_as_float(kF32MaxBits); }
};
typedef Mxfp4Quantizer<Mxfp4Blocks> FloorMxfp4Quantizer;
typedef Mxfp4Quantizer<Mxfp4RceilBlocks> RceilMxfp4Quantizer;
typedef Mxfp4Quantizer<Mxfp4TePow2Blocks> TePow2Mxfp4Quantizer;

// TE's Four Over Six (docs/te_rht_and_4over6.md, part B), 1x16 blocks under
// S_enc = RN(6E / A) of the row's global amax A (E = 448 or 256: denominator
// = 6E); kMse: err_mode "MSE", else "MAE". Its scale bytes are E4M3 (0x7f for
// NaN blocks and every block of an invalid S_enc), decoded under S_enc; its
// mask is section 6.3's NVFP4 rule.
template <bool kMse>
struct FourOverSixQuantizer : QuantizerDefaults {
  static constexpr bool kMx = false;
  static constexpr int kScaleBytes = 128;
  static constexpr int kValues = kBlockSize;
  static constexpr bool kOwnBlocks = true;
  static constexpr bool kTakesAmax = true;
  FourOverSixGlobal g;
  ErrorDivision division;

  __device__ explicit FourOverSixQuantizer(const QuantizerArgs& a)
      : g(four_over_six_global(a.gs, a.denominator)), division(error_division(g, a.fast_math)) {}
  __device__ float encode_scale() const { return g.encode; }
  template <typename Input>
  __device__ u32 quantize(const u32 (&words)[1][4 * sizeof(typename Input::raw_t)], int, uint2 (&codes)[1]) const {
    u8 scale_byte;
    codes[0] = four_over_six_block<Input, kMse>(words[0], g, division, scale_byte);
    return scale_byte;
  }
  __device__ static bool saturates(u32 scale_byte) { return scale_byte == kE4M3Max; }
  __device__ float largest() const { return div_rn(2688.0f, g.encode); }
};

// TE's random Hadamard transform then numerics "te" (docs/te_rht_and_4over6.md,
// part A), each 16-value block one chunk (rht.cuh), under S_enc = RN(2688 /
// A) of the row's global amax A taken after the transform; kToInput: the
// transformed values rounded to x's dtype (transform_dtype="input"). No mask
// (section 6.3).
template <bool kToInput>
struct RhtQuantizer : Nvfp4TeBlocks, QuantizerDefaults {
  static constexpr bool kMx = false;
  static constexpr int kScaleBytes = 128;
  static constexpr bool kOwnBlocks = true;
  static constexpr bool kTakesAmax = true;
  static constexpr bool kInverseRht = true;
  float encode;

  __device__ explicit RhtQuantizer(const QuantizerArgs& a) : RhtQuantizer(te_encode_scale(a.gs, 448.0f * 6.0f)) {}
  __device__ explicit RhtQuantizer(float encode_scale)
      : Nvfp4TeBlocks(Nvfp4TeBlocks::from_global_scale(encode_scale)), encode(encode_scale) {}
  __device__ float encode_scale() const { return encode; }
  template <typename Input>
  __device__ u32 quantize(const u32 (&words)[1][4 * sizeof(typename Input::raw_t)], int, uint2 (&codes)[1]) const {
    RhtChunk<Input, kToInput> chunk;
    chunk.transform(words[0]);
    typedef typename RhtChunk<Input, kToInput>::Quantized Transformed;
    const BlockScale scale = this->scale(Transformed::abs_max_bits(chunk.words));
    codes[0] = pack_block<Transformed, Codes>(chunk.words, scale);
    return scale.scale_byte;
  }
};

// max |v| over a block's pieces, as float32 bits (NaN patterns above inf).
template <typename Input, int kHalves, int kWords>
__device__ __forceinline__ u32 block_amax_bits(const u32 (&words)[kHalves][kWords]) {
  u32 amax_bits = Input::abs_max_bits(words[0]);
#pragma unroll
  for (int h = 1; h < kHalves; ++h) amax_bits = max(amax_bits, Input::abs_max_bits(words[h]));
  return amax_bits;
}

// A block (its kHalves 16-value pieces of Input's words; k: its index in the
// row) quantized: returns its scale byte, and its pieces' packed codes in
// `codes`. block_scale_byte: the scale byte alone (the mask's).
template <typename Input, typename Quantizer, int kHalves, int kWords>
__device__ __forceinline__ u32 quantize_block(const Quantizer& quantizer, const u32 (&words)[kHalves][kWords], int k,
                                              uint2 (&codes)[kHalves]) {
  if constexpr (Quantizer::kOwnBlocks) {
    return quantizer.template quantize<Input>(words, k, codes);
  } else {
    const BlockScale scale = quantizer.scale(block_amax_bits<Input>(words));
#pragma unroll
    for (int h = 0; h < kHalves; ++h) codes[h] = quantizer.template codes<Input>(words[h], scale, k);
    return scale.scale_byte;
  }
}

template <typename Input, typename Quantizer, int kHalves, int kWords>
__device__ __forceinline__ u32 block_scale_byte(const Quantizer& quantizer, const u32 (&words)[kHalves][kWords],
                                                int k) {
  if constexpr (Quantizer::kOwnBlocks) {
    uint2 codes[kHalves];
    return quantizer.template quantize<Input>(words, k, codes);
  } else {
    return quantizer.scale(block_amax_bits<Input>(words)).scale_byte;
  }
}


// ---------------------------------------------------------------------------
// Decoding: what the quantizers change.
// ---------------------------------------------------------------------------

// The type blocks decode to: float32 with the RHT (transformed back before
// the rounding to Output), else Output itself.
template <bool kInverseRht, typename Output>
struct Decoding {
  typedef Output type;
};
template <typename Output>
struct Decoding<true, Output> {
  typedef Float32Output type;
};

// S, which the decoder divides by: the row's global scale gs, or the encode
// scale a quantizer made from its row's global amax.
template <typename Quantizer>
__device__ __forceinline__ float decoding_scale(const Quantizer& quantizer, float gs) {
  if constexpr (Quantizer::kTakesAmax) {
    return quantizer.encode_scale();
  } else {
    return gs;
  }
}

// A decoded block as Output words: itself, or with the RHT its float32 values
// transformed back (section 6.2) and rounded once each to Output, NaN canonical.
template <typename Quantizer, typename Output, typename Decoded>
__device__ __forceinline__ BlockWords<Output> finish_block(const BlockWords<Decoded>& block) {
  if constexpr (Quantizer::kInverseRht) {
    float v[kBlockSize];
#pragma unroll
    for (int i = 0; i < kBlockSize; ++i) v[i] = __uint_as_float(block.w[i]);
    inverse_rht16(v);
    return round_block<Output>(v);
  } else {
    return block;
  }
}

// ---------------------------------------------------------------------------
// The kernels.
// ---------------------------------------------------------------------------

// Plain st.global for the mask (see decode.cuh's store_global).
__device__ __forceinline__ void store_global(u8* p, u32 v) {
  asm volatile("st.global.u8 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void store_global(uint2* p, uint2 v) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(v.x), "r"(v.y) : "memory");
}

// Section 6.3's mask of 16 values: byte v of word v / 4 is 1 where value v
// is saturated (largest_bits < |v| <= inf, on the float32 bits).
template <typename Input>
__device__ __forceinline__ void saturated_bytes(const u32* words, u32 largest_bits, u32 (&mask)[4]) {
#pragma unroll
  for (int v = 0; v < kBlockSize; ++v) {
    const u32 bits = __float_as_uint(Input::element(words, v)) & kF32AbsMask;
    const u32 saturated = (bits > largest_bits && bits <= kF32InfBits) ? 1u : 0u;
    if (v & 3) {
      mask[v >> 2] |= saturated << (8 * (v & 3));
    } else {
      mask[v >> 2] = saturated;
    }
  }
}

// The body of both kernels. kMask: write section 6.3's mask (one byte a
// value, 0 or 1) instead of the fake-quantized values; Output is then unused.
template <typename Input, typename Output, typename Quantizer, bool kVector, bool kMask, int kMaxSteps, typename Out>
__device__ __forceinline__ void fake_quantize_rows(const typename Input::raw_t* __restrict__ x,
                                                   const float* __restrict__ global_scale_ptr,
                                                   float global_scale_value, Out* __restrict__ out,
                                                   u32 seed_lo, u32 seed_hi, u32 offset_lo, u32 offset_hi,
                                                   long long row_stride, long long expert_stride, int m, int n,
                                                   int blocks_per_row, int steps, long long global_scale_expert_step,
                                                   int global_scale_row_step, float denominator, int fast_math) {
  typedef typename Input::raw_t raw_t;
  constexpr int kHalves = Quantizer::kValues / kBlockSize;  // 16-value pieces of a block
  constexpr int kWords = 4 * (int)sizeof(raw_t);            // 32-bit words of 16 values
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const bool in_rows = row < m;
  const int span = min((int)blockDim.x, 32);
  const int j = threadIdx.x & (span - 1);
  const int first = (blockIdx.y * blockDim.x + (threadIdx.x & ~(span - 1))) * steps;  // the segment's first block
  const int k = first + j;  // this thread's block of step 0
  const long long expert = blockIdx.z;
  // This thread's steps that hold a block of the data (none for rows past m;
  // span is a power of two).
  const int loaded = in_rows ? min(steps, (blocks_per_row - k + span - 1) >> (__ffs(span) - 1)) : 0;

  // Blocks past the row (and rows past m) are zeros: worked on like any
  // block, and nothing of them is stored.
  const raw_t* x_row = x + (expert * expert_stride + (long long)(in_rows ? row : 0) * row_stride);
  u32 words[kMaxSteps][kHalves][kWords];
#pragma unroll
  for (int s = 0; s < kMaxSteps; ++s) {
    // steps is a power of two: a test at each power of two, not at every step.
    if ((s & (s - 1)) == 0 && s >= steps) break;
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      if (s < loaded) {
        load_block<Input, kVector>(x_row, (k + s * span) * Quantizer::kValues + h * kBlockSize, n, words[s][h]);
      } else {
#pragma unroll
        for (int w = 0; w < kWords; ++w) words[s][h][w] = 0u;
      }
    }
  }

  // Rows past m take row 0's global scale: the shared tables below need every
  // thread's to be the thread block's one scale, and nothing of theirs is stored.
  const float gs = Quantizer::kMx ? 1.0f
                 : global_scale_ptr
                     ? __ldg(global_scale_ptr + (expert * global_scale_expert_step +
                                                 (in_rows ? row : 0) * global_scale_row_step))
                     : global_scale_value;
  const Quantizer quantizer(QuantizerArgs{gs, seed_lo, seed_hi, offset_lo, offset_hi,
                                           (unsigned long long)(expert * m + row) * (unsigned long long)blocks_per_row,
                                           denominator, fast_math});

  const int step_values = span * Quantizer::kValues;
  int limit = in_rows ? n - first * Quantizer::kValues : 0;  // values of the row from the step's first on
  Out* out_step = out + ((expert * m + row) * (long long)n + (long long)first * Quantizer::kValues);
  asm("cvta.to.global.u64 %0, %0;" : "+l"(out_step));  // opaque: kept in a register, stored with st.global

  if constexpr (kMask) {
    const u32 largest_bits = __float_as_uint(quantizer.largest());
#pragma unroll
    for (int s = 0; s < kMaxSteps; ++s) {
      if (s >= steps || first + s * span >= blocks_per_row) break;
      const bool saturating = Quantizer::saturates(block_scale_byte<Input>(quantizer, words[s], k + s * span));
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        u32 mask[4] = {0u, 0u, 0u, 0u};
        if (saturating) saturated_bytes<Input>(words[s][h], largest_bits, mask);
        const int value = j * Quantizer::kValues + h * kBlockSize;  // from out_step
        if constexpr (kVector) {
          // n % 8 == 0 and an 8-byte aligned mask on this path: each 8-value
          // piece lies wholly inside or outside [0, n).
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            if (value + 8 * q < limit) {
              store_global(reinterpret_cast<uint2*>(out_step + value + 8 * q), make_uint2(mask[2 * q], mask[2 * q + 1]));
            }
          }
        } else {
#pragma unroll
          for (int v = 0; v < kBlockSize; ++v) {
            if (value + v < limit) store_global(out_step + value + v, (mask[v >> 2] >> (8 * (v & 3))) & 0xffu);
          }
        }
      }
      out_step += step_values;
      asm("" : "+l"(out_step));
      limit -= step_values;
    }
  } else {
    constexpr int kHalfPieces = kWords / 4;           // 16-byte pieces of 16 output values
    constexpr int kPieces = kHalves * kHalfPieces;     // of a block's output
    constexpr int kPieceValues = kBlockSize / kHalfPieces;
    // With the RHT, blocks decode to float32 (transformed back, then rounded once).
    typedef typename Decoding<Quantizer::kInverseRht, Output>::type Decoded;
    const BlockDecoder<Decoded, Quantizer::kMx> decoder(decoding_scale(quantizer, gs));
    __shared__ uint4 staging[kVector ? kThreadsPerBlock * kPieces : 1];
    const int flat = threadIdx.y * blockDim.x + threadIdx.x;
    const int lane = flat & 31;
    uint4* warp_staging = staging + (flat - lane) * kPieces;
    const int first_piece = (lane & ~(span - 1)) * kPieces + j;  // this thread's first read-back piece

    // With one global scale for the whole thread block, the tables of every
    // scale byte the quantizer writes are made once, one a thread, while the
    // loads are in flight; a block then looks its table up. Otherwise (a
    // global scale per row and several rows a thread block) each block makes
    // its own.
    constexpr int kTableWords = sizeof(MagnitudeTable<Decoded>) / 4;
    __shared__ uint4 tables[Quantizer::kScaleBytes * kTableWords / 4];
    const bool shared_tables = Quantizer::kMx || global_scale_row_step == 0 || blockDim.y == 1;
    if (shared_tables) {
#pragma unroll
      for (int i = 0; i < (Quantizer::kScaleBytes + kThreadsPerBlock - 1) / kThreadsPerBlock; ++i) {
        const int byte = flat + i * kThreadsPerBlock;
        if (byte < Quantizer::kScaleBytes) {
          const MagnitudeTable<Decoded> t = decoder.table(byte);
#pragma unroll
          for (int q = 0; q < kTableWords / 4; ++q) {
            tables[byte * (kTableWords / 4) + q] =
                make_uint4(t.plane[4 * q], t.plane[4 * q + 1], t.plane[4 * q + 2], t.plane[4 * q + 3]);
          }
        }
      }
      __syncthreads();
    }

    // First every block is quantized, as quantize.cu does it: the codes and
    // scale byte of a step are all that stay of it (its words are dead), so
    // that the out-of-line exact paths of both halves are called with few
    // registers live.
    uint2 codes[kMaxSteps][kHalves];
    u32 scale_bytes[kMaxSteps];
#pragma unroll
    for (int s = 0; s < kMaxSteps; ++s) {
      if ((s & (s - 1)) == 0 && s >= steps) break;
      scale_bytes[s] = quantize_block<Input>(quantizer, words[s], k + s * span, codes[s]);
    }

    // Then decoded, as dequantize.cu does it; the step loop is inlined once
    // for each way of getting a block's table (from_tables is a constant in
    // each copy).
    const auto run_steps = [&](bool from_tables) {
#pragma unroll
      for (int s = 0; s < kMaxSteps; ++s) {
        if (s >= steps || first + s * span >= blocks_per_row) break;  // the same for the whole warp
        const u32 byte = scale_bytes[s];
        MagnitudeTable<Decoded> t;
        if (from_tables) {
#pragma unroll
          for (int q = 0; q < kTableWords / 4; ++q) {
            const uint4 v = tables[byte * (kTableWords / 4) + q];
            t.plane[4 * q] = v.x;
            t.plane[4 * q + 1] = v.y;
            t.plane[4 * q + 2] = v.z;
            t.plane[4 * q + 3] = v.w;
          }
        } else {
          t = decoder.table(byte);
        }
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
          const auto emit = [&](const BlockWords<Output>& block) {
            if constexpr (kVector) {
#pragma unroll
              for (int q = 0; q < kHalfPieces; ++q) {
                warp_staging[staging_slot<kPieces>(lane * kPieces + h * kHalfPieces + q)] =
                    make_uint4(block.w[4 * q], block.w[4 * q + 1], block.w[4 * q + 2], block.w[4 * q + 3]);
              }
            } else {
#pragma unroll
              for (int v = 0; v < kBlockSize; ++v) {
                const int value = j * Quantizer::kValues + h * kBlockSize + v;
                if (value < limit) {
                  store_global(out_step + value, sizeof(raw_t) == 4 ? block.w[v] : block.w[v >> 1] >> (16 * (v & 1)));
                }
              }
            }
          };
          // Each path hands its words on by itself (as in dequantize.cu).
          if (t.plane[0] != kSlow) {
            emit(finish_block<Quantizer, Output>(decode_block<Decoded>(codes[s][h], t)));
          } else {
            emit(finish_block<Quantizer, Output>(decoder.exact(codes[s][h], byte)));
          }
        }
        if constexpr (kVector) {
          store_staged<kPieces, kPieceValues>(warp_staging, first_piece, span, j, limit, out_step);
        }
        out_step += step_values;
        asm("" : "+l"(out_step));  // one 64-bit add a step
        limit -= step_values;
      }
    };
    if (shared_tables) {
      run_steps(true);
    } else {
      run_steps(false);
    }
  }
}

// The per-call arguments come first (the launcher packs only those), then
// the ones fixed by the call's shape. The seed and the offset (32-bit
// halves) are read by stochastic rounding's quantizer only.
template <typename Input, typename Output, typename Quantizer, bool kVector, int kMaxSteps>
__global__ void __launch_bounds__(kThreadsPerBlock)
fake_quantize(const typename Input::raw_t* __restrict__ x, const float* __restrict__ global_scale_ptr,
              float global_scale_value, typename Output::raw_t* __restrict__ out, unsigned seed_lo, unsigned seed_hi,
              unsigned offset_lo, unsigned offset_hi, long long row_stride, long long expert_stride, int m, int n,
              int blocks_per_row, int steps, long long global_scale_expert_step, int global_scale_row_step,
              float denominator, int fast_math) {
  fake_quantize_rows<Input, Output, Quantizer, kVector, false, kMaxSteps>(
      x, global_scale_ptr, global_scale_value, out, seed_lo, seed_hi, offset_lo, offset_hi, row_stride, expert_stride,
      m, n, blocks_per_row, steps, global_scale_expert_step, global_scale_row_step, denominator, fast_math);
}

// out: one byte a value of x, 1 where saturated (docs/fused_ops.md, section 6.3).
template <typename Input, typename Quantizer, bool kVector, int kMaxSteps>
__global__ void __launch_bounds__(kThreadsPerBlock)
saturation_mask(const typename Input::raw_t* __restrict__ x, const float* __restrict__ global_scale_ptr,
                float global_scale_value, u8* __restrict__ out, long long row_stride, long long expert_stride, int m,
                int n, int blocks_per_row, int steps, long long global_scale_expert_step, int global_scale_row_step,
                float denominator, int fast_math) {
  fake_quantize_rows<Input, Float32Output, Quantizer, kVector, true, kMaxSteps>(
      x, global_scale_ptr, global_scale_value, out, 0u, 0u, 0u, 0u, row_stride, expert_stride, m, n, blocks_per_row,
      steps, global_scale_expert_step, global_scale_row_step, denominator, fast_math);
}

// ---------------------------------------------------------------------------
// numerics="te" with 16x16 tiles (TE's weight recipe, docs/te_numerics.md
// section 4) on row_tiles.cuh's thread-block tile, as quantize.cu's
// quantize_nvfp4_te_tiles: its threads load the tile's row blocks once,
// SquareTileAmax reduces each 16x16 tile's amax in shared memory (rows past m
// count as zeros), and each thread quantizes its row blocks with their tile's
// amax (TeNvfp4Quantizer's scale and codes), decodes them in registers and
// stores the values (kMask: section 6.3's mask bytes) straight to global
// memory: 32 or 64 contiguous bytes a block. One S_enc for all of x:
// global_scale_ptr[0], or global_scale_value without a pointer.
// ---------------------------------------------------------------------------
template <typename Input, typename Output, bool kVector, bool kMask, typename Out>
__device__ __forceinline__ void fake_quantize_tile_rows(const typename Input::raw_t* __restrict__ x,
                                                        const float* __restrict__ global_scale_ptr,
                                                        float global_scale_value, Out* __restrict__ out,
                                                        long long row_stride, int m, int n) {
  typedef RowTile<Input> Tile;
  typedef typename Output::raw_t raw_t;
  u32 words[Tile::kBlocksPerThread][Tile::kWords];
  __shared__ SquareTileAmax<Input> square;
  const auto [first_row, first_col, t, r, row] = load_square_tiles<Input, kVector>(x, row_stride, m, n, words, square);
  if (row >= m) return;
  const float gs = global_scale_ptr ? __ldg(global_scale_ptr) : global_scale_value;
  const TeNvfp4Quantizer quantizer(QuantizerArgs{gs, 0u, 0u, 0u, 0u, 0ull, 0.0f, 0});
  const BlockDecoder<Output, false> decoder(gs);
  const u32 largest_bits = __float_as_uint(quantizer.largest());
  Out* out_row = out + (long long)row * n;
#pragma unroll
  for (int b = 0; b < Tile::kBlocksPerThread; ++b) {
    const int k_local = t % kThreadsPerRow + b * kThreadsPerRow;
    const int col = first_col + k_local * kBlockSize;
    if (col >= n) break;  // col grows with b
    const BlockScale scale = quantizer.scale(square.tiles[r / kBlockSize][k_local]);
    if constexpr (kMask) {
      u32 mask[4] = {0u, 0u, 0u, 0u};
      if (TeNvfp4Quantizer::saturates(scale.scale_byte)) saturated_bytes<Input>(words[b], largest_bits, mask);
      if constexpr (kVector) {  // n % 8 == 0 and an 8-byte aligned mask: 8-value pieces lie wholly in [0, n) or past it
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          if (col + 8 * q < n) store_global(reinterpret_cast<uint2*>(out_row + col + 8 * q), make_uint2(mask[2 * q], mask[2 * q + 1]));
        }
      } else {
#pragma unroll
        for (int v = 0; v < kBlockSize; ++v) {
          if (col + v < n) store_global(out_row + col + v, (mask[v >> 2] >> (8 * (v & 3))) & 0xffu);
        }
      }
    } else {
      const uint2 codes = pack_block<Input, TeNvfp4Quantizer::Codes>(words[b], scale);
      const MagnitudeTable<Output> table = decoder.table(scale.scale_byte);
      const BlockWords<Output> block =
          table.plane[0] != kSlow ? decode_block<Output>(codes, table) : decoder.exact(codes, scale.scale_byte);
      if constexpr (kVector) {  // n % 8 == 0 and a 16-byte aligned out: 16-byte pieces lie wholly in or past the row
        constexpr int kPieceValues = 16 / sizeof(raw_t);
#pragma unroll
        for (int q = 0; q < (int)sizeof(raw_t); ++q) {
          if (col + q * kPieceValues < n) {
            store_global(reinterpret_cast<uint4*>(out_row + col) + q,
                         make_uint4(block.w[4 * q], block.w[4 * q + 1], block.w[4 * q + 2], block.w[4 * q + 3]));
          }
        }
      } else {
#pragma unroll
        for (int v = 0; v < kBlockSize; ++v) {
          if (col + v < n) {
            store_global(out_row + col + v, sizeof(raw_t) == 4 ? block.w[v] : block.w[v >> 1] >> (16 * (v & 1)));
          }
        }
      }
    }
  }
}

template <typename Input, typename Output, bool kVector>
__global__ void __launch_bounds__(kThreadsPerBlock)
fake_quantize_te_tiles(const typename Input::raw_t* __restrict__ x, const float* __restrict__ global_scale_ptr,
                       float global_scale_value, typename Output::raw_t* __restrict__ out, long long row_stride, int m,
                       int n) {
  fake_quantize_tile_rows<Input, Output, kVector, false>(x, global_scale_ptr, global_scale_value, out, row_stride, m,
                                                         n);
}

template <typename Input, bool kVector>
__global__ void __launch_bounds__(kThreadsPerBlock)
saturation_mask_te_tiles(const typename Input::raw_t* __restrict__ x, const float* __restrict__ global_scale_ptr,
                         float global_scale_value, u8* __restrict__ out, long long row_stride, int m, int n) {
  fake_quantize_tile_rows<Input, Float32Output, kVector, true>(x, global_scale_ptr, global_scale_value, out,
                                                               row_stride, m, n);
}

}  // namespace nvfp4
