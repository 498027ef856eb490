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
#include <cstdint>
#include <cstring>
#include <thread>
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

// Round to nearest even, as torch's float -> bfloat16 conversion does; NaN stays a quiet NaN.
TOLARIA_INLINE uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Loads kLanes elements of a row as floats.
template <DType D>
TOLARIA_INLINE vfloat load_lanes(const void* row, int64_t col) {
  vfloat v;
  if constexpr (D == DType::kFloat32) {
    std::memcpy(&v, static_cast<const float*>(row) + col, sizeof v);
  } else if constexpr (D == DType::kBFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(row) + col;
    for (int l = 0; l < kLanes; ++l) v[l] = bf16_to_float(p[l]);
  } else if constexpr (D == DType::kFloat16) {
    const _Float16* p = static_cast<const _Float16*>(row) + col;
    for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
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

TOLARIA_INLINE double hsum(vfloat v) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// Columns per chunk: the K rows of one chunk (as floats) should fit in about 24 KiB of L1.
int64_t chunk_columns(int64_t k) {
  int64_t c = (24 * 1024 / 4) / std::max<int64_t>(k, 1);
  c = std::max<int64_t>(kLanes * 4, (c / kLanes) * kLanes);
  return std::min<int64_t>(c, 4096);
}

// ---- Gram ---------------------------------------------------------------------------------------

// Adds the lower triangle of J[:, begin:end] J[:, begin:end]^T into acc (K x K, row-major, double).
// Low-precision rows are widened into `scratch` (K x chunk floats) once per chunk, so the K^2/2 pair
// reductions read floats from L1 instead of converting every element K times.
template <DType D>
TOLARIA_INLINE void gram_range_lowp(const void* const* rows, int64_t k, int64_t begin, int64_t end,
                                    double* acc) {
  const int64_t chunk = chunk_columns(k);
  std::vector<float> scratch_store;
  const float** frows = static_cast<const float**>(alloca(sizeof(float*) * k));
  if constexpr (D != DType::kFloat32) scratch_store.resize(static_cast<size_t>(k * chunk));

  for (int64_t c0 = begin; c0 < end; c0 += chunk) {
    const int64_t len = std::min(chunk, end - c0);
    const int64_t vec_len = (len / kLanes) * kLanes;
    for (int64_t i = 0; i < k; ++i) {
      if constexpr (D == DType::kFloat32) {
        frows[i] = static_cast<const float*>(rows[i]) + c0;
      } else {
        float* dst = scratch_store.data() + i * chunk;
        for (int64_t c = 0; c < vec_len; c += kLanes) {
          vfloat v = load_lanes<D>(rows[i], c0 + c);
          std::memcpy(dst + c, &v, sizeof v);
        }
        for (int64_t c = vec_len; c < len; ++c) dst[c] = load_one<D>(rows[i], c0 + c);
        frows[i] = dst;
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      const float* xi = frows[i];
      int64_t j = 0;
      // Four pairs at once: one load of row i feeds four accumulators.
      for (; j + 3 <= i; j += 4) {
        vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {};
        const float *y0 = frows[j], *y1 = frows[j + 1], *y2 = frows[j + 2], *y3 = frows[j + 3];
        for (int64_t c = 0; c < vec_len; c += kLanes) {
          vfloat x, v0, v1, v2, v3;
          std::memcpy(&x, xi + c, sizeof x);
          std::memcpy(&v0, y0 + c, sizeof x);
          std::memcpy(&v1, y1 + c, sizeof x);
          std::memcpy(&v2, y2 + c, sizeof x);
          std::memcpy(&v3, y3 + c, sizeof x);
          a0 += x * v0;
          a1 += x * v1;
          a2 += x * v2;
          a3 += x * v3;
        }
        double s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (int64_t c = vec_len; c < len; ++c) {
          s0 += static_cast<double>(xi[c]) * y0[c];
          s1 += static_cast<double>(xi[c]) * y1[c];
          s2 += static_cast<double>(xi[c]) * y2[c];
          s3 += static_cast<double>(xi[c]) * y3[c];
        }
        acc[i * k + j] += s0;
        acc[i * k + j + 1] += s1;
        acc[i * k + j + 2] += s2;
        acc[i * k + j + 3] += s3;
      }
      for (; j <= i; ++j) {
        vfloat a = {};
        const float* y = frows[j];
        for (int64_t c = 0; c < vec_len; c += kLanes) {
          vfloat x, v;
          std::memcpy(&x, xi + c, sizeof x);
          std::memcpy(&v, y + c, sizeof x);
          a += x * v;
        }
        double s = hsum(a);
        for (int64_t c = vec_len; c < len; ++c) s += static_cast<double>(xi[c]) * y[c];
        acc[i * k + j] += s;
      }
    }
  }
}

// float64 rows: accumulate in double throughout.
TOLARIA_INLINE void gram_range_f64(const void* const* rows, int64_t k, int64_t begin, int64_t end,
                                   double* acc) {
  const int64_t chunk = chunk_columns(2 * k);
  for (int64_t c0 = begin; c0 < end; c0 += chunk) {
    const int64_t len = std::min(chunk, end - c0);
    const int64_t vec_len = (len / 8) * 8;
    for (int64_t i = 0; i < k; ++i) {
      const double* xi = static_cast<const double*>(rows[i]) + c0;
      for (int64_t j = 0; j <= i; ++j) {
        const double* y = static_cast<const double*>(rows[j]) + c0;
        vdouble a = {};
        for (int64_t c = 0; c < vec_len; c += 8) {
          vdouble x, v;
          std::memcpy(&x, xi + c, sizeof x);
          std::memcpy(&v, y + c, sizeof x);
          a += x * v;
        }
        double s = 0.0;
        for (int l = 0; l < 8; ++l) s += a[l];
        for (int64_t c = vec_len; c < len; ++c) s += xi[c] * y[c];
        acc[i * k + j] += s;
      }
    }
  }
}

TOLARIA_CLONES void gram_range(DType dtype, const void* const* rows, int64_t k, int64_t begin,
                               int64_t end, double* acc) {
  switch (dtype) {
    case DType::kFloat32: gram_range_lowp<DType::kFloat32>(rows, k, begin, end, acc); break;
    case DType::kBFloat16: gram_range_lowp<DType::kBFloat16>(rows, k, begin, end, acc); break;
    case DType::kFloat16: gram_range_lowp<DType::kFloat16>(rows, k, begin, end, acc); break;
    case DType::kFloat64: gram_range_f64(rows, k, begin, end, acc); break;
  }
}

// ---- combine ------------------------------------------------------------------------------------

template <DType D>
TOLARIA_INLINE void combine_range_lowp(const void* const* rows, int64_t k, const double* weights,
                                       int64_t begin, int64_t end, void* out) {
  constexpr int64_t chunk = 1024;
  alignas(64) float acc[chunk];
  float* w = static_cast<float*>(alloca(sizeof(float) * k));
  for (int64_t i = 0; i < k; ++i) w[i] = static_cast<float>(weights[i]);
  for (int64_t c0 = begin; c0 < end; c0 += chunk) {
    const int64_t len = std::min(chunk, end - c0);
    const int64_t vec_len = (len / kLanes) * kLanes;
    for (int64_t i = 0; i < k; ++i) {
      const vfloat wi = vfloat{} + w[i];
      for (int64_t c = 0; c < vec_len; c += kLanes) {
        vfloat a;
        if (i == 0) {
          a = vfloat{};
        } else {
          std::memcpy(&a, acc + c, sizeof a);
        }
        a += wi * load_lanes<D>(rows[i], c0 + c);
        std::memcpy(acc + c, &a, sizeof a);
      }
      for (int64_t c = vec_len; c < len; ++c) {
        acc[c] = (i == 0 ? 0.0f : acc[c]) + w[i] * load_one<D>(rows[i], c0 + c);
      }
    }
    if constexpr (D == DType::kFloat32) {
      std::memcpy(static_cast<float*>(out) + c0, acc, sizeof(float) * len);
    } else {
      for (int64_t c = 0; c < len; ++c) store_one<D>(out, c0 + c, acc[c]);
    }
  }
}

TOLARIA_INLINE void combine_range_f64(const void* const* rows, int64_t k, const double* weights,
                                      int64_t begin, int64_t end, void* out) {
  double* o = static_cast<double*>(out);
  for (int64_t c = begin; c < end; ++c) o[c] = 0.0;
  constexpr int64_t chunk = 512;
  for (int64_t c0 = begin; c0 < end; c0 += chunk) {
    const int64_t stop = std::min(chunk + c0, end);
    for (int64_t i = 0; i < k; ++i) {
      const double* x = static_cast<const double*>(rows[i]);
      const double wi = weights[i];
      for (int64_t c = c0; c < stop; ++c) o[c] += wi * x[c];
    }
  }
}

TOLARIA_CLONES void combine_range(DType dtype, const void* const* rows, int64_t k,
                                  const double* weights, int64_t begin, int64_t end, void* out) {
  switch (dtype) {
    case DType::kFloat32: combine_range_lowp<DType::kFloat32>(rows, k, weights, begin, end, out); break;
    case DType::kBFloat16: combine_range_lowp<DType::kBFloat16>(rows, k, weights, begin, end, out); break;
    case DType::kFloat16: combine_range_lowp<DType::kFloat16>(rows, k, weights, begin, end, out); break;
    case DType::kFloat64: combine_range_f64(rows, k, weights, begin, end, out); break;
  }
}

// ---- threading ----------------------------------------------------------------------------------

// Splits [0, n) into `threads` ranges aligned to 64 elements (whole cache lines for every dtype) and
// runs fn(t, begin, end) on each; range 0 runs on the calling thread.
template <typename Fn>
void parallel_ranges(int64_t n, int threads, Fn fn) {
  constexpr int64_t kMinPerThread = 1 << 15;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / kMinPerThread)));
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
  std::vector<std::vector<double>> partial(static_cast<size_t>(std::max(threads, 1)),
                                           std::vector<double>(k * k, 0.0));
  parallel_ranges(n, threads, [&](int t, int64_t b, int64_t e) {
    gram_range(static_cast<DType>(dtype), ptrs.data(), k, b, e, partial[t].data());
  });
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

void combine(const std::vector<uintptr_t>& rows, int64_t n, int dtype, uintptr_t weights,
             uintptr_t out, int threads) {
  const int64_t k = static_cast<int64_t>(rows.size());
  std::vector<const void*> ptrs = to_pointers(rows);
  const double* w = reinterpret_cast<const double*>(weights);
  void* o = reinterpret_cast<void*>(out);
  py::gil_scoped_release release;
  parallel_ranges(n, threads, [&](int, int64_t b, int64_t e) {
    combine_range(static_cast<DType>(dtype), ptrs.data(), k, w, b, e, o);
  });
}

}  // namespace

PYBIND11_MODULE(_aggregation_cpu, m) {
  m.doc() = "Tolaria's compiled CPU Gram and combine passes (called from tolaria.aggregation).";
  m.def("gram", &gram, py::arg("rows"), py::arg("n"), py::arg("dtype"), py::arg("out"),
        py::arg("threads"),
        "Writes G = J J^T (K x K float64, row-major) to `out` for K row pointers of length n.");
  m.def("combine", &combine, py::arg("rows"), py::arg("n"), py::arg("dtype"), py::arg("weights"),
        py::arg("out"), py::arg("threads"),
        "Writes out = sum_k weights[k] * row_k (n elements, the rows' dtype) to `out`.");
  m.attr("FLOAT32") = static_cast<int>(DType::kFloat32);
  m.attr("FLOAT64") = static_cast<int>(DType::kFloat64);
  m.attr("BFLOAT16") = static_cast<int>(DType::kBFloat16);
  m.attr("FLOAT16") = static_cast<int>(DType::kFloat16);
}
