// Error-message building shared by the validation, the KV-cache bookkeeping and the CUDA API
// layer: cat(parts...) joins strings, C strings, integers, floating-point numbers (as "%g", what an
// ostream prints) and pointers. No iostreams: inside the torch ops library on the GPU machine, an
// ostringstream in nvcc-compiled translation units crashed on its first integer (segfault in
// basic_ostream::_M_insert<long>, seen with a fast build's "not compiled" message).
#pragma once

#include <cstdio>
#include <string>
#include <type_traits>

namespace nsa::detail {

inline void append_part(std::string& out, const char* part) { out += part; }
inline void append_part(std::string& out, const std::string& part) { out += part; }
inline void append_part(std::string& out, const void* part) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%p", part);
  out += buf;
}
template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append_part(std::string& out, T part) {
  if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(part));
    out += buf;
  } else {
    out += std::to_string(part);
  }
}

template <class... Parts>
std::string cat(const Parts&... parts) {
  std::string out;
  (append_part(out, parts), ...);
  return out;
}

}  // namespace nsa::detail
