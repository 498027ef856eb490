// SharedSeqlock's segment-file half: opening, owner and layout checks, mapping, reclaiming a
// segment left by a dead creator. Included at the end of shared_seqlock.h (member templates
// defined out of the class, so that each file stays one concern).

#pragma once

#include "shared_seqlock.h"

namespace tolaria::signal {

template <class Payload>
void SharedSeqlock<Payload>::check_open() const {
  if (seg_ == nullptr || closing_.load()) {
    throw ClosedError(std::string(Payload::kKind) + " signal '" + name_ + "' is closed");
  }
}

// Refuses a segment another user owns, or one anyone but its owner may write: its contents would
// be someone else's to forge (a fake HALT) or to suppress.
template <class Payload>
void SharedSeqlock<Payload>::check_owner() const {
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
template <class Payload>
void SharedSeqlock<Payload>::check_live_header() const {
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

template <class Payload>
void SharedSeqlock<Payload>::stat_identity() {
  struct stat st;
  if (fstat(fd_, &st) != 0) throw os_error(errno, "cannot stat shared memory of", name_);
  dev_ = st.st_dev;
  ino_ = st.st_ino;
}

template <class Payload>
void SharedSeqlock<Payload>::map() {
  stat_identity();
  void* addr = mmap(nullptr, kSegmentSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (addr == MAP_FAILED) throw os_error(errno, "cannot map shared memory of", name_);
  seg_ = static_cast<Seg*>(addr);
  map_size_ = kSegmentSize;
}

// For a segment this process just created: size and map it, or remove it again on failure.
template <class Payload>
void SharedSeqlock<Payload>::map_or_unlink(const std::string& path) {
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

template <class Payload>
off_t SharedSeqlock<Payload>::segment_file_size() const {
  struct stat st;
  if (fstat(fd_, &st) != 0) throw os_error(errno, "cannot stat shared memory of", name_);
  return st.st_size;
}

// Reads the 8-byte magic through the file (the segment may still be shorter than a header).
template <class Payload>
uint64_t SharedSeqlock<Payload>::file_magic() const {
  if (segment_file_size() < static_cast<off_t>(sizeof(uint64_t))) return 0;
  uint64_t magic = 0;
  if (pread(fd_, &magic, sizeof magic, 0) != static_cast<ssize_t>(sizeof magic)) {
    throw os_error(errno, "cannot read the header of", name_);
  }
  return magic;
}

// A creator sizes the segment, then fills the header and writes the magic last. Gives it a grace
// period; returns whether the segment got initialised.
template <class Payload>
bool SharedSeqlock<Payload>::initialised_within_grace() const {
  const double deadline = monotonic_seconds() + kInitGraceSeconds;
  for (;;) {
    if (segment_file_size() >= static_cast<off_t>(sizeof(Header)) && file_magic() != 0) return true;
    if (monotonic_seconds() > deadline) return false;
    sleep_seconds(1e-3);
  }
}

template <class Payload>
void SharedSeqlock<Payload>::wait_until_initialised() const {
  if (!initialised_within_grace()) {
    throw LayoutError(std::string("shared memory '") + name_ + "' was never initialised as a signal " +
                      "(its creator crashed while creating it, or it is not a Tolaria signal); " +
                      "create() reclaims it, or unlink it by hand");
  }
}

template <class Payload>
void SharedSeqlock<Payload>::check_layout() const {
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
template <class Payload>
std::unique_ptr<SharedSeqlock<Payload>> SharedSeqlock<Payload>::reclaim(const std::string& name,
                                                                        const std::string& path) {
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
template <class Payload>
void SharedSeqlock<Payload>::map_prefix_or_whole() {
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
template <class Payload>
void SharedSeqlock<Payload>::unlink_stale(const std::string& path) {
  int fd = shm_open(path.c_str(), O_RDONLY, 0);
  if (fd < 0) return;  // already gone: the caller creates it afresh
  struct stat st;
  bool same = fstat(fd, &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_;
  ::close(fd);
  if (same && shm_unlink(path.c_str()) != 0 && errno != ENOENT) {
    throw os_error(errno, "cannot remove the stale shared memory of", name_);
  }
}

}  // namespace tolaria::signal
