// RMSNorm (docs/fused_ops.md, section 3), alone (output in x's dtype T) and
// fused with NVFP4 or MXFP4 quantization; both with the residual form, which
// normalizes z = RN_T(x + residual) and writes z back into `residual` in place.
//
// Thread mapping: one thread block of kRowThreads = 128 threads per row. A
// row is cut into pieces of 16 values (an NVFP4 block, half an MXFP4 block);
// thread t takes pieces p = t + 128 j, j = 0, 1, .... Piece p is the chunks
// 2p and 2p + 1 of section 3.2 (RMS_CHUNK = 8), whose virtual lanes are
// (2p) mod 256 = 2t and 2t + 1 for every j: thread t is lanes 2t and 2t + 1,
// with one accumulator each, fed chunk after chunk (increasing j) and in
// index order inside a chunk, with FMA(z, z, acc). Lane v = 2t + a (a = 0, 1)
// of thread t = 32 w + i is lane l = 2 (i mod 16) + a of group g = 2 w + i / 16,
// so the group tree's partner distances 16, 8, 4, 2 are __shfl_xor_sync
// distances 8, 4, 2, 1 on each accumulator and distance 1 is a0 + a1 in the
// thread; the half-warps' group sums then meet in shared memory, where every
// thread runs the tree 4, 2, 1 over the 8 of them (section 3.2).
//
// Registers: a thread keeps kRegisterPieces pieces of z between the sum of
// squares and the normalization, so a row of up to 128 * 16 * kRegisterPieces
// = 8192 values is read once. Longer rows (any n works) read the values
// beyond that twice, the second time from L2; with a residual, those pieces
// of z are written back in the second pass, when they are recomputed from x
// and the residual (which then still holds its old values).
//
// The quantizing kernel's grid covers the whole scale tensor (layout padding
// rows included, one thread block a row), so that every byte of both outputs
// is written here: K padding (n <= column < padded_n) quantizes +0 values,
// scale columns past padded_n / B and rows past m get 0x00.
#include "numerics.cuh"
#include "load.cuh"
#include "layouts.cuh"
#include "output.cuh"

namespace nvfp4 {

constexpr int kLanes = 256;  // section 3.2: RMS_LANES virtual lanes, 8 groups of 32
constexpr int kGroups = kLanes / 32;
constexpr int kRowThreads = 128;  // threads per row, two lanes each (ops/rms_norm.py reads this constant)
constexpr int kRegisterPieces = 4;  // 16-value pieces a thread keeps in registers (ops/rms_norm.py reads it)
constexpr int kPieceValues = 16;
static_assert(2 * kRowThreads == kLanes, "thread t is lanes 2t and 2t + 1");
// __launch_bounds__(kRowThreads, kRowMinBlocks<...>) on the kernels. With the
// thread count alone, sm_80's ptxas caps the 16-bit kernels at 64-80
// registers and spills the element-load path (unaligned rows, up to ~210
// registers); a minimum of one thread block an SM lets it take what it needs.
// The 16-bit vector path, the common one, fits 64 registers without spilling
// on sm_80 to sm_90 (tests/test_compile.py checks every arch), so there 8
// thread blocks (32 warps) share an SM instead of the 5 that its ~93
// registers allowed: a thread block waits on its row's loads, then on the
// block-wide sum, then issues the quantization, and more rows in flight hide
// those waits. sm_100a and sm_120a (NVFP4_HW_E2M1) spill at 64 and even at
// 80 registers, so they keep the minimum of one.
template <typename Input, bool kVectorLoads>
constexpr int kRowMinBlocks = (kVectorLoads && sizeof(typename Input::raw_t) == 2 && !NVFP4_HW_E2M1) ? 8 : 1;
static_assert(kRowThreads <= kThreadsPerBlock, "no larger thread blocks than the launcher's other kernels");
constexpr unsigned kAllLanes = 0xffffffffu;

// ---------------------------------------------------------------------------
// The arithmetic in T of section 3.1 (steps 1 and 8) and its NaN rule.
// For float16 and bfloat16 the residual sum and the weight product are
// correctly rounded T operations on two values at once: fma.rn.{f16,bf16}x2
// with 1 or -0 (what cuda_bf16.hpp's __hadd2_rn / __hmul2_rn are on sm_80),
// which section 3.1 shows equal to rounding the float32 sum or product to T.
// No .ftz: subnormals are kept.
// ---------------------------------------------------------------------------
template <typename Input>
struct RowArithmetic;

template <>
struct RowArithmetic<Float16Input> {
  static constexpr u32 kInfBits = 0x7c00u;
  __device__ static u32 add(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x3c003c00u), "r"(b));
    return d;
  }
  __device__ static u32 mul(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
  }
};

