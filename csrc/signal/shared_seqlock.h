// The cross-process signal primitive: one record in POSIX shared memory, published with a seqlock
// and announced through a futex.
//
// Everything a signal kind needs except its payload lives here, once: naming, creating, attaching,
// reclaiming a segment left by a crashed creator, the writer lock, the seqlock, the generation
// counters and the futex wait/wake. A signal kind (emergency, deadline) is a trivially copyable
// payload struct with its own magic number and layout version; see signal_module.cpp.
//
// Segment layout (all offsets fixed; the first 16 bytes are the same in every layout version, so a
// reader can always tell what a segment is before trusting anything else in it):
//
//   0   u64  magic               which kind of segment this is (0 while its creator initialises it)
//   8   u32  layout_version      bumped whenever anything below changes
//   12  u32  creator_pid         process that created (or reclaimed) the segment
//   16  u64  segment_size        total bytes, so a payload size change is caught as well
//   24  u32  writer_pid          writer lock: pid holding it, 0 when free
//   28  u32  wake_word           futex word: bumped after every write (and on close)
//   32  u64  seq                 seqlock sequence: odd while a write is in progress
//   40  u64  generation          bumped by every trigger and every clear
//   48  u64  trigger_generation  generation of the latest trigger
//   56  u32  is_set              1 after a trigger, 0 after a clear
//   60  u32  waiters             processes/threads inside wait(); writers skip the wake syscall at 0
//   64  ...  payload             the kind's record, stored as 64-bit words
//
// Writers from any process serialise on writer_pid; a writer that finds the lock held by a dead
// process takes it over, and its write repairs whatever record the dead writer left half-written.
// Readers never block writers: they copy the record and retry when the sequence moved.
//
// Hostile or corrupted segments. Every byte of a mapped segment may be overwritten by another
// process at any time, so nothing read from it is trusted: the header is checked on attach and on
// every call, the record is checked after every read (the kind's validator: ranges, lengths,
// UTF-8), and every loop that waits on another process is bounded (kStuckSeconds), ending in an
// error instead of a hang. The record lives in the segment's first page, which a file of any
// non-zero size backs, so no read faults. Only a segment of this effective uid, writable by no one
// else (no group or other write bit), is attached: another user could otherwise forge or suppress
// a HALT. What this does not stop: a process of the same user that truncates the segment to zero
// bytes after others mapped it makes their next access fault (SIGBUS); same-user processes are
// trusted as much as the process itself.

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

// One process's handle on a signal segment of kind `Payload`.
//
// Payload must provide: kMagic (u64), kVersion (u32), kKind (const char*), a static
// `std::string invalid(const Payload&, uint32_t is_set)` that says what is wrong with a record read
// from the segment (empty: nothing), and be trivially copyable; a value-initialised Payload is
// the cleared record.
template <class Payload>
class SharedSeqlock {
  static_assert(std::is_trivially_copyable_v<Payload>, "payloads are copied word by word");
  using Seg = Segment<Payload>;
  static_assert(sizeof(Seg) <= kMinPageSize, "a segment must fit one page (see kMinPageSize)");

 public:
  static constexpr std::size_t kSegmentSize = sizeof(Seg);
  static constexpr double kInitGraceSeconds = 1.0;  // how long a creator may take to initialise

  // Creates a new segment. A segment of this kind left by a dead creator is reclaimed: with this
  // layout it is adopted in place (processes still attached stay connected; the record is cleared
  // and the generation keeps counting), with an older layout it is replaced.
  static std::unique_ptr<SharedSeqlock> create(const std::string& name) {
    check_name(name);
    const std::string path = "/" + name;
    for (int attempt = 0; attempt < 8; ++attempt) {
      int fd = shm_open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
      if (fd >= 0) {
        std::unique_ptr<SharedSeqlock> handle(new SharedSeqlock(name, fd, /*created=*/true));
        handle->map_or_unlink(path);
        Header& h = handle->header();
        h.layout_version.store(Payload::kVersion, std::memory_order_relaxed);
        h.creator_pid.store(static_cast<uint32_t>(getpid()), std::memory_order_relaxed);
        h.segment_size.store(kSegmentSize, std::memory_order_relaxed);
        h.magic.store(Payload::kMagic, std::memory_order_release);  // last: publishes the segment
        return handle;
      }
      if (errno != EEXIST) throw os_error(errno, "cannot create shared memory for", name);
      if (auto adopted = reclaim(name, path)) return adopted;
      // The stale segment was removed (or vanished); create it afresh.
    }
    throw OsError(
        EEXIST,
        std::string("cannot create ") + Payload::kKind + " signal '" + name + "': other processes keep re-creating it",
        name);
  }

