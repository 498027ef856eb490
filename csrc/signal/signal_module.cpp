// tolaria._signal: cross-process signals over POSIX shared memory (see shared_seqlock.h for the
// primitive and the segment layout).
//
// Two kinds share the primitive, each with its own payload, magic number and layout version:
//   SharedEmergencySignal  level (EmergencyLevel 1..4 while set), reason, timestamp
//   SharedDeadlineSignal   reason, timestamp (the rollback deadline)
// Python-facing classes are re-exported, with the emergency levels, by tolaria/signals.py.

#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "shared_seqlock.h"

namespace py = pybind11;

namespace tolaria::signal {

// Reasons are UTF-8, cut to at most this many bytes on a character boundary.
constexpr std::size_t kMaxReasonBytes = 256;
constexpr int kMinTriggerLevel = 1;  // EmergencyLevel.NOTICE; NONE is what clear() sets
constexpr int kMaxLevel = 4;         // EmergencyLevel.HALT

// What is wrong with a reason and timestamp read from a segment (empty: nothing). Nothing in a
// segment is trusted: another process may have written any bytes there.
inline std::string invalid_reason_and_time(uint32_t reason_length, const char* reason, double timestamp_ms) {
  if (reason_length > kMaxReasonBytes) {
    return "reason length " + std::to_string(reason_length) + " past the " + std::to_string(kMaxReasonBytes) +
           "-byte buffer";
  }
  if (!valid_utf8(reason, reason_length)) return "reason is not valid UTF-8";
  if (!std::isfinite(timestamp_ms) || timestamp_ms < 0) return "timestamp is not a finite time >= 0";
  return {};
}

// What every payload kind shares: its segment header's identity (magic number, layout version) and
// the check of a record read from a segment that SharedSeqlock calls, Payload::invalid: the is_set
// word, the kind's own fields (Payload::invalid_fields), then the reason and timestamp.
template <class Payload, uint64_t Magic, uint32_t Version>
struct PayloadKind {
  static constexpr uint64_t kMagic = Magic;
  static constexpr uint32_t kVersion = Version;

  static std::string invalid(const Payload& p, uint32_t is_set) {
    if (is_set > 1) return "is_set word is " + std::to_string(is_set) + ", not 0 or 1";
    if (auto problem = Payload::invalid_fields(p, is_set); !problem.empty()) return problem;
    return invalid_reason_and_time(p.reason_length, p.reason, p.timestamp_ms);
  }
};

struct EmergencyPayload : PayloadKind<EmergencyPayload, magic_from("TLRSEMRG"), 1> {
  static constexpr const char* kKind = "emergency";

  double timestamp_ms;
  int32_t level;
  uint32_t reason_length;
  char reason[kMaxReasonBytes];

  static std::string invalid_fields(const EmergencyPayload& p, uint32_t is_set) {
    if (is_set != 0 && (p.level < kMinTriggerLevel || p.level > kMaxLevel)) {
      return "level " + std::to_string(p.level) + " outside 1..4 while set";
    }
    if (is_set == 0 && (p.level != 0 || p.reason_length != 0 || p.timestamp_ms != 0.0)) {
      return "a cleared record with a level, reason or timestamp";
    }
    return {};
  }
};

struct DeadlinePayload : PayloadKind<DeadlinePayload, magic_from("TLRSDDLN"), 1> {
  static constexpr const char* kKind = "deadline";

  double timestamp_ms;
  uint32_t reason_length;
  uint32_t unused;
  char reason[kMaxReasonBytes];

