// SiLU-and-mul, alone and fused with NVFP4/MXFP4 quantization, and the expert
// batches (docs/fused_ops.md, sections 4 and 5): one file, because the
// quantizing kernels differ only in where a row's values come from (x itself,
// or silu(gate) * up computed in registers) and where its bytes go.
//
// - silu_and_mul: x [m, 2n] -> T [m, n], out_i = to_T(RN(silu32(gate_i) * up_i)).
// - quantize_batch: `experts` (blockIdx.z) batches of m rows, each a complete
//   scale tensor of scale_rows rows: the dense forms (one batch, or [E, m, n]
//   with a global scale per expert) and the masked batch (rows >= count[e]
//   are neither read nor quantized; their bytes are 0x00).
// - grouped experts: tokens sorted by expert, rows expert_offsets[e] ..
//   expert_offsets[e + 1] - 1 of expert e; expert e's scales fill scale rows
//   b[e] .. b[e + 1] - 1, b[e + 1] = b[e] + round_up(count_e, row_tile).
//   Two launches: grouped_row_map sanitizes the offsets (section 5.4:
//   clamped to [0, m], then a running maximum), computes b, maps each token
//   row to its expert and scale row, and zeroes the padding scale rows; then
//   quantize_grouped quantizes each token row where the map says.
//
// Thread mapping, as quantize.cu's quantize_rows: threadIdx.y / blockIdx.x
// walk rows, threadIdx.x / blockIdx.y a row's blocks, kPerThread blocks a
// thread blockDim.x apart, and the grid covers every scale row and column of
// the output, layout padding included, so that every byte is written
// (grouped: quantize_grouped's grid covers the token rows, and
// grouped_row_map writes the padding scale rows). The
// scale layout is a run-time argument (it only moves a byte store), which
// keeps the number of kernels small.
#include "numerics.cuh"
#include "load.cuh"
#include "layouts.cuh"
#include "blocks.cuh"
#include "output.cuh"
#include "fused_math.cuh"

namespace nvfp4 {

// The most experts grouped_row_map stages in shared memory (the launcher refuses more).
enum ExpertLimits : int { kMaxExperts = 1024 };

// The 16 values of `gate` become to_T(RN(silu32(gate_j) * up_j)), in place
// (docs/fused_ops.md, section 4.1). kCanonicalNaN: NaN results are written as
// T's canonical NaN (the silu_and_mul output); the quantizer needs only to
// see a NaN, whichever.
template <typename Input, bool kCanonicalNaN>
__device__ __forceinline__ void silu_mul_block(u32 (&gate)[4 * sizeof(typename Input::raw_t)],
                                               const u32 (&up)[4 * sizeof(typename Input::raw_t)]) {
  if constexpr (sizeof(typename Input::raw_t) == 2) {
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      const float lo = mul_rn(silu32(Input::element(gate, 2 * w)), Input::element(up, 2 * w));
      const float hi = mul_rn(silu32(Input::element(gate, 2 * w + 1)), Input::element(up, 2 * w + 1));
      typedef typename OutputOf<Input>::type Output;
      u32 pair = Output::from_f32x2(lo, hi);
      if (kCanonicalNaN) {
        if (is_nan_f32(lo)) pair = (pair & 0xffff0000u) | Output::kCanonicalNaN;
        if (is_nan_f32(hi)) pair = (pair & 0x0000ffffu) | (Output::kCanonicalNaN << 16);
      }
      gate[w] = pair;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kBlockSize; ++j) {
      const float v = mul_rn(silu32(__uint_as_float(gate[j])), __uint_as_float(up[j]));
      gate[j] = (kCanonicalNaN && is_nan_f32(v)) ? kF32CanonicalNaN : __float_as_uint(v);
    }
  }
}

// The block format of a kernel (blocks.cuh), and how it is made from the
// row's global scale.
template <bool kMx>
struct FormatOf {
  typedef Nvfp4Blocks Scales;
  __device__ static Scales make(float gs) { return Nvfp4Blocks::from_global_scale(gs); }
};

