// The seam of the coordinate-wise aggregations (GradDrop, TrimmedMean): functions of each column of
// J alone, not of the Gram matrix, so one pass over J and no second one.
//
// coordinatewise.h is compiled inside each isa_*.cpp, next to kernels.h and with its ISA traits, and
// each of those files exports one CoordinatewiseTable; coordinatewise.cpp picks the table of the ISA
// level whose KernelTable is active (so TOLARIA_CPU_ISA and set_cpu_isa() apply to both), splits the
// columns into ranges and runs them on torch's OpenMP team (parallel.h).
#pragma once

#include <cstdint>
#include <vector>

#include "kernel_table.h"

namespace tolaria::cpu {

struct CoordinatewiseTable {
  const char* name;  // the ISA level, as KernelTable::name
  // GradDrop (Chen et al. 2020, Algorithm 1 lines 10-15, f = identity) over columns [begin, end):
  // s = sum_i x_i, a = sum_i |x_i|, u = the column's uniform (graddrop_uniform below), thr = (2u - 1) a;
  // keep x_i if (x_i > 0 and s > thr) or (x_i < 0 and s < thr), i.e. if P > u, resp. P < u, for
  // P = (1 + s / a) / 2; out = sum_i (kept ? 1 : leak_i) x_i. `leak` may be null (no leak). Sums in
  // float32 lanes for 16/32-bit rows (double for float64), rows in index order. Returns whether every
  // input value was finite.
  bool (*graddrop_range)(DType dtype, const void* const* rows, int64_t k, const double* leak, uint32_t key0,
                         uint32_t key1, int64_t begin, int64_t end, void* out);
  // TrimmedMean (Yin et al. 2018) over columns [begin, end): per column, the K values sorted in the
  // total order -inf < ... < -0 < +0 < ... < +inf < NaN (a sorting network, `pairs`: npairs
  // compare-exchanges (pairs[2p], pairs[2p + 1])), the trim smallest and trim largest dropped, the
  // rest summed in ascending order (float32 for 16/32-bit rows, double for float64) and divided by
  // their count. Returns whether every input value was finite.
  bool (*trimmed_mean_range)(DType dtype, const void* const* rows, int64_t k, int64_t trim, const int32_t* pairs,
                             int64_t npairs, int64_t begin, int64_t end, void* out);
};

#if defined(__x86_64__)
extern const CoordinatewiseTable kAvx512Coordinatewise;
extern const CoordinatewiseTable kAvx2Coordinatewise;
#endif
#if defined(__aarch64__)
extern const CoordinatewiseTable kNeonCoordinatewise;
#endif
extern const CoordinatewiseTable kBaselineCoordinatewise;

// The table of the ISA level in use (dispatch.h's active_kernels()).
const CoordinatewiseTable& active_coordinatewise();

// Batcher's merge-exchange sorting network for n keys (Knuth, TAOCP 3, 5.2.2 Algorithm M), as
// index pairs (lo, hi): after every compare-exchange in order, keys[lo] <= keys[hi].
std::vector<int32_t> merge_exchange_pairs(int64_t n);

// The drivers the bindings call (rows: K row pointers of n elements); each returns whether every
// input value was finite. `threads`: the most threads of torch's team to use.
bool graddrop(const std::vector<uintptr_t>& rows, int64_t n, int dtype, uintptr_t leak, uint32_t key0, uint32_t key1,
              uintptr_t out, int threads);
bool trimmed_mean(const std::vector<uintptr_t>& rows, int64_t n, int dtype, int64_t trim, uintptr_t out, int threads);

}  // namespace tolaria::cpu
