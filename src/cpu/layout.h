// Moving tensors between the API's strided, typed layout and the dense float64 arrays the CPU
// reference computes on, plus the row arithmetic of the padded and packed layouts.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "nsa/params.h"
#include "nsa/semantics.h"

namespace nsa::cpu {

inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t{bits} << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

inline uint16_t float_to_bf16_bits(float value) {  // round to nearest even; NaN stays NaN
  uint32_t wide;
  std::memcpy(&wide, &value, sizeof(wide));
  if (std::isnan(value)) return static_cast<uint16_t>((wide >> 16) | 0x40u);
  wide += 0x7fffu + ((wide >> 16) & 1u);
  return static_cast<uint16_t>(wide >> 16);
}

inline float fp16_bits_to_float(uint16_t bits) {
  const uint32_t sign = uint32_t{bits & 0x8000u} << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
  } else if (exponent == 31) {
    magnitude = mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  }
  uint32_t wide;
  std::memcpy(&wide, &magnitude, sizeof(wide));
  wide |= sign;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

inline uint16_t float_to_fp16_bits(float value) {  // round to nearest even
  uint32_t wide;
  std::memcpy(&wide, &value, sizeof(wide));
  const uint16_t sign = static_cast<uint16_t>((wide >> 16) & 0x8000u);
  const float magnitude = std::fabs(value);
  if (std::isnan(value)) return static_cast<uint16_t>(sign | 0x7e00u);
  if (magnitude >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (magnitude < 6.103515625e-05f) {  // subnormal range: units of 2^-24, nearbyint rounds to even
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(magnitude, 24))));
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, sizeof(bits));
  const uint32_t exponent = ((bits >> 23) & 0xffu) - 127u + 15u;
  uint32_t half = (exponent << 10) | ((bits >> 13) & 0x3ffu);
  const uint32_t rest = bits & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // may carry into the exponent
  return static_cast<uint16_t>(sign | half);
}

inline double load_element(DType dtype, const void* base, int64_t offset) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kFloat64: return static_cast<const double*>(base)[offset];
    case DType::kBFloat16: return bf16_bits_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::kFloat16: return fp16_bits_to_float(static_cast<const uint16_t*>(base)[offset]);
  }
  return std::numeric_limits<double>::quiet_NaN();
}

inline void store_element(DType dtype, void* base, int64_t offset, double value) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[offset] = static_cast<float>(value); return;
    case DType::kFloat64: static_cast<double*>(base)[offset] = value; return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[offset] = float_to_bf16_bits(static_cast<float>(value));
      return;
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[offset] = float_to_fp16_bits(static_cast<float>(value));
      return;
  }
}

