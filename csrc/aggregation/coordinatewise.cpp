// GradDrop and TrimmedMean on the CPU: the table of the active ISA level, the sorting network, and
// the split of the columns into ranges on torch's OpenMP team (the kernels: coordinatewise.h).
//
// Every column's result depends on that column alone, so ranges need no reduction and the result
// does not depend on the thread count; the Python side (tolaria/aggregation/backends/coordinatewise.py)
// validates everything before calling in, and this file trusts its arguments.
#include <algorithm>
#include <cstring>
#include <vector>

#include "coordinatewise_table.h"
#include "dispatch.h"
#include "parallel.h"

namespace tolaria::cpu {
namespace {

// As module.cpp: hand a thread at least a few hundred KiB of rows.
constexpr int64_t kMinWorkPerRange = 1 << 18;

int range_count(int64_t work, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, work / kMinWorkPerRange)));
}

std::vector<const void*> to_pointers(const std::vector<uintptr_t>& rows) {
  std::vector<const void*> ptrs(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) ptrs[i] = reinterpret_cast<const void*>(rows[i]);
  return ptrs;
}

bool all_true(const std::vector<char>& flags) {
  return std::all_of(flags.begin(), flags.end(), [](char f) { return f != 0; });
}

}  // namespace

const CoordinatewiseTable& active_coordinatewise() {
  const char* name = active_kernels().name;
  static const CoordinatewiseTable* const tables[] = {
#if defined(__x86_64__)
    &kAvx512Coordinatewise,
    &kAvx2Coordinatewise,
#endif
#if defined(__aarch64__)
    &kNeonCoordinatewise,
#endif
    &kBaselineCoordinatewise,
  };
  for (const CoordinatewiseTable* table : tables) {
    if (std::strcmp(table->name, name) == 0) return *table;
  }
  return kBaselineCoordinatewise;
}

std::vector<int32_t> merge_exchange_pairs(int64_t n) {
  std::vector<int32_t> pairs;
  if (n < 2) return pairs;
  int t = 0;
  while ((int64_t{1} << t) < n) ++t;
  for (int64_t p = int64_t{1} << (t - 1); p > 0; p >>= 1) {  // M1, M5
    int64_t q = int64_t{1} << (t - 1), r = 0, d = p;         // M2
    while (true) {
      for (int64_t i = 0; i < n - d; ++i) {  // M3
        if ((i & p) == r) {
          pairs.push_back(static_cast<int32_t>(i));
          pairs.push_back(static_cast<int32_t>(i + d));
        }
      }
      if (q == p) break;  // M4
      d = q - p;
      q >>= 1;
      r = p;
    }
  }
  return pairs;
}

bool graddrop(const std::vector<uintptr_t>& rows, int64_t n, int dtype, uintptr_t leak, uint32_t key0, uint32_t key1,
              uintptr_t out, int threads) {
  const int64_t k = static_cast<int64_t>(rows.size());
  const std::vector<const void*> ptrs = to_pointers(rows);
  const CoordinatewiseTable& table = active_coordinatewise();
  const DType d = static_cast<DType>(dtype);
  const double* lk = reinterpret_cast<const double*>(leak);  // null: no leak
  void* o = reinterpret_cast<void*>(out);
  const int ranges = range_count(n * k, threads);
  std::vector<char> finite(static_cast<size_t>(ranges), 1);
  parallel_ranges(n, ranges, threads, [&](int r, int64_t b, int64_t e) {
    finite[r] = table.graddrop_range(d, ptrs.data(), k, lk, key0, key1, b, e, o);
  });
  return all_true(finite);
}

bool trimmed_mean(const std::vector<uintptr_t>& rows, int64_t n, int dtype, int64_t trim, uintptr_t out, int threads) {
  const int64_t k = static_cast<int64_t>(rows.size());
  const std::vector<const void*> ptrs = to_pointers(rows);
  const std::vector<int32_t> pairs = merge_exchange_pairs(k);
  const CoordinatewiseTable& table = active_coordinatewise();
  const DType d = static_cast<DType>(dtype);
  void* o = reinterpret_cast<void*>(out);
  const int64_t npairs = static_cast<int64_t>(pairs.size() / 2);
  const int ranges = range_count(n * k, threads);
  std::vector<char> finite(static_cast<size_t>(ranges), 1);
  parallel_ranges(n, ranges, threads, [&](int r, int64_t b, int64_t e) {
    finite[r] = table.trimmed_mean_range(d, ptrs.data(), k, trim, pairs.data(), npairs, b, e, o);
  });
  return all_true(finite);
}

}  // namespace tolaria::cpu
