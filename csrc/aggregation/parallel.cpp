// Parallel loops on torch's own OpenMP team.
//
// Starting std::threads per call cost tens of microseconds, and torch's OpenMP workers, still
// spinning after the previous torch op, competed with them for the cores (a pass right after a torch
// op took up to 1.7x as long). Running on the same team instead reuses those very workers. We do not
// link an OpenMP runtime (a second copy would be a second team): we call GOMP_parallel, the entry
// point of GCC's OpenMP ABI, in the runtime torch already loaded (libgomp; LLVM's and Intel's
// runtimes export it too). torch.set_num_threads sets that team's size; the caller passes it.
#include "parallel.h"

#include <dlfcn.h>
#if defined(__linux__)
#include <link.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

namespace tolaria::cpu {
namespace {

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct Runtime {
  GompParallel parallel = nullptr;
  std::string library;
};

#if defined(__linux__)
// Loaded libraries that export GOMP_parallel; one under torch's own folder wins.
int visit_library(struct dl_phdr_info* info, size_t, void* data) {
  auto* best = static_cast<Runtime*>(data);
  const std::string name = info->dlpi_name ? info->dlpi_name : "";
  if (name.find("omp") == std::string::npos) return 0;
  void* handle = dlopen(name.c_str(), RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) return 0;
  auto fn = reinterpret_cast<GompParallel>(dlsym(handle, "GOMP_parallel"));
  const bool torch_own = name.find("torch") != std::string::npos;
  if (fn != nullptr && (best->parallel == nullptr || torch_own)) {
    best->parallel = fn;
    best->library = name;
  }
  dlclose(handle);  // RTLD_NOLOAD took a reference; the library stays loaded by its owner
  return 0;
}
#endif

Runtime discover() {
  Runtime found;
#if defined(__linux__)
  dl_iterate_phdr(&visit_library, &found);
#endif
  if (found.parallel == nullptr) {
    found.parallel = reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    if (found.parallel != nullptr) {
      Dl_info info;
      found.library =
          dladdr(reinterpret_cast<void*>(found.parallel), &info) && info.dli_fname ? info.dli_fname : "GOMP_parallel";
    }
  }
  return found;
}

const Runtime& runtime() {
  static const Runtime found = discover();
  return found;
}

struct Job {
  int64_t n;
  int64_t per;
  int ranges;
  std::atomic<int> next{0};
  const std::function<void(int, int64_t, int64_t)>* fn;
};

// Every member of the team takes ranges until none are left.
void run_job(void* data) {
  Job* job = static_cast<Job*>(data);
  for (int r = job->next.fetch_add(1); r < job->ranges; r = job->next.fetch_add(1)) {
    const int64_t begin = std::min(job->n, job->per * r);
    const int64_t end = std::min(job->n, job->per * (r + 1));
    (*job->fn)(r, begin, end);
  }
}

long current_thread_id() {
#if defined(__linux__)
  return static_cast<long>(syscall(SYS_gettid));
#else
  return 0;
#endif
}

}  // namespace

const std::string& openmp_runtime() { return runtime().library; }

void parallel_ranges(int64_t n, int ranges, int threads, const std::function<void(int, int64_t, int64_t)>& fn) {
  Job job;
  job.n = n;
  job.ranges = std::max(ranges, 1);
  job.per = ((n + job.ranges - 1) / job.ranges + 63) / 64 * 64;
  job.fn = &fn;
  threads = std::max(1, std::min(threads, job.ranges));
  const GompParallel parallel = runtime().parallel;
  if (threads > 1 && parallel != nullptr) {
    parallel(&run_job, &job, static_cast<unsigned>(threads), 0);
  } else {
    run_job(&job);
  }
}

std::vector<long> team_thread_ids(int threads) {
  std::mutex lock;
  std::vector<long> ids;
  struct Probe {
    std::mutex* lock;
    std::vector<long>* ids;
  } probe{&lock, &ids};
  auto record = [](void* data) {
    auto* p = static_cast<Probe*>(data);
    const long id = current_thread_id();
    std::lock_guard<std::mutex> guard(*p->lock);
    p->ids->push_back(id);
  };
  const GompParallel parallel = runtime().parallel;
  if (threads > 1 && parallel != nullptr) {
    parallel(record, &probe, static_cast<unsigned>(threads), 0);
  } else {
    record(&probe);
  }
  return ids;
}

}  // namespace tolaria::cpu