  static std::unique_ptr<SharedSeqlock> attach(const std::string& name) {
    check_name(name);
    const std::string path = "/" + name;
    int fd = shm_open(path.c_str(), O_RDWR, 0);
    if (fd < 0) {
      if (errno == ENOENT) {
        throw OsError(ENOENT,
                      std::string("no ") + Payload::kKind + " signal named '" + name + "' exists (create() it first)",
                      name);
      }
      throw os_error(errno, "cannot open shared memory for", name);
    }
    std::unique_ptr<SharedSeqlock> handle(new SharedSeqlock(name, fd, /*created=*/false));
    handle->check_owner();
    handle->wait_until_initialised();
    handle->map();
    handle->check_layout();
    return handle;
  }

  // Creates the signal, or attaches to it when a live process created it: of several processes
  // calling this at once, exactly one creates (O_CREAT|O_EXCL) and the others attach, waiting for
  // its header (kInitGraceSeconds). The name vanishing between the two (its creator unlinked it, or
  // a dead creator's segment was replaced) is retried.
  static std::unique_ptr<SharedSeqlock> create_or_attach(const std::string& name) {
    check_name(name);
    for (int attempt = 0; attempt < 8; ++attempt) {
      try {
        return create(name);
      } catch (const OsError& e) {
        if (e.code != EEXIST) throw;
      }
      try {
        return attach(name);
      } catch (const OsError& e) {
        if (e.code != ENOENT) throw;
      }
    }
    throw OsError(EEXIST,
                  std::string("cannot create or attach ") + Payload::kKind + " signal '" + name +
                      "': it keeps appearing and vanishing (other processes create and unlink it in a loop)",
                  name);
  }

  ~SharedSeqlock() {
    if (seg_ != nullptr) munmap(seg_, map_size_);
    if (fd_ >= 0) ::close(fd_);
  }

  SharedSeqlock(const SharedSeqlock&) = delete;
  SharedSeqlock& operator=(const SharedSeqlock&) = delete;

  const std::string& name() const { return name_; }
  bool created() const { return created_; }
  bool closed() const { return closing_.load(); }
  std::optional<uint32_t> reclaimed_pid() const { return reclaimed_pid_; }

  // Publishes `payload` as the new record (set) and returns its generation.
  uint64_t trigger(const Payload& payload) {
    std::shared_lock<std::shared_mutex> lk(mu_);
    check_open();
    check_live_header();
    return write(payload, /*set=*/true);
  }

  // Publishes `payload` only if `accept(current payload, current is_set word)` holds at the moment
  // of writing, atomically with respect to every other writer. Returns the generation, or nullopt.
  // The current record may be corrupted: `accept` decides what a write over it does
  // (Payload::invalid says whether it is).
  template <class Accept>
  std::optional<uint64_t> trigger_if(const Payload& payload, const Accept& accept) {
    std::shared_lock<std::shared_mutex> lk(mu_);
    check_open();
    check_live_header();
    return write_if(payload, /*set=*/true, accept);
  }

  // Clears the record only if `accept(current payload, current is_set)` holds at the moment of
  // writing, atomically with respect to every other writer. Returns the generation, or nullopt.
  template <class Accept>
  std::optional<uint64_t> clear_if(const Accept& accept) {
    std::shared_lock<std::shared_mutex> lk(mu_);
    check_open();
    check_live_header();
    return write_if(Payload{}, /*set=*/false, accept);
  }

  // Replaces the record with the cleared one; returns the new generation.
  uint64_t clear() {
    std::shared_lock<std::shared_mutex> lk(mu_);
    check_open();
    check_live_header();
    return write(Payload{}, /*set=*/false);
  }

