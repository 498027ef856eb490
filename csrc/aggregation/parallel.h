// Parallel loops on torch's own OpenMP team: no threads of our own.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace tolaria::cpu {

// The OpenMP runtime torch loaded, found at the first call: its library path, or "" when no loaded
// library provides GOMP_parallel (then every pass runs on the calling thread).
const std::string& openmp_runtime();

// Splits [0, n) into `ranges` ranges whose bounds are multiples of 64 elements (whole cache lines
// for every dtype) and runs fn(range, begin, end) for each, on up to `threads` threads of torch's
// OpenMP team (the calling thread among them). Which thread runs which range does not matter:
// results are indexed by range, so they do not depend on scheduling.
void parallel_ranges(int64_t n, int ranges, int threads, const std::function<void(int, int64_t, int64_t)>& fn);

// The thread ids (gettid) of the team one parallel region of `threads` threads runs on; for tests.
std::vector<long> team_thread_ids(int threads);

}  // namespace tolaria::cpu
