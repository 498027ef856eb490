// CPU hot path of the aggregation engine: G = J J^T and out = w^T J.
//
// J is given as K row pointers (rows need not be adjacent: a K x N tensor with any row stride, or K
// separate flat tensors), so nothing is stacked first. Both passes stream J once, in column chunks
// small enough that the K rows of a chunk stay in L1 while every pair of rows is reduced. Chunk sums
// are accumulated in float lanes and folded into double per chunk (fp32 accumulation over at most a
// few hundred elements per lane, double across chunks), so the Gram matrix is accurate to well below
// fp32 rounding of the inputs, and squares of large finite fp32 values cannot overflow.
//
// Hot loops are compiled several times (AVX-512, AVX2, baseline) and the best clone for the running
// CPU is picked at load time, so the extension stays portable without -march=native.
//
// The Python side (tolaria/aggregation/backends/cpu.py) validates dtypes, devices, contiguity and
// lengths before calling in; this file trusts its arguments.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

namespace py = pybind11;

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TOLARIA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TOLARIA_CLONES
#endif

#define TOLARIA_INLINE inline __attribute__((always_inline))

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

constexpr int kLanes = 16;  // one AVX-512 register of floats; split in two or four on narrower CPUs
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef double vdouble __attribute__((vector_size(8 * sizeof(double))));

// ---- element conversion -------------------------------------------------------------------------

TOLARIA_INLINE float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The bfloat16 bits (in the low 16 bits) of float bits: round to nearest even, as torch's float ->
// bfloat16 conversion does; NaN stays a quiet NaN. U is uint32_t or a vector of them (vu32).
template <typename U>
TOLARIA_INLINE U bf16_bits(U bits) {
  const U rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return ((bits & 0x7fffffffu) > 0x7f800000u) ? ((bits >> 16) | 0x40u) : rounded;
}

TOLARIA_INLINE uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>(bf16_bits(bits));
}

typedef uint16_t vu16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t vu32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef _Float16 vhalf __attribute__((vector_size(kLanes * sizeof(_Float16))));

// Loads kLanes elements of a row as floats, converting whole vectors (bf16: a widening shift;
// fp16: the hardware conversion where the CPU has one).
template <DType D>
TOLARIA_INLINE vfloat load_lanes(const void* row, int64_t col) {
  vfloat v;
  if constexpr (D == DType::kFloat32) {
    std::memcpy(&v, static_cast<const float*>(row) + col, sizeof v);
  } else if constexpr (D == DType::kBFloat16) {
    vu16 h;
    std::memcpy(&h, static_cast<const uint16_t*>(row) + col, sizeof h);
    const vu32 bits = __builtin_convertvector(h, vu32) << 16;
    std::memcpy(&v, &bits, sizeof v);
  } else if constexpr (D == DType::kFloat16) {
    vhalf h;
    std::memcpy(&h, static_cast<const _Float16*>(row) + col, sizeof h);
    v = __builtin_convertvector(h, vfloat);
  }
  return v;
}

template <DType D>
TOLARIA_INLINE float load_one(const void* row, int64_t col) {
  if constexpr (D == DType::kFloat32) return static_cast<const float*>(row)[col];
  if constexpr (D == DType::kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(row)[col]);
  if constexpr (D == DType::kFloat16) return static_cast<float>(static_cast<const _Float16*>(row)[col]);
  return 0.0f;
}

template <DType D>
TOLARIA_INLINE void store_one(void* row, int64_t col, float value) {
  if constexpr (D == DType::kFloat32) static_cast<float*>(row)[col] = value;
  if constexpr (D == DType::kBFloat16) static_cast<uint16_t*>(row)[col] = float_to_bf16(value);
  if constexpr (D == DType::kFloat16) static_cast<_Float16*>(row)[col] = static_cast<_Float16>(value);
}

