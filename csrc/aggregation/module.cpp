// CPU hot path of the aggregation engine: G = J J^T and out = w^T J (pybind11 bindings).
//
// J is given as K row pointers (rows need not be adjacent: a K x N tensor with any row stride, or K
// separate flat tensors), so nothing is stacked first. The passes themselves are in kernels.h,
// compiled once per ISA level (isa_*.cpp) and picked at load time (dispatch.cpp); they run on
// torch's own OpenMP team (parallel.cpp). This file splits the columns into ranges, sums the
// per-range partial Gram matrices in range order (so the result does not depend on scheduling) and
// re-runs a float32-accumulated Gram in double when its diagonal came out non-finite.
//
// The Python side (tolaria/aggregation/backends/cpu.py) validates dtypes, devices, contiguity and
// lengths before calling in; this file trusts its arguments.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "coordinatewise_table.h"
#include "dispatch.h"
#include "kernel_table.h"
#include "parallel.h"

namespace py = pybind11;

namespace {

using tolaria::cpu::DType;
using tolaria::cpu::KernelTable;

// Handing a range to another thread of the team costs a few microseconds: only worth it for a few
// hundred KiB of rows each.
constexpr int64_t kMinWorkPerRange = 1 << 18;  // elements of J (all K rows) per range

int range_count(int64_t work, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, work / kMinWorkPerRange)));
}

std::vector<const void*> to_pointers(const std::vector<uintptr_t>& rows) {
  std::vector<const void*> ptrs(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) ptrs[i] = reinterpret_cast<const void*>(rows[i]);
  return ptrs;
}

// One 64-byte-aligned scratch area per range, of the size the kernels ask for.
struct Workspaces {
  Workspaces(int ranges, int64_t bytes) : stride((bytes + 63) / 64 * 64 + 64) {
    storage.resize(static_cast<size_t>(ranges * stride / 8 + 8));
  }
  void* get(int range) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(storage.data());
    return reinterpret_cast<void*>((base + 63) / 64 * 64 + static_cast<uintptr_t>(range * stride));
  }
  int64_t stride;
  std::vector<double> storage;
};

void gram(const std::vector<uintptr_t>& rows, int64_t n, int dtype, uintptr_t out, int threads) {
  const int64_t k = static_cast<int64_t>(rows.size());
  std::vector<const void*> ptrs = to_pointers(rows);
  py::gil_scoped_release release;
  const KernelTable& kernels = tolaria::cpu::active_kernels();
  const DType d = static_cast<DType>(dtype);
  const int ranges = range_count(n * k, threads);
  Workspaces workspaces(ranges, kernels.gram_workspace_bytes(k));
  std::vector<std::vector<double>> partial;
  auto run = [&](bool wide) {
    partial.assign(static_cast<size_t>(ranges), std::vector<double>(k * k, 0.0));
    tolaria::cpu::parallel_ranges(n, ranges, threads, [&](int r, int64_t b, int64_t e) {
      kernels.gram_range(d, wide, ptrs.data(), k, b, e, partial[r].data(), workspaces.get(r));
    });
  };
  run(/*wide=*/d == DType::kFloat64);
  if (d != DType::kFloat64) {
    // If every diagonal partial sum is finite in float32, Cauchy-Schwarz bounds every off-diagonal
    // one, so the fast path never overflows silently; otherwise double tells a NaN/inf in the input
    // (still non-finite) from an overflow of a huge finite input (finite in double).
    bool finite = true;
    for (int64_t i = 0; i < k; ++i) {
      double s = 0.0;
      for (const auto& p : partial) s += p[i * k + i];
      finite = finite && std::isfinite(s);
    }
    if (!finite) run(/*wide=*/true);
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

bool combine(const std::vector<uintptr_t>& rows, int64_t n, int dtype, uintptr_t weights, uintptr_t out, int threads,
             bool wide) {
  const int64_t k = static_cast<int64_t>(rows.size());
  std::vector<const void*> ptrs = to_pointers(rows);
  const double* w = reinterpret_cast<const double*>(weights);
  void* o = reinterpret_cast<void*>(out);
  const DType d = static_cast<DType>(dtype);
  // Stream the output past the caches only when it is far larger than them (it will not be read
  // back from cache anyway) and every range starts on a cache line.
  const bool stream = !wide && d == DType::kFloat32 && n * 4 >= kStreamBytes && out % 64 == 0;
  const int ranges = range_count(n * k, threads);
  std::vector<char> finite(static_cast<size_t>(ranges), 1);
  py::gil_scoped_release release;
  const KernelTable& kernels = tolaria::cpu::active_kernels();
  tolaria::cpu::parallel_ranges(n, ranges, threads, [&](int r, int64_t b, int64_t e) {
    finite[r] = kernels.combine_range(d, wide, ptrs.data(), k, w, b, e, o, stream);
  });
#if defined(__x86_64__)
  if (stream) _mm_sfence();  // non-temporal stores are weakly ordered: publish them
#endif
  return std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; });
}

}  // namespace

