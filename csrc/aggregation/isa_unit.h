// What every ISA translation unit (isa_<level>.cpp) shares: the kernels and the tables they fill,
// included once, after the level's own intrinsics header, and the macro that defines the level's two
// tables. A level's file then holds only its traits struct (vector width, tile shape, float16 and
// streaming stores): see docs/ARCHITECTURE.md, "Adding a CPU ISA level".
#pragma once

#include <alloca.h>

#include <cstdint>
#include <cstring>

#include "coordinatewise_table.h"
#include "kernel_table.h"

// kernels.h goes inside an anonymous namespace (internal linkage, see there); every system header
// it uses is included above, outside it. The traits struct of the including file goes in the same
// (per translation unit) anonymous namespace.
namespace {
#include "kernels.h"
#include "coordinatewise.h"  // GradDrop and TrimmedMean, on the same traits
}  // namespace

// Defines tolaria::cpu::k<Traits>Kernels and k<Traits>Coordinatewise, the tables dispatch.cpp names.
#define TOLARIA_DEFINE_ISA_TABLES(Traits)                                                       \
  namespace tolaria::cpu {                                                                      \
  extern const KernelTable k##Traits##Kernels = Kernels<Traits>::table();                       \
  extern const CoordinatewiseTable k##Traits##Coordinatewise = Coordinatewise<Traits>::table(); \
  }
