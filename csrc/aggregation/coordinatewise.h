// GradDrop and TrimmedMean: coordinate-wise passes over the K x N matrix J, written once over the
// ISA traits of kernels.h and compiled per ISA level (isa_*.cpp include this right after kernels.h,
// inside the same anonymous namespace; see coordinatewise_table.h for the semantics).
//
// 16/32-bit rows run in float32 lanes of the ISA's own width (Kernels<Isa>::load_lanes/store_lanes,
// so float16 goes through the ISA's conversion); float64 rows, and the ragged tail of a range, run
// one column at a time in the same arithmetic, so every column's result is the same whichever path
// computed it. Like kernels.h, no std:: templates and no allocation (alloca for K keys).
#pragma once

// The uniform of column `col` of one GradDrop call keyed (key0, key1): two rounds of the lowbias32
// integer hash (C. Wellons), its top 24 bits as a float in [0, 1) (exact in float32). The same
// function is tolaria.kernels.graddrop's _uniform (Triton) and tolaria.aggregation.graddrop's
// uniforms (torch), so every backend draws the same U. U is any uint32_t or vector of them.
template <typename U>
TOLARIA_INLINE U lowbias32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

template <typename U>
TOLARIA_INLINE U graddrop_hash(U lo, U hi, uint32_t key0, uint32_t key1) {
  return lowbias32<U>(U(lowbias32<U>(U(lo ^ key0)) ^ hi ^ key1));
}

constexpr float kTwoToMinus24 = 5.9604644775390625e-08f;

// Signed 32-bit lanes of a `Bytes`-byte register (outside the template below: GCC 12 fails on a
// vector typedef whose size depends on the enclosing template's parameters).
template <int Bytes>
struct SignedLanes {
  typedef int32_t vs32 __attribute__((vector_size(Bytes)));
};

template <class Isa>
struct Coordinatewise {
  using K = Kernels<Isa>;
  using DType = tolaria::cpu::DType;
  using vf = typename Isa::vf;
  using vu32 = typename Isa::vu32;
  using vs32 = typename SignedLanes<static_cast<int>(sizeof(vf))>::vs32;
  static constexpr int L = Isa::kLanes;
  static constexpr int V = Isa::kCombineVectors / 2 > 0 ? Isa::kCombineVectors / 2 : 1;

  // ---- the dtype switch of the range entry points ---------------------------------------------
  //
  // by_dtype calls `pass` (a generic lambda) with DTypeIs<D> for the rows' dtype D, so that D is a
  // compile-time constant there: graddrop_range and trimmed_mean_range send 16/32-bit rows down the
  // lane path and float64 rows down the scalar one. One switch for both passes.

  template <DType D>
  struct DTypeIs {
    static constexpr DType value = D;
  };

  template <typename Pass>
  static TOLARIA_INLINE bool by_dtype(DType dtype, const Pass& pass) {
    switch (dtype) {
      case DType::kFloat32:
        return pass(DTypeIs<DType::kFloat32>{});
      case DType::kBFloat16:
        return pass(DTypeIs<DType::kBFloat16>{});
      case DType::kFloat16:
        return pass(DTypeIs<DType::kFloat16>{});
      case DType::kFloat64:
        return pass(DTypeIs<DType::kFloat64>{});
    }
    return false;
  }

  // ---- scalar columns (float64 rows, ragged tails) --------------------------------------------

  template <DType D>
  static TOLARIA_INLINE auto load_scalar(const void* row, int64_t col) {
    if constexpr (D == DType::kFloat64) {
      return static_cast<const double*>(row)[col];
    } else {
      return K::template load_one<D>(row, col);
    }
  }

  template <DType D, typename T>
  static TOLARIA_INLINE void store_scalar(void* out, int64_t col, T value) {
    if constexpr (D == DType::kFloat64) {
      static_cast<double*>(out)[col] = value;
    } else {
      K::template store_one<D>(out, col, value);
    }
  }

