// float16 / bfloat16 <-> float32 conversions on bits, for scalars and for vectors of any width.
//
// Written with integer and float arithmetic only (no _Float16, which GCC 12 lacks in C++ on
// aarch64), bit-exact with torch: round to nearest even, NaN stays a quiet NaN. CPUs with a
// hardware conversion (F16C, AVX-512, NEON) use it instead for whole vectors (see isa_*.cpp);
// these serve the ragged tails and the baseline level. Included only inside an anonymous namespace.
#pragma once

#include <cstdint>
#include <cstring>

#define TOLARIA_INLINE inline __attribute__((always_inline))

template <typename To, typename From>
TOLARIA_INLINE To bit_cast_to(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_to needs types of one size");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

// The bfloat16 bits (low 16 bits) of float bits `bits` (uint32_t or a vector of them).
// A U (a scalar, or a vector with every lane) equal to c.
template <typename U, typename C>
TOLARIA_INLINE U splat(C c) {
  return U{} + c;
}

template <typename U>
TOLARIA_INLINE U bf16_bits(U bits) {
  const U rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return ((bits & 0x7fffffffu) > 0x7f800000u) ? ((bits >> 16) | 0x40u) : rounded;
}

// Float bits of float16 bits `h` (in the low 16 bits of U). No float arithmetic touches a
// subnormal float, so the result is right under flush-to-zero / denormals-are-zero too.
template <typename U, typename F>
TOLARIA_INLINE U half_to_float_bits(U h) {
  const U sign = (h & 0x8000u) << 16;
  const U shifted = (h & 0x7fffu) << 13;  // exponent and mantissa, in float position
  const U exponent = shifted & 0x0f800000u;
  const U normal = shifted + 0x38000000u;  // rebias 15 -> 127
  const U special = normal + 0x38000000u;  // inf / NaN: exponent 255
  // Zero and subnormal halves: 2^-14 * (mantissa / 2^10), computed as (1.m * 2^-14) - 2^-14.
  const F subnormal = bit_cast_to<F>(U(normal + 0x00800000u)) - bit_cast_to<F>(splat<U>(0x38800000u));
  const U result = exponent == 0x0f800000u ? special : (exponent == 0u ? bit_cast_to<U>(subnormal) : normal);
  return result | sign;
}

// Float16 bits (low 16 bits of U) of float bits `f`: round to nearest even; NaN -> 0x7e00 (quiet),
// overflow -> inf, as torch's conversion.
template <typename U, typename F>
TOLARIA_INLINE U float_bits_to_half(U f) {
  const U sign = f & 0x80000000u;
  const U magnitude = f ^ sign;
  // Results that are subnormal halves or zero: add 0.5 so the FPU rounds the mantissa (to nearest
  // even) into the low bits, then take the bits off.
  const U denormal_magic = splat<U>(0x3f000000u);  // 0.5f: ((127 - 15) + (23 - 10) + 1) << 23
  const U small = bit_cast_to<U>(F(bit_cast_to<F>(magnitude) + bit_cast_to<F>(denormal_magic))) - denormal_magic;
  // Normal results: rebias and round to nearest even on the 13 dropped bits.
  const U odd = (magnitude >> 13) & 1u;
  const U normal = (magnitude + 0xc8000fffu + odd) >> 13;  // 0xc8000fff = ((15 - 127) << 23) + 0xfff
  const U special = magnitude > 0x7f800000u ? splat<U>(0x7e00u) : splat<U>(0x7c00u);
  const U result = magnitude >= 0x47800000u ? special : (magnitude < 0x38800000u ? small : U(normal & 0xffffu));
  return result | (sign >> 16);
}