template <>
struct FormatOf<true> {
  typedef Mxfp4Blocks Scales;
  __device__ static Scales make(float) { return Scales{}; }
};

// One row's kPerThread blocks of a thread (blocks first_k + b * blockDim.x):
// the values a block quantizes, as the input dtype's raw words.
template <typename Input, bool kMx, bool kSilu, int kPerThread>
struct RowBlocks {
  typedef typename Input::raw_t raw_t;
  static constexpr int kValues = FormatOf<kMx>::Scales::kValues;
  static constexpr int kHalves = kValues / kBlockSize;  // 16-value pieces of a block
  static constexpr int kWords = 4 * sizeof(raw_t);
  u32 words[kPerThread][kHalves][kWords];
  u32 up[kSilu ? kPerThread : 1][kHalves][kWords];

  // Issues every load of the row's blocks (columns >= n read as +0). x_row
  // holds n values, or with kSilu the gate's n values then the up's n.
  template <bool kVectorLoads>
  __device__ __forceinline__ void load_all(const raw_t* x_row, int n, int first_k) {
#pragma unroll
    for (int b = 0; b < kPerThread; ++b) {
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        const int col = (first_k + b * (int)blockDim.x) * kValues + h * kBlockSize;
        load_block<Input, kVectorLoads>(x_row, col, n, words[b][h]);
        if (kSilu) load_block<Input, kVectorLoads>(x_row + n, col, n, up[kSilu ? b : 0][h]);
      }
    }
  }

  __device__ __forceinline__ void load(const raw_t* x_row, int n, int first_k, bool vector_loads) {
    if (vector_loads) {
      load_all<true>(x_row, n, first_k);
    } else {
      load_all<false>(x_row, n, first_k);
    }
  }

  // SiLU-and-mul in registers: the T values the quantizer reads (padding
  // columns give silu(+0) * +0 = +0).
  __device__ __forceinline__ void combine() {
    if constexpr (kSilu) {
#pragma unroll
      for (int b = 0; b < kPerThread; ++b) {
#pragma unroll
        for (int h = 0; h < kHalves; ++h) silu_mul_block<Input, false>(words[b][h], up[b][h]);
      }
    }
  }

  // Quantizes the blocks into packed_row and the scale row (scale_row is
  // the row's part of the layout offset); blocks past padded_n exist only
  // in the scale layout's padding and get a 0 byte.
  template <typename Scales>
  __device__ __forceinline__ void store(const Scales& scales, uint2* __restrict__ packed_row, u8* __restrict__ scale_row,
                                        RuntimeLayout layout, int first_k, int padded_n, int scale_cols) const {
#pragma unroll
    for (int b = 0; b < kPerThread; ++b) {
      const int k = first_k + b * blockDim.x;
      if (k >= scale_cols) break;  // k grows with b
      u8 scale_byte = 0;
      if (k * kValues < padded_n) {
        u32 amax_bits = Input::abs_max_bits(words[b][0]);
#pragma unroll
        for (int h = 1; h < kHalves; ++h) amax_bits = max(amax_bits, Input::abs_max_bits(words[b][h]));
        const BlockScale scale = scales.scale(amax_bits);
#pragma unroll
        for (int h = 0; h < kHalves; ++h) packed_row[k * kHalves + h] = pack_block<Input>(words[b][h], scale);
        scale_byte = scale.scale_byte;
      }
      scale_row[layout.column_offset(k)] = scale_byte;
    }
  }

  // A row of no expert, or a masked one: zero packed bytes (packed_row may
  // be null: no packed row) and zero scale bytes (scale_row may be null).
  __device__ __forceinline__ static void store_zeros(uint2* __restrict__ packed_row, u8* __restrict__ scale_row,
                                                     RuntimeLayout layout, int first_k, int padded_n, int scale_cols) {
#pragma unroll
    for (int b = 0; b < kPerThread; ++b) {
      const int k = first_k + b * blockDim.x;
      if (k >= scale_cols) break;
      if (packed_row && k * kValues < padded_n) {
#pragma unroll
        for (int h = 0; h < kHalves; ++h) packed_row[k * kHalves + h] = make_uint2(0u, 0u);
      }
      if (scale_row) scale_row[layout.column_offset(k)] = 0;
    }
  }
};

