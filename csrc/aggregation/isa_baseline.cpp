// The baseline of the architecture (x86-64: SSE2; elsewhere whatever the compiler assumes): 4 floats
// per register, 16 registers: the AVX2 tile shapes, float16 converted on bits (half.h). Compiled with
// the default flags; the fallback on every CPU, and the one level that exists on every architecture.
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa_unit.h"

namespace {

struct Baseline : IsaShape<16, 4, 2, 8> {  // bytes a register, Gram tile rows x columns, combine unroll
  static constexpr const char* kName = "baseline";

  static TOLARIA_INLINE vf load_half(const uint16_t* p) {
    vu16 h;
    std::memcpy(&h, p, sizeof h);
    return bit_cast_to<vf>(half_to_float_bits<vu32, vf>(__builtin_convertvector(h, vu32)));
  }
  static TOLARIA_INLINE void store_half(uint16_t* p, vf v) {
    const vu16 h = __builtin_convertvector(float_bits_to_half<vu32, vf>(bit_cast_to<vu32>(v)), vu16);
    std::memcpy(p, &h, sizeof h);
  }
  static TOLARIA_INLINE void stream(float* p, vf v) {
#if defined(__x86_64__)
    _mm_stream_ps(p, bit_cast_to<__m128>(v));
#else
    std::memcpy(p, &v, sizeof v);
#endif
  }
};

}  // namespace

TOLARIA_DEFINE_ISA_TABLES(Baseline)
