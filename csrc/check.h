// Precondition checks for the API entry points. Each returns a Status whose message names
// the argument, what was expected and what was given, so the Python layer can pass it on
// to the user unchanged.
#pragma once

#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "fastinternlm/common.h"

namespace fastinternlm {

#define FIL_RETURN_IF_ERROR(expr)            \
  do {                                       \
    ::fastinternlm::Status fil_status_ = (expr); \
    if (!fil_status_.ok()) return fil_status_;   \
  } while (0)

// Messages are assembled with std::to_string and snprintf, not iostreams: a libstdc++
// stream formats through the process's locale facets, and in a process that mixes
// toolchains (a torch wheel, our module, the static CUDA runtime) that machinery was seen
// to crash (H100 device run, 2026-11-26). Plain appends also keep the success path free of
// any allocation.
inline void append_part(std::string& s, const std::string& v) { s += v; }
inline void append_part(std::string& s, const char* v) { s += v ? v : "(null)"; }
inline void append_part(std::string& s, char v) { s += v; }
inline void append_part(std::string& s, double v) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g", v);
  s += buffer;
}
inline void append_part(std::string& s, const void* v) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%p", v);
  s += buffer;
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, char>>>
void append_part(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append_part(std::string& s, float v) { append_part(s, static_cast<double>(v)); }

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::string s;
  (append_part(s, parts), ...);
  return s;
}

template <typename... Parts>
Status invalid_value(const Parts&... parts) {
  return Status(StatusCode::kInvalidValue, concat(parts...));
}

template <typename... Parts>
Status invalid_type(const Parts&... parts) {
  return Status(StatusCode::kInvalidType, concat(parts...));
}

inline Status check_not_null(const char* name, const void* ptr) {
  if (ptr == nullptr) return invalid_value(name, " must not be a null pointer");
  return Status::Ok();
}

inline Status check_positive(const char* name, int64_t value) {
  if (value <= 0) return invalid_value(name, " must be positive, got ", value);
  return Status::Ok();
}

// lo <= value < hi
inline Status check_range(const char* name, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value >= hi)
    return invalid_value(name, " must be in [", lo, ", ", hi, "), got ", value);
  return Status::Ok();
}

inline Status check_one_of(const char* name, int64_t value, std::initializer_list<int64_t> allowed) {
  for (int64_t a : allowed)
    if (a == value) return Status::Ok();
  std::string list;
  for (int64_t a : allowed) list += (list.empty() ? "" : ", ") + std::to_string(a);
  return invalid_value(name, " must be one of {", list, "}, got ", value);
}

inline Status check_multiple(const char* name, int64_t value, int64_t divisor, const char* divisor_name) {
  if (divisor <= 0 || value % divisor != 0)
    return invalid_value(name, " (", value, ") must be a multiple of ", divisor_name, " (", divisor, ")");
  return Status::Ok();
}

// [a, a + a_bytes) and [b, b + b_bytes) share no byte: an op that writes one while reading
// the other would read values it has already overwritten (or race with itself on CUDA).
inline Status check_disjoint(const char* a_name, const void* a, int64_t a_bytes, const char* b_name,
                             const void* b, int64_t b_bytes) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  if (pa < pb + static_cast<uintptr_t>(b_bytes) && pb < pa + static_cast<uintptr_t>(a_bytes))
    return invalid_value(a_name, " must not overlap ", b_name, " in memory, got ", a_bytes, " bytes at ", a,
                         " and ", b_bytes, " bytes at ", b);
  return Status::Ok();
}

// The device is known and, for CUDA, compiled in.
Status check_context(const Context& ctx);

// Activation types: float16/bfloat16 everywhere, float32 on the CPU only.
Status check_activation_dtype(const Context& ctx, const char* name, DType dtype);

// Vectorised CUDA kernels need their pointers aligned to `bytes`.
inline Status check_aligned(const char* name, const void* ptr, int64_t bytes) {
  if (reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) != 0)
    return invalid_value(name, " must be ", bytes, "-byte aligned, got address ", ptr);
  return Status::Ok();
}

Status not_compiled(const char* op);

}  // namespace fastinternlm

// Route a validated call to the CUDA implementation, or report that it is not built in.
#if FASTINTERNLM_WITH_CUDA
#define FIL_DISPATCH_CUDA(ctx, op_name, call) \
  if ((ctx).device == ::fastinternlm::Device::kCUDA) return (call)
#else
#define FIL_DISPATCH_CUDA(ctx, op_name, call) \
  if ((ctx).device == ::fastinternlm::Device::kCUDA) return ::fastinternlm::not_compiled(op_name)
#endif
