// One pass over the float32 leaves of an SGLD step on CPU: the update, the
// sums of products behind the metrics, and the count sketch.
//
// sgld_optax/_src/cpu_kernel.py compiles this file with the system C++
// compiler the first time it is asked for, and calls it through XLA's FFI.
// Every element's noise is computed with the float32 operations of
// sgld_optax/_src/noise.py, in the same order and with the same multiply-adds
// as XLA's CPU code for them, so the noise is equal bit for bit to the XLA
// program's (tested). The update is the same formula; where XLA contracts a
// product and a sum into a multiply-add depends on which hyperparameters are
// compile-time constants, so the two agree to float32 rounding, not bitwise.
// Sums and sketches add the same terms in another order.
//
// One call takes all the float32 leaves of a step (of every chain, under
// jax.vmap), laid end to end and cut, chain by chain, into at most
// kMaxRanges ranges fixed by their sizes (and the sketch's);
// XLA's intra-op threads take ranges from a shared counter, and each range
// accumulates into its own partial sums and sketch, which are added in range
// order at the end: results do not depend on the number of threads or on
// which thread ran which range.

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>


#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The per-element functions must be inlined into the loops for them to
// vectorise, however many instances of the loops there are.
#define SGLD_INLINE inline __attribute__((always_inline))