TOLARIA_INLINE double hsum(vdouble v) {
  double s = 0.0;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// ---- Gram ---------------------------------------------------------------------------------------
//
// Fast path (float32 accumulation): rows are reduced in chunks of a few cache lines, so the K rows of
// a chunk stay in L1 while every pair is reduced; pairs are handled in 4 x 4 tiles of rows (eight
// loads feed sixteen independent FMA chains, so the loop is bound by FMAs, not loads: K = 16 went
// from 25 to 13 ms at N = 4e6 against one row times four); per-pair accumulators stay in vector lanes
// across a super-chunk and are folded into double once per super-chunk, so the horizontal sums cost
// nothing and no lane accumulates more than a few hundred products.
//
// Wide path (double accumulation): used for float64 input, and to re-run a float32-accumulated Gram
// whose diagonal came out non-finite, which tells a real NaN/inf in the input (still non-finite) from
// an fp32 overflow of a huge finite input (finite in double). If every diagonal partial sum is finite
// in float32, Cauchy-Schwarz bounds every off-diagonal one, so the fast path never overflows silently.

// Columns per chunk for the fast path. Short chunks also sidestep L1 set conflicts between rows whose
// addresses differ by a multiple of 4 KiB (the usual K x N layout).
TOLARIA_INLINE int64_t fast_chunk_columns(int64_t k) {
  return std::clamp<int64_t>((16384 / std::max<int64_t>(k, 1)) / kLanes * kLanes, 2 * kLanes, 16 * kLanes);
}
constexpr int64_t kSuperChunk = 4096;  // columns per lane-accumulation window (256 products per lane)

TOLARIA_INLINE vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

TOLARIA_INLINE void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// Lane accumulators live in plain float storage (kLanes floats per pair, loaded and stored unaligned):
// std::vector of an over-aligned vector type is not reliably aligned across the target clones.
//
// One tile of the Gram matrix: rows i0..i0+BI-1 against rows j0..j0+BJ-1. Every loaded vector
// feeds BI or BJ products, so a 4 x 4 tile needs half a load per FMA (one row against four needs
// 1.25), and its 16 accumulators stay in registers across the chunk.
template <int BI, int BJ>
TOLARIA_INLINE void gram_tile(const float* const* x, int64_t i0, int64_t j0, int64_t k, int64_t len,
                              float* va) {
  auto slot = [&](int64_t i, int64_t j) { return va + (i * k + j) * kLanes; };
  vfloat acc[BI][BJ];
#pragma GCC unroll 4
  for (int a = 0; a < BI; ++a) {
#pragma GCC unroll 4
    for (int b = 0; b < BJ; ++b) acc[a][b] = vload(slot(i0 + a, j0 + b));
  }
  for (int64_t c = 0; c < len; c += kLanes) {
    vfloat xv[BI], yv[BJ];
#pragma GCC unroll 4
    for (int a = 0; a < BI; ++a) xv[a] = vload(x[i0 + a] + c);
#pragma GCC unroll 4
    for (int b = 0; b < BJ; ++b) yv[b] = vload(x[j0 + b] + c);
#pragma GCC unroll 4
    for (int a = 0; a < BI; ++a) {
#pragma GCC unroll 4
      for (int b = 0; b < BJ; ++b) acc[a][b] += xv[a] * yv[b];
    }
  }
#pragma GCC unroll 4
  for (int a = 0; a < BI; ++a) {
#pragma GCC unroll 4
    for (int b = 0; b < BJ; ++b) vstore(slot(i0 + a, j0 + b), acc[a][b]);
  }
}

template <int BI>
TOLARIA_INLINE void gram_tile_rows(const float* const* x, int64_t i0, int64_t j0, int bj, int64_t k,
                                   int64_t len, float* va) {
  switch (bj) {
    case 1: gram_tile<BI, 1>(x, i0, j0, k, len, va); break;
    case 2: gram_tile<BI, 2>(x, i0, j0, k, len, va); break;
    case 3: gram_tile<BI, 3>(x, i0, j0, k, len, va); break;
    default: gram_tile<BI, 4>(x, i0, j0, k, len, va); break;
  }
}

// va[i * k + j] += sum over the chunk of x_i * x_j, lane-wise, for j <= i (tiles on the diagonal
// also fill some j > i: other entries of the same symmetric matrix, never read). len is a multiple
// of kLanes.
TOLARIA_INLINE void gram_chunk_f32(const float* const* x, int64_t k, int64_t len, float* va) {
  for (int64_t i0 = 0; i0 < k; i0 += 4) {
    const int bi = static_cast<int>(std::min<int64_t>(4, k - i0));
    for (int64_t j0 = 0; j0 <= i0; j0 += 4) {
      const int bj = static_cast<int>(std::min<int64_t>(4, k - j0));
      switch (bi) {
        case 1: gram_tile_rows<1>(x, i0, j0, bj, k, len, va); break;
        case 2: gram_tile_rows<2>(x, i0, j0, bj, k, len, va); break;
        case 3: gram_tile_rows<3>(x, i0, j0, bj, k, len, va); break;
        default: gram_tile_rows<4>(x, i0, j0, bj, k, len, va); break;
      }
    }
  }
}

template <DType D>
TOLARIA_INLINE void gram_range_fast(const void* const* rows, int64_t k, int64_t begin, int64_t end,
                                    double* acc) {
  const int64_t chunk = fast_chunk_columns(k);
  std::vector<float> va(static_cast<size_t>(k * k * kLanes));
  std::vector<float> scratch(D == DType::kFloat32 ? 0 : static_cast<size_t>(k * chunk));
  std::vector<const float*> x(static_cast<size_t>(k));
  // Whole vectors only; the ragged tail (< kLanes columns) is added in double below.
  const int64_t vec_end = begin + (end - begin) / kLanes * kLanes;
  for (int64_t s0 = begin; s0 < vec_end; s0 += kSuperChunk) {
    const int64_t s1 = std::min(vec_end, s0 + kSuperChunk);
    std::fill(va.begin(), va.end(), 0.0f);
    for (int64_t c0 = s0; c0 < s1; c0 += chunk) {
      const int64_t len = std::min(chunk, s1 - c0);
      for (int64_t i = 0; i < k; ++i) {
        if constexpr (D == DType::kFloat32) {
          x[i] = static_cast<const float*>(rows[i]) + c0;
        } else {
          float* dst = scratch.data() + i * chunk;
          for (int64_t c = 0; c < len; c += kLanes) vstore(dst + c, load_lanes<D>(rows[i], c0 + c));
          x[i] = dst;
        }
      }
      gram_chunk_f32(x.data(), k, len, va.data());
    }
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j <= i; ++j) {
        double sum = 0.0;
        for (int l = 0; l < kLanes; ++l) sum += va[(i * k + j) * kLanes + l];
        acc[i * k + j] += sum;
      }
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double sum = 0.0;
      for (int64_t c = vec_end; c < end; ++c) {
        sum += static_cast<double>(load_one<D>(rows[i], c)) * load_one<D>(rows[j], c);
      }
      acc[i * k + j] += sum;
    }
  }
}

