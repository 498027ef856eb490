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

#include "segment_layout.h"

namespace tolaria::signal {

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

  // Opening, checking and mapping the segment file: defined in segment_file.h.
  void check_open() const;
  void check_owner() const;
  void check_live_header() const;
  void stat_identity();
  void map();
  void map_or_unlink(const std::string& path);
  off_t segment_file_size() const;
  uint64_t file_magic() const;
  bool initialised_within_grace() const;
  void wait_until_initialised() const;
  void check_layout() const;
  static std::unique_ptr<SharedSeqlock> reclaim(const std::string& name, const std::string& path);
  void map_prefix_or_whole();
  void unlink_stale(const std::string& path);

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

#include "segment_file.h"  // the segment-file members, defined out of the class