namespace {

constexpr int64_t kBlock = 1024;      // elements per block (stays in L1)
constexpr int64_t kMinRange = 32768;  // elements per range, at least
constexpr int64_t kMaxRanges = 64;
constexpr int64_t kMinRanges = 16;  // the most when the sketch is large
// Bytes of per-range sketch buckets above which fewer ranges are used.
constexpr int64_t kSketchBudget = int64_t{4} << 20;
constexpr int64_t kMaxSketchDim = int64_t{1} << 16;

// Bits of the flags attribute.
enum : int64_t {
  kLocalization = 1,   // add the localization term
  kWeightDecay = 2,    // add the weight decay term
  kBox = 4,            // clamp to [w0 - b, w0 + b]
  kMask = 8,           // multiply every component by the mask
  kSums = 16,          // write the sums of products
  kSketch = 32,        // write the count sketches
  kInitial = 64,       // w0 is given (the displacement is a base vector)
};

// Sums of products of the masked base vectors: g (gradient), d (w - w0),
// w (weight) and e (noise).
enum { kGG, kDD, kEE, kGE, kGD, kDE, kWW, kGW, kWE, kNumSums };
// The sketch output is (k, kNumRows): each bucket holds the signed sums of
// g, d, w and e, in this order.
constexpr int64_t kNumRows = 4;
typedef float Quad __attribute__((vector_size(16)));

SGLD_INLINE uint32_t Rotl(uint32_t x, int d) {
  return (x << d) | (x >> (32 - d));
}

#define SGLD_ROUND(r) x0 += x1; x1 = Rotl(x1, r); x1 ^= x0;

// Threefry-2x32 with 20 rounds on the counter (0, i).
SGLD_INLINE void Threefry(uint32_t k0, uint32_t k1, uint32_t i, uint32_t& y0,
                     uint32_t& y1) {
  const uint32_t k2 = k0 ^ k1 ^ 0x1BD11BDAu;
  uint32_t x0 = k0, x1 = i + k1;
  SGLD_ROUND(13) SGLD_ROUND(15) SGLD_ROUND(26) SGLD_ROUND(6)
  x0 += k1; x1 += k2; x1 += 1u;
  SGLD_ROUND(17) SGLD_ROUND(29) SGLD_ROUND(16) SGLD_ROUND(24)
  x0 += k2; x1 += k0; x1 += 2u;
  SGLD_ROUND(13) SGLD_ROUND(15) SGLD_ROUND(26) SGLD_ROUND(6)
  x0 += k0; x1 += k1; x1 += 3u;
  SGLD_ROUND(17) SGLD_ROUND(29) SGLD_ROUND(16) SGLD_ROUND(24)
  x0 += k1; x1 += k2; x1 += 4u;
  SGLD_ROUND(13) SGLD_ROUND(15) SGLD_ROUND(26) SGLD_ROUND(6)
  x0 += k2; x1 += k0; x1 += 5u;
  y0 = x0;
  y1 = x1;
}

#undef SGLD_ROUND

SGLD_INLINE float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

SGLD_INLINE uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// a * b + c with one rounding where the target has fused multiply-adds
// (where LLVM, which generates XLA's CPU code, contracts them), two elsewhere.
SGLD_INLINE float Madd(float a, float b, float c) {
#if defined(__FP_FAST_FMAF)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The Box-Muller draw of noise.normal_from_words.
SGLD_INLINE float Normal(uint32_t y0, uint32_t y1) {
  const uint32_t x = y0 | 1u;
  const uint32_t zeros = static_cast<uint32_t>(__builtin_clz(x));
  const uint32_t mantissa = ((x << zeros) >> 8) & 0x7FFFFFu;
  const bool big = mantissa >= 0x3504F3u;
  const float m = BitsToFloat(mantissa | (big ? 0x3F000000u : 0x3F800000u));
  const float e = (big ? 1.0f : 0.0f) - static_cast<float>(zeros + 1u);
  const float t = m - 1.0f;
  float p = 0.08632376790046692f;
  p = Madd(p, t, -0.14196017384529114f);
  p = Madd(p, t, 0.14908719062805176f);
  p = Madd(p, t, -0.1658325046300888f);
  p = Madd(p, t, 0.1996299922466278f);
  p = Madd(p, t, -0.2500135600566864f);
  p = Madd(p, t, 0.33333998918533325f);
  p = Madd(p, t, -0.4999999403953552f);
  p = Madd(p, t, 1.0f);
  const float log_u = Madd(e, 0.6931471805599453f, t * p);
  const float radius = std::sqrt(-2.0f * log_u);
  const float v = static_cast<float>(y1 & 0x7FFFFFFFu) * 4.656612873077393e-10f;
  const float v2 = v * v;
  float c = -2.38830762100406e-05f;
  c = Madd(c, v2, 0.0009178587351925671f);
  c = Madd(c, v2, -0.020862795412540436f);
  c = Madd(c, v2, 0.2536693513393402f);
  c = Madd(c, v2, -1.2337005138397217f);
  c = Madd(c, v2, 1.0f);
  return BitsToFloat(FloatToBits(radius * c) ^ (y1 & 0x80000000u));
}

SGLD_INLINE uint32_t Fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// x / k for x < 2^31 and 0 < k <= 2^16 by a multiplication and a shift
// (Granlund & Montgomery, 1994), which vectorises, unlike integer division:
// with s = 31 + ceil(log2 k) and m = ceil(2^s / k) < 2^32, the quotient is
// floor(x m / 2^s) exactly.
struct Divisor {
  uint32_t m;
  int shift;
  explicit Divisor(uint32_t k) {
    int bits = 0;
    while ((uint64_t{1} << bits) < k) ++bits;
    shift = 31 + bits;
    m = static_cast<uint32_t>(((uint64_t{1} << shift) + k - 1) / k);
  }
};

// The count sketch's hash (sketch.py) of inputs first, ..., first + len - 1,
// and their signed values: offset[j] is the byte offset in the k 16-byte
// buckets of input first + j's bucket, and quad j holds its g, d, w and e
// with its sign (the sign bit flipped by an xor).
template <bool kPowerOfTwo>
void SignedQuads(uint32_t first, uint32_t salt1, uint32_t salt2, uint32_t k,
                 int len, const float* __restrict g, const float* __restrict d,
                 const float* __restrict w, const float* __restrict e,
                 uint32_t* __restrict offset, uint32_t* __restrict quads) {
  const Divisor div(k);
  const uint32_t m = div.m;
  const int shift = div.shift;
#pragma omp simd
  for (int j = 0; j < len; ++j) {
    const uint32_t i = first + static_cast<uint32_t>(j);
    const uint32_t x = Fmix32(Fmix32(i ^ salt1) + salt2);
    // Bucket from the low 31 bits, sign from the top bit.
    const uint32_t low = x & 0x7FFFFFFFu;
    uint32_t bucket;
    if (kPowerOfTwo) {
      bucket = low & (k - 1);
    } else {
      const uint32_t q =
          static_cast<uint32_t>((uint64_t{low} * uint64_t{m}) >> shift);
      bucket = low - q * k;
    }
    offset[j] = bucket * static_cast<uint32_t>(sizeof(Quad));
    const uint32_t sign = x & 0x80000000u;
    quads[4 * j] = FloatToBits(g[j]) ^ sign;
    quads[4 * j + 1] = FloatToBits(d[j]) ^ sign;
    quads[4 * j + 2] = FloatToBits(w[j]) ^ sign;
    quads[4 * j + 3] = FloatToBits(e[j]) ^ sign;
  }
}

// Adds quad j to the bucket at byte offset offset[j] of acc, for j < len:
// one 16-byte load, add and store per input. Two per iteration: the loop's
// own instructions are a good part of the cost (about 25% faster than one).
inline void AddQuads(Quad* acc, const uint32_t* __restrict offset,
                     const uint32_t* quads, int len) {
  char* base = reinterpret_cast<char*>(acc);
  const Quad* q = reinterpret_cast<const Quad*>(quads);
  int j = 0;
  for (; j + 2 <= len; j += 2) {
    *reinterpret_cast<Quad*>(base + offset[j]) += q[j];
    *reinterpret_cast<Quad*>(base + offset[j + 1]) += q[j + 1];
  }
  if (j < len) *reinterpret_cast<Quad*>(base + offset[j]) += q[j];
}

// The components of the update are these times the base vectors:
// a_g = lr nbeta / 2, a_loc = lr gamma / 2, a_wd = lr lambda / 2 and
// a_noise = sqrt(lr) sigma; box is the half-width of the bounding box.
struct Scalars {
  float grad, localization, weight_decay, noise, box;
};

// One float32 leaf of one chain: its buffers, its place among the job's
// leaves (start) and in the flattened params (offset, for the sketch's hash),
// its noise key and its chain's scalars.
struct Leaf {
  const float *w, *g, *w0, *mask;
  float* u;
  int64_t n, start, offset;
  uint32_t key0, key1;
  Scalars s;
};

// Elements [begin, end) of the job's leaves laid end to end; a range never
// spans two chains.
struct Range {
  int64_t begin, end;
};

struct Job;
using UpdateFn = void (*)(const Job&, const Leaf&, int64_t, int, float*,
                          float*, float*, float*);

struct Job {
  int64_t flags, k;
  uint32_t salt1, salt2;
  std::vector<Leaf> leaves;
  std::vector<Range> ranges;
  int64_t num_ranges;
  UpdateFn update;
  // Per range: kNumSums partial sums, and k x kNumRows sketch buckets.
  std::vector<double> sums;
  float* sketch = nullptr;  // num_ranges x k x kNumRows
};

// Scratch for the ranges' sketches, kept by each thread that runs the
// handler from one call to the next: allocating it afresh would map new
// pages, and fault them in, at every step.
float* SketchScratch(size_t count) {
  thread_local std::vector<float> scratch;
  if (scratch.size() < count) scratch.resize(count);
  std::fill_n(scratch.data(), count, 0.0f);
  return scratch.data();
}

// The update of elements [0, len) of a block, and (with kBases) the masked
// base vectors the sums and the sketch read. One instance per combination of
// terms, so that the loop has no branches and vectorises.
template <bool kHasMask, bool kLoc, bool kWd, bool kHasBox, bool kHasW0,
          bool kBases>
void UpdateBlock(const Job& job, const Leaf& leaf, int64_t begin, int len,
                 float* __restrict eta, float* __restrict dist,
                 float* __restrict gm, float* __restrict wm) {
  const Scalars s = leaf.s;
  const uint32_t key0 = leaf.key0, key1 = leaf.key1;
  const uint32_t first = static_cast<uint32_t>(begin);
  const float* __restrict w = leaf.w + begin;
  const float* __restrict g = leaf.g + begin;
  const float* __restrict w0 = kHasW0 ? leaf.w0 + begin : leaf.w + begin;
  const float* __restrict mask = kHasMask ? leaf.mask + begin : leaf.w + begin;
  float* __restrict u = leaf.u + begin;
#pragma omp simd
  for (int j = 0; j < len; ++j) {
    uint32_t y0, y1;
    Threefry(key0, key1, first + static_cast<uint32_t>(j), y0, y1);
    const float e = Normal(y0, y1);
    const float wj = w[j], gj = g[j];
    const float d = kHasW0 ? wj - w0[j] : 0.0f;
    const float mj = kHasMask ? mask[j] : 1.0f;
    // drift = a_g g + a_loc d + a_wd w and u = a_noise e - drift, each
    // masked, with a multiply-add wherever a product meets a sum.
    const float mg = kHasMask ? s.grad * gj : gj;
    const float md = kHasMask ? s.localization * d : d;
    const float mw = kHasMask ? s.weight_decay * wj : wj;
    const float cg = kHasMask ? mj : s.grad;
    const float cd = kHasMask ? mj : s.localization;
    const float cw = kHasMask ? mj : s.weight_decay;
    float drift;
    if (kLoc && kWd) {
      drift = Madd(cw, mw, Madd(cg, mg, cd * md));
    } else if (kLoc) {
      drift = Madd(cg, mg, cd * md);
    } else if (kWd) {
      drift = Madd(cg, mg, cw * mw);
    } else {
      drift = cg * mg;
    }
    float uj = kHasMask ? Madd(s.noise * e, mj, -drift)
                        : Madd(s.noise, e, -drift);
    if (kHasBox) {
      const float lo = w0[j] - s.box, hi = w0[j] + s.box;
      uj = std::min(std::max(wj + uj, lo), hi) - wj;
    }
    u[j] = uj;
    if (kBases) {
      eta[j] = kHasMask ? e * mj : e;
      dist[j] = kHasMask ? d * mj : d;
      gm[j] = kHasMask ? gj * mj : gj;
      wm[j] = kHasMask ? wj * mj : wj;
    }
  }
}

template <int kBits>
constexpr UpdateFn UpdateFor() {
  return &UpdateBlock<(kBits & 1) != 0, (kBits & 2) != 0, (kBits & 4) != 0,
                      (kBits & 8) != 0, (kBits & 16) != 0,
                      (kBits & 32) != 0>;
}

template <int... kBits>
constexpr auto MakeTable(std::integer_sequence<int, kBits...>) {
  return std::array<UpdateFn, sizeof...(kBits)>{UpdateFor<kBits>()...};
}

constexpr auto kUpdates = MakeTable(std::make_integer_sequence<int, 64>());

UpdateFn SelectUpdate(int64_t flags) {
  const int bits = ((flags & kMask) ? 1 : 0) |
                   ((flags & kLocalization) ? 2 : 0) |
                   ((flags & kWeightDecay) ? 4 : 0) | ((flags & kBox) ? 8 : 0) |
                   ((flags & kInitial) ? 16 : 0) |
                   ((flags & (kSums | kSketch)) ? 32 : 0);
  return kUpdates[bits];
}

// Elements [begin, end) of a leaf (at most one block): the update, and the
// range's sums and sketch.
void RunBlock(const Job& job, const Leaf& leaf, int64_t begin, int64_t end,
              double* sums, float* sketch) {
  const int64_t flags = job.flags;
  const int len = static_cast<int>(end - begin);
  alignas(64) float eta[kBlock], dist[kBlock], gm[kBlock], wm[kBlock];
  job.update(job, leaf, begin, len, eta, dist, gm, wm);
  if (flags & kSums) {
    float gg = 0, dd = 0, ee = 0, ge = 0, gd = 0, dE = 0, ww = 0, gw = 0,
          we = 0;
#pragma omp simd reduction(+ : gg, dd, ee, ge, gd, dE, ww, gw, we)
    for (int j = 0; j < len; ++j) {
      gg += gm[j] * gm[j];
      dd += dist[j] * dist[j];
      ee += eta[j] * eta[j];
      ge += gm[j] * eta[j];
      gd += gm[j] * dist[j];
      dE += dist[j] * eta[j];
      ww += wm[j] * wm[j];
      gw += gm[j] * wm[j];
      we += wm[j] * eta[j];
    }
    sums[kGG] += gg; sums[kDD] += dd; sums[kEE] += ee;
    sums[kGE] += ge; sums[kGD] += gd; sums[kDE] += dE;
    sums[kWW] += ww; sums[kGW] += gw; sums[kWE] += we;
  }
  if (flags & kSketch) {
    const uint32_t k = static_cast<uint32_t>(job.k);
    const uint32_t first = static_cast<uint32_t>(leaf.offset + begin);
    const uint32_t salt1 = job.salt1, salt2 = job.salt2;
    alignas(64) uint32_t offset[kBlock], quads[kNumRows * kBlock];
    if ((k & (k - 1)) == 0) {
      SignedQuads<true>(first, salt1, salt2, k, len, gm, dist, wm, eta,
                        offset, quads);
    } else {
      SignedQuads<false>(first, salt1, salt2, k, len, gm, dist, wm, eta,
                         offset, quads);
    }
    AddQuads(reinterpret_cast<Quad*>(sketch), offset, quads, len);
  }
}

// Range r of the job.
void RunRange(Job& job, int64_t r) {
  const int64_t begin = job.ranges[r].begin, end = job.ranges[r].end;
  double* sums = job.sums.data() + r * kNumSums;
  float* sketch = (job.flags & kSketch)
                      ? job.sketch + r * kNumRows * job.k
                      : nullptr;
  // The last leaf starting at or before `begin`.
  auto it = std::upper_bound(
      job.leaves.begin(), job.leaves.end(), begin,
      [](int64_t x, const Leaf& leaf) { return x < leaf.start; });
  for (--it; it != job.leaves.end() && it->start < end; ++it) {
    const int64_t lo = std::max(begin, it->start) - it->start;
    const int64_t hi = std::min(end, it->start + it->n) - it->start;
    for (int64_t b = lo; b < hi; b += kBlock) {
      RunBlock(job, *it, b, std::min(hi, b + kBlock), sums, sketch);
    }
  }
}

// Ranges handed out to whichever thread asks next; shared with the helper
// tasks, which may start after the call has returned.
struct Work {
  Job job;
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mu;
  std::condition_variable cv;

  void Drain() {
    int64_t finished = 0;
    for (int64_t r; (r = next.fetch_add(1)) < job.num_ranges;) {
      RunRange(job, r);
      ++finished;
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(mu);
      done += finished;
      if (done == job.num_ranges) cv.notify_all();
    }
  }
};

// Under jax.vmap (vmap_method="expand_dims") every operand comes with the
// batch dimensions in front, of size 1 where it is not batched, and the
// outputs with all of them: each index into them is one chain, and the chains
// are stepped in one call. Batch dimensions of an operand, and the element
// stride of each, against the outputs' batch shape; false if they do not
// broadcast.
bool BatchStrides(ffi::Span<const int64_t> dims, int64_t own_rank,
                  const std::vector<int64_t>& batch,
                  std::vector<int64_t>* strides) {
  const int64_t rank = static_cast<int64_t>(dims.size());
  const int64_t nb = static_cast<int64_t>(batch.size());
  if (rank != nb + own_rank) return false;
  strides->assign(nb, 0);
  int64_t stride = 1;
  for (int64_t d = rank - 1; d >= 0; --d) {
    if (d < nb) {
      if (dims[d] != batch[d] && dims[d] != 1) return false;
      (*strides)[d] = dims[d] == 1 ? 0 : stride;
    }
    stride *= dims[d];
  }
  return true;
}

// Element offset of chain `chain` (row-major over the batch shape) in an
// operand with these batch strides.
int64_t ChainOffset(int64_t chain, const std::vector<int64_t>& batch,
                    const std::vector<int64_t>& strides) {
  int64_t offset = 0;
  for (int64_t d = static_cast<int64_t>(batch.size()) - 1; d >= 0; --d) {
    offset += (chain % batch[d]) * strides[d];
    chain /= batch[d];
  }
  return offset;
}

ffi::Error Step(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> keys,
                ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs leaf_args,
                ffi::ResultBuffer<ffi::F32> sums,
                ffi::ResultBuffer<ffi::F32> sketch,
                ffi::RemainingRets updates, int64_t flags, int64_t sketch_dim,
                ffi::Span<const int64_t> offsets,
                ffi::Span<const int64_t> ranks, int64_t salt1,
                int64_t salt2) {
  const size_t num_leaves = offsets.size();
  const size_t per_leaf =
      2 + ((flags & kInitial) ? 1 : 0) + ((flags & kMask) ? 1 : 0);
  if (leaf_args.size() != per_leaf * num_leaves ||
      updates.size() != num_leaves || ranks.size() != num_leaves) {
    return ffi::Error::InvalidArgument(
        "expected w, g[, w0][, mask], a rank and an update per leaf");
  }
  // The chains: the batch dimensions of the sums.
  const auto sum_dims = sums->dimensions();
  if (sum_dims.size() == 0 || sum_dims.back() != kNumSums) {
    return ffi::Error::InvalidArgument("bad sums shape");
  }
  const std::vector<int64_t> batch(sum_dims.begin(), sum_dims.end() - 1);
  int64_t num_chains = 1;
  for (const int64_t b : batch) num_chains *= b;
  if (num_chains == 0) return ffi::Error::Success();
  std::vector<int64_t> key_strides, scalar_strides;
  if (!BatchStrides(keys.dimensions(), 2, batch, &key_strides) ||
      keys.dimensions().back() != 2 ||
      keys.dimensions()[batch.size()] != static_cast<int64_t>(num_leaves) ||
      !BatchStrides(scalars.dimensions(), 1, batch, &scalar_strides) ||
      scalars.dimensions().back() != 5) {
    return ffi::Error::InvalidArgument("bad keys or scalars shape");
  }
  if ((flags & kSketch) &&
      (sketch_dim < 1 || sketch_dim > kMaxSketchDim ||
       sketch->element_count() !=
           static_cast<size_t>(num_chains * kNumRows * sketch_dim))) {
    return ffi::Error::InvalidArgument("bad sketch shape");
  }

  // Each leaf's buffers and their batch strides.
  struct Operand {
    const float* data;
    std::vector<int64_t> strides;
  };
  struct LeafOperands {
    Operand w, g, w0, mask;
    float* u;
    int64_t n;
  };
  std::vector<LeafOperands> operands(num_leaves);
  int64_t n = 0;  // elements per chain
  for (size_t i = 0; i < num_leaves; ++i) {
    size_t a = per_leaf * i;
    LeafOperands& op = operands[i];
    auto u = updates.get<ffi::Buffer<ffi::F32>>(i);
    if (!u.has_value()) {
      return ffi::Error::InvalidArgument("updates must be float32");
    }
    const auto u_dims = (*u)->dimensions();
    if (static_cast<int64_t>(u_dims.size()) !=
        static_cast<int64_t>(batch.size()) + ranks[i]) {
      return ffi::Error::InvalidArgument("bad update shape");
    }
    op.u = (*u)->typed_data();
    op.n = static_cast<int64_t>((*u)->element_count()) / num_chains;
    Operand* inputs[4] = {&op.w, &op.g, &op.w0, &op.mask};
    const bool present[4] = {true, true, (flags & kInitial) != 0,
                             (flags & kMask) != 0};
    for (int j = 0; j < 4; ++j) {
      if (!present[j]) {
        inputs[j]->data = nullptr;
        continue;
      }
      auto x = leaf_args.get<ffi::Buffer<ffi::F32>>(a++);
      if (!x.has_value()) {
        return ffi::Error::InvalidArgument("leaf buffers must be float32");
      }
      const auto dims = x->dimensions();
      if (!BatchStrides(dims, ranks[i], batch, &inputs[j]->strides) ||
          !std::equal(dims.end() - ranks[i], dims.end(),
                      u_dims.end() - ranks[i])) {
        return ffi::Error::InvalidArgument(
            "w, g, w0, mask and the update of a leaf must have one shape");
      }
      inputs[j]->data = x->typed_data();
    }
    n += op.n;
  }

  // Many small ranges balance the threads' work best; each range keeps its
  // own sketch, so a large sketch gets fewer of them. A chain's ranges do not
  // depend on the number of chains, so neither do its sums and sketch.
  int64_t max_ranges = kMaxRanges;
  if (flags & kSketch) {
    max_ranges = std::clamp<int64_t>(
        kSketchBudget / (kNumRows * 4 * sketch_dim), kMinRanges, kMaxRanges);
  }
  const int64_t chain_ranges = std::max<int64_t>(
      1, std::min<int64_t>(max_ranges, (n + kMinRange - 1) / kMinRange));
  const int64_t range_size =
      std::max<int64_t>(1, (n + chain_ranges - 1) / chain_ranges);
  // Chains per call of the threads: as many as the sketch budget allows.
  int64_t wave = num_chains;
  if (flags & kSketch) {
    wave = std::clamp<int64_t>(
        kSketchBudget / (chain_ranges * kNumRows * 4 * sketch_dim), 1,
        num_chains);
  }
  const UpdateFn update = SelectUpdate(flags);
  const float* sc = scalars.typed_data();
  const uint32_t* kw = keys.typed_data();
  float* out_sums = sums->typed_data();
  float* out_sketch = (flags & kSketch) ? sketch->typed_data() : nullptr;
  const int64_t sketch_size = kNumRows * sketch_dim;

  for (int64_t first = 0; first < num_chains; first += wave) {
    const int64_t last = std::min(num_chains, first + wave);
    auto work = std::make_shared<Work>();
    Job& job = work->job;
    job.flags = flags;
    job.k = sketch_dim;
    job.salt1 = static_cast<uint32_t>(salt1);
    job.salt2 = static_cast<uint32_t>(salt2);
    job.update = update;
    int64_t start = 0;
    for (int64_t c = first; c < last; ++c) {
      const float* s = sc + ChainOffset(c, batch, scalar_strides);
      const uint32_t* key = kw + ChainOffset(c, batch, key_strides);
      const int64_t chain_start = start;
      for (size_t i = 0; i < num_leaves; ++i) {
        const LeafOperands& op = operands[i];
        auto at = [&](const Operand& x) {
          return x.data ? x.data + ChainOffset(c, batch, x.strides) : nullptr;
        };
        Leaf leaf{};
        leaf.w = at(op.w);
        leaf.g = at(op.g);
        leaf.w0 = at(op.w0);
        leaf.mask = at(op.mask);
        leaf.u = op.u + c * op.n;
        leaf.n = op.n;
        leaf.start = start;
        leaf.offset = offsets[i];
        leaf.key0 = key[2 * i];
        leaf.key1 = key[2 * i + 1];
        leaf.s = Scalars{s[0], s[1], s[2], s[3], s[4]};
        start += op.n;
        if (leaf.n > 0) job.leaves.push_back(leaf);
      }
      for (int64_t b = 0; b < n; b += range_size) {
        job.ranges.push_back(
            Range{chain_start + b, chain_start + std::min(n, b + range_size)});
      }
      if (n == 0) job.ranges.push_back(Range{chain_start, chain_start});
    }
    job.num_ranges = static_cast<int64_t>(job.ranges.size());
    job.sums.assign(job.num_ranges * kNumSums, 0.0);
    if (flags & kSketch) {
      job.sketch = SketchScratch(job.num_ranges * sketch_size);
    }
    if (start > 0) {
      // The calling thread works too: with XLA's threads as many as the
      // cores, one fewer helper keeps every core busy without
      // oversubscribing them.
      const int64_t helpers = std::min<int64_t>(
          std::max<int64_t>(pool.num_threads() - 1, 0), job.num_ranges - 1);
      for (int64_t h = 0; h < helpers; ++h) {
        pool.Schedule([work] { work->Drain(); });
      }
      work->Drain();
      std::unique_lock<std::mutex> lock(work->mu);
      work->cv.wait(lock, [&] { return work->done == job.num_ranges; });
    }
    // Each chain's ranges, added in order.
    const int64_t per_chain = job.num_ranges / (last - first);
    for (int64_t c = first; c < last; ++c) {
      const int64_t r0 = (c - first) * per_chain;
      for (int q = 0; q < kNumSums; ++q) {
        double total = 0.0;
        for (int64_t r = r0; r < r0 + per_chain; ++r) {
          total += job.sums[r * kNumSums + q];
        }
        out_sums[c * kNumSums + q] = static_cast<float>(total);
      }
      if (flags & kSketch) {
        float* dst = out_sketch + c * sketch_size;
        std::memset(dst, 0, sketch_size * sizeof(float));
        for (int64_t r = r0; r < r0 + per_chain; ++r) {
          const float* part = job.sketch + r * sketch_size;
          for (int64_t i = 0; i < sketch_size; ++i) dst[i] += part[i];
        }
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SgldOptaxCpuStep, Step,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // keys (L, 2)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scalars
                                  // w, g[, w0][, mask] of each leaf
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sums
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sketch
                                  .RemainingRets()  // the update of each leaf
                                  .Attr<int64_t>("flags")
                                  .Attr<int64_t>("sketch_dim")
                                  .Attr<ffi::Span<const int64_t>>("offsets")
                                  .Attr<ffi::Span<const int64_t>>("ranks")
                                  .Attr<int64_t>("salt1")
                                  .Attr<int64_t>("salt2"));
