// The global scale from the data: 448 * 6 / amax(|x|) (numerics "ieee" or
// "te", which differ at amax 0 and inf), over the whole tensor or per row, in
// one launch, so that quantization needs no host sync and
// quantize() of a large x is two launches (a small one is one: quantize.cu).
//
// Work: x is `rows` rows of `n` values (`row_stride` apart; a contiguous
// tensor reduced whole arrives as one row). Each row is cut into `segments`
// ranges of `segment` values, and an item is one (row, range). Groups of
// `lanes_per_item` lanes (a power of two: 32, or fewer for short rows) take
// items in a grid-stride loop over a grid of a few thread blocks per SM. A
// lane issues kLoadsPerStep independent 16-byte loads (128 bytes) before it
// uses any, and folds each 16 values with the exact, NaN-propagating
// Input::abs_max_bits of numerics.cuh (float32 bits: for non-negative floats,
// and NaN above infinity, integer order is float order).
//
// Finishing without a second launch or a memset:
// - whole tensor: each thread block folds its lanes (warp reduce, then one
//   shared array), then does one atomicMax into workspace[0] and, after a
//   fence, one atomicAdd on the counter workspace[1]. The block that counts
//   last converts the accumulated amax into the scale, writes result[0] and
//   sets both words back to zero. A grid of one block writes directly.
// - per row: a row that is one item is finished by its group (no atomics).
//   A row split into several items (few long rows) uses workspace[2 + 2r]
//   and workspace[3 + 2r] the same way, and the item that counts last
//   finishes the row.
// The workspace is therefore zero at rest: the launcher zeroes it once, when
// it creates it, and never again.
#include "numerics.cuh"

