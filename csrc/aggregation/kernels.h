// The Gram and combine passes, written once and instantiated per instruction set.
//
// An ISA is a traits struct (see isa_*.cpp) giving the vector width (kLanes floats, the CPU's own
// register width, so that no vector lives on the stack), the Gram tile shape (kTileRows x kTileCols
// accumulators fit the register file beside the loaded rows), the combine's unroll, and the
// float16 conversions and streaming stores of that ISA. This header must be included inside an
// anonymous namespace of a translation unit compiled for exactly that ISA: every function here then
// has internal linkage, so no code compiled for a wider ISA can be shared with a narrower one by the
// linker. For the same reason it uses no std:: templates, and allocates nothing (the caller passes
// a workspace).
//
// Gram (fast path, float32 accumulation): J is read in column chunks small enough that the K rows
// of a chunk stay in L1 while every pair of rows is reduced over it, in tiles: a triangle of
// kTileRows rows on the diagonal, kTileRows x kTileCols rectangles below it. Per-pair lane
// accumulators persist across a super-chunk of 256 products per lane and are folded into double
// there, so the result is accurate to well below float32 rounding of the inputs.
//
// Gram (wide path, double accumulation): float64 input, and the re-run of a float32 Gram whose
// diagonal came out non-finite (tells a NaN/inf in the input from an overflow of a huge finite one).
//
// Combine: out = w^T J, kCombineVectors vectors of columns at a time with every row's contribution
// summed in registers, so each output line is written once and J read once. It returns whether
// every sum was finite: `check` gathers sum * 0, which stays 0 unless a sum is NaN or inf.
#pragma once

#include <alloca.h>

#include <cstdint>
#include <cstring>

#include "half.h"
#include "kernel_table.h"