  // A consistent copy of the record, checked: a header that changed since attach or a record the
  // kind's validator rejects is a LayoutError; a record mid-write for kStuckSeconds a TornRecordError.
  Snapshot<Payload> read() const {
    std::shared_lock<std::shared_mutex> lk(mu_);
    check_open();
    check_live_header();
    const Header& h = header();
    uint64_t buf[Seg::kWords];
    double give_up_at = 0.0;
    for (uint64_t spins = 1;; ++spins) {
      uint64_t s1 = h.seq.load(std::memory_order_acquire);
      if ((s1 & 1) == 0) {
        for (std::size_t i = 0; i < Seg::kWords; ++i) buf[i] = seg_->words[i].load(std::memory_order_relaxed);
        uint64_t generation = h.generation.load(std::memory_order_relaxed);
        uint32_t is_set = h.is_set.load(std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_acquire);
        if (h.seq.load(std::memory_order_relaxed) == s1) {
          Snapshot<Payload> snap;
          std::memcpy(&snap.payload, buf, sizeof(Payload));
          if (const std::string problem = Payload::invalid(snap.payload, is_set); !problem.empty()) {
            throw LayoutError(std::string("the ") + Payload::kKind + " signal '" + name_ +
                              "' holds a corrupted record (" + problem +
                              "): something other than a Tolaria signal wrote to it; the next trigger() or "
                              "clear() replaces it");
          }
          snap.generation = generation;
          snap.is_set = is_set != 0;
          return snap;
        }
      }
      if (spins % 64 == 0) sched_yield();
      if (spins % 4096 == 0) {
        const bool mid_write = (h.seq.load(std::memory_order_acquire) & 1) != 0;
        uint32_t writer = h.writer_pid.load(std::memory_order_acquire);
        if (mid_write && !process_alive(writer)) {
          throw TornRecordError(std::string("the ") + Payload::kKind + " signal '" + name_ +
                                "' holds a half-written record: its writer (pid " + std::to_string(writer) +
                                ") died mid-write; the next trigger() or clear() repairs it");
        }
        const double now = monotonic_seconds();
        if (give_up_at == 0.0) give_up_at = now + kStuckSeconds;
        if (now > give_up_at) {
          throw TornRecordError(std::string("the ") + Payload::kKind + " signal '" + name_ + "' gave no consistent " +
                                "record for " + std::to_string(kStuckSeconds) + " s (" +
                                (mid_write
                                     ? "stuck mid-write, writer pid " + std::to_string(writer) + " alive or stopped"
                                     : "its sequence keeps moving") +
                                "): the segment is corrupted or its writer is stopped; the next trigger() or "
                                "clear() repairs it");
        }
      }
    }
  }

  uint64_t generation() const {
    std::shared_lock<std::shared_mutex> lk(mu_);
    check_open();
    return header().generation.load(std::memory_order_acquire);
  }

  bool is_set() const {
    std::shared_lock<std::shared_mutex> lk(mu_);
    check_open();
    return header().is_set.load(std::memory_order_acquire) != 0;
  }

  // Blocks until a trigger with a generation above `after` (default: the current generation), or
  // until the timeout (negative: none). Returns whether such a trigger happened. `interrupted` runs
  // when a POSIX signal interrupts the sleep (it may throw, e.g. KeyboardInterrupt). Call it without
  // the GIL.
  bool wait(double timeout_s, std::optional<uint64_t> after, const std::function<void()>& interrupted) {
    std::shared_lock<std::shared_mutex> lk(mu_);
    check_open();
    Header& h = header();
    const uint64_t target = after.has_value() ? *after : h.generation.load(std::memory_order_acquire);
    const bool forever = timeout_s < 0;
    const double deadline = forever ? 0.0 : monotonic_seconds() + timeout_s;
    // Announce this waiter before reading the word (both seq_cst): a writer either sees the count
    // and wakes, or wrote before the word was read, so the futex call returns at once. A waiter
    // killed while waiting leaves the count high: writers then just always make the wake call.
    h.waiters.fetch_add(1, std::memory_order_seq_cst);
    struct Leave {
      Header& h;
      ~Leave() { h.waiters.fetch_sub(1, std::memory_order_seq_cst); }
    } leave{h};
#if !TOLARIA_SIGNAL_FUTEX
    uint64_t polls = 0;
#endif
    for (;;) {
      // Load the word before checking: a trigger after this load changes it, so the futex call
      // below returns at once instead of sleeping through the wake.
      const uint32_t word = h.wake_word.load(std::memory_order_seq_cst);
      if (h.trigger_generation.load(std::memory_order_acquire) > target) return true;
      check_live_header();  // a segment overwritten while waited on ends the wait loudly
      if (closing_.load()) {
        throw ClosedError(std::string(Payload::kKind) + " signal '" + name_ + "' was closed while waiting");
      }
      double remaining = forever ? 3600.0 : deadline - monotonic_seconds();
      if (remaining <= 0) return false;
      if (remaining > 3600.0) remaining = 3600.0;  // long timeouts sleep in slices (no time_t overflow)
#if TOLARIA_SIGNAL_FUTEX
      timespec ts;
      ts.tv_sec = static_cast<time_t>(remaining);
      ts.tv_nsec = static_cast<long>((remaining - static_cast<double>(ts.tv_sec)) * 1e9);
      // Not FUTEX_PRIVATE: the word is shared between processes.
      long rc = syscall(SYS_futex, reinterpret_cast<uint32_t*>(&h.wake_word), FUTEX_WAIT, word, &ts, nullptr, 0);
      if (rc != 0) {
        if (errno == EINTR) {
          interrupted();
        } else if (errno != EAGAIN && errno != ETIMEDOUT) {
          throw os_error(errno, "futex wait failed on", name_);
        }
      }
#else
      // No cross-process futex here: poll. Short sleeps keep the wake latency near 0.2 ms.
      sleep_seconds(remaining < 2e-4 ? remaining : 2e-4);
      if (++polls % 256 == 0) interrupted();
#endif
    }
  }