template <>
struct RowArithmetic<BFloat16Input> {
  static constexpr u32 kInfBits = 0x7f80u;
  __device__ static u32 add(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x3f803f80u), "r"(b));
    return d;
  }
  __device__ static u32 mul(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
  }
};

template <>
struct RowArithmetic<Float32Input> {
  static constexpr u32 kInfBits = kF32InfBits;
  __device__ static u32 add(u32 a, u32 b) { return __float_as_uint(add_rn(__uint_as_float(a), __uint_as_float(b))); }
  __device__ static u32 mul(u32 a, u32 b) { return __float_as_uint(mul_rn(__uint_as_float(a), __uint_as_float(b))); }
};

template <typename Input>
struct Piece {
  static constexpr int kWords = 4 * sizeof(typename Input::raw_t);  // 32-bit words of 16 values
  static constexpr int kValuesPerWord = kPieceValues / kWords;
  u32 w[kWords];
};

// Every NaN of a piece as T's canonical quiet NaN. Input::abs_max_bits is
// NaN-propagating, so a piece without NaN (the common case) costs only it.
template <typename Input>
__device__ __forceinline__ void canonical_nans(Piece<Input>& piece) {
  typedef RowArithmetic<Input> A;
  typedef typename OutputOf<Input>::type Output;
  if (Input::abs_max_bits(piece.w) <= kF32InfBits) return;
#pragma unroll
  for (int w = 0; w < Piece<Input>::kWords; ++w) {
    if constexpr (Piece<Input>::kValuesPerWord == 1) {
      if ((piece.w[w] & kF32AbsMask) > A::kInfBits) piece.w[w] = Output::kCanonicalNaN;
    } else {
      if ((piece.w[w] & 0x7fffu) > A::kInfBits) piece.w[w] = (piece.w[w] & 0xffff0000u) | Output::kCanonicalNaN;
      if (((piece.w[w] >> 16) & 0x7fffu) > A::kInfBits) {
        piece.w[w] = (piece.w[w] & 0xffffu) | (Output::kCanonicalNaN << 16);
      }
    }
  }
}

// Values at index >= keep (columns past n: K padding, or past the row) set to +0.
template <typename Input>
__device__ __forceinline__ void zero_from(Piece<Input>& piece, int keep) {
#pragma unroll
  for (int w = 0; w < Piece<Input>::kWords; ++w) {
    if constexpr (Piece<Input>::kValuesPerWord == 1) {
      if (w >= keep) piece.w[w] = 0u;
    } else {
      if (2 * w >= keep) piece.w[w] = 0u;
      else if (2 * w + 1 >= keep) piece.w[w] &= 0xffffu;
    }
  }
}