template <DType D>
TOLARIA_INLINE double load_double(const void* row, int64_t col) {
  if constexpr (D == DType::kFloat64) return static_cast<const double*>(row)[col];
  return static_cast<double>(load_one<D>(row, col));
}

// Columns per chunk for the wide path: K rows of doubles in about 24 KiB of L1.
TOLARIA_INLINE int64_t wide_chunk_columns(int64_t k) {
  return std::clamp<int64_t>((3072 / std::max<int64_t>(k, 1)) / 8 * 8, 32, 2048);
}

template <DType D>
TOLARIA_INLINE void gram_range_wide(const void* const* rows, int64_t k, int64_t begin, int64_t end,
                                    double* acc) {
  const int64_t chunk = wide_chunk_columns(k);
  std::vector<double> scratch(static_cast<size_t>(k * chunk));
  for (int64_t c0 = begin; c0 < end; c0 += chunk) {
    const int64_t len = std::min(chunk, end - c0);
    const int64_t vec_len = (len / 8) * 8;
    for (int64_t i = 0; i < k; ++i) {
      double* dst = scratch.data() + i * chunk;
      for (int64_t c = 0; c < len; ++c) dst[c] = load_double<D>(rows[i], c0 + c);
    }
    for (int64_t i = 0; i < k; ++i) {
      const double* xi = scratch.data() + i * chunk;
      for (int64_t j = 0; j <= i; ++j) {
        const double* y = scratch.data() + j * chunk;
        vdouble a = {}, b = {};
        int64_t c = 0;
        for (; c + 16 <= vec_len; c += 16) {
          vdouble x0, y0, x1, y1;
          std::memcpy(&x0, xi + c, sizeof x0);
          std::memcpy(&y0, y + c, sizeof y0);
          std::memcpy(&x1, xi + c + 8, sizeof x1);
          std::memcpy(&y1, y + c + 8, sizeof y1);
          a += x0 * y0;
          b += x1 * y1;
        }
        for (; c < vec_len; c += 8) {
          vdouble x0, y0;
          std::memcpy(&x0, xi + c, sizeof x0);
          std::memcpy(&y0, y + c, sizeof y0);
          a += x0 * y0;
        }
        double sum = hsum(a + b);
        for (; c < len; ++c) sum += xi[c] * y[c];
        acc[i * k + j] += sum;
      }
    }
  }
}