  // Closes this handle: waiters in this process return with an error, later calls fail. Waits for
  // calls in flight on other threads. Call it without the GIL. Idempotent.
  void close() {
    if (closing_.exchange(true)) {
      std::unique_lock<std::shared_mutex> lk(mu_);  // another close is in progress: let it finish
      return;
    }
    {
      std::shared_lock<std::shared_mutex> lk(mu_);
      if (seg_ != nullptr) wake(header());  // waiters of this handle see closing_ and leave
    }
    std::unique_lock<std::shared_mutex> lk(mu_);
    if (seg_ != nullptr) munmap(seg_, map_size_);
    seg_ = nullptr;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  // Removes the name, if it still refers to this handle's segment (a crashed creator's segment may
  // have been replaced under the same name since). Works on a closed handle too.
  void unlink() {
    const std::string path = "/" + name_;
    int fd = shm_open(path.c_str(), O_RDONLY, 0);
    if (fd < 0) {
      if (errno == ENOENT) {
        throw OsError(
            ENOENT,
            std::string("cannot unlink ") + Payload::kKind + " signal '" + name_ + "': the name no longer exists",
            name_);
      }
      throw os_error(errno, "cannot open shared memory to unlink", name_);
    }
    struct stat st;
    int rc = fstat(fd, &st);
    int err = errno;
    ::close(fd);
    if (rc != 0) throw os_error(err, "cannot stat shared memory of", name_);
    if (st.st_dev != dev_ || st.st_ino != ino_) {
      throw std::runtime_error(std::string("refusing to unlink ") + Payload::kKind + " signal '" + name_ +
                               "': the name now refers to a different segment than this handle's");
    }
    if (shm_unlink(path.c_str()) != 0) throw os_error(errno, "cannot unlink shared memory", name_);
    unlinked_ = true;
  }

  bool unlinked() const { return unlinked_; }

 private:
  SharedSeqlock(std::string name, int fd, bool created) : name_(std::move(name)), fd_(fd), created_(created) {}

  static OsError os_error(int code, const std::string& what, const std::string& name) {
    return OsError(code, what + " " + Payload::kKind + " signal '" + name + "': " + std::strerror(code), name);
  }

  Header& header() const { return seg_->header; }

  void check_open() const {
    if (seg_ == nullptr || closing_.load()) {
      throw ClosedError(std::string(Payload::kKind) + " signal '" + name_ + "' is closed");
    }
  }

  // Refuses a segment another user owns, or one anyone but its owner may write: its contents would
  // be someone else's to forge (a fake HALT) or to suppress.
  void check_owner() const {
    struct stat st;
    if (fstat(fd_, &st) != 0) throw os_error(errno, "cannot stat shared memory of", name_);
    const uid_t me = geteuid();
    if (st.st_uid != me) {
      throw OsError(EACCES,
                    std::string("refusing ") + Payload::kKind + " signal '" + name_ + "': the segment belongs to uid " +
                        std::to_string(st.st_uid) + ", not to this process's uid " + std::to_string(me) +
                        " (only segments of the same user are trusted; run every process as one user)",
                    name_);
    }
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
      char mode[8];
      std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
      throw OsError(EACCES,
                    std::string("refusing ") + Payload::kKind + " signal '" + name_ + "': its mode " + mode +
                        " lets other users write it (signals are created 0600); unlink it and create it again",
                    name_);
    }
  }