  static std::string invalid_fields(const DeadlinePayload& p, uint32_t is_set) {
    if (is_set == 0 && (p.reason_length != 0 || p.timestamp_ms != 0.0)) {
      return "a cleared record with a reason or timestamp";
    }
    return {};
  }
};

// The (empty) base adds no bytes: the records keep the layout of their layout version.
static_assert(sizeof(EmergencyPayload) == 16 + kMaxReasonBytes && offsetof(EmergencyPayload, reason) == 16);
static_assert(sizeof(DeadlinePayload) == 16 + kMaxReasonBytes && offsetof(DeadlinePayload, reason) == 16);

inline const char* known_kind(uint64_t magic) {
  if (magic == EmergencyPayload::kMagic) return EmergencyPayload::kKind;
  if (magic == DeadlinePayload::kMagic) return DeadlinePayload::kKind;
  return nullptr;
}

// What read() returns: plain values, comparable and picklable.
struct SignalState {
  int level = 0;
  std::string reason;
  double timestamp_ms = 0.0;
  uint64_t generation = 0;
  bool is_set = false;
};

struct DeadlineState {
  double timestamp_ms = 0.0;
  std::string reason;
  uint64_t generation = 0;
  bool is_set = false;
};

using EmergencyCore = SharedSeqlock<EmergencyPayload>;
using DeadlineCore = SharedSeqlock<DeadlinePayload>;

// ---- argument checks ----------------------------------------------------------------------------

// An emergency level's integer value; `expected` says which values the caller takes.
Py_ssize_t level_value(py::handle level, const char* expected) {
  // bool is an int in Python, but True is no emergency level.
  if (PyBool_Check(level.ptr()) || !PyIndex_Check(level.ptr())) {
    throw std::invalid_argument("invalid emergency level " + py::repr(level).cast<std::string>() +
                                ": expected an EmergencyLevel or an int in " + expected);
  }
  Py_ssize_t value = PyNumber_AsSsize_t(level.ptr(), nullptr);
  if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
  return value;
}

int check_level(py::handle level) {
  const Py_ssize_t value = level_value(level, "1..4");
  if (value == 0) {
    throw std::invalid_argument("cannot trigger emergency level NONE (0): use clear() to reset the signal");
  }
  if (value < kMinTriggerLevel || value > kMaxLevel) {
    throw std::invalid_argument("invalid emergency level " + std::to_string(value) +
                                ": EmergencyLevel values are 0..4 (NONE, NOTICE, ELEVATED, CONSERVATIVE, HALT)");
  }
  return static_cast<int>(value);
}

// The level lower_level() goes to: NONE (0) .. from - 1.
int check_lower_target(py::handle level, int from) {
  const Py_ssize_t value = level_value(level, "0..3");
  if (value < 0 || value >= from) {
    throw std::invalid_argument("lower_level needs a level below " + std::to_string(from) + ", got " +
                                std::to_string(value));
  }
  return static_cast<int>(value);
}

double check_timestamp(std::optional<double> monotonic_ms) {
  if (!monotonic_ms.has_value()) return monotonic_ms_now();
  double t = *monotonic_ms;
  if (!std::isfinite(t) || t < 0) {
    throw std::invalid_argument("monotonic_ms must be a finite, non-negative time in milliseconds, got " +
                                std::to_string(t));
  }
  return t;
}

double check_timeout(std::optional<double> timeout_s) {
  if (!timeout_s.has_value()) return -1.0;  // no timeout
  double t = *timeout_s;
  if (std::isnan(t) || t < 0) {
    throw std::invalid_argument("timeout_s must be a non-negative number of seconds or None, got " + std::to_string(t));
  }
  return std::isinf(t) ? -1.0 : t;
}

std::optional<uint64_t> check_generation(std::optional<int64_t> after_generation) {
  if (!after_generation.has_value()) return std::nullopt;
  if (*after_generation < 0) {
    throw std::invalid_argument("after_generation must be a generation (>= 0), got " +
                                std::to_string(*after_generation));
  }
  return static_cast<uint64_t>(*after_generation);
}

template <class Payload>
void store_reason(Payload& p, const py::str& reason) {
  std::string text = reason;  // UTF-8; a lone surrogate raises UnicodeEncodeError
  std::size_t n = utf8_prefix_length(text, kMaxReasonBytes);
  std::memcpy(p.reason, text.data(), n);
  p.reason_length = static_cast<uint32_t>(n);
}

template <class Payload>
std::string load_reason(const Payload& p) {
  // read() has checked the record (Payload::invalid); the clamp keeps this safe on its own too.
  std::size_t n = p.reason_length <= kMaxReasonBytes ? p.reason_length : kMaxReasonBytes;
  return std::string(p.reason, n);
}

// The record a trigger writes: `reason` stored, then `monotonic_ms` checked (default: now).
template <class Payload>
Payload new_record(const py::str& reason, std::optional<double> monotonic_ms) {
  Payload p{};
  store_reason(p, reason);
  p.timestamp_ms = check_timestamp(monotonic_ms);
  return p;
}

EmergencyPayload emergency_record(int level, const py::str& reason, std::optional<double> monotonic_ms) {
  EmergencyPayload p = new_record<EmergencyPayload>(reason, monotonic_ms);
  p.level = level;
  return p;
}

// ---- read results as Python values --------------------------------------------------------------

// A field of a read result (SignalState, DeadlineState): its Python name and its member.
template <class State, class T>
struct Field {
  const char* name;
  T State::*member;
};

template <class State, class T>
Field<State, T> field(const char* name, T State::*member) {
  return {name, member};
}

template <class State, class... T, std::size_t... I>
State state_from_tuple(const py::tuple& t, std::index_sequence<I...>) {
  return State{t[I].template cast<T>()...};
}

// `State` as a Python value over `fields` (every member, in the struct's order): a keyword-only
// constructor, read-only attributes, ==, hash, repr (`Name(field=repr(value), ...)`) and pickling.
template <class State, class... T>
void bind_state(py::module_& m, const char* cls_name, const char* doc, Field<State, T>... fields) {
  py::class_<State> cls(m, cls_name, doc);
  cls.def(py::init([](T... values) { return State{std::move(values)...}; }), py::kw_only(), py::arg(fields.name)...);
  (cls.def_readonly(fields.name, fields.member), ...);
  cls.def(
      "__eq__", [fields...](const State& a, const State& b) { return ((a.*fields.member == b.*fields.member) && ...); },
      py::is_operator());
  cls.def("__hash__", [fields...](const State& s) { return py::hash(py::make_tuple(s.*fields.member...)); });
  cls.def("__repr__", [cls_name, fields...](const State& s) {
    std::string text;
    auto add = [&text](const char* name, const auto& value) {
      text += (text.empty() ? "" : ", ") + std::string(name) + "=" + std::string(py::repr(py::cast(value)));
    };
    (add(fields.name, s.*fields.member), ...);
    return std::string(cls_name) + "(" + text + ")";
  });
  cls.def(
      py::pickle([fields...](const State& s) { return py::make_tuple(s.*fields.member...); },
                 [](const py::tuple& t) { return state_from_tuple<State, T...>(t, std::index_sequence_for<T...>{}); }));
}

// ---- shared bindings ----------------------------------------------------------------------------

void log_warning(const std::string& message) {
  py::module_::import("logging").attr("getLogger")("tolaria.signals").attr("warning")(message);
}

// `open` (create or create_or_attach), logging a warning when it reclaimed a dead creator's segment.
template <class Open>
auto logging_reclaims(const std::string& kind, Open open) {
  return [kind, open](const std::string& name) {
    auto core = open(name);
    if (auto pid = core->reclaimed_pid()) {
      log_warning("reclaimed " + kind + " signal '" + name + "' left by dead process " + std::to_string(*pid) +
                  "; its record was cleared");
    }
    return core;
  };
}

template <class Payload>
py::class_<SharedSeqlock<Payload>> bind_signal(py::module_& m, const char* cls_name, const char* doc) {
  using Core = SharedSeqlock<Payload>;
  py::class_<Core> cls(m, cls_name, doc);
  const std::string kind = Payload::kKind;

  cls.def_static("create", logging_reclaims(kind, &Core::create), py::arg("name"),
                 "Creates the signal `name` (cleared, generation 0) and returns a handle on it.\n\n"
                 "Raises FileExistsError when the name exists and its creator is alive, SignalLayoutError when it\n"
                 "holds something else. A segment whose creator died is reclaimed: with this layout it is adopted\n"
                 "in place (attached processes stay connected; the record is cleared, the generation keeps\n"
                 "counting; `reclaimed_pid` names the dead creator), with another layout version it is replaced.");
  cls.def_static("attach", &Core::attach, py::arg("name"),
                 ("Attaches to the existing signal `name`. Raises FileNotFoundError when it does not exist,\n"
                  "PermissionError when another user owns it or others may write it, and SignalLayoutError\n"
                  "when it is not a " +
                  kind + " signal of this layout version.")
                     .c_str());
  cls.def_static("create_or_attach", logging_reclaims(kind, &Core::create_or_attach), py::arg("name"),
                 "Creates the signal `name`, or attaches to it when a live process created it; `created` says which.\n"
                 "Of several processes calling this at once (ranks on one host), exactly one creates and the others\n"
                 "attach, waiting for its header; none fails.");

  cls.def_property_readonly("name", &Core::name, "The signal's name (without the leading '/').");
  cls.def_property_readonly("created", &Core::created, "Whether this handle created (or reclaimed) the segment.");
  cls.def_property_readonly("closed", &Core::closed, "Whether close() was called on this handle.");
  cls.def_property_readonly("reclaimed_pid", &Core::reclaimed_pid,
                            "Pid of the dead creator whose segment create() reclaimed, else None.");
  cls.def_property_readonly("generation", &Core::generation,
                            "Current generation: bumped by every trigger() and every clear().");

  cls.def("is_set", &Core::is_set, "Whether the last write was a trigger() (not a clear()).");
  cls.def("clear", &Core::clear,
          "Resets the record (not set, empty reason, timestamp 0.0) and returns the new generation.\n"
          "Waiters are not released: wait() returns only for triggers.");
  cls.def(
      "wait",
      [](Core& self, std::optional<double> timeout_s, std::optional<int64_t> after_generation) {
        const double timeout = check_timeout(timeout_s);
        const auto after = check_generation(after_generation);
        py::gil_scoped_release release;
        return self.wait(timeout, after, [] {
          py::gil_scoped_acquire acquire;
          if (PyErr_CheckSignals() != 0) throw py::error_already_set();
        });
      },
      py::arg("timeout_s"), py::arg("after_generation") = py::none(),
      "Blocks, without the GIL, until a trigger with a generation above `after_generation` (default: the\n"
      "current generation) or until `timeout_s` seconds pass (None: no limit). Returns True for a trigger,\n"
      "False on timeout; returns at once when such a trigger already happened. On Linux it sleeps on a\n"
      "futex in the shared segment and wakes as soon as another process triggers.");
  cls.def(
      "close",
      [](Core& self) {
        py::gil_scoped_release release;
        self.close();
      },
      "Closes this handle (idempotent); waits in other threads of this process end with ValueError.\n"
      "The segment stays for other processes until unlink().");
  cls.def("unlink", &Core::unlink,
          "Removes the name (the segment lives on while processes keep it mapped). Raises\n"
          "FileNotFoundError when the name is gone, RuntimeError when it now names another segment.");
  cls.def("__enter__", [](py::object self) { return self; });
  cls.def(
      "__exit__",
      [](Core& self, py::handle, py::handle, py::handle) {
        {
          py::gil_scoped_release release;
          self.close();
        }
        if (self.created() && !self.unlinked()) self.unlink();
        return false;
      },
      "Closes the handle; a handle that created the signal also unlinks it.");
  cls.def("__repr__", [cls_name](const Core& self) {
    return std::string(cls_name) + "(name='" + self.name() + "', created=" + (self.created() ? "True" : "False") +
           ", closed=" + (self.closed() ? "True" : "False") + ")";
  });

  cls.attr("MAX_REASON_BYTES") = kMaxReasonBytes;
  cls.attr("STUCK_S") = kStuckSeconds;
  cls.attr("MAGIC") = Payload::kMagic;
  cls.attr("LAYOUT_VERSION") = Payload::kVersion;
  cls.attr("SEGMENT_SIZE") = Core::kSegmentSize;
  py::dict layout;
  layout["magic"] = offsetof(Header, magic);
  layout["layout_version"] = offsetof(Header, layout_version);
  layout["creator_pid"] = offsetof(Header, creator_pid);
  layout["segment_size"] = offsetof(Header, segment_size);
  layout["writer_pid"] = offsetof(Header, writer_pid);
  layout["wake_word"] = offsetof(Header, wake_word);
  layout["seq"] = offsetof(Header, seq);
  layout["generation"] = offsetof(Header, generation);
  layout["trigger_generation"] = offsetof(Header, trigger_generation);
  layout["is_set"] = offsetof(Header, is_set);
  layout["waiters"] = offsetof(Header, waiters);
  layout["payload"] = offsetof(Segment<Payload>, words);
  cls.attr("LAYOUT") = layout;
  return cls;
}

}  // namespace tolaria::signal