TOLARIA_CLONES void gram_range(DType dtype, bool wide, const void* const* rows, int64_t k,
                               int64_t begin, int64_t end, double* acc) {
  switch (dtype) {
    case DType::kFloat32:
      wide ? gram_range_wide<DType::kFloat32>(rows, k, begin, end, acc)
           : gram_range_fast<DType::kFloat32>(rows, k, begin, end, acc);
      break;
    case DType::kBFloat16:
      wide ? gram_range_wide<DType::kBFloat16>(rows, k, begin, end, acc)
           : gram_range_fast<DType::kBFloat16>(rows, k, begin, end, acc);
      break;
    case DType::kFloat16:
      wide ? gram_range_wide<DType::kFloat16>(rows, k, begin, end, acc)
           : gram_range_fast<DType::kFloat16>(rows, k, begin, end, acc);
      break;
    case DType::kFloat64: gram_range_wide<DType::kFloat64>(rows, k, begin, end, acc); break;
  }
}

// ---- combine ------------------------------------------------------------------------------------

// Stores kLanes floats as the output dtype; `stream` bypasses the cache (non-temporal store), which
// spares the read-for-ownership of every output line when the output is far larger than the caches.
template <DType D>
TOLARIA_INLINE void store_lanes(void* out, int64_t col, vfloat v, bool stream) {
  if constexpr (D == DType::kFloat32) {
    float* p = static_cast<float*>(out) + col;
    if (stream) {
#if defined(__x86_64__)
      for (int l = 0; l < kLanes; l += 4) _mm_stream_ps(p + l, _mm_setr_ps(v[l], v[l + 1], v[l + 2], v[l + 3]));
#else
      std::memcpy(p, &v, sizeof v);
#endif
    } else {
      std::memcpy(p, &v, sizeof v);
    }
  } else if constexpr (D == DType::kBFloat16) {
    // float_to_bf16 on whole vectors.
    vu32 bits;
    std::memcpy(&bits, &v, sizeof bits);
    const vu16 h = __builtin_convertvector(bf16_bits(bits), vu16);
    std::memcpy(static_cast<uint16_t*>(out) + col, &h, sizeof h);
  } else {
    const vhalf h = __builtin_convertvector(v, vhalf);  // round to nearest even, as torch does
    std::memcpy(static_cast<_Float16*>(out) + col, &h, sizeof h);
  }
}

