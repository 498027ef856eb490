// The seam between the dispatcher (module.cpp, dispatch.cpp) and the per-ISA kernels (isa_*.cpp).
//
// Each isa_*.cpp compiles kernels.h once with its own instruction set and vector width and exports
// one KernelTable; dispatch.cpp picks the best table the running CPU supports (or the one
// TOLARIA_CPU_ISA forces). See docs/ARCHITECTURE.md, "The compiled CPU engine".
#pragma once

#include <cstdint>

namespace tolaria::cpu {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

struct KernelTable {
  const char* name;  // the ISA level: "avx512", "avx2", "baseline", "neon"
  int lanes;         // floats per vector register
  // Bytes of scratch one gram_range call needs for k rows (64-byte aligned by the caller).
  int64_t (*gram_workspace_bytes)(int64_t k);
  // acc[i * k + j] += sum over columns [begin, end) of row_i * row_j, for j <= i (lower triangle).
  // `wide`: accumulate in double (float64 input, or a re-run after a float32 overflow).
  void (*gram_range)(DType dtype, bool wide, const void* const* rows, int64_t k, int64_t begin, int64_t end,
                     double* acc, void* workspace);
  // out[c] = sum_i weights[i] * row_i[c] for c in [begin, end); returns whether every sum was finite.
  // `wide`: accumulate in double (for cancelling weights), else in float32 lanes for 16/32-bit rows.
  // `stream`: non-temporal stores (float32 only; out + begin must be 64-byte aligned).
  bool (*combine_range)(DType dtype, bool wide, const void* const* rows, int64_t k, const double* weights,
                        int64_t begin, int64_t end, void* out, bool stream);
};

// Defined by the isa_*.cpp of the running architecture (the others compile to nothing).
#if defined(__x86_64__)
extern const KernelTable kAvx512Kernels;
extern const KernelTable kAvx2Kernels;
#endif
#if defined(__aarch64__)
extern const KernelTable kNeonKernels;
#endif
extern const KernelTable kBaselineKernels;

}  // namespace tolaria::cpu