PYBIND11_MODULE(_aggregation_cpu, m) {
  m.doc() = "Tolaria's compiled CPU Gram and combine passes (called from tolaria.aggregation).";
  m.def("gram", &gram, py::arg("rows"), py::arg("n"), py::arg("dtype"), py::arg("out"), py::arg("threads"),
        "Writes G = J J^T (K x K float64, row-major) to `out` for K row pointers of length n.");
  m.def("combine", &combine, py::arg("rows"), py::arg("n"), py::arg("dtype"), py::arg("weights"), py::arg("out"),
        py::arg("threads"), py::arg("wide") = false,
        "Writes out = sum_k weights[k] * row_k (n elements, the rows' dtype) to `out`; returns "
        "whether every sum was finite (computed in float32 or wider, before rounding to the output). "
        "`wide`: accumulate in double and round once (for weights whose terms cancel).");
  m.def("graddrop", &tolaria::cpu::graddrop, py::arg("rows"), py::arg("n"), py::arg("dtype"), py::arg("leak"),
        py::arg("key0"), py::arg("key1"), py::arg("out"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "GradDrop's combination (coordinatewise_table.h) of K row pointers of length n into `out` (the rows' "
        "dtype); `leak`: K float64 or 0 for none; returns whether every input value was finite.");
  m.def("trimmed_mean", &tolaria::cpu::trimmed_mean, py::arg("rows"), py::arg("n"), py::arg("dtype"), py::arg("trim"),
        py::arg("out"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "Per column, the mean of the K values less the `trim` smallest and `trim` largest, into `out`; returns "
        "whether every input value was finite.");
  m.def("merge_exchange_pairs", &tolaria::cpu::merge_exchange_pairs, py::arg("n"),
        "The sorting network TrimmedMean uses for n keys, as a flat list of (lo, hi) index pairs (for tests).");
  m.def(
      "isa", [] { return std::string(tolaria::cpu::active_kernels().name); }, "The ISA level whose kernels run now.");
  m.def(
      "lanes", [] { return tolaria::cpu::active_kernels().lanes; }, "Floats per vector of the level in use.");
  m.def("set_isa", &tolaria::cpu::select_level, py::arg("level"),
        "Runs the kernels of `level` from now on (ValueError if unknown or unsupported here).");
  m.def("compiled_isa_levels", &tolaria::cpu::compiled_levels, "ISA levels built in, widest first.");
  m.def("supported_isa_levels", &tolaria::cpu::supported_levels, "Built-in levels this CPU runs, widest first.");
  m.def("openmp_runtime", &tolaria::cpu::openmp_runtime,
        "Path of the OpenMP runtime (torch's) the passes run on; '' if none was found.");
  m.def("team_thread_ids", &tolaria::cpu::team_thread_ids, py::arg("threads"),
        "Thread ids of one parallel region of `threads` threads (for tests).");
  m.attr("FLOAT32") = static_cast<int>(DType::kFloat32);
  m.attr("FLOAT64") = static_cast<int>(DType::kFloat64);
  m.attr("BFLOAT16") = static_cast<int>(DType::kBFloat16);
  m.attr("FLOAT16") = static_cast<int>(DType::kFloat16);
}