// out[c] = sum_i w_i * row_i[c], four vectors of columns at a time with every row's contribution
// summed in registers, so each output line is written once and J is read once. Returns whether
// every sum was finite: `check` gathers sum * 0, which stays 0 unless a sum is NaN or inf (so a
// finiteness check costs no second pass over the output).
template <DType D>
TOLARIA_INLINE bool combine_range_lowp(const void* const* rows, int64_t k, const double* weights,
                                       int64_t begin, int64_t end, void* out, bool stream) {
  constexpr int64_t block = 4 * kLanes;
  float* w = static_cast<float*>(alloca(sizeof(float) * k));
  for (int64_t i = 0; i < k; ++i) w[i] = static_cast<float>(weights[i]);
  int64_t c = begin;
  vfloat check = {};
  const vfloat zero = {};
  for (; c + block <= end; c += block) {
    // Start from row 0's products (not from +0), so that -0 sums to -0 as in torch.
    const vfloat w0 = vfloat{} + w[0];
    vfloat a0 = w0 * load_lanes<D>(rows[0], c), a1 = w0 * load_lanes<D>(rows[0], c + kLanes),
           a2 = w0 * load_lanes<D>(rows[0], c + 2 * kLanes), a3 = w0 * load_lanes<D>(rows[0], c + 3 * kLanes);
    for (int64_t i = 1; i < k; ++i) {
      const vfloat wi = vfloat{} + w[i];
      a0 += wi * load_lanes<D>(rows[i], c);
      a1 += wi * load_lanes<D>(rows[i], c + kLanes);
      a2 += wi * load_lanes<D>(rows[i], c + 2 * kLanes);
      a3 += wi * load_lanes<D>(rows[i], c + 3 * kLanes);
    }
    check += a0 * zero + a1 * zero + a2 * zero + a3 * zero;
    store_lanes<D>(out, c, a0, stream);
    store_lanes<D>(out, c + kLanes, a1, stream);
    store_lanes<D>(out, c + 2 * kLanes, a2, stream);
    store_lanes<D>(out, c + 3 * kLanes, a3, stream);
  }
  bool finite = true;
  for (int l = 0; l < kLanes; ++l) finite = finite && check[l] == 0.0f;
  for (; c < end; ++c) {
    float a = w[0] * load_one<D>(rows[0], c);
    for (int64_t i = 1; i < k; ++i) a += w[i] * load_one<D>(rows[i], c);
    finite = finite && std::isfinite(a);
    store_one<D>(out, c, a);
  }
  return finite;
}

TOLARIA_INLINE bool combine_range_f64(const void* const* rows, int64_t k, const double* weights,
                                      int64_t begin, int64_t end, void* out) {
  double* o = static_cast<double*>(out);
  double check = 0.0;  // sum of o * 0: stays 0 unless some o is NaN or inf
  constexpr int64_t chunk = 512;
  for (int64_t c0 = begin; c0 < end; c0 += chunk) {
    const int64_t stop = std::min(chunk + c0, end);
    const double* x0 = static_cast<const double*>(rows[0]);
    for (int64_t c = c0; c < stop; ++c) o[c] = weights[0] * x0[c];  // from row 0: -0 stays -0
    for (int64_t i = 1; i < k; ++i) {
      const double* x = static_cast<const double*>(rows[i]);
      const double wi = weights[i];
      for (int64_t c = c0; c < stop; ++c) o[c] += wi * x[c];
    }
    for (int64_t c = c0; c < stop; ++c) check += o[c] * 0.0;
  }
  return check == 0.0;
}

TOLARIA_CLONES bool combine_range(DType dtype, const void* const* rows, int64_t k,
                                  const double* weights, int64_t begin, int64_t end, void* out,
                                  bool stream) {
  switch (dtype) {
    case DType::kFloat32: return combine_range_lowp<DType::kFloat32>(rows, k, weights, begin, end, out, stream);
    case DType::kBFloat16: return combine_range_lowp<DType::kBFloat16>(rows, k, weights, begin, end, out, stream);
    case DType::kFloat16: return combine_range_lowp<DType::kFloat16>(rows, k, weights, begin, end, out, stream);
    case DType::kFloat64: return combine_range_f64(rows, k, weights, begin, end, out);
  }
  return false;
}

// ---- threading ----------------------------------------------------------------------------------

// Splits [0, n) into `threads` ranges aligned to 64 elements (whole cache lines for every dtype) and
// runs fn(t, begin, end) on each; range 0 runs on the calling thread.
constexpr int64_t kMinWorkPerThread = 1 << 19;  // elements of J (all K rows) per thread

template <typename Fn>
void parallel_ranges(int64_t n, int64_t work, int threads, Fn fn) {
  // Starting a thread costs tens of microseconds: only worth it for a few hundred KiB of rows each.
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, work / kMinWorkPerThread)));
  if (threads == 1) {
    fn(0, 0, n);
    return;
  }
  int64_t per = ((n + threads - 1) / threads + 63) / 64 * 64;
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) {
    int64_t b = std::min(n, per * t), e = std::min(n, per * (t + 1));
    pool.emplace_back([=] { fn(t, b, e); });
  }
  fn(0, 0, std::min(n, per));
  for (auto& th : pool) th.join();
}

