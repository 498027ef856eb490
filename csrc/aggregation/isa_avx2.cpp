// AVX2 + FMA (x86-64-v3): 8 floats per register, 16 registers: 4-row triangles on the diagonal
// (10 accumulators and 4 loaded vectors) and 4 x 2 rectangles below (8 and 6), float16 through F16C.
// Compiled with -march=x86-64-v3 (setup.py); used only where the CPU has it (dispatch.cpp).
#if defined(__x86_64__)
#include <immintrin.h>

#include "isa_unit.h"

namespace {

struct Avx2 : IsaShape<32, 4, 2, 8> {  // bytes a register, Gram tile rows x columns, combine unroll
  static constexpr const char* kName = "avx2";

  static TOLARIA_INLINE vf load_half(const uint16_t* p) {
    return bit_cast_to<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static TOLARIA_INLINE void store_half(uint16_t* p, vf v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(bit_cast_to<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
  }
  static TOLARIA_INLINE void stream(float* p, vf v) { _mm256_stream_ps(p, bit_cast_to<__m256>(v)); }
};

}  // namespace

TOLARIA_DEFINE_ISA_TABLES(Avx2)
#endif
