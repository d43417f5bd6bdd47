// NVFP4 / MXFP4 -> float16 / bfloat16 / float32, the inverse of quantize.cu
// for every scale layout (docs/format.md, Dequantization): value = e2m1 *
// float(e4m3) / global_scale in IEEE float32 (round-to-nearest-even,
// subnormals kept), then one rounding to the output type. A NaN result is
// written as the output type's canonical quiet NaN, so that the bytes are
// defined.
//
// Thread mapping: threadIdx.y / blockIdx.x walk rows, threadIdx.x /
// blockIdx.y a row's 16-value blocks, up to kMaxSteps blocks a thread (see
// dequantize_fp4). The fast path (docs/format.md, section 8.1): a block's
// values are its scale byte's two quotients q1 = sf / gs and q3 = 3 sf / gs
// times powers of two; the quotients take a multiply by gs's correctly
// rounded reciprocal and one correction each, and give a table of the 8
// possible magnitudes, in which the 16 values are byte-permute lookups. With
// one global scale for a whole thread block, the tables of all 256 scale
// bytes are made once per thread block.
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
template <typename Output>
__device__ __noinline__ BlockWords<Output> exact_block(uint2 codes, float sf, float gs) {
  BlockWords<Output> out;
#pragma unroll
  for (int j = 0; j < kBlockSize; ++j) {
    const u32 code = ((j < 8 ? codes.x : codes.y) >> (4 * (j & 7))) & 0xfu;
    const float v = div_rn(mul_rn(e2m1_to_f32(code), sf), gs);
    const u32 bits = (__float_as_uint(v) & kF32AbsMask) > kF32InfBits ? Output::kCanonicalNaN : Output::from_f32(v);
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

// ---------------------------------------------------------------------------
// The fast path.
// ---------------------------------------------------------------------------

// RN(a / b) for a = 0 or |a| an E4M3 value or 3 times one, given
// y = RN(1 / b), for 2^-100 <= |b| <= 2^100 (kFastDivideMin,
// kFastDivideMax): q0 = RN(a * y), then one correction with the remainder
// a - b * q0. tests/test_dequantize_math.py checks this sequence against
// the IEEE quotient for every divisor significand and every such dividend;
// the range keeps every intermediate normal, so that the significands are all
// that matters. The sign of a zero a is restored at the end: the
// correction turns -0 into +0.
constexpr u32 kFastDivideMin = 0x0d800000u;  // 2^-100
constexpr u32 kFastDivideMax = 0x71800000u;  // 2^100

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
// The kernel.
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

// NVFP4 or, with kMx, MXFP4 (32-value blocks, E8M0 scales, no global scale;
// each 16-value half of a block is handled like an NVFP4 block). blockIdx.z
// is the expert of an [E, m, K/2] batch, each with its own packed rows,
// complete scale tensor and output rows; the global scale of (expert, row)
// is global_scale_ptr[expert * expert_step + row * row_step] (steps 0 for
// one scale, 1 and 0 for one per expert, m and 1 for one per row).
//
// Each thread takes `steps` (at most kMaxSteps) 16-value blocks of one row.
// The threads x of a row form segments of span = min(blockDim.x, 32) threads
// (a warp, or all of the row's threads of a warp; the launcher makes
// blockDim.x at least 8): a segment covers span * steps consecutive blocks,
// block j of each step going to thread j. All loads are issued before the
// first block is worked on. On the vector path each step's output goes
// through shared memory: thread j writes its block's 16-byte pieces, then
// reads back piece i * span + j of the step's run, so that every store
// instruction of a warp writes whole 32-byte sectors of contiguous bytes.
template <typename Output, typename Layout, bool kVectorStores, bool kMx, int kMaxSteps>
__global__ void __launch_bounds__(kThreadsPerBlock)
dequantize_fp4(const uint2* __restrict__ packed, const u8* __restrict__ scales, const float* __restrict__ global_scale_ptr,
               float global_scale_value, typename Output::raw_t* __restrict__ out, int m, int n, int blocks_per_row,
               int steps, long long global_scale_expert_step, int global_scale_row_step, long long scale_expert_stride,
               int scale_cols) {
  typedef typename Output::raw_t raw_t;
  constexpr int kWords = 4 * (int)sizeof(raw_t);  // 32-bit words of a block's output
  constexpr int kPieces = kWords / 4;             // its 16-byte pieces
  constexpr int kPieceValues = kBlockSize / kPieces;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const bool in_rows = row < m;
  const int span = min((int)blockDim.x, 32);
  const int j = threadIdx.x & (span - 1);
  const int first = (blockIdx.y * blockDim.x + (threadIdx.x & ~(span - 1))) * steps;  // the segment's first block
  const long long expert = blockIdx.z;
  const long long row_index = expert * m + row;
  // Steps are span blocks apart, a multiple of 8: span / 2 MXFP4 blocks, a
  // multiple of 4 either way, and every layout's column offset steps evenly
  // over whole groups of 4 columns.
  const int k = first + j;  // this thread's block of step 0
  const u32 scale_step = Layout::column_offset(kMx ? span >> 1 : span);
  // Per-row pointers, then 32-bit offsets for everything per block. The asm
  // (a global-space conversion, which is the identity) makes the pointers
  // opaque, so that the compiler keeps them in registers instead of redoing
  // the 64-bit sums for each block; it also hides that they are global, hence
  // __ldg (ld.global.nc) and store_global.
  const uint2* packed_row = packed + (row_index * blocks_per_row + k);
  const u8* scale_row = scales + (expert * scale_expert_stride + Layout::row_offset(row, scale_cols) +
                                  Layout::column_offset(kMx ? k >> 1 : k));
  raw_t* out_step = out + (row_index * n + (long long)first * kBlockSize);  // step 0's first value
  asm("cvta.to.global.u64 %0, %0;\n\tcvta.to.global.u64 %1, %1;\n\tcvta.to.global.u64 %2, %2;"
      : "+l"(packed_row), "+l"(scale_row), "+l"(out_step));
  // This thread's steps that hold a block of the data (none for rows past m;
  // span is a power of two).
  const int loaded = in_rows ? min(steps, (blocks_per_row - k + span - 1) >> (__ffs(span) - 1)) : 0;

  // Blocks past the row (or rows past m) read as zero codes and scale 0, a
  // block of zeros: the fast path, and nothing of it is stored.
  uint2 codes[kMaxSteps];
  u32 scale_bytes[kMaxSteps];
#pragma unroll
  for (int s = 0; s < kMaxSteps; ++s) scale_bytes[s] = 0u;
#pragma unroll
  for (int s = 0; s < kMaxSteps; ++s) {
    // steps is a power of two: a test at each power of two, not at every step.
    if ((s & (s - 1)) == 0 && s >= steps) break;
    codes[s] = make_uint2(0u, 0u);
    if (s < loaded) {
      codes[s] = __ldg(packed_row + s * span);
      scale_bytes[s] = __ldg(scale_row + (u32)(s * scale_step));
    }
  }
  // Four scale bytes a register while the steps run.
  u32 scale_words[(kMaxSteps + 3) / 4];
#pragma unroll
  for (int w = 0; w < (kMaxSteps + 3) / 4; ++w) {
    scale_words[w] = 0u;
#pragma unroll
    for (int b = 0; b < 4 && 4 * w + b < kMaxSteps; ++b) scale_words[w] |= scale_bytes[4 * w + b] << (8 * b);
  }
  const auto scale_byte = [&](int s) { return (scale_words[s >> 2] >> (8 * (s & 3))) & 0xffu; };
  // Rows past m read row 0's global scale: the shared tables below need every
  // thread's to be the thread block's one scale, and nothing of theirs is stored.
  const float gs = kMx ? 1.0f
                 : global_scale_ptr
                     ? __ldg(global_scale_ptr + (expert * global_scale_expert_step + (in_rows ? row : 0) * global_scale_row_step))
                     : global_scale_value;
  const bool fast_divide = kMx || (__float_as_uint(gs) & kF32AbsMask) - kFastDivideMin <= kFastDivideMax - kFastDivideMin;
  const float reciprocal = kMx ? 1.0f : div_rn(1.0f, gs);
  const auto scale_value = [](u32 byte) { return kMx ? e8m0_to_f32((u8)byte) : e4m3_to_f32_signed((u8)byte); };
  // The table of a scale byte, or kSlow where the block must take the formula.
  const auto table_of = [&](u32 byte) {
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
  };

  const int step_values = span * kBlockSize;
  int limit = in_rows ? n - first * kBlockSize : 0;  // values of the row from the step's first on
  __shared__ uint4 staging[kVectorStores ? kThreadsPerBlock * kPieces : 1];
  const int flat = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = flat & 31;
  uint4* warp_staging = staging + (flat - lane) * kPieces;
  const int first_piece = (lane & ~(span - 1)) * kPieces + j;  // this thread's first read-back piece

  // With one global scale for the whole thread block, the tables of all 256
  // scale bytes are made once, one a thread, while the loads are in flight;
  // a block then looks its table up. Otherwise (a global scale per row and
  // several rows a thread block) each block makes its own.
  constexpr int kTableWords = sizeof(MagnitudeTable<Output>) / 4;
  __shared__ uint4 tables[256 * kTableWords / 4];
  const bool shared_tables = global_scale_row_step == 0 || blockDim.y == 1;
  if (shared_tables) {
#pragma unroll
    for (int i = 0; i < (256 + kThreadsPerBlock - 1) / kThreadsPerBlock; ++i) {
      const int byte = flat + i * kThreadsPerBlock;
      if (byte < 256) {
        const MagnitudeTable<Output> t = table_of(byte);
#pragma unroll
        for (int q = 0; q < kTableWords / 4; ++q) {
          tables[byte * (kTableWords / 4) + q] =
              make_uint4(t.plane[4 * q], t.plane[4 * q + 1], t.plane[4 * q + 2], t.plane[4 * q + 3]);
        }
      }
    }
    __syncthreads();
  }

  // The step loop, inlined once for each way of getting a block's table
  // (from_tables is a constant in each copy), so that neither pays for the
  // other's registers or tests.
  const auto run_steps = [&](bool from_tables) {
#pragma unroll
    for (int s = 0; s < kMaxSteps; ++s) {
      if (s >= steps || first + s * span >= blocks_per_row) break;  // the same for the whole warp
      MagnitudeTable<Output> t;
      if (from_tables) {
#pragma unroll
        for (int q = 0; q < kTableWords / 4; ++q) {
          const uint4 v = tables[scale_byte(s) * (kTableWords / 4) + q];
          t.plane[4 * q] = v.x;
          t.plane[4 * q + 1] = v.y;
          t.plane[4 * q + 2] = v.z;
          t.plane[4 * q + 3] = v.w;
        }
      } else {
        t = table_of(scale_byte(s));
      }
      // Each path hands its words on by itself: merging two 8- or 16-word
      // results would cost register moves on the fast path.
      const auto emit = [&](const BlockWords<Output>& block) {
        if constexpr (kVectorStores) {
#pragma unroll
          for (int q = 0; q < kPieces; ++q) {
            warp_staging[staging_slot<kPieces>(lane * kPieces + q)] =
                make_uint4(block.w[4 * q], block.w[4 * q + 1], block.w[4 * q + 2], block.w[4 * q + 3]);
          }
        } else {
#pragma unroll
          for (int v = 0; v < kBlockSize; ++v) {
            const int value = j * kBlockSize + v;
            if (value < limit) {
              store_global(out_step + value, sizeof(raw_t) == 4 ? block.w[v] : block.w[v >> 1] >> (16 * (v & 1)));
            }
          }
        }
      };
      if (t.plane[0] != kSlow) {
        emit(decode_block<Output>(codes[s], t));
      } else {
        emit(exact_block<Output>(codes[s], scale_value(scale_byte(s)), gs));
      }
      if constexpr (kVectorStores) {
        // The launcher guarantees 16-byte alignment and n % 8 == 0 on this
        // path: each 16-byte piece lies wholly inside or outside [0, n).
        __syncwarp();
#pragma unroll
        for (int i = 0; i < kPieces; ++i) {
          const int value = (i * span + j) * kPieceValues;
          const uint4 v = warp_staging[staging_slot<kPieces>(first_piece + i * span)];
          if (value < limit) store_global(reinterpret_cast<uint4*>(out_step + value), v);
        }
        __syncwarp();  // before the next step's writes
      }
      out_step += step_values;
      asm("" : "+l"(out_step));  // one 64-bit add a step, the pieces' addresses 32-bit offsets from it
      limit -= step_values;
    }
  };
  if (shared_tables) {
    run_steps(true);
  } else {
    run_steps(false);
  }
}

}  // namespace nvfp4
