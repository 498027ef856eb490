// A standalone check of the compiled CPU kernels (csrc/aggregation) without Python: every ISA level
// this CPU supports, against a double reference, for all four dtypes, K from 1 to 17, odd N and
// ragged tails, split ranges, streaming stores and non-finite inputs. Built and run by
// tests/native/test_native_kernels.py, natively and cross-compiled for aarch64 under qemu.
//
// Prints one line per failure and a summary; exits 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "dispatch.h"
#include "kernel_table.h"

using tolaria::cpu::DType;
using tolaria::cpu::KernelTable;

namespace {

int failures = 0;
int checks = 0;

void fail(const std::string& what) {
  if (++failures <= 20) std::printf("FAIL %s\n", what.c_str());
}

uint64_t state = 0x9e3779b97f4a7c15ull;
double uniform() {  // in [-1, 1)
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<double>(state >> 11) / 4503599627370496.0 - 1.0;
}

// Plain decoders, written independently of csrc/aggregation/half.h.
double bf16_value(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
double f16_value(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 31, mantissa = h & 1023;
  double v;
  if (exponent == 0) {
    v = std::ldexp(mantissa, -24);
  } else if (exponent == 31) {
    v = mantissa ? NAN : INFINITY;
  } else {
    v = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return sign ? -v : v;
}
// Nearest-even encoders for test data (values are small and normal, or exact).
uint16_t to_bf16(double x) {
  float f = static_cast<float>(x);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}
uint16_t to_f16(double x) {  // |x| < 2: round to 10 mantissa bits below the leading one
  if (x == 0) return 0;
  const int sign = x < 0;
  double a = std::fabs(x);
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exponent = e - 1 + 15;
  if (exponent <= 0) {
    return static_cast<uint16_t>((sign << 15) | static_cast<int>(std::nearbyint(std::ldexp(a, 24))));
  }
  double scaled = std::nearbyint(std::ldexp(a, 10 - (e - 1)));  // in [1024, 2048]
  if (scaled == 2048) {
    scaled = 1024;
    ++exponent;
  }
  return static_cast<uint16_t>((sign << 15) | (exponent << 10) | (static_cast<int>(scaled) - 1024));
}

size_t element_size(DType d) { return d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2; }

struct Matrix {
  DType dtype;
  int64_t k, n;
  std::vector<std::vector<unsigned char>> bytes;
  std::vector<std::vector<double>> values;  // exactly what the stored elements hold

  Matrix(DType d, int64_t k_, int64_t n_, int64_t offset_elements) : dtype(d), k(k_), n(n_) {
    const size_t es = element_size(d);
    for (int64_t i = 0; i < k; ++i) {
      // Rows start `offset_elements` into their buffer, so that they are not all 64-byte aligned.
      bytes.emplace_back(static_cast<size_t>(n + offset_elements + 64) * es, 0);
      values.emplace_back(static_cast<size_t>(n));
      for (int64_t c = 0; c < n; ++c) set(i, c, uniform() * (1.0 + i), offset_elements);
    }
    offset = offset_elements;
  }
  void set(int64_t i, int64_t c, double x, int64_t off) {
    unsigned char* p = bytes[i].data() + (off + c) * element_size(dtype);
    if (dtype == DType::kFloat64) {
      std::memcpy(p, &x, 8);
      values[i][c] = x;
    } else if (dtype == DType::kFloat32) {
      float f = static_cast<float>(x);
      std::memcpy(p, &f, 4);
      values[i][c] = f;
    } else if (dtype == DType::kBFloat16) {
      uint16_t h = to_bf16(x);
      std::memcpy(p, &h, 2);
      values[i][c] = bf16_value(h);
    } else {
      uint16_t h = to_f16(x);
      std::memcpy(p, &h, 2);
      values[i][c] = f16_value(h);
    }
  }
  std::vector<const void*> rows() const {
    std::vector<const void*> r;
    for (const auto& b : bytes) r.push_back(b.data() + offset * element_size(dtype));
    return r;
  }
  int64_t offset = 0;
};

double decode(DType d, const unsigned char* p) {
  if (d == DType::kFloat64) {
    double x;
    std::memcpy(&x, p, 8);
    return x;
  }
  if (d == DType::kFloat32) {
    float x;
    std::memcpy(&x, p, 4);
    return x;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return d == DType::kBFloat16 ? bf16_value(h) : f16_value(h);
}

std::vector<double> gram_of(const KernelTable& t, const Matrix& m, bool wide, int64_t split) {
  std::vector<double> acc(static_cast<size_t>(m.k * m.k), 0.0);
  std::vector<double> workspace(static_cast<size_t>(t.gram_workspace_bytes(m.k) / 8 + 16));
  void* ws = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(workspace.data()) + 63) / 64 * 64);
  const std::vector<const void*> rows = m.rows();
  t.gram_range(m.dtype, wide, rows.data(), m.k, 0, split, acc.data(), ws);
  t.gram_range(m.dtype, wide, rows.data(), m.k, split, m.n, acc.data(), ws);
  return acc;
}

void check_gram(const KernelTable& t, DType d, int64_t k, int64_t n, const char* dname) {
  Matrix m(d, k, n, (k + n) % 3);
  const double tol = d == DType::kFloat64 ? 1e-13 : 2e-6;
  for (bool wide : {false, true}) {
    if (d == DType::kFloat64 && !wide) continue;
    const int64_t split = n > 200 ? (n / 2) / 64 * 64 : 0;
    std::vector<double> g = gram_of(t, m, wide, split);
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j <= i; ++j) {
        double ref = 0, ii = 0, jj = 0;
        for (int64_t c = 0; c < n; ++c) {
          ref += m.values[i][c] * m.values[j][c];
          ii += m.values[i][c] * m.values[i][c];
          jj += m.values[j][c] * m.values[j][c];
        }
        ++checks;
        const double scale = std::sqrt(ii * jj) + 1e-300;
        if (!(std::fabs(g[i * k + j] - ref) <= tol * scale)) {
          char buf[200];
          std::snprintf(buf, sizeof buf, "%s gram %s wide=%d k=%lld n=%lld G[%lld,%lld]=%.17g ref %.17g", t.name, dname,
                        wide, (long long)k, (long long)n, (long long)i, (long long)j, g[i * k + j], ref);
          fail(buf);
        }
      }
    }
  }
}