using namespace tolaria::signal;

PYBIND11_MODULE(_signal, m) {
  m.doc() = "Cross-process emergency and deadline signals over POSIX shared memory (see tolaria.signals).";

  static py::exception<LayoutError> layout_error(m, "SignalLayoutError", PyExc_RuntimeError);
  layout_error.doc() =
      "A shared-memory name holds a segment this build cannot read (foreign, other kind or layout version).";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OsError& e) {
      // OSError(errno, message, filename) becomes FileNotFoundError, FileExistsError, ... by errno.
      py::object err = py::reinterpret_steal<py::object>(
          PyObject_CallFunction(PyExc_OSError, "isO", e.code, e.what(), py::str(e.name).ptr()));
      if (!err) throw py::error_already_set();
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
    } catch (const LayoutError& e) {
      py::set_error(layout_error, e.what());
    } catch (const ClosedError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const TornRecordError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.attr("MAX_REASON_BYTES") = kMaxReasonBytes;

  bind_state(m, "SignalState",
             "One consistent read of an emergency signal: level (0 = NONE when not set), reason,\n"
             "timestamp_ms (monotonic milliseconds; 0.0 when not set), generation, is_set.",
             field("level", &SignalState::level), field("reason", &SignalState::reason),
             field("timestamp_ms", &SignalState::timestamp_ms), field("generation", &SignalState::generation),
             field("is_set", &SignalState::is_set));
  bind_state(m, "DeadlineState",
             "One consistent read of a deadline signal: timestamp_ms (monotonic milliseconds when\n"
             "the deadline tripped; 0.0 when not set), reason, generation, is_set.",
             field("timestamp_ms", &DeadlineState::timestamp_ms), field("reason", &DeadlineState::reason),
             field("generation", &DeadlineState::generation), field("is_set", &DeadlineState::is_set));

  bind_signal<EmergencyPayload>(
      m, "SharedEmergencySignal",
      "The host-wide emergency level, in POSIX shared memory: one process triggers, every attached\n"
      "process reads it or wakes from wait() within microseconds.")
      .def(
          "trigger",
          [](EmergencyCore& self, py::handle level, const py::str& reason, std::optional<double> monotonic_ms) {
            return self.trigger(emergency_record(check_level(level), reason, monotonic_ms));
          },
          py::arg("level"), py::arg("reason"), py::arg("monotonic_ms") = py::none(),
          "Sets the signal to `level` (EmergencyLevel NOTICE..HALT; NONE is clear()'s job) with `reason`\n"
          "(UTF-8, cut to MAX_REASON_BYTES = 256 bytes on a character boundary) and `monotonic_ms` (default:\n"
          "now, from the clock behind time.monotonic()), as one record no reader sees half-written. Wakes\n"
          "every waiter and returns the new generation. A trigger that woke a waiter yields the CPU once\n"
          "(sched_yield), so a waiter queued on this CPU runs at once instead of after this time slice.")
      .def(
          "raise_level",
          [](EmergencyCore& self, py::handle level, const py::str& reason, std::optional<double> monotonic_ms) {
            const EmergencyPayload p = emergency_record(check_level(level), reason, monotonic_ms);
            return self.trigger_if(p, [&p](const EmergencyPayload& current, uint32_t is_set) {
              // A corrupted record is replaced: an escalation must reach the signal.
              return !EmergencyPayload::invalid(current, is_set).empty() || is_set == 0 || current.level < p.level;
            });
          },
          py::arg("level"), py::arg("reason"), py::arg("monotonic_ms") = py::none(),
          "Like trigger(), but only if `level` is above the current level (NONE when not set), decided\n"
          "atomically with respect to writers in every process: two processes escalating at once can never\n"
          "lower the level. Returns the new generation, or None when the level was already as high.")
      .def(
          "lower_level",
          [](EmergencyCore& self, py::handle from_level, py::handle to_level, const py::str& reason,
             std::optional<double> monotonic_ms) -> std::optional<uint64_t> {
            const int from = check_level(from_level);
            const int to = check_lower_target(to_level, from);
            // Only if the level is still `from`: a concurrent escalation elsewhere is never undone.
            // A corrupted record is left alone: it may hide a higher level, which a lowering must not undo.
            auto still_from = [from](const EmergencyPayload& current, uint32_t is_set) {
              return EmergencyPayload::invalid(current, is_set).empty() && is_set == 1 && current.level == from;
            };
            if (to == 0) return self.clear_if(still_from);
            return self.trigger_if(emergency_record(to, reason, monotonic_ms), still_from);
          },
          py::arg("from_level"), py::arg("to_level"), py::arg("reason"), py::arg("monotonic_ms") = py::none(),
          "Lowers the level from `from_level` to `to_level` (NONE clears the signal), only if the level\n"
          "is still `from_level`, decided atomically with respect to writers in every process: a\n"
          "concurrent escalation is never undone. Returns the new generation, or None when the level\n"
          "had changed.")
      .def(
          "read",
          [](const EmergencyCore& self) {
            auto snap = self.read();
            return SignalState{snap.payload.level, load_reason(snap.payload), snap.payload.timestamp_ms,
                               snap.generation, snap.is_set};
          },
          "Returns the current record as a SignalState, read consistently.");

  bind_signal<DeadlinePayload>(
      m, "SharedDeadlineSignal",
      "Tells every process on the host that a rollback deadline tripped, when, and why. Same primitive\n"
      "as SharedEmergencySignal, with its own layout.")
      .def(
          "trigger",
          [](DeadlineCore& self, const py::str& reason, std::optional<double> monotonic_ms) {
            return self.trigger(new_record<DeadlinePayload>(reason, monotonic_ms));
          },
          py::arg("reason"), py::arg("monotonic_ms") = py::none(),
          "Marks the deadline as tripped with `reason` (UTF-8, cut to MAX_REASON_BYTES = 256 bytes on a\n"
          "character boundary) at `monotonic_ms` (default: now). Wakes every waiter and returns the new\n"
          "generation.")
      .def(
          "read",
          [](const DeadlineCore& self) {
            auto snap = self.read();
            return DeadlineState{snap.payload.timestamp_ms, load_reason(snap.payload), snap.generation, snap.is_set};
          },
          "Returns the current record as a DeadlineState, read consistently.");
}