  static TOLARIA_INLINE float uniform_one(int64_t col, uint32_t key0, uint32_t key1) {
    const uint64_t c = static_cast<uint64_t>(col);
    const uint32_t h = graddrop_hash<uint32_t>(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), key0, key1);
    return static_cast<float>(static_cast<int32_t>(h >> 8)) * kTwoToMinus24;
  }

  // T: float for 16/32-bit rows, double for float64 rows. Returns whether every value was finite.
  template <DType D, typename T>
  static bool graddrop_columns(const void* const* rows, int64_t k, const double* leak, uint32_t key0, uint32_t key1,
                               int64_t begin, int64_t end, void* out) {
    T check = 0;
    for (int64_t c = begin; c < end; ++c) {
      T s = 0, a = 0;
      for (int64_t i = 0; i < k; ++i) {
        const T x = load_scalar<D>(rows[i], c);
        s += x;
        a += __builtin_fabs(x);
        check += x * T(0);
      }
      const T thr = (T(2) * T(uniform_one(c, key0, key1)) - T(1)) * a;
      const bool up = s > thr, down = s < thr;
      T acc = 0;
      for (int64_t i = 0; i < k; ++i) {
        const T x = load_scalar<D>(rows[i], c);
        const bool keep = (x > T(0) && up) || (x < T(0) && down);
        const T coef = keep ? T(1) : (leak != nullptr ? T(leak[i]) : T(0));
        acc += coef * x;
      }
      store_scalar<D>(out, c, acc);
    }
    return check == T(0);
  }

  // ---- GradDrop, float32 lanes ---------------------------------------------------------------

  static TOLARIA_INLINE vf uniform_lanes(int64_t col, uint32_t key0, uint32_t key1) {
    const uint64_t c = static_cast<uint64_t>(col);
    vu32 iota;
    for (int l = 0; l < L; ++l) iota[l] = static_cast<uint32_t>(l);
    const vu32 base = splat<vu32>(static_cast<uint32_t>(c));
    const vu32 lo = base + iota;
    const vu32 hi = splat<vu32>(static_cast<uint32_t>(c >> 32)) - bit_cast_to<vu32>(lo < base);  // carry
    const vu32 h = graddrop_hash<vu32>(lo, hi, key0, key1);
    return __builtin_convertvector(bit_cast_to<vs32>(h >> 8), vf) * kTwoToMinus24;
  }

  template <DType D>
  static bool graddrop_lowp(const void* const* rows, int64_t k, const double* leak, uint32_t key0, uint32_t key1,
                            int64_t begin, int64_t end, void* out) {
    float* lk = static_cast<float*>(alloca(sizeof(float) * static_cast<size_t>(k)));
    for (int64_t i = 0; i < k; ++i) lk[i] = leak != nullptr ? static_cast<float>(leak[i]) : 0.0f;
    constexpr int64_t block = V * L;
    const vf zero = {};
    const vf one = splat<vf>(1.0f);
    const vu32 magnitude = splat<vu32>(0x7fffffffu);
    vf check = {};
    int64_t c = begin;
    for (; c + block <= end; c += block) {
      vf s[V], a[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) s[v] = a[v] = zero;
      for (int64_t i = 0; i < k; ++i) {
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) {
          const vf x = K::template load_lanes<D>(rows[i], c + v * L);
          s[v] += x;
          a[v] += bit_cast_to<vf>(bit_cast_to<vu32>(x) & magnitude);
          check += x * zero;
        }
      }
      vs32 up[V], down[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const vf thr = (uniform_lanes(c + v * L, key0, key1) * 2.0f - 1.0f) * a[v];
        up[v] = s[v] > thr;
        down[v] = s[v] < thr;
      }
      vf acc[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[v] = zero;
      for (int64_t i = 0; i < k; ++i) {
        const vf li = splat<vf>(lk[i]);
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) {
          const vf x = K::template load_lanes<D>(rows[i], c + v * L);
          const vs32 keep = ((x > zero) & up[v]) | ((x < zero) & down[v]);
          acc[v] += (keep ? one : li) * x;
        }
      }
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) K::template store_lanes<D>(out, c + v * L, acc[v], false);
    }
    bool finite = true;
    for (int l = 0; l < L; ++l) finite = finite && check[l] == 0.0f;
    return graddrop_columns<D, float>(rows, k, leak, key0, key1, c, end, out) && finite;
  }

  static bool graddrop_range(DType dtype, const void* const* rows, int64_t k, const double* leak, uint32_t key0,
                             uint32_t key1, int64_t begin, int64_t end, void* out) {
    return by_dtype(dtype, [&](auto d) {
      constexpr DType D = decltype(d)::value;
      if constexpr (D == DType::kFloat64) {
        return graddrop_columns<D, double>(rows, k, leak, key0, key1, begin, end, out);
      } else {
        return graddrop_lowp<D>(rows, k, leak, key0, key1, begin, end, out);
      }
    });
  }

  // ---- TrimmedMean ---------------------------------------------------------------------------
  //
  // Values become integer keys in the total order (NaN made one positive quiet NaN, then negative
  // values' magnitude bits flipped), sorted by the network with integer min/max, and turned back.

  template <typename S, typename T>
  static TOLARIA_INLINE S key_one(T x) {
    S bits = bit_cast_to<S>(x);
    if (x != x) bits = sizeof(S) == 4 ? S(0x7fc00000) : S(0x7ff8000000000000LL);
    const S sign_mask = sizeof(S) == 4 ? S(0x7fffffff) : S(0x7fffffffffffffffLL);
    return bits ^ ((bits >> (sizeof(S) * 8 - 1)) & sign_mask);
  }

  template <typename S, typename T>
  static TOLARIA_INLINE T value_one(S key) {
    const S sign_mask = sizeof(S) == 4 ? S(0x7fffffff) : S(0x7fffffffffffffffLL);
    return bit_cast_to<T>(S(key ^ ((key >> (sizeof(S) * 8 - 1)) & sign_mask)));
  }

  template <DType D, typename T, typename S>
  static bool trimmed_columns(const void* const* rows, int64_t k, int64_t trim, const int32_t* pairs, int64_t npairs,
                              int64_t begin, int64_t end, void* out) {
    S* keys = static_cast<S*>(alloca(sizeof(S) * static_cast<size_t>(k)));
    const T count = static_cast<T>(k - 2 * trim);
    T check = 0;
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t i = 0; i < k; ++i) {
        const T x = load_scalar<D>(rows[i], c);
        check += x * T(0);
        keys[i] = key_one<S, T>(x);
      }
      for (int64_t p = 0; p < npairs; ++p) {
        const S x = keys[pairs[2 * p]], y = keys[pairs[2 * p + 1]];
        keys[pairs[2 * p]] = min_of(x, y);
        keys[pairs[2 * p + 1]] = max_of(x, y);
      }
      T acc = 0;
      for (int64_t i = trim; i < k - trim; ++i) acc += value_one<S, T>(keys[i]);
      store_scalar<D>(out, c, T(acc / count));
    }
    return check == T(0);
  }

  template <DType D>
  static bool trimmed_lowp(const void* const* rows, int64_t k, int64_t trim, const int32_t* pairs, int64_t npairs,
                           int64_t begin, int64_t end, void* out) {
    vs32* keys = static_cast<vs32*>(alloca(sizeof(vs32) * static_cast<size_t>(k) + 64));
    keys = reinterpret_cast<vs32*>((reinterpret_cast<uintptr_t>(keys) + 63) / 64 * 64);
    const vf zero = {};
    const vf count = splat<vf>(static_cast<float>(k - 2 * trim));
    const vs32 quiet_nan = splat<vs32>(0x7fc00000);
    const vs32 magnitude = splat<vs32>(0x7fffffff);
    vf check = {};
    int64_t c = begin;
    for (; c + L <= end; c += L) {
      for (int64_t i = 0; i < k; ++i) {
        const vf x = K::template load_lanes<D>(rows[i], c);
        check += x * zero;
        const vs32 bits = (x != x) ? quiet_nan : bit_cast_to<vs32>(x);
        keys[i] = bits ^ ((bits >> 31) & magnitude);
      }
      for (int64_t p = 0; p < npairs; ++p) {
        vs32* lo = keys + pairs[2 * p];
        vs32* hi = keys + pairs[2 * p + 1];
        const vs32 x = *lo, y = *hi;
        const vs32 less = x < y;
        *lo = less ? x : y;
        *hi = less ? y : x;
      }
      vf acc = zero;
      for (int64_t i = trim; i < k - trim; ++i) acc += bit_cast_to<vf>(keys[i] ^ ((keys[i] >> 31) & magnitude));
      K::template store_lanes<D>(out, c, acc / count, false);
    }
    bool finite = true;
    for (int l = 0; l < L; ++l) finite = finite && check[l] == 0.0f;
    return trimmed_columns<D, float, int32_t>(rows, k, trim, pairs, npairs, c, end, out) && finite;
  }

  static bool trimmed_mean_range(DType dtype, const void* const* rows, int64_t k, int64_t trim, const int32_t* pairs,
                                 int64_t npairs, int64_t begin, int64_t end, void* out) {
    return by_dtype(dtype, [&](auto d) {
      constexpr DType D = decltype(d)::value;
      if constexpr (D == DType::kFloat64) {
        return trimmed_columns<D, double, int64_t>(rows, k, trim, pairs, npairs, begin, end, out);
      } else {
        return trimmed_lowp<D>(rows, k, trim, pairs, npairs, begin, end, out);
      }
    });
  }

  static constexpr tolaria::cpu::CoordinatewiseTable table() {
    return {Isa::kName, &graddrop_range, &trimmed_mean_range};
  }
};
