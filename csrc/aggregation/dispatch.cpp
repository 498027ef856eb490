// Picks the kernel table at load time from what the CPU supports (cpuid, with the operating
// system's consent to the wider registers: GCC's and clang's __builtin_cpu_supports check both).
#include "dispatch.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <atomic>
#include <stdexcept>

namespace tolaria::cpu {
namespace {

struct Level {
  const KernelTable* table;
  bool (*supported)();
};

#if defined(__x86_64__)
// F16C and MOVBE from cpuid leaf 1 (ECX bits 29 and 22): not every compiler's
// __builtin_cpu_supports knows their names.
bool has_f16c_and_movbe() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  return (ecx & (1u << 29)) != 0 && (ecx & (1u << 22)) != 0;
}
bool has_avx2() {
  __builtin_cpu_init();
  // x86-64-v3, the flags isa_avx2.cpp is compiled with.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && has_f16c_and_movbe();
}
bool has_avx512() {
  __builtin_cpu_init();
  // x86-64-v4, the flags isa_avx512.cpp is compiled with.
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif
bool always() { return true; }

const std::vector<Level>& levels() {
  static const std::vector<Level> all = {
#if defined(__x86_64__)
    {&kAvx512Kernels, &has_avx512},
    {&kAvx2Kernels, &has_avx2},
#endif
#if defined(__aarch64__)
    {&kNeonKernels, &always},
#endif
    {&kBaselineKernels, &always},
  };
  return all;
}

const KernelTable* best_supported() {
  for (const Level& level : levels()) {
    if (level.supported()) return level.table;
  }
  return &kBaselineKernels;
}

std::atomic<const KernelTable*>& active() {
  static std::atomic<const KernelTable*> table{best_supported()};
  return table;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& name : names) out += (out.empty() ? "" : ", ") + name;
  return out;
}

}  // namespace

std::vector<std::string> compiled_levels() {
  std::vector<std::string> names;
  for (const Level& level : levels()) names.emplace_back(level.table->name);
  return names;
}

std::vector<std::string> supported_levels() {
  std::vector<std::string> names;
  for (const Level& level : levels()) {
    if (level.supported()) names.emplace_back(level.table->name);
  }
  return names;
}

const KernelTable& active_kernels() { return *active().load(std::memory_order_acquire); }

void select_level(const std::string& name) {
  for (const Level& level : levels()) {
    if (name != level.table->name) continue;
    if (!level.supported()) {
      throw std::invalid_argument("CPU ISA level '" + name + "' is not supported by this CPU; it supports " +
                                  join(supported_levels()));
    }
    active().store(level.table, std::memory_order_release);
    return;
  }
  throw std::invalid_argument("unknown CPU ISA level '" + name + "'; this build has " + join(compiled_levels()));
}

}  // namespace tolaria::cpu
