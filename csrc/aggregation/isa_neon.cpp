// aarch64 NEON: 4 floats per register, 32 registers: 4 x 4 Gram tiles (16 accumulators and 8 loaded
// vectors), float16 through the hardware conversion (round to nearest even, as FPCR defaults).
// NEON is part of every aarch64 CPU, so no extra flags and no run-time check.
#if defined(__aarch64__)
#include <arm_neon.h>

#include "isa_unit.h"

namespace {

struct Neon : IsaShape<16, 4, 4, 8> {  // bytes a register, Gram tile rows x columns, combine unroll
  static constexpr const char* kName = "neon";

  static TOLARIA_INLINE vf load_half(const uint16_t* p) {
    return bit_cast_to<vf>(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))));
  }
  static TOLARIA_INLINE void store_half(uint16_t* p, vf v) {
    vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(bit_cast_to<float32x4_t>(v))));
  }
  static TOLARIA_INLINE void stream(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
};

}  // namespace

TOLARIA_DEFINE_ISA_TABLES(Neon)
#endif