std::vector<const void*> to_pointers(const std::vector<uintptr_t>& rows) {
  std::vector<const void*> ptrs(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) ptrs[i] = reinterpret_cast<const void*>(rows[i]);
  return ptrs;
}

void gram(const std::vector<uintptr_t>& rows, int64_t n, int dtype, uintptr_t out, int threads) {
  const int64_t k = static_cast<int64_t>(rows.size());
  std::vector<const void*> ptrs = to_pointers(rows);
  py::gil_scoped_release release;
  const DType d = static_cast<DType>(dtype);
  std::vector<std::vector<double>> partial;
  auto run = [&](bool wide) {
    partial.assign(static_cast<size_t>(std::max(threads, 1)), std::vector<double>(k * k, 0.0));
    parallel_ranges(n, n * k, threads, [&](int t, int64_t b, int64_t e) {
      gram_range(d, wide, ptrs.data(), k, b, e, partial[t].data());
    });
  };
  run(/*wide=*/d == DType::kFloat64);
  if (d != DType::kFloat64) {
    bool finite = true;
    for (int64_t i = 0; i < k; ++i) {
      double s = 0.0;
      for (const auto& p : partial) s += p[i * k + i];
      finite = finite && std::isfinite(s);
    }
    if (!finite) run(/*wide=*/true);  // NaN/inf in the input, or an fp32 overflow: double decides
  }
  double* g = reinterpret_cast<double*>(out);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0.0;
      for (const auto& p : partial) s += p[i * k + j];
      g[i * k + j] = s;
      g[j * k + i] = s;
    }
  }
}

constexpr int64_t kStreamBytes = 8 << 20;

bool combine(const std::vector<uintptr_t>& rows, int64_t n, int dtype, uintptr_t weights,
             uintptr_t out, int threads) {
  const int64_t k = static_cast<int64_t>(rows.size());
  std::vector<const void*> ptrs = to_pointers(rows);
  const double* w = reinterpret_cast<const double*>(weights);
  void* o = reinterpret_cast<void*>(out);
  const DType d = static_cast<DType>(dtype);
  // Stream the output past the caches only when it is far larger than them (it will not be read
  // back from cache anyway) and every thread's range starts on a cache line.
  const bool stream = d == DType::kFloat32 && n * 4 >= kStreamBytes && out % 64 == 0;
  std::vector<char> finite(static_cast<size_t>(std::max(threads, 1)), 1);
  py::gil_scoped_release release;
  parallel_ranges(n, n * k, threads, [&](int t, int64_t b, int64_t e) {
    finite[t] = combine_range(d, ptrs.data(), k, w, b, e, o, stream);
  });
#if defined(__x86_64__)
  if (stream) _mm_sfence();
#endif  // non-temporal stores are weakly ordered: publish them
  return std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; });
}

}  // namespace

PYBIND11_MODULE(_aggregation_cpu, m) {
  m.doc() = "Tolaria's compiled CPU Gram and combine passes (called from tolaria.aggregation).";
  m.def("gram", &gram, py::arg("rows"), py::arg("n"), py::arg("dtype"), py::arg("out"),
        py::arg("threads"),
        "Writes G = J J^T (K x K float64, row-major) to `out` for K row pointers of length n.");
  m.def("combine", &combine, py::arg("rows"), py::arg("n"), py::arg("dtype"), py::arg("weights"),
        py::arg("out"), py::arg("threads"),
        "Writes out = sum_k weights[k] * row_k (n elements, the rows' dtype) to `out`; returns "
        "whether every sum was finite (computed in float32 or wider, before rounding to the output).");
  m.attr("FLOAT32") = static_cast<int>(DType::kFloat32);
  m.attr("FLOAT64") = static_cast<int>(DType::kFloat64);
  m.attr("BFLOAT16") = static_cast<int>(DType::kBFloat16);
  m.attr("FLOAT16") = static_cast<int>(DType::kFloat16);
}
