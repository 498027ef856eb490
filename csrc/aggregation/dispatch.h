// Which ISA level's kernels run: the best the CPU supports, or the one asked for.
#pragma once

#include <string>
#include <vector>

#include "kernel_table.h"

namespace tolaria::cpu {

// Levels compiled into this build for this architecture, widest first.
std::vector<std::string> compiled_levels();
// The compiled levels this CPU (and its operating system) can run, widest first.
std::vector<std::string> supported_levels();
// The kernels in use; the widest supported level until select_level() picks another.
const KernelTable& active_kernels();
// Makes `level` the one in use; throws std::invalid_argument naming the valid ones otherwise.
void select_level(const std::string& level);

}  // namespace tolaria::cpu