  // The header as attach found it: magic, version and size re-checked on every call, since another
  // process may have overwritten them since.
  void check_live_header() const {
    const Header& h = header();
    if (h.magic.load(std::memory_order_relaxed) != Payload::kMagic ||
        h.layout_version.load(std::memory_order_relaxed) != Payload::kVersion ||
        h.segment_size.load(std::memory_order_relaxed) != kSegmentSize) {
      throw LayoutError(std::string("the ") + Payload::kKind + " signal '" + name_ +
                        "' had its header overwritten since it was attached (magic, layout version or size "
                        "changed): something other than a Tolaria signal writes to it; unlink it and create it "
                        "again");
    }
  }

  void stat_identity() {
    struct stat st;
    if (fstat(fd_, &st) != 0) throw os_error(errno, "cannot stat shared memory of", name_);
    dev_ = st.st_dev;
    ino_ = st.st_ino;
  }

  void map() {
    stat_identity();
    void* addr = mmap(nullptr, kSegmentSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    if (addr == MAP_FAILED) throw os_error(errno, "cannot map shared memory of", name_);
    seg_ = static_cast<Seg*>(addr);
    map_size_ = kSegmentSize;
  }

  // For a segment this process just created: size and map it, or remove it again on failure.
  void map_or_unlink(const std::string& path) {
    if (ftruncate(fd_, static_cast<off_t>(kSegmentSize)) != 0) {
      int err = errno;
      shm_unlink(path.c_str());
      throw os_error(err, "cannot size shared memory of", name_);
    }
    try {
      map();
    } catch (...) {
      shm_unlink(path.c_str());
      throw;
    }
  }

  off_t segment_file_size() const {
    struct stat st;
    if (fstat(fd_, &st) != 0) throw os_error(errno, "cannot stat shared memory of", name_);
    return st.st_size;
  }

  // Reads the 8-byte magic through the file (the segment may still be shorter than a header).
  uint64_t file_magic() const {
    if (segment_file_size() < static_cast<off_t>(sizeof(uint64_t))) return 0;
    uint64_t magic = 0;
    if (pread(fd_, &magic, sizeof magic, 0) != static_cast<ssize_t>(sizeof magic)) {
      throw os_error(errno, "cannot read the header of", name_);
    }
    return magic;
  }

  // A creator sizes the segment, then fills the header and writes the magic last. Gives it a grace
  // period; returns whether the segment got initialised.
  bool initialised_within_grace() const {
    const double deadline = monotonic_seconds() + kInitGraceSeconds;
    for (;;) {
      if (segment_file_size() >= static_cast<off_t>(sizeof(Header)) && file_magic() != 0) return true;
      if (monotonic_seconds() > deadline) return false;
      sleep_seconds(1e-3);
    }
  }

  void wait_until_initialised() const {
    if (!initialised_within_grace()) {
      throw LayoutError(std::string("shared memory '") + name_ + "' was never initialised as a signal " +
                        "(its creator crashed while creating it, or it is not a Tolaria signal); " +
                        "create() reclaims it, or unlink it by hand");
    }
  }

  void check_layout() const {
    const Header& h = header();
    const uint64_t magic = h.magic.load(std::memory_order_acquire);
    if (magic != Payload::kMagic) {
      const char* kind = known_kind(magic);
      throw LayoutError(std::string("shared memory '") + name_ + "' is not a Tolaria " + Payload::kKind +
                        " signal: it holds " +
                        (kind ? std::string("a Tolaria ") + kind + " signal"
                              : std::string("a foreign segment (unknown magic number)")));
    }
    const uint32_t version = h.layout_version.load(std::memory_order_relaxed);
    if (version != Payload::kVersion) {
      throw LayoutError(std::string(Payload::kKind) + " signal '" + name_ + "' has layout version " +
                        std::to_string(version) + "; this build reads version " + std::to_string(Payload::kVersion) +
                        " (a process from another Tolaria build made it; unlink it or use matching builds)");
    }
    const uint64_t size = h.segment_size.load(std::memory_order_relaxed);
    if (size != kSegmentSize || segment_file_size() < static_cast<off_t>(kSegmentSize)) {
      throw LayoutError(std::string(Payload::kKind) + " signal '" + name_ + "' records a size of " +
                        std::to_string(size) + " bytes; layout version " + std::to_string(version) + " is " +
                        std::to_string(kSegmentSize) + " bytes");
    }
  }

  // The name exists. Returns the adopted segment, or nullptr when the stale one was removed (the
  // caller then creates it afresh). Throws when the segment is alive or not ours to reclaim.
  static std::unique_ptr<SharedSeqlock> reclaim(const std::string& name, const std::string& path) {
    int fd = shm_open(path.c_str(), O_RDWR, 0);
    if (fd < 0) {
      if (errno == ENOENT) return nullptr;  // removed meanwhile
      throw os_error(errno, "cannot open existing shared memory of", name);
    }
    std::unique_ptr<SharedSeqlock> old(new SharedSeqlock(name, fd, /*created=*/true));
    old->check_owner();
    old->stat_identity();
    if (!old->initialised_within_grace()) {
      old->unlink_stale(path);  // its creator died before finishing the header
      return nullptr;
    }
    const uint64_t magic = old->file_magic();
    if (magic != Payload::kMagic) {
      const char* kind = known_kind(magic);
      throw LayoutError(std::string("cannot create ") + Payload::kKind + " signal '" + name + "': the name holds " +
                        (kind ? std::string("a Tolaria ") + kind + " signal" : std::string("a foreign segment")) +
                        "; unlink it by hand if it is stale");
    }
    old->map_prefix_or_whole();
    Header& h = old->header();
    uint32_t creator = h.creator_pid.load(std::memory_order_acquire);
    const bool same_layout = h.layout_version.load(std::memory_order_relaxed) == Payload::kVersion &&
                             h.segment_size.load(std::memory_order_relaxed) == kSegmentSize &&
                             old->segment_file_size() >= static_cast<off_t>(kSegmentSize);
    for (;;) {
      if (process_alive(creator)) {
        throw OsError(EEXIST,
                      std::string(Payload::kKind) + " signal '" + name + "' already exists and its creator (pid " +
                          std::to_string(creator) + ") is alive; attach() to it, or unlink() it first",
                      name);
      }
      if (!same_layout) {
        old->unlink_stale(path);  // an older layout: replace it
        return nullptr;
      }
      // Adopt: only one reclaiming process wins this exchange; the others see a live creator.
      if (h.creator_pid.compare_exchange_strong(creator, static_cast<uint32_t>(getpid()))) break;
    }
    old->reclaimed_pid_ = creator;
    old->write(Payload{}, /*set=*/false);
    return old;
  }

  // Maps the whole segment when it has this layout's size, else just the header (enough to judge it).
  void map_prefix_or_whole() {
    if (segment_file_size() < static_cast<off_t>(kSegmentSize)) {
      // Shorter older layout: map only the header; the handle is thrown away after the judgement.
      void* addr = mmap(nullptr, sizeof(Header), PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
      if (addr == MAP_FAILED) throw os_error(errno, "cannot map shared memory of", name_);
      seg_ = static_cast<Seg*>(addr);
      map_size_ = sizeof(Header);
      return;
    }
    map();
  }

  // Removes a stale segment, unless someone replaced it under the same name meanwhile.
  void unlink_stale(const std::string& path) {
    int fd = shm_open(path.c_str(), O_RDONLY, 0);
    if (fd < 0) return;  // already gone: the caller creates it afresh
    struct stat st;
    bool same = fstat(fd, &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_;
    ::close(fd);
    if (same && shm_unlink(path.c_str()) != 0 && errno != ENOENT) {
      throw os_error(errno, "cannot remove the stale shared memory of", name_);
    }
  }

  void lock_writer(Header& h) {
    const uint32_t me = static_cast<uint32_t>(getpid());
    double give_up_at = 0.0;
    for (uint64_t spins = 1;; ++spins) {
      uint32_t owner = 0;
      if (h.writer_pid.compare_exchange_weak(owner, me, std::memory_order_acquire, std::memory_order_relaxed)) return;
      if (spins % 64 == 0) sched_yield();
      // The lock is held for well under a microsecond; still held after thousands of tries means
      // its owner may have died holding it. Take it over then (the write repairs the record).
      if (spins % 4096 == 0) {
        if (owner != 0 && owner != me && !process_alive(owner)) {
          if (h.writer_pid.compare_exchange_strong(owner, me, std::memory_order_acquire, std::memory_order_relaxed)) {
            return;
          }
        }
        // Held by a live (or stopped) process, or by this one's pid written by someone else: give up
        // rather than hang. Taking it over could tear the record under a writer that resumes.
        const double now = monotonic_seconds();
        if (give_up_at == 0.0) give_up_at = now + kStuckSeconds;
        if (now > give_up_at) {
          throw TornRecordError(std::string("cannot write the ") + Payload::kKind + " signal '" + name_ +
                                "': its writer lock has been held by pid " + std::to_string(owner) + " for " +
                                std::to_string(kStuckSeconds) +
                                " s (a stopped writer or a corrupted segment); unlink it and create it again");
        }
      }
    }
  }

  uint64_t write(const Payload& payload, bool set) {
    return *write_if(payload, set, [](const Payload&, uint32_t) { return true; });
  }

  // Writes unless `accept(current payload, current is_set word)`, evaluated under the writer lock
  // (so no other process can write in between), returns false; then returns nullopt.
  template <class Accept>
  std::optional<uint64_t> write_if(const Payload& payload, bool set, const Accept& accept) {
    Header& h = header();
    uint64_t buf[Seg::kWords] = {};
    std::memcpy(buf, &payload, sizeof(Payload));
    lock_writer(h);
    if ((h.seq.load(std::memory_order_relaxed) & 1) == 0) {  // a torn record is always replaced
      uint64_t current_words[Seg::kWords];
      for (std::size_t i = 0; i < Seg::kWords; ++i) current_words[i] = seg_->words[i].load(std::memory_order_relaxed);
      Payload current;
      std::memcpy(&current, current_words, sizeof(Payload));
      if (!accept(current, h.is_set.load(std::memory_order_relaxed))) {
        h.writer_pid.store(0, std::memory_order_release);
        return std::nullopt;
      }
    }
    // Seqlock write: odd sequence, release fence, data, even sequence with release. A sequence
    // already odd was left by a writer that died mid-write; this write completes it.
    uint64_t s = h.seq.load(std::memory_order_relaxed);
    if ((s & 1) == 0) h.seq.store(++s, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    for (std::size_t i = 0; i < Seg::kWords; ++i) seg_->words[i].store(buf[i], std::memory_order_relaxed);
    const uint64_t generation = h.generation.load(std::memory_order_relaxed) + 1;
    h.generation.store(generation, std::memory_order_relaxed);
    h.is_set.store(set ? 1u : 0u, std::memory_order_relaxed);
    if (set) h.trigger_generation.store(generation, std::memory_order_release);
    h.seq.store(s + 1, std::memory_order_release);
    h.writer_pid.store(0, std::memory_order_release);
    wake(h, /*hand_over=*/set);
    return generation;
  }

  // Bumps the futex word and wakes every waiter. With `hand_over` (a trigger, not a clear or a
  // close), a writer that woke someone then yields its CPU: the scheduler often queues a woken
  // process on the waker's own CPU (the other one may be idle and slow to wake, as on a VM), where
  // it would otherwise wait for the writer's time slice. Triggers are rare; measured in
  // benchmarks/signal_latency.py, the yield cuts the p99 trigger-to-wake latency.
  static void wake(Header& h, bool hand_over = false) {
    h.wake_word.fetch_add(1, std::memory_order_seq_cst);
#if TOLARIA_SIGNAL_FUTEX
    if (h.waiters.load(std::memory_order_seq_cst) != 0) {
      long woken =
          syscall(SYS_futex, reinterpret_cast<uint32_t*>(&h.wake_word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
      if (hand_over && woken > 0) sched_yield();
    }
#endif
  }

  std::string name_;
  int fd_ = -1;
  bool created_ = false;
  bool unlinked_ = false;
  Seg* seg_ = nullptr;
  std::size_t map_size_ = 0;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  std::optional<uint32_t> reclaimed_pid_;
  std::atomic<bool> closing_{false};
  mutable std::shared_mutex mu_;  // shared: calls in flight; exclusive: close() unmapping
};

}  // namespace tolaria::signal
