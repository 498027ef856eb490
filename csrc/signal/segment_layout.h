// Layout of a signal segment and the primitives every signal file shares (errors, clocks, names,
// UTF-8 checks). See shared_seqlock.h for the protocol.

#pragma once

#include <atomic>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#define TOLARIA_SIGNAL_FUTEX 1
#else
#define TOLARIA_SIGNAL_FUTEX 0
#endif

namespace tolaria::signal {

// ---- errors (the module maps each to a Python exception) ------------------------------------------

// An OS call failed: raised in Python as OSError(errno, message, name), which Python turns into
// FileNotFoundError, FileExistsError, PermissionError, ... from the errno.
struct OsError : std::runtime_error {
  int code;
  std::string name;
  OsError(int code_, const std::string& message, std::string name_)
      : std::runtime_error(message), code(code_), name(std::move(name_)) {}
};

// The name holds a segment this build cannot read (foreign, other kind, other layout version).
struct LayoutError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The handle was closed (Python ValueError, as for a closed file).
struct ClosedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A writer died in the middle of a write (or the record stayed mid-write for kStuckSeconds); the
// next trigger or clear repairs the record.
struct TornRecordError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// How long a call waits for another process (a record mid-write, the writer lock) before it gives
// up with an error. A real writer holds both for well under a microsecond; seconds mean a stopped
// writer (SIGSTOP) or a corrupted segment, and a call must not hang on either.
constexpr double kStuckSeconds = 0.5;

// ---- small helpers ------------------------------------------------------------------------------

constexpr uint64_t magic_from(const char (&tag)[9]) {
  uint64_t m = 0;
  for (int i = 7; i >= 0; --i) m = (m << 8) | static_cast<unsigned char>(tag[i]);
  return m;  // little-endian: the tag reads as text in a hex dump of the segment
}

constexpr std::size_t kMaxNameLength = 200;

inline double monotonic_seconds() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  // the clock behind Python's time.monotonic() on Linux
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

inline double monotonic_ms_now() { return monotonic_seconds() * 1e3; }

inline void sleep_seconds(double s) {
  timespec ts;
  ts.tv_sec = static_cast<time_t>(s);
  ts.tv_nsec = static_cast<long>((s - static_cast<double>(ts.tv_sec)) * 1e9);
  nanosleep(&ts, nullptr);
}

// Whether `pid` names a live process. A zombie (exited, not yet reaped) counts as dead. Process
// ids can be reused, so a long-dead creator whose pid was recycled looks alive: the caller then
// gets a clear "exists, creator alive" error and can unlink the segment by hand.
inline bool process_alive(uint32_t pid) {
  // 0 and values past INT_MAX name no process (as a pid_t they are 0 or negative, which kill()
  // reads as a process group or every process); they come from corrupted segments.
  if (pid == 0 || pid > static_cast<uint32_t>(INT_MAX)) return false;
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
#if defined(__linux__)
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%u/stat", pid);
  if (FILE* f = std::fopen(path, "r")) {
    char buf[512];
    std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = '\0';
    // Format: "pid (comm) S ..."; comm may contain spaces or parentheses, so read after the last ')'.
    if (const char* close = std::strrchr(buf, ')')) {
      if (close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X')) return false;
    }
  }
#endif
  return true;
}

// Names are plain file names under the shm namespace: no '/', nothing that could escape it.
inline void check_name(const std::string& name) {
  bool ok = !name.empty() && name.size() <= kMaxNameLength && name[0] != '.';
  for (char c : name) {
    bool allowed =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    ok = ok && allowed;
  }
  if (!ok) {
    throw std::invalid_argument("invalid signal name '" + name + "': use 1 to " + std::to_string(kMaxNameLength) +
                                " characters among letters, digits, '.', '_' and '-', not starting with '.' (no '/')");
  }
}

// Cuts UTF-8 text to at most `max_bytes` bytes without splitting a character.
inline std::size_t utf8_prefix_length(const std::string& text, std::size_t max_bytes) {
  if (text.size() <= max_bytes) return text.size();
  std::size_t cut = max_bytes;
  // text[cut] is the first byte left out; while it continues a character, that character straddles
  // the cut and is left out whole.
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return cut;
}

// Whether `data` is UTF-8 exactly as Python's strict decoder takes it (no overlong forms, no
// surrogates, nothing past U+10FFFF): a record that passes decodes without error.
inline bool valid_utf8(const char* data, std::size_t n) {
  const auto* s = reinterpret_cast<const unsigned char*>(data);
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    std::size_t extra;
    unsigned char lo = 0x80, hi = 0xBF;  // range of the first continuation byte
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      extra = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      extra = 2;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      extra = 3;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // past U+10FFFF
    } else {
      return false;
    }
    if (n - i <= extra) return false;
    if (s[i + 1] < lo || s[i + 1] > hi) return false;
    for (std::size_t k = 2; k <= extra; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
    }
    i += extra + 1;
  }
  return true;
}

// ---- the segment --------------------------------------------------------------------------------

struct Header {
  std::atomic<uint64_t> magic;
  std::atomic<uint32_t> layout_version;
  std::atomic<uint32_t> creator_pid;
  std::atomic<uint64_t> segment_size;
  std::atomic<uint32_t> writer_pid;
  std::atomic<uint32_t> wake_word;
  std::atomic<uint64_t> seq;
  std::atomic<uint64_t> generation;
  std::atomic<uint64_t> trigger_generation;
  std::atomic<uint32_t> is_set;
  std::atomic<uint32_t> waiters;
};

// Shared memory starts zero-filled and is mapped by several processes, so every field must be a
// lock-free atomic whose all-zero bytes mean 0.
static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<uint32_t>::is_always_lock_free,
              "the shared signal needs lock-free 32- and 64-bit atomics");
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word must be a plain u32");
static_assert(sizeof(Header) == 64, "header layout changed: bump every layout version");
static_assert(offsetof(Header, magic) == 0 && offsetof(Header, layout_version) == 8 &&
                  offsetof(Header, creator_pid) == 12 && offsetof(Header, segment_size) == 16 &&
                  offsetof(Header, writer_pid) == 24 && offsetof(Header, wake_word) == 28 &&
                  offsetof(Header, seq) == 32 && offsetof(Header, generation) == 40 &&
                  offsetof(Header, trigger_generation) == 48 && offsetof(Header, is_set) == 56 &&
                  offsetof(Header, waiters) == 60,
              "header offsets are part of the layout");

// The magic numbers of every Tolaria signal kind, to name the kind a mismatched segment holds.
inline const char* known_kind(uint64_t magic);

template <class Payload>
struct Segment {
  static constexpr std::size_t kWords = (sizeof(Payload) + 7) / 8;
  Header header;
  std::atomic<uint64_t> words[kWords];
};

// The smallest page size: a segment that fits in it is backed whole by any non-empty file, so a
// short (corrupted) segment is caught by the size checks instead of faulting the reader.
constexpr std::size_t kMinPageSize = 4096;

// A consistent copy of the record.
template <class Payload>
struct Snapshot {
  Payload payload;
  uint64_t generation;
  bool is_set;
};

}  // namespace tolaria::signal
