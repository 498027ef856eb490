// AVX-512 (x86-64-v4): 16 floats per register, 32 registers: 4 x 4 Gram tiles (16 accumulators and
// 8 loaded vectors), float16 through the hardware conversion. Compiled with -march=x86-64-v4
// (setup.py); used only where the CPU has it (dispatch.cpp).
#if defined(__x86_64__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns inside its own AVX-512 conversion intrinsics (_mm512_undefined_*): a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "isa_unit.h"

namespace {

struct Avx512 : IsaShape<64, 4, 4, 4> {  // bytes a register, Gram tile rows x columns, combine unroll
  static constexpr const char* kName = "avx512";

  static TOLARIA_INLINE vf load_half(const uint16_t* p) {
    return bit_cast_to<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  static TOLARIA_INLINE void store_half(uint16_t* p, vf v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(bit_cast_to<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static TOLARIA_INLINE void stream(float* p, vf v) { _mm512_stream_ps(p, bit_cast_to<__m512>(v)); }
};

}  // namespace

TOLARIA_DEFINE_ISA_TABLES(Avx512)
#endif