// Stores the 16 values of `piece` at columns [col, col + 16) of a row
// (columns >= n not written). The counterpart of load_block (load.cuh).
template <typename Input, bool kVectorStores>
__device__ __forceinline__ void store_block(typename Input::raw_t* __restrict__ row, int col, int n,
                                            const Piece<Input>& piece) {
  typedef typename Input::raw_t raw_t;
  if (kVectorStores) {
    // The launcher guarantees 16-byte alignment and n % 8 == 0 on this path.
    uint4* dst = reinterpret_cast<uint4*>(row + col);
    constexpr int kValuesPerVector = 16 / sizeof(raw_t);
#pragma unroll
    for (int q = 0; q < (int)sizeof(raw_t); ++q) {
      if (col + q * kValuesPerVector < n) {
        dst[q] = make_uint4(piece.w[4 * q], piece.w[4 * q + 1], piece.w[4 * q + 2], piece.w[4 * q + 3]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPieceValues; ++j) {
      if (col + j < n) {
        row[col + j] = (raw_t)(sizeof(raw_t) == 4 ? piece.w[j] : piece.w[j >> 1] >> (16 * (j & 1)));
      }
    }
  }
}

// z = x, or with a residual z = RN_T(x + r) (section 3.1, step 1), NaN canonical.
template <typename Input, bool kVectorLoads>
__device__ __forceinline__ void add_residual(Piece<Input>& z, const typename Input::raw_t* __restrict__ residual_row,
                                             int col, int n) {
  Piece<Input> r;
  load_block<Input, kVectorLoads>(residual_row, col, n, r.w);
#pragma unroll
  for (int w = 0; w < Piece<Input>::kWords; ++w) z.w[w] = RowArithmetic<Input>::add(z.w[w], r.w[w]);
  canonical_nans(z);
}

// Section 3.2, step 1: the piece's chunks into the accumulators of lanes 2t
// (values 0..7) and 2t + 1 (values 8..15).
template <typename Input>
__device__ __forceinline__ void accumulate_squares(const Piece<Input>& z, float& acc0, float& acc1) {
#pragma unroll
  for (int j = 0; j < kPieceValues / 2; ++j) {
    const float v = Input::element(z.w, j);
    acc0 = fma_rn(v, v, acc0);
  }
#pragma unroll
  for (int j = kPieceValues / 2; j < kPieceValues; ++j) {
    const float v = Input::element(z.w, j);
    acc1 = fma_rn(v, v, acc1);
  }
}

// Section 3.2, steps 2 and 3, then section 3.1, steps 3-6: inv for the row,
// the same in every thread. `groups`: kGroups floats of shared memory.
__device__ __forceinline__ float row_inverse_rms(float acc0, float acc1, float* groups, int n, float eps) {
#pragma unroll
  for (int distance = 8; distance >= 1; distance >>= 1) {  // group partner distances 16, 8, 4, 2
    acc0 = add_rn(acc0, __shfl_xor_sync(kAllLanes, acc0, distance));
    acc1 = add_rn(acc1, __shfl_xor_sync(kAllLanes, acc1, distance));
  }
  const int lane = threadIdx.x & 31;
  if ((lane & 15) == 0) groups[2 * (threadIdx.x >> 5) + (lane >> 4)] = add_rn(acc0, acc1);  // distance 1
  __syncthreads();
  float g[kGroups];
#pragma unroll
  for (int i = 0; i < kGroups; ++i) g[i] = groups[i];
#pragma unroll
  for (int distance = kGroups / 2; distance >= 1; distance >>= 1) {
#pragma unroll
    for (int i = 0; i < distance; ++i) g[i] = add_rn(g[i], g[i + distance]);
  }
  const float mean_square = div_rn(g[0], (float)n);  // n is exact in float32 up to 2^24
  return div_rn(1.0f, sqrt_rn(add_rn(mean_square, eps)));
}

// Section 3.1, steps 7 and 8: out = RN_T(RN_T(RN(z * inv)) * weight), values
// at index >= keep as +0 (K padding is not normalized). NaN not canonical
// (the quantizer does not look at NaN payloads; rms_norm canonicalizes).
template <typename Input, bool kVectorLoads>
__device__ __forceinline__ Piece<Input> normalize(const Piece<Input>& z, float inv,
                                                  const typename Input::raw_t* __restrict__ weight, int col, int n) {
  typedef RowArithmetic<Input> A;
  typedef typename OutputOf<Input>::type Output;
  Piece<Input> out;
  if constexpr (Piece<Input>::kValuesPerWord == 2) {
#pragma unroll
    for (int w = 0; w < Piece<Input>::kWords; ++w) {
      out.w[w] = Output::from_f32x2(mul_rn(Input::element(z.w, 2 * w), inv),
                                    mul_rn(Input::element(z.w, 2 * w + 1), inv));
    }
  } else {
#pragma unroll
    for (int w = 0; w < Piece<Input>::kWords; ++w) out.w[w] = __float_as_uint(mul_rn(__uint_as_float(z.w[w]), inv));
  }
  if (weight) {
    Piece<Input> scale;
    load_block<Input, kVectorLoads>(weight, col, n, scale.w);
#pragma unroll
    for (int w = 0; w < Piece<Input>::kWords; ++w) out.w[w] = A::mul(out.w[w], scale.w[w]);
  }
  if (col + kPieceValues > n) zero_from(out, n - col);
  return out;
}

// Phase 1 of a row: z for the thread's pieces (the first kRegisterPieces kept
// in `z`, their residual sums written back), and the sum of squares; returns
// inv. `residual_row` is null without a residual.
template <typename Input, bool kVectorLoads>
__device__ __forceinline__ float load_and_reduce(const typename Input::raw_t* __restrict__ x_row,
                                                 typename Input::raw_t* __restrict__ residual_row, int n, float eps,
                                                 Piece<Input> (&z)[kRegisterPieces]) {
  __shared__ float groups[kGroups];
  const int t = threadIdx.x;
  // Every load first (columns >= n read as +0 without a memory access).
#pragma unroll
  for (int j = 0; j < kRegisterPieces; ++j) {
    load_block<Input, kVectorLoads>(x_row, (t + j * kRowThreads) * kPieceValues, n, z[j].w);
  }
  if (residual_row) {
#pragma unroll
    for (int j = 0; j < kRegisterPieces; ++j) {
      const int col = (t + j * kRowThreads) * kPieceValues;
      add_residual<Input, kVectorLoads>(z[j], residual_row, col, n);
      store_block<Input, kVectorLoads>(residual_row, col, n, z[j]);
    }
  }
  float acc0 = 0.0f, acc1 = 0.0f;
#pragma unroll
  for (int j = 0; j < kRegisterPieces; ++j) accumulate_squares(z[j], acc0, acc1);
  // Rows longer than the registers hold: the rest streams through once here.
  for (int j = kRegisterPieces; j * kRowThreads * kPieceValues < n; ++j) {
    const int col = (t + j * kRowThreads) * kPieceValues;
    Piece<Input> more;
    load_block<Input, kVectorLoads>(x_row, col, n, more.w);
    if (residual_row) add_residual<Input, kVectorLoads>(more, residual_row, col, n);
    accumulate_squares(more, acc0, acc1);
  }
  return row_inverse_rms(acc0, acc1, groups, n, eps);
}

// z of a piece beyond the registers, again: from x (and the residual, whose
// sum is written back now).
template <typename Input, bool kVectorLoads>
__device__ __forceinline__ Piece<Input> reload(const typename Input::raw_t* __restrict__ x_row,
                                               typename Input::raw_t* __restrict__ residual_row, int col, int n) {
  Piece<Input> z;
  load_block<Input, kVectorLoads>(x_row, col, n, z.w);
  if (residual_row) {
    add_residual<Input, kVectorLoads>(z, residual_row, col, n);
    store_block<Input, kVectorLoads>(residual_row, col, n, z);
  }
  return z;
}

// ---------------------------------------------------------------------------
// rms_norm: out [rows, n] in T (C-contiguous), NaN canonical.
// ---------------------------------------------------------------------------
template <typename Input, bool kVectorLoads>
__device__ __forceinline__ void store_normalized(const Piece<Input>& z, float inv,
                                                 const typename Input::raw_t* __restrict__ weight,
                                                 typename Input::raw_t* __restrict__ out_row, int col, int n) {
  Piece<Input> out = normalize<Input, kVectorLoads>(z, inv, weight, col, n);
  canonical_nans(out);
  store_block<Input, kVectorLoads>(out_row, col, n, out);
}

// The per-call arguments come first (the launcher packs only those), then
// the ones fixed by the call's shape. weight and residual are null when absent.
template <typename Input, bool kVectorLoads>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks<Input, kVectorLoads>)
rms_norm(const typename Input::raw_t* __restrict__ x, const typename Input::raw_t* __restrict__ weight,
         typename Input::raw_t* __restrict__ residual, float eps, typename Input::raw_t* __restrict__ out,
         long long row_stride, int n) {
  const long long row = blockIdx.x;
  const typename Input::raw_t* x_row = x + row * row_stride;
  typename Input::raw_t* residual_row = residual ? residual + row * n : nullptr;
  typename Input::raw_t* out_row = out + row * n;
  Piece<Input> z[kRegisterPieces];
  const float inv = load_and_reduce<Input, kVectorLoads>(x_row, residual_row, n, eps, z);
  const int t = threadIdx.x;
#pragma unroll
  for (int j = 0; j < kRegisterPieces; ++j) {
    const int col = (t + j * kRowThreads) * kPieceValues;
    if (col < n) store_normalized<Input, kVectorLoads>(z[j], inv, weight, out_row, col, n);
  }
  for (int col = (t + kRegisterPieces * kRowThreads) * kPieceValues; col < n; col += kRowThreads * kPieceValues) {
    store_normalized<Input, kVectorLoads>(reload<Input, kVectorLoads>(x_row, residual_row, col, n), inv, weight,
                                          out_row, col, n);
  }
}

// ---------------------------------------------------------------------------
// rms_norm_quant: the normalized T values through numerics.cuh's block
// arithmetic, as quantize.cu's quantize_rows does it.
// ---------------------------------------------------------------------------
struct RowOutputs {
  uint2* packed_row;  // 16 values (8 bytes) per piece
  u8* scale_row;      // the layout's row offset applied
  RuntimeLayout layout;
  GlobalScale global;  // NVFP4 only
};

// Quantizes piece p (valid: p < padded_n / 16) of normalized values. Every
// thread of the warp calls it together (MXFP4 shares the amax of pieces 2k
// and 2k + 1, held by threads t and t ^ 1, through a shuffle).
template <typename Input, bool kMx>
__device__ __forceinline__ void quantize_piece(const Piece<Input>& values, int p, bool valid, const RowOutputs& to) {
  u32 amax_bits = Input::abs_max_bits(values.w);
  if constexpr (kMx) {
    amax_bits = max(amax_bits, __shfl_xor_sync(kAllLanes, amax_bits, 1));
    const BlockScale scale = mx_block_scale(amax_bits);
    if (valid) {
      to.packed_row[p] = pack_block<Input>(values.w, scale);
      if (!(p & 1)) to.scale_row[to.layout.column_offset(p >> 1)] = scale.scale_byte;
    }
  } else {
    const BlockScale scale = block_scale(amax_bits, to.global);
    if (valid) {
      to.packed_row[p] = pack_block<Input>(values.w, scale);
      to.scale_row[to.layout.column_offset(p)] = scale.scale_byte;
    }
  }
}

// The per-call arguments come first. global_scale_ptr (null: use
// global_scale_value) is indexed by row * gs_row_step + expert *
// gs_expert_step (one scale, per row, per expert); MXFP4 ignores both.
// blockIdx.y is the expert of an [E, m, n] batch (its own rows of x, packed
// rows and complete scale tensor; 1 otherwise), blockIdx.x the row of its
// scale tensor (m <= row < scale_rows: layout padding).
template <typename Input, bool kVectorLoads, bool kMx>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks<Input, kVectorLoads>)
rms_norm_quant(const typename Input::raw_t* __restrict__ x, const typename Input::raw_t* __restrict__ weight,
               typename Input::raw_t* __restrict__ residual, float eps, const float* __restrict__ global_scale_ptr,
               float global_scale_value, uint2* __restrict__ packed, u8* __restrict__ scales, long long row_stride,
               long long expert_stride, int m, int n, int padded_n, int scale_rows, int scale_cols, int layout_id,
               int gs_row_step, int gs_expert_step) {
  constexpr int kBlockValues = kMx ? kMxBlockSize : kBlockSize;
  const RuntimeLayout layout{layout_id};
  const int row = blockIdx.x;
  const int expert = blockIdx.y;
  const int t = threadIdx.x;
  u8* scale_row = scales + (long long)expert * scale_rows * scale_cols + layout.row_offset(row, scale_cols);
  if (row >= m) {
    // A row that exists only in the scale layout's padding.
    for (int k = t; k < scale_cols; k += kRowThreads) scale_row[layout.column_offset(k)] = 0;
    return;
  }
  for (int k = padded_n / kBlockValues + t; k < scale_cols; k += kRowThreads) {
    scale_row[layout.column_offset(k)] = 0;  // columns of the layout's padding
  }
  const long long row_index = (long long)expert * m + row;  // in the flattened rows of x
  const typename Input::raw_t* x_row = x + expert * expert_stride + row * row_stride;
  typename Input::raw_t* residual_row = residual ? residual + row_index * n : nullptr;
  Piece<Input> z[kRegisterPieces];
  const float inv = load_and_reduce<Input, kVectorLoads>(x_row, residual_row, n, eps, z);

  RowOutputs to;
  to.packed_row = packed + row_index * (padded_n / kPieceValues);
  to.scale_row = scale_row;
  to.layout = layout;
  if constexpr (!kMx) {
    const int scale_index = row * gs_row_step + expert * gs_expert_step;
    to.global = global_scale(global_scale_ptr ? __ldg(global_scale_ptr + scale_index) : global_scale_value);
  }
  const int pieces = padded_n / kPieceValues;
#pragma unroll
  for (int j = 0; j < kRegisterPieces; ++j) {
    if (j * kRowThreads >= pieces) break;  // the same for the whole thread block
    const int p = t + j * kRowThreads;
    quantize_piece<Input, kMx>(normalize<Input, kVectorLoads>(z[j], inv, weight, p * kPieceValues, n), p,
                               p < pieces, to);
  }
  for (int j = kRegisterPieces; j * kRowThreads < pieces; ++j) {
    const int p = t + j * kRowThreads;
    const int col = p * kPieceValues;
    const Piece<Input> again = reload<Input, kVectorLoads>(x_row, residual_row, col, n);
    quantize_piece<Input, kMx>(normalize<Input, kVectorLoads>(again, inv, weight, col, n), p, p < pieces, to);
  }
}

}  // namespace nvfp4
