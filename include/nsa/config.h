// Config: the NSA hyper-parameters (paper defaults) and the element types the API accepts.
#pragma once

#include <cstdint>

namespace nsa {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

const char* dtype_name(DType dtype);
int64_t dtype_size(DType dtype);

struct Config {
  int64_t cmp_block = 32;    // l: raw tokens summarized by one compressed token
  int64_t cmp_stride = 16;   // d: distance between the starts of consecutive compressed tokens
  int64_t sel_block = 64;    // l': raw tokens per selection block
  int64_t num_selected = 16; // n: selection blocks attended per (query, kv head), forced ones included
  int64_t num_init = 1;      // blocks 0 .. num_init-1 are always selected
  int64_t num_local = 2;     // the block of t and the num_local-1 before it are always selected
  int64_t window = 512;      // w: the window branch sees keys max(0, t-w+1) .. t
  double scale = 0.0;        // softmax scale; 0 means 1/sqrt(head_dim_qk)
};

}  // namespace nsa