namespace nvfp4 {

// Per lane and loop step: this many 16-byte loads, all issued before any is
// used (ops/global_scale.py reads this constant).
constexpr int kLoadsPerStep = 8;
// __launch_bounds__' minimum: this many thread blocks fit an SM at once, and
// the launcher's grid (SMs * kBlocksPerSM at most) is resident in one wave
// (ops/global_scale.py reads this constant).
constexpr int kBlocksPerSM = 4;
constexpr int kWarpsPerBlock = kThreadsPerBlock / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// amax bits of row[begin, end), this lane's share: lane `rank` of a group of
// `width` reads values begin + rank + width * j, 16 a step. Element loads,
// any alignment: the path of misaligned inputs and of a row's last values.
// (More loads a step than 16 spill under __launch_bounds__ on sm_100/120.)
template <typename Input>
__device__ __forceinline__ u32 amax_elements(const typename Input::raw_t* __restrict__ row, long long begin,
                                             long long end, int rank, int width) {
  typedef typename Input::raw_t raw_t;
  u32 amax = 0;
  for (long long base = begin + rank; base < end; base += (long long)width * kBlockSize) {
    const raw_t* p = row + base;
    const long long left = end - base;
    constexpr int kPerWord = 4 / sizeof(raw_t);
    u32 words[kBlockSize / kPerWord];
#pragma unroll
    for (int w = 0; w < kBlockSize / kPerWord; ++w) {
      u32 word = 0;
#pragma unroll
      for (int h = 0; h < kPerWord; ++h) {
        const int k = width * (w * kPerWord + h);
        if (k < left) word |= (u32)__ldg(p + k) << (16 * h);  // +0 beyond the range
      }
      words[w] = word;
    }
    amax = max(amax, Input::abs_max_bits(words));
  }
  return amax;
}

// One step of amax_vectors: kLoadsPerStep vectors from `first`, `width` apart.
template <typename Input, bool kGuard>
__device__ __forceinline__ u32 amax_vector_step(const uint4* __restrict__ vectors, long long first, long long last,
                                                int width) {
  constexpr int kVectorsPerBlock = sizeof(typename Input::raw_t);  // 16 values: 2 vectors (16-bit), 4 (fp32)
  uint4 loaded[kLoadsPerStep];
#pragma unroll
  for (int u = 0; u < kLoadsPerStep; ++u) {
    const long long i = first + (long long)width * u;
    loaded[u] = (!kGuard || i < last) ? __ldg(vectors + i) : make_uint4(0u, 0u, 0u, 0u);
  }
  u32 amax = 0;
#pragma unroll
  for (int b = 0; b < kLoadsPerStep / kVectorsPerBlock; ++b) {
    u32 words[4 * kVectorsPerBlock];
#pragma unroll
    for (int q = 0; q < kVectorsPerBlock; ++q) {
      const uint4 v = loaded[b * kVectorsPerBlock + q];
      words[4 * q + 0] = v.x;
      words[4 * q + 1] = v.y;
      words[4 * q + 2] = v.z;
      words[4 * q + 3] = v.w;
    }
    amax = max(amax, Input::abs_max_bits(words));
  }
  return amax;
}

// As amax_elements, with 16-byte loads: the launcher guarantees that `row`
// is 16-byte aligned and `begin` a whole number of vectors. Values past the
// last whole vector (a row's tail) are read one by one.
template <typename Input>
__device__ __forceinline__ u32 amax_vectors(const typename Input::raw_t* __restrict__ row, long long begin,
                                            long long end, int rank, int width) {
  constexpr int kPerVector = 16 / sizeof(typename Input::raw_t);
  const uint4* vectors = reinterpret_cast<const uint4*>(row);
  const long long last = end / kPerVector;  // whole vectors: [begin / kPerVector, last)
  const long long stride = (long long)width * kLoadsPerStep;
  long long first = begin / kPerVector + rank;
  u32 amax = 0;
  for (; first + stride - width < last; first += stride) {
    amax = max(amax, amax_vector_step<Input, false>(vectors, first, last, width));
  }
  if (first < last) amax = max(amax, amax_vector_step<Input, true>(vectors, first, last, width));
  if (last * kPerVector < end) amax = max(amax, amax_elements<Input>(row, last * kPerVector, end, rank, width));
  return amax;
}

// max over each aligned group of `width` lanes, in every lane of it. All 32
// lanes must take part.
__device__ __forceinline__ u32 group_max(u32 value, int width) {
  if (width == 32) return __reduce_max_sync(kFullMask, value);
  for (int offset = width >> 1; offset > 0; offset >>= 1) value = max(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// The amax -> scale step of each numerics, the kernel's last template
// argument: "ieee" (docs/format.md, section 7) or "te" (docs/te_numerics.md,
// section 3). Both are numerics.cuh's.
struct IeeeScaleFromAmax {
  __device__ static float scale(u32 amax) { return global_scale_from_amax(amax); }
};
struct TeScaleFromAmax {
  __device__ static float scale(u32 amax) { return global_scale_from_amax_te(amax); }
};
// Four Over Six's error step needs the amax A itself (docs/te_rht_and_4over6.md, B.2).
struct AmaxItself {
  __device__ static float scale(u32 amax) { return __uint_as_float(amax); }
};

// After this thread's atomicMax into accumulator[0]: count it in
// accumulator[1]; the thread that counts `arrivals` finishes, writing the
// scale and setting both words back to zero.
template <typename FromAmax>
__device__ __forceinline__ void arrive(u32* accumulator, u32 arrivals, float* out) {
  __threadfence();  // our atomicMax before our count
  if (atomicAdd(accumulator + 1, 1u) != arrivals - 1) return;
  __threadfence();  // every count (and so every atomicMax) before our read
  const u32 amax = atomicExch(accumulator, 0u);
  atomicExch(accumulator + 1, 0u);
  *out = FromAmax::scale(amax);
}

template <typename Input, bool kVectorLoads, typename FromAmax = IeeeScaleFromAmax>
__global__ void __launch_bounds__(kThreadsPerBlock, kBlocksPerSM)
global_scale(const typename Input::raw_t* __restrict__ x, u32* __restrict__ workspace, float* __restrict__ result,
             long long row_stride, int rows, long long n, long long segment, int segments, int lanes_per_item,
             int per_row) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int rank = lane & (lanes_per_item - 1);
  const u32 items_per_warp = 32 / lanes_per_item;
  const u32 items = (u32)rows * (u32)segments;  // < 2^31: the launcher sees to it
  const u32 stride = gridDim.x * kWarpsPerBlock * items_per_warp;
  u32 amax = 0;  // whole tensor: this lane's running max
  // Warp-uniform loop: every lane reaches group_max.
  for (u32 base = (blockIdx.x * kWarpsPerBlock + warp) * items_per_warp; base < items; base += stride) {
    const u32 item = base + lane / lanes_per_item;
    const int row = (int)(item / (u32)segments);
    u32 item_amax = 0;
    if (item < items) {
      const long long begin = (long long)(item - (u32)row * (u32)segments) * segment;
      const long long end = min(begin + segment, n);
      const typename Input::raw_t* row_ptr = x + (long long)row * row_stride;
      item_amax = kVectorLoads ? amax_vectors<Input>(row_ptr, begin, end, rank, lanes_per_item)
                               : amax_elements<Input>(row_ptr, begin, end, rank, lanes_per_item);
    }
    if (!per_row) {
      amax = max(amax, item_amax);
      continue;
    }
    item_amax = group_max(item_amax, lanes_per_item);
    if (rank != 0 || item >= items) continue;
    if (segments == 1) {
      result[row] = FromAmax::scale(item_amax);
    } else {
      u32* accumulator = workspace + 2 + 2 * row;
      if (item_amax) atomicMax(accumulator, item_amax);
      arrive<FromAmax>(accumulator, segments, result + row);
    }
  }
  if (per_row) return;

  __shared__ u32 warp_amax[kWarpsPerBlock];
  amax = __reduce_max_sync(kFullMask, amax);
  if (lane == 0) warp_amax[warp] = amax;
  __syncthreads();
  if (threadIdx.x != 0) return;
#pragma unroll
  for (int w = 1; w < kWarpsPerBlock; ++w) amax = max(amax, warp_amax[w]);
  if (gridDim.x == 1) {
    result[0] = FromAmax::scale(amax);
    return;
  }
  if (amax) atomicMax(workspace, amax);
  arrive<FromAmax>(workspace, gridDim.x, result);
}

}  // namespace nvfp4