// Statistics are float64 for float64 inputs, float32 otherwise.
inline DType stats_dtype(DType dtype) { return dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

// Which rows of a sequence a tensor holds: query rows (q, gates, grad_out), raw keys, compressed keys.
enum class RowKind { kQuery, kKey, kCmp };

// Where sequence b's rows lie in the dense arrays, and the position of its first query.
// Prefill: the queries are the sequence's tokens, so the key rows are the query rows, the first
// position is 0, and in the packed layout dense rows are the packed rows. Decode / chunked
// prefill (KvCacheView): query rows b*m .. b*m+m-1 at positions seqlens[b]-m .., keys packed
// sequence after sequence (only the rows < seqlens[b], so a large capacity costs nothing).
struct SequenceRows {
  int64_t first_row, length;        // query rows: q, gates, out, lse, block_indices
  int64_t first_position;           // the position of query row first_row in its sequence
  int64_t first_key_row, num_keys;  // dense rows of k, v, k_win, v_win
  int64_t first_cmp_row, num_cmp;   // dense rows of k_cmp, v_cmp

  // (first dense row, count) of the rows of `kind`.
  std::pair<int64_t, int64_t> rows(RowKind kind) const {
    switch (kind) {
      case RowKind::kQuery: return {first_row, length};
      case RowKind::kKey: return {first_key_row, num_keys};
      case RowKind::kCmp: return {first_cmp_row, num_cmp};
    }
    return {0, 0};
  }
};

inline std::vector<SequenceRows> sequence_table(const Config& config, const Shape& shape, const Varlen& varlen,
                                                const KvCacheView& cache) {
  std::vector<SequenceRows> table;
  int64_t key_row = 0, cmp_row = 0;
  for (int64_t b = 0; b < shape.batch; ++b) {
    SequenceRows seq{};
    if (varlen.cu_seqlens != nullptr) {  // prefill only (no cache in the packed layout)
      seq.first_row = seq.first_key_row = varlen.cu_seqlens[b];
      seq.length = seq.num_keys = int64_t{varlen.cu_seqlens[b + 1]} - varlen.cu_seqlens[b];
      seq.first_cmp_row = varlen.cu_seqlens_cmp[b];
      seq.num_cmp = int64_t{varlen.cu_seqlens_cmp[b + 1]} - varlen.cu_seqlens_cmp[b];
    } else {
      seq.first_row = b * shape.seqlen;
      seq.length = shape.seqlen;
      seq.first_key_row = key_row;
      seq.num_keys = cache.seqlens != nullptr ? cache.seqlens[b] : shape.seqlen;
      seq.first_cmp_row = cmp_row;
      seq.num_cmp = num_cmp_tokens(seq.num_keys, config.cmp_block, config.cmp_stride);
    }
    seq.first_position = seq.num_keys - seq.length;
    key_row += seq.num_keys;
    cmp_row += seq.num_cmp;
    table.push_back(seq);
  }
  return table;
}

// Query rows of the layout (B*T when padded, B*m with a cache).
inline int64_t total_rows(const Shape& shape, const Varlen& varlen) {
  return varlen.cu_seqlens ? varlen.total_tokens : shape.batch * shape.seqlen;
}
// Dense rows of `kind` of a sequence table (sequences are laid out one after the other).
inline int64_t total_rows(const std::vector<SequenceRows>& table, RowKind kind) {
  if (table.empty()) return 0;
  const auto [first, count] = table.back().rows(kind);
  return first + count;
}

// A dense float64 [rows, heads, dim] array, rows as in SequenceRows.
struct Dense {
  std::vector<double> data;
  int64_t heads = 0, dim = 0;

  Dense() = default;
  Dense(int64_t rows, int64_t num_heads, int64_t head_dim)
      : data(static_cast<size_t>(rows * num_heads * head_dim), 0.0), heads(num_heads), dim(head_dim) {}
  double* at(int64_t row, int64_t head) { return data.data() + (row * heads + head) * dim; }
  const double* at(int64_t row, int64_t head) const { return data.data() + (row * heads + head) * dim; }
};

// Offset of element (row, head, 0) of a strided tensor; rows_per_batch is T (padded) or 0 (varlen).
inline int64_t strided_offset(int64_t batch_stride, int64_t seq_stride, int64_t head_stride, int64_t rows_per_batch,
                              int64_t row, int64_t head) {
  if (rows_per_batch == 0) return row * seq_stride + head * head_stride;
  return (row / rows_per_batch) * batch_stride + (row % rows_per_batch) * seq_stride + head * head_stride;
}

// Converts each sequence's rows of `kind` of a strided tensor to a dense array laid out as the
// table says. A sequence starts at batch entry b (padded layout, a cache) or at its packed row,
// which is its dense row (varlen); rows past what the table lists (a cache's rows >=
// seqlens[b]) are never read.
inline Dense gather(DType dtype, const InputTensor& t, const std::vector<SequenceRows>& table, bool varlen,
                    RowKind kind, int64_t heads, int64_t dim) {
  Dense dense(total_rows(table, kind), heads, dim);
  if (t.data == nullptr) return dense;
  for (size_t b = 0; b < table.size(); ++b) {
    const auto [first, count] = table[b].rows(kind);
    const int64_t base = varlen ? first * t.seq_stride : static_cast<int64_t>(b) * t.batch_stride;
    for (int64_t row = 0; row < count; ++row)
      for (int64_t head = 0; head < heads; ++head) {
        const int64_t offset = base + row * t.seq_stride + head * t.head_stride;
        double* dst = dense.at(first + row, head);
        for (int64_t e = 0; e < dim; ++e) dst[e] = load_element(dtype, t.data, offset + e);
      }
  }
  return dense;
}

inline void scatter(DType dtype, const Dense& dense, const OutputTensor& t, int64_t rows, int64_t rows_per_batch) {
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t head = 0; head < dense.heads; ++head) {
      const int64_t offset = strided_offset(t.batch_stride, t.seq_stride, t.head_stride, rows_per_batch, row, head);
      const double* src = dense.at(row, head);
      for (int64_t e = 0; e < dense.dim; ++e) store_element(dtype, t.data, offset + e, src[e]);
    }
}

}  // namespace nsa::cpu