void check_combine(const KernelTable& t, DType d, int64_t k, int64_t n, const char* dname) {
  Matrix m(d, k, n, 0);
  std::vector<double> w(static_cast<size_t>(k));
  for (auto& x : w) x = uniform();
  const size_t es = element_size(d);
  std::vector<double> storage(static_cast<size_t>(n * es / 8 + 16));
  unsigned char* out = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) / 64 * 64);
  const std::vector<const void*> rows = m.rows();
  for (int mode = 0; mode < 3; ++mode) {  // float32 lanes, streaming stores, double accumulation
    const bool stream = mode == 1, wide = mode == 2;
    if (stream && d != DType::kFloat32) continue;
    const int64_t split = n > 200 ? (n / 2) / 64 * 64 : 0;
    bool finite = t.combine_range(d, wide, rows.data(), k, w.data(), 0, split, out, stream);
    finite = t.combine_range(d, wide, rows.data(), k, w.data(), split, n, out, stream) && finite;
    ++checks;
    if (!finite) fail(std::string(t.name) + " combine reported a non-finite sum of finite inputs");
    const double rel = d == DType::kFloat64 ? 1e-14 : d == DType::kFloat32 ? 1e-6 : d == DType::kBFloat16 ? 8e-3 : 1e-3;
    for (int64_t c = 0; c < n; ++c) {
      double ref = 0, mag = 0;
      for (int64_t i = 0; i < k; ++i) {
        ref += w[i] * m.values[i][c];
        mag += std::fabs(w[i] * m.values[i][c]);
      }
      const double got = decode(d, out + c * es);
      ++checks;
      // float16 results below 2^-14 are subnormal: their spacing is 2^-24 whatever their size.
      const double floor = d == DType::kFloat16 ? std::ldexp(1.0, -24) : 1e-30;
      // Double accumulation rounds once: half a unit in the last place of the result itself.
      const double unit = d == DType::kFloat32 ? 0x1p-24 : d == DType::kBFloat16 ? 0x1p-8 : 0x1p-11;
      const double tol =
          wide && d != DType::kFloat64 ? 1.01 * unit * std::fabs(ref) + floor + 1e-15 * mag : rel * mag + floor;
      if (!(std::fabs(got - ref) <= tol)) {
        char buf[200];
        std::snprintf(buf, sizeof buf, "%s combine %s mode=%d k=%lld n=%lld out[%lld]=%.9g ref %.9g", t.name, dname,
                      mode, (long long)k, (long long)n, (long long)c, got, ref);
        fail(buf);
        break;
      }
    }
  }
  // A NaN anywhere makes the pass report a non-finite sum, in the vector body and in the tail.
  for (int64_t where : {int64_t(0), n - 1}) {
    Matrix bad(d, k, n, 0);
    bad.set(k - 1, where, NAN, 0);
    const std::vector<const void*> bad_rows = bad.rows();
    ++checks;
    for (bool wide : {false, true}) {
      if (t.combine_range(d, wide, bad_rows.data(), k, w.data(), 0, n, out, false)) {
        fail(std::string(t.name) + " combine missed a NaN in " + dname);
      }
    }
  }
}

}  // namespace

int main() {
  const struct {
    DType d;
    const char* name;
  } dtypes[] = {{DType::kFloat32, "float32"},
                {DType::kFloat64, "float64"},
                {DType::kBFloat16, "bfloat16"},
                {DType::kFloat16, "float16"}};
  const int64_t ns[] = {1, 3, 17, 63, 65, 257, 1001, 4099, 9000};
  std::vector<std::string> levels = tolaria::cpu::supported_levels();
  for (const std::string& level : levels) {
    tolaria::cpu::select_level(level);
    const KernelTable& t = tolaria::cpu::active_kernels();
    for (const auto& dt : dtypes) {
      for (int64_t k = 1; k <= 17; ++k) {
        for (int64_t n : ns) {
          if (k > 9 && n > 4099) continue;  // keep the emulated run short
          check_gram(t, dt.d, k, n, dt.name);
          check_combine(t, dt.d, k, n, dt.name);
        }
      }
    }
  }
  std::string names;
  for (const auto& l : levels) names += (names.empty() ? "" : ",") + l;
  std::printf("kernel harness: levels %s: %d checks, %d failures\n", names.c_str(), checks, failures);
  return failures == 0 ? 0 : 1;
}