template <typename T>
TOLARIA_INLINE T min_of(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
TOLARIA_INLINE T max_of(T a, T b) {
  return a < b ? b : a;
}

// The vector types of an ISA level whose registers hold `Bytes` bytes (see IsaShape).
template <int Bytes>
struct VectorTypes {
  static constexpr int kLanes = Bytes / 4;
  typedef float vf __attribute__((vector_size(Bytes)));
  typedef uint32_t vu32 __attribute__((vector_size(Bytes)));
  typedef uint16_t vu16 __attribute__((vector_size(Bytes / 2)));
  typedef double vd __attribute__((vector_size(Bytes)));
};

// The numbers of an ISA level: its vector types, the Gram tile shape (TileRows x TileCols) and the
// combine's unroll (CombineVectors). Each level's traits struct derives from it and adds its name
// and its own float16 conversions and streaming store.
template <int Bytes, int TileRows, int TileCols, int CombineVectors>
struct IsaShape : VectorTypes<Bytes> {
  static constexpr int kTileRows = TileRows;
  static constexpr int kTileCols = TileCols;
  static constexpr int kCombineVectors = CombineVectors;
};

template <class Isa>
struct Kernels {
  using DType = tolaria::cpu::DType;
  using vf = typename Isa::vf;
  using vu32 = typename Isa::vu32;
  using vu16 = typename Isa::vu16;
  using vd = typename Isa::vd;
  static constexpr int L = Isa::kLanes;
  static constexpr int kRows = Isa::kTileRows;
  static constexpr int kCols = Isa::kTileCols;
  static_assert(kRows % kCols == 0, "rectangle tiles must divide the diagonal blocks");
  static_assert(sizeof(vf) == L * sizeof(float) && sizeof(vu16) == L * sizeof(uint16_t), "vector widths");
  static constexpr int DL = static_cast<int>(sizeof(vd) / sizeof(double));

  // ---- loads and stores ----------------------------------------------------------------------

  static TOLARIA_INLINE vf vload(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }

  static TOLARIA_INLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

  template <DType D>
  static TOLARIA_INLINE vf load_lanes(const void* row, int64_t col) {
    if constexpr (D == DType::kFloat32) {
      return vload(static_cast<const float*>(row) + col);
    } else if constexpr (D == DType::kBFloat16) {
      vu16 h;
      std::memcpy(&h, static_cast<const uint16_t*>(row) + col, sizeof h);
      return bit_cast_to<vf>(vu32(__builtin_convertvector(h, vu32) << 16));
    } else {
      return Isa::load_half(static_cast<const uint16_t*>(row) + col);
    }
  }

  template <DType D>
  static TOLARIA_INLINE float load_one(const void* row, int64_t col) {
    if constexpr (D == DType::kFloat32) {
      return static_cast<const float*>(row)[col];
    } else if constexpr (D == DType::kBFloat16) {
      return bit_cast_to<float>(uint32_t(static_cast<const uint16_t*>(row)[col]) << 16);
    } else {
      const uint32_t h = static_cast<const uint16_t*>(row)[col];
      return bit_cast_to<float>(half_to_float_bits<uint32_t, float>(h));
    }
  }

  template <DType D>
  static TOLARIA_INLINE double load_double(const void* row, int64_t col) {
    if constexpr (D == DType::kFloat64) {
      return static_cast<const double*>(row)[col];
    } else {
      return static_cast<double>(load_one<D>(row, col));
    }
  }

  template <DType D>
  static TOLARIA_INLINE void store_one(void* row, int64_t col, float value) {
    const uint32_t bits = bit_cast_to<uint32_t>(value);
    if constexpr (D == DType::kFloat32) {
      static_cast<float*>(row)[col] = value;
    } else if constexpr (D == DType::kBFloat16) {
      static_cast<uint16_t*>(row)[col] = static_cast<uint16_t>(bf16_bits(bits));
    } else {
      static_cast<uint16_t*>(row)[col] = static_cast<uint16_t>(float_bits_to_half<uint32_t, float>(bits));
    }
  }

  template <DType D>
  static TOLARIA_INLINE void store_lanes(void* out, int64_t col, vf v, bool stream) {
    if constexpr (D == DType::kFloat32) {
      float* p = static_cast<float*>(out) + col;
      if (stream) {
        Isa::stream(p, v);
      } else {
        vstore(p, v);
      }
    } else if constexpr (D == DType::kBFloat16) {
      const vu16 h = __builtin_convertvector(bf16_bits(bit_cast_to<vu32>(v)), vu16);
      std::memcpy(static_cast<uint16_t*>(out) + col, &h, sizeof h);
    } else {
      Isa::store_half(static_cast<uint16_t*>(out) + col, v);
    }
  }

  // ---- Gram, fast path -----------------------------------------------------------------------

  // One tile: rows i0..i0+BI-1 against rows j0..j0+BJ-1 over `len` columns of the chunk; on the
  // diagonal (i0 == j0) only the pairs b <= a. Accumulators stay in registers across the chunk.
  // V: the vector type (vf for float lanes, vd for the wide path's double lanes), T its element.
  template <typename V, typename T>
  static TOLARIA_INLINE V load_vector(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }

  template <typename V, typename T>
  static TOLARIA_INLINE void store_vector(T* p, V v) {
    std::memcpy(p, &v, sizeof v);
  }

  template <typename V, typename T, int BI, int BJ, bool kDiagonal>
  static TOLARIA_INLINE void tile(const T* const* x, int64_t i0, int64_t j0, int64_t k, int64_t len, T* va) {
    constexpr int W = static_cast<int>(sizeof(V) / sizeof(T));
    auto slot = [&](int a, int b) { return va + ((i0 + a) * k + (j0 + b)) * W; };
    V acc[BI][BJ];
#pragma GCC unroll 8
    for (int a = 0; a < BI; ++a) {
#pragma GCC unroll 8
      for (int b = 0; b < BJ; ++b) {
        if (!kDiagonal || b <= a) acc[a][b] = load_vector<V>(slot(a, b));
      }
    }
    for (int64_t c = 0; c < len; c += W) {
      V xv[BI], yv[BJ];
#pragma GCC unroll 8
      for (int a = 0; a < BI; ++a) xv[a] = load_vector<V>(x[i0 + a] + c);
      if constexpr (!kDiagonal) {
#pragma GCC unroll 8
        for (int b = 0; b < BJ; ++b) yv[b] = load_vector<V>(x[j0 + b] + c);
      }
#pragma GCC unroll 8
      for (int a = 0; a < BI; ++a) {
#pragma GCC unroll 8
        for (int b = 0; b < BJ; ++b) {
          if constexpr (kDiagonal) {
            if (b <= a) acc[a][b] += xv[a] * xv[b];
          } else {
            acc[a][b] += xv[a] * yv[b];
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int a = 0; a < BI; ++a) {
#pragma GCC unroll 8
      for (int b = 0; b < BJ; ++b) {
        if (!kDiagonal || b <= a) store_vector<V>(slot(a, b), acc[a][b]);
      }
    }
  }

  // The ragged last block of rows (k % kRows of them) takes the same tiles with fewer rows.
  template <typename V, typename T, int BI = kRows>
  static TOLARIA_INLINE void block_row(int bi, const T* const* x, int64_t i0, int64_t k, int64_t len, T* va) {
    if constexpr (BI > 1) {
      if (bi < BI) {
        block_row<V, T, BI - 1>(bi, x, i0, k, len, va);
        return;
      }
    }
    for (int64_t j0 = 0; j0 < i0; j0 += kCols) tile<V, T, BI, kCols, false>(x, i0, j0, k, len, va);
    tile<V, T, BI, BI, true>(x, i0, i0, k, len, va);
  }

  // va[(i * k + j) * W + lane] += the chunk's products of rows i and j, lane-wise, for j <= i (tiles
  // on the diagonal also fill some j > i: other entries of the same symmetric matrix, never read).
  template <typename V, typename T>
  static TOLARIA_INLINE void gram_chunk(const T* const* x, int64_t k, int64_t len, T* va) {
    for (int64_t i0 = 0; i0 < k; i0 += kRows) {
      block_row<V, T>(static_cast<int>(min_of<int64_t>(kRows, k - i0)), x, i0, k, len, va);
    }
  }

  // ---- Gram over a range of columns -------------------------------------------------------------
  //
  // One routine for both paths: T = float (fast: lanes of L floats, folded into the double result
  // every kSuperChunk columns, so that no lane adds more than 256 products) or T = double (wide:
  // products exact for 16/32-bit inputs, one window for the whole range). Rows whose dtype is not T
  // are converted a chunk at a time into the workspace; the ragged tail (fewer columns than one
  // vector) is added in double.
  static TOLARIA_INLINE int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

  static constexpr int64_t kSuperChunk = 256 * L;  // columns per float lane-accumulation window

  // Columns per chunk: the K rows of one chunk take about 16 KiB of L1. Short chunks also sidestep
  // L1 set conflicts between rows whose addresses differ by a multiple of 4 KiB (the K x N layout).
  template <typename T, int W>
  static TOLARIA_INLINE int64_t chunk_columns(int64_t k) {
    const int64_t columns = (static_cast<int64_t>(16384 / sizeof(T)) / max_of<int64_t>(k, 1)) / W * W;
    return min_of<int64_t>(max_of<int64_t>(columns, 2 * W), 4096 / static_cast<int64_t>(sizeof(T)));
  }

  // K row pointers, the lane accumulators (K x K x W), the converted chunk (K x chunk); 64-byte aligned.
  template <typename T, int W>
  static int64_t tiled_workspace_bytes(int64_t k) {
    return align64(k * static_cast<int64_t>(sizeof(void*))) + align64(k * k * W * sizeof(T)) +
           align64(k * chunk_columns<T, W>(k) * sizeof(T));
  }

  template <typename V, typename T, DType D>
  static void gram_range_tiled(const void* const* rows, int64_t k, int64_t begin, int64_t end, double* acc,
                               void* workspace) {
    constexpr int W = static_cast<int>(sizeof(V) / sizeof(T));
    constexpr bool kInPlace = (D == DType::kFloat32 && sizeof(T) == 4) || (D == DType::kFloat64 && sizeof(T) == 8);
    char* base = static_cast<char*>(workspace);
    const T** x = reinterpret_cast<const T**>(base);
    T* va = reinterpret_cast<T*>(base + align64(k * static_cast<int64_t>(sizeof(void*))));
    T* scratch = va + align64(k * k * W * sizeof(T)) / sizeof(T);
    const int64_t chunk = chunk_columns<T, W>(k);
    const int64_t window = sizeof(T) == 4 ? kSuperChunk : end - begin;
    const int64_t vec_end = begin + (end - begin) / W * W;
    for (int64_t s0 = begin; s0 < vec_end; s0 += window) {
      const int64_t s1 = min_of(vec_end, s0 + window);
      std::memset(va, 0, static_cast<size_t>(k * k * W) * sizeof(T));
      for (int64_t c0 = s0; c0 < s1; c0 += chunk) {
        const int64_t len = min_of(chunk, s1 - c0);
        for (int64_t i = 0; i < k; ++i) {
          if constexpr (kInPlace) {
            x[i] = static_cast<const T*>(rows[i]) + c0;
          } else {
            T* dst = scratch + i * chunk;
            if constexpr (sizeof(T) == 4) {
              for (int64_t c = 0; c < len; c += L) vstore(dst + c, load_lanes<D>(rows[i], c0 + c));
            } else {
              for (int64_t c = 0; c < len; ++c) dst[c] = load_double<D>(rows[i], c0 + c);
            }
            x[i] = dst;
          }
        }
        gram_chunk<V, T>(x, k, len, va);
      }
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = 0; j <= i; ++j) {
          const T* lanes = va + (i * k + j) * W;
          double sum = 0.0;
          for (int l = 0; l < W; ++l) sum += lanes[l];
          acc[i * k + j] += sum;
        }
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j <= i; ++j) {
        double sum = 0.0;
        for (int64_t c = vec_end; c < end; ++c) sum += load_double<D>(rows[i], c) * load_double<D>(rows[j], c);
        acc[i * k + j] += sum;
      }
    }
  }

  template <DType D>
  static void gram_range_fast(const void* const* rows, int64_t k, int64_t begin, int64_t end, double* acc,
                              void* workspace) {
    gram_range_tiled<vf, float, D>(rows, k, begin, end, acc, workspace);
  }

  template <DType D>
  static void gram_range_wide(const void* const* rows, int64_t k, int64_t begin, int64_t end, double* acc,
                              void* workspace) {
    gram_range_tiled<vd, double, D>(rows, k, begin, end, acc, workspace);
  }

  static void gram_range(DType dtype, bool wide, const void* const* rows, int64_t k, int64_t begin, int64_t end,
                         double* acc, void* workspace) {
    // The wide path's scratch (K x chunk doubles) fits in the fast path's workspace: see
    // workspace_bytes, which takes the larger of the two.
    switch (dtype) {
      case DType::kFloat32:
        return wide ? gram_range_wide<DType::kFloat32>(rows, k, begin, end, acc, workspace)
                    : gram_range_fast<DType::kFloat32>(rows, k, begin, end, acc, workspace);
      case DType::kBFloat16:
        return wide ? gram_range_wide<DType::kBFloat16>(rows, k, begin, end, acc, workspace)
                    : gram_range_fast<DType::kBFloat16>(rows, k, begin, end, acc, workspace);
      case DType::kFloat16:
        return wide ? gram_range_wide<DType::kFloat16>(rows, k, begin, end, acc, workspace)
                    : gram_range_fast<DType::kFloat16>(rows, k, begin, end, acc, workspace);
      case DType::kFloat64:
        return gram_range_wide<DType::kFloat64>(rows, k, begin, end, acc, workspace);
    }
  }

  static int64_t workspace_bytes(int64_t k) {
    return max_of(tiled_workspace_bytes<float, L>(k), tiled_workspace_bytes<double, DL>(k));
  }

  // ---- combine -------------------------------------------------------------------------------

  template <DType D>
  static bool combine_range_lowp(const void* const* rows, int64_t k, const double* weights, int64_t begin, int64_t end,
                                 void* out, bool stream) {
    constexpr int V = Isa::kCombineVectors;
    constexpr int64_t block = V * L;
    float* w = static_cast<float*>(alloca(sizeof(float) * static_cast<size_t>(k)));
    for (int64_t i = 0; i < k; ++i) w[i] = static_cast<float>(weights[i]);
    int64_t c = begin;
    vf check = {};
    const vf zero = {};
    for (; c + block <= end; c += block) {
      // Start from row 0's products (not from +0), so that -0 sums to -0 as in torch.
      const vf w0 = vf{} + w[0];
      vf a[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) a[v] = w0 * load_lanes<D>(rows[0], c + v * L);
      for (int64_t i = 1; i < k; ++i) {
        const vf wi = vf{} + w[i];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) a[v] += wi * load_lanes<D>(rows[i], c + v * L);
      }
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        check += a[v] * zero;
        store_lanes<D>(out, c + v * L, a[v], stream);
      }
    }
    bool finite = true;
    for (int l = 0; l < L; ++l) finite = finite && check[l] == 0.0f;
    for (; c < end; ++c) {
      float s = w[0] * load_one<D>(rows[0], c);
      for (int64_t i = 1; i < k; ++i) s += w[i] * load_one<D>(rows[i], c);
      finite = finite && __builtin_isfinite(s);
      store_one<D>(out, c, s);
    }
    return finite;
  }

  static bool combine_range_f64(const void* const* rows, int64_t k, const double* weights, int64_t begin, int64_t end,
                                void* out) {
    double* o = static_cast<double*>(out);
    double check = 0.0;  // sum of o * 0: stays 0 unless some o is NaN or inf
    constexpr int64_t chunk = 512;
    for (int64_t c0 = begin; c0 < end; c0 += chunk) {
      const int64_t stop = min_of(chunk + c0, end);
      const double* x0 = static_cast<const double*>(rows[0]);
      for (int64_t c = c0; c < stop; ++c) o[c] = weights[0] * x0[c];  // from row 0: -0 stays -0
      for (int64_t i = 1; i < k; ++i) {
        const double* xi = static_cast<const double*>(rows[i]);
        const double wi = weights[i];
        for (int64_t c = c0; c < stop; ++c) o[c] += wi * xi[c];
      }
      for (int64_t c = c0; c < stop; ++c) check += o[c] * 0.0;
    }
    return check == 0.0;
  }

  // The wide combine: every sum accumulated in double and rounded once to the output dtype, for
  // weights whose terms cancel (a result far shorter than sum_i |w_i| |g_i|: float32 accumulation
  // would leave an error of float32 rounding times that ratio). kCombineVectors vectors of DL
  // doubles stay in registers while every row's contribution is added, as in combine_range_lowp.
  typedef float vfh __attribute__((vector_size(sizeof(vd) / 2)));  // DL floats

  template <DType D>
  static TOLARIA_INLINE vd load_wide(const void* row, int64_t col) {
    if constexpr (D == DType::kFloat64) {
      return load_vector<vd>(static_cast<const double*>(row) + col);
    } else if constexpr (D == DType::kFloat32) {
      return __builtin_convertvector(load_vector<vfh>(static_cast<const float*>(row) + col), vd);
    } else {
      vd v;
      for (int l = 0; l < DL; ++l) v[l] = load_double<D>(row, col + l);
      return v;
    }
  }

  template <DType D>
  static bool combine_range_wide(const void* const* rows, int64_t k, const double* weights, int64_t begin, int64_t end,
                                 void* out) {
    constexpr int V = Isa::kCombineVectors;
    constexpr int64_t block = V * DL;
    int64_t c = begin;
    vd check = {};
    const vd zero = {};
    for (; c + block <= end; c += block) {
      const vd w0 = vd{} + weights[0];
      vd a[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) a[v] = w0 * load_wide<D>(rows[0], c + v * DL);  // from row 0: -0 stays -0
      for (int64_t i = 1; i < k; ++i) {
        const vd wi = vd{} + weights[i];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) a[v] += wi * load_wide<D>(rows[i], c + v * DL);
      }
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        check += a[v] * zero;
        for (int l = 0; l < DL; ++l) {
          if constexpr (D == DType::kFloat64) {
            static_cast<double*>(out)[c + v * DL + l] = a[v][l];
          } else {
            store_one<D>(out, c + v * DL + l, static_cast<float>(a[v][l]));
          }
        }
      }
    }
    bool finite = true;
    for (int l = 0; l < DL; ++l) finite = finite && check[l] == 0.0;
    for (; c < end; ++c) {
      double sum = weights[0] * load_double<D>(rows[0], c);
      for (int64_t i = 1; i < k; ++i) sum += weights[i] * load_double<D>(rows[i], c);
      finite = finite && __builtin_isfinite(sum);
      if constexpr (D == DType::kFloat64) {
        static_cast<double*>(out)[c] = sum;
      } else {
        store_one<D>(out, c, static_cast<float>(sum));
      }
    }
    return finite;
  }

  static bool combine_range(DType dtype, bool wide, const void* const* rows, int64_t k, const double* weights,
                            int64_t begin, int64_t end, void* out, bool stream) {
    if (wide) {
      switch (dtype) {
        case DType::kFloat32:
          return combine_range_wide<DType::kFloat32>(rows, k, weights, begin, end, out);
        case DType::kBFloat16:
          return combine_range_wide<DType::kBFloat16>(rows, k, weights, begin, end, out);
        case DType::kFloat16:
          return combine_range_wide<DType::kFloat16>(rows, k, weights, begin, end, out);
        case DType::kFloat64:
          return combine_range_f64(rows, k, weights, begin, end, out);
      }
    }
    switch (dtype) {
      case DType::kFloat32:
        return combine_range_lowp<DType::kFloat32>(rows, k, weights, begin, end, out, stream);
      case DType::kBFloat16:
        return combine_range_lowp<DType::kBFloat16>(rows, k, weights, begin, end, out, false);
      case DType::kFloat16:
        return combine_range_lowp<DType::kFloat16>(rows, k, weights, begin, end, out, false);
      case DType::kFloat64:
        return combine_range_f64(rows, k, weights, begin, end, out);
    }
    return false;
  }

  static constexpr tolaria::cpu::KernelTable table() {
    return {Isa::kName, L, &workspace_bytes, &gram_range, &combine_range};
  }
};