// ---------------------------------------------------------------------------
// silu_and_mul: 16 outputs a thread.
// ---------------------------------------------------------------------------
template <typename Input>
__global__ void __launch_bounds__(kThreadsPerBlock)
silu_and_mul(const typename Input::raw_t* __restrict__ x, typename Input::raw_t* __restrict__ out, int vector_access,
             long long row_stride, int m, int n) {
  typedef typename Input::raw_t raw_t;
  constexpr int kWords = 4 * sizeof(raw_t);
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int col = (blockIdx.y * blockDim.x + threadIdx.x) * kBlockSize;
  if (row >= m || col >= n) return;
  const raw_t* x_row = x + row * row_stride;
  u32 gate[kWords], up[kWords];
  if (vector_access) {
    load_block<Input, true>(x_row, col, n, gate);
    load_block<Input, true>(x_row + n, col, n, up);
  } else {
    load_block<Input, false>(x_row, col, n, gate);
    load_block<Input, false>(x_row + n, col, n, up);
  }
  silu_mul_block<Input, true>(gate, up);
  raw_t* out_row = out + (long long)row * n;
  if (vector_access) {
    // n % 8 == 0 and a 16-byte aligned out: each 16-byte piece lies wholly inside or outside the row.
    constexpr int kValuesPerVector = 16 / sizeof(raw_t);
#pragma unroll
    for (int q = 0; q < (int)sizeof(raw_t); ++q) {
      if (col + q * kValuesPerVector < n) {
        reinterpret_cast<uint4*>(out_row + col)[q] =
            make_uint4(gate[4 * q], gate[4 * q + 1], gate[4 * q + 2], gate[4 * q + 3]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kBlockSize; ++j) {
      if (col + j < n) {
        out_row[col + j] =
            (raw_t)(sizeof(raw_t) == 4 ? gate[j] : (gate[j >> 1] >> (16 * (j & 1))) & 0xffffu);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// quantize_batch: `experts` batches (blockIdx.z) of m rows of x (expert_stride
// apart), each quantized into its own packed rows and complete scale tensor
// of scale_rows rows. expert_counts (null: every row) gives the rows of each
// batch that exist, clamped to [0, m] (docs/fused_ops.md, section 5.4). The
// global scale of a row: global_scale_ptr[e * gs_expert_step + row *
// gs_row_step], or global_scale_value without a pointer.
// ---------------------------------------------------------------------------
template <typename Input, bool kMx, bool kSilu, int kPerThread>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_batch(const typename Input::raw_t* __restrict__ x, const float* __restrict__ global_scale_ptr,
               float global_scale_value, const int* __restrict__ expert_counts, uint2* __restrict__ packed,
               u8* __restrict__ scales, int vector_loads, long long row_stride, long long expert_stride, int m, int n,
               int padded_n, int scale_rows, int scale_cols, int layout_id, int gs_expert_step, int gs_row_step) {
  typedef RowBlocks<Input, kMx, kSilu, kPerThread> Row;
  const RuntimeLayout layout{layout_id};
  const int expert = blockIdx.z;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int first_k = blockIdx.y * (blockDim.x * kPerThread) + threadIdx.x;
  if (row >= scale_rows) return;
  const long long packed_per_row = padded_n / kBlockSize;  // uint2 words
  u8* scale_row = scales + (long long)expert * scale_rows * scale_cols + layout.row_offset(row, scale_cols);
  if (row >= m) {  // a row of the scale layout's padding only
    Row::store_zeros(nullptr, scale_row, layout, first_k, padded_n, scale_cols);
    return;
  }
  uint2* packed_row = packed + ((long long)expert * m + row) * packed_per_row;
  const int count = expert_counts ? min(max(__ldg(expert_counts + expert), 0), m) : m;
  if (row >= count) {  // masked: not read
    Row::store_zeros(packed_row, scale_row, layout, first_k, padded_n, scale_cols);
    return;
  }
  Row blocks;
  blocks.load(x + expert * expert_stride + row * row_stride, n, first_k, vector_loads);
  const float gs = global_scale_ptr ? __ldg(global_scale_ptr + expert * gs_expert_step + row * gs_row_step)
                                    : global_scale_value;
  blocks.combine();
  blocks.store(FormatOf<kMx>::make(gs), packed_row, scale_row, layout, first_k, padded_n, scale_cols);
}

// ---------------------------------------------------------------------------
// grouped_row_map's offsets, in shared memory: starts[e] = the sanitized
// expert_offsets[e] (clamped to [0, m], then a running maximum: section
// 5.4; unchanged for offsets that pass validate=True's checks), tiles[e] =
// b[e], the first scale row of expert e. Every thread of the block loads
// its share of the E + 1 offsets (one round trip to L2, not one per 32
// offsets); then one warp scans them 32 at a time while the other threads
// wait at the barrier.
// ---------------------------------------------------------------------------
__device__ __forceinline__ void stage_offsets(const int* __restrict__ expert_offsets, int experts, int m, int row_tile,
                                              int* starts, int* tiles) {
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;  // a thread block has at least 129 threads
  for (int i = thread; i <= experts; i += blockDim.x * blockDim.y) {
    starts[i] = min(max(__ldg(expert_offsets + i), 0), m);
  }
  __syncthreads();
  if (thread < 32) {
    const int lane = thread;
    int carry = 0;  // the running maximum so far (the clamped values are >= 0)
    for (int base = 0; base <= experts; base += 32) {
      const int i = base + lane;
      int v = i <= experts ? starts[i] : 0;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v = max(v, other);
      }
      v = max(v, carry);
      if (i <= experts) starts[i] = v;
      carry = __shfl_sync(0xffffffffu, v, 31);
    }
    __syncwarp();
    if (lane == 0) tiles[0] = 0;
    int total = 0;  // b so far
    for (int base = 0; base < experts; base += 32) {
      const int e = base + lane;
      // round_up(count_e, row_tile), row_tile a power of two
      int v = e < experts ? (starts[e + 1] - starts[e] + row_tile - 1) & -row_tile : 0;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += other;
      }
      v += total;
      if (e < experts) tiles[e + 1] = v;
      total = __shfl_sync(0xffffffffu, v, 31);
    }
  }
  __syncthreads();
}

// The e in [0, last) with bounds[e] <= value < bounds[e + 1], given
// bounds[0] <= value < bounds[last] (non-decreasing bounds: the last such e,
// so an empty expert is never found).
__device__ __forceinline__ int find_expert(const int* bounds, int last, int value) {
  int low = 0, high = last;
  while (high - low > 1) {
    const int middle = (low + high) >> 1;
    if (bounds[middle] <= value) {
      low = middle;
    } else {
      high = middle;
    }
  }
  return low;
}

// grouped_row_map: the grouped experts' bookkeeping, once a call, so that the
// quantizing kernel needs no offsets, barriers or searches. A 1-D grid of
// thread blocks, each staging the offsets (stage_offsets), then:
// - block 0 writes b to blockscale_offsets;
// - token row t gets row_map[t] = (expert e, scale row b[e] + (t - o[e])),
//   or (-1, 0) for a row of no expert (a thread a row, grid-stride);
// - the padding scale rows are zeroed as whole bands of row_tile rows, which
//   every layout stores contiguously: the last tile of each expert whose
//   count is not a multiple of row_tile (its data rows too: quantize_grouped
//   writes those afterwards), and the rows from b[E] on. (Zeroing only the
//   padding rows, a few bytes of each 32-byte sector, ran at 150 GB/s on the
//   H200.)

// count bytes from `bytes` (a 16-byte-aligned tensor's), zeroed by the
// threads first, first + step, ...: 16-byte stores between the unaligned
// ends.
__device__ __forceinline__ void zero_bytes(u8* __restrict__ bytes, long long count, int first, int step) {
  const long long head = min((long long)((16 - ((unsigned long long)bytes & 15)) & 15), count);
  const long long pieces = (count - head) / 16;
  for (long long i = first; i < head; i += step) bytes[i] = 0;
  uint4* aligned = reinterpret_cast<uint4*>(bytes + head);
  for (long long i = first; i < pieces; i += step) aligned[i] = make_uint4(0u, 0u, 0u, 0u);
  for (long long i = head + pieces * 16 + first; i < count; i += step) bytes[i] = 0;
}

__global__ void __launch_bounds__(kThreadsPerBlock)
grouped_row_map(const int* __restrict__ expert_offsets, int2* __restrict__ row_map, u8* __restrict__ scales,
                int* __restrict__ blockscale_offsets, int m, int scale_rows, int scale_cols, int layout_id, int experts,
                int row_tile) {
  __shared__ int starts[kMaxExperts + 1];
  __shared__ int tiles[kMaxExperts + 1];
  stage_offsets(expert_offsets, experts, m, row_tile, starts, tiles);
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i <= experts; i += blockDim.x) blockscale_offsets[i] = tiles[i];
  }
  const int thread = blockIdx.x * blockDim.x + threadIdx.x;
  for (int t = thread; t < m; t += gridDim.x * blockDim.x) {
    int2 entry = make_int2(-1, 0);
    if (t >= starts[0] && t < starts[experts]) {
      const int expert = find_expert(starts, experts, t);
      entry = make_int2(expert, tiles[expert] + (t - starts[expert]));
    }
    row_map[t] = entry;
  }
  const RuntimeLayout layout{layout_id};
  for (int e = blockIdx.x; e < experts; e += gridDim.x) {
    if ((starts[e + 1] - starts[e]) % row_tile == 0) continue;  // no padding rows
    const long long begin = layout.row_offset(tiles[e + 1] - row_tile, scale_cols);
    zero_bytes(scales + begin, layout.row_offset(tiles[e + 1], scale_cols) - begin, threadIdx.x, blockDim.x);
  }
  const long long tail = layout.row_offset(tiles[experts], scale_cols);
  zero_bytes(scales + tail, (long long)scale_rows * scale_cols - tail, thread, gridDim.x * blockDim.x);
}

// Thread row t < m (the grid covers the token rows) quantizes x row t into
// packed row t and the scale row of its expert e, with e's global scale, as
// grouped_row_map found them; a row of no expert gets zero packed bytes.
template <typename Input, bool kMx, bool kSilu, int kPerThread>
__global__ void __launch_bounds__(kThreadsPerBlock)
quantize_grouped(const typename Input::raw_t* __restrict__ x, const float* __restrict__ global_scale_ptr,
                 float global_scale_value, const int2* __restrict__ row_map, uint2* __restrict__ packed,
                 u8* __restrict__ scales, int vector_loads, long long row_stride, int m, int n, int padded_n,
                 int scale_cols, int layout_id, int gs_expert_step) {
  typedef RowBlocks<Input, kMx, kSilu, kPerThread> Row;
  const RuntimeLayout layout{layout_id};
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int first_k = blockIdx.y * (blockDim.x * kPerThread) + threadIdx.x;
  if (row >= m) return;
  Row blocks;
  blocks.load(x + row * row_stride, n, first_k, vector_loads);  // in flight with the map's load
  const int2 entry = __ldg(row_map + row);
  uint2* packed_row = packed + (long long)row * (padded_n / kBlockSize);
  if (entry.x < 0) {
    Row::store_zeros(packed_row, nullptr, layout, first_k, padded_n, scale_cols);
    return;
  }
  const float gs = global_scale_ptr ? __ldg(global_scale_ptr + entry.x * gs_expert_step) : global_scale_value;
  blocks.combine();
  blocks.store(FormatOf<kMx>::make(gs), packed_row, scales + layout.row_offset(entry.y, scale_cols), layout, first_k,
               padded_n, scale_cols);
}

}  // namespace nvfp4
