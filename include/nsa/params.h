// Plain parameter structs for the NSA forward and backward. No framework types: pointers,
// sizes and int64 strides (in elements). Every tensor's last dimension is contiguous.
//
// Layouts. Padded: [B, T, H, D] with B = shape.batch, T = shape.seqlen; every sequence has
// T tokens and Tc = num_cmp_tokens(T) compressed tokens. Packed varlen (varlen.cu_seqlens set):
// [total_tokens, H, D]; sequence b holds rows cu_seqlens[b] .. cu_seqlens[b+1]-1 and its
// compressed tokens rows cu_seqlens_cmp[b] .. cu_seqlens_cmp[b+1]-1, which must equal
// num_cmp_tokens(length of b). In varlen layout batch strides are ignored.
//
// Branch order everywhere is (cmp, slc, win), the order of the gates.
#pragma once

#include <cstdint>

#include "nsa/config.h"

namespace nsa {

inline constexpr int kNumBranches = 3;
enum Branch : int { kBranchCmp = 0, kBranchSlc = 1, kBranchWin = 2 };

// A read-only [B, T, H, D] (or [total, H, D]) tensor.
struct InputTensor {
  const void* data = nullptr;
  int64_t batch_stride = 0;  // ignored in varlen layout
  int64_t seq_stride = 0;
  int64_t head_stride = 0;
};

// A written [B, T, H, D] (or [total, H, D]) tensor; its strides must not make elements overlap.
struct OutputTensor {
  void* data = nullptr;
  int64_t batch_stride = 0;
  int64_t seq_stride = 0;
  int64_t head_stride = 0;
};

struct Shape {
  int64_t batch = 0;         // B: sequences (varlen: N, the number of sequences)
  int64_t seqlen = 0;        // T (varlen: the longest sequence, an upper bound used for sizing)
  int64_t num_q_heads = 0;   // Hq
  int64_t num_kv_heads = 0;  // Hkv; G = Hq / Hkv query heads share one kv head
  int64_t head_dim_qk = 0;   // Dk
  int64_t head_dim_v = 0;    // Dv
};

struct Varlen {
  const int32_t* cu_seqlens = nullptr;      // [N+1] raw-token row offsets; null: padded layout
  const int32_t* cu_seqlens_cmp = nullptr;  // [N+1] compressed-token row offsets
  int64_t total_tokens = 0;                 // cu_seqlens[N]
  int64_t total_cmp_tokens = 0;             // cu_seqlens_cmp[N]
};

// Decode and chunked prefill (DESIGN section 1): the forward's m = shape.seqlen queries of each
// sequence sit at the end of that sequence's KV cache. Only the padded layout (varlen.cu_seqlens
// null). With seqlens set:
//   q, gates, out, out_branch, lse, block_indices  [B, m, ...] as in prefill (row i = query i);
//   k, v, k_win, v_win                             [B, capacity, Hkv, D] (the raw cache; any
//                                                   strides; k_win/v_win null: the window
//                                                   branch reads k/v);
//   k_cmp, v_cmp                                   [B, cmp_capacity, Hkv, D].
// Sequence b holds keys 0 .. seqlens[b]-1 (its m new tokens already appended) and its first
// num_cmp_tokens(seqlens[b]) compressed tokens; its query i sits at position seqlens[b] - m + i
// and sees exactly what that position sees in prefill. Requires m <= seqlens[b] <= capacity and
// num_cmp_tokens(seqlens[b]) <= cmp_capacity: the host validation checks this (it reads seqlens);
// the CUDA backend cannot without a sync, so there it is the caller's bookkeeping (the KV cache of
// include/nsa/kv_cache.h keeps it), and its kernels clamp each length into the cache: a bad length
// gives wrong values, never reads outside the cache.
struct KvCacheView {
  const int32_t* seqlens = nullptr;  // [B] keys held per sequence; null: prefill (no cache)
  int64_t capacity = 0;              // raw rows per sequence in k, v, k_win, v_win
  int64_t cmp_capacity = 0;          // compressed rows per sequence in k_cmp, v_cmp
};

// Statistics (lse) are float for 16-bit and float32 inputs, double for float64 inputs.
struct ForwardParams {
  Config config;
  DType dtype = DType::kFloat32;
  Shape shape;
  Varlen varlen;

  InputTensor q;      // [B, T, Hq, Dk]
  InputTensor k;      // [B, T, Hkv, Dk]   selection branch keys
  InputTensor v;      // [B, T, Hkv, Dv]
  InputTensor k_win;  // [B, T, Hkv, Dk]   window branch keys; data == nullptr: use k
  InputTensor v_win;  // [B, T, Hkv, Dv]   data == nullptr: use v
  InputTensor k_cmp;  // [B, Tc, Hkv, Dk]  compressed keys (may be null when Tc == 0)
  InputTensor v_cmp;  // [B, Tc, Hkv, Dv]
  InputTensor gates;  // [B, T, Hq, 3]     (cmp, slc, win) multipliers

  // [B, T, Hkv, n] contiguous int32, ascending, -1 padded. Written by the forward unless
  // block_indices_given, in which case it is only read (any order, -1 entries ignored, no
  // repeats, each in [0, t / l']) and replaces the scoring; forced blocks are not added. A row
  // of all -1 gives the slc branch no key: output 0, lse -inf.
  int32_t* block_indices = nullptr;
  bool block_indices_given = false;

  OutputTensor out;            // [B, T, Hq, Dv] gated sum of the branches
  void* out_branch = nullptr;  // [B, T, Hq, 3, Dv] contiguous, dtype of the inputs: each branch's
                               // output; may be null (inference); the backward needs it
  void* lse = nullptr;         // [B, T, Hq, 3] contiguous, per-branch log-sum-exp of the scaled
                               // scores; -inf where the branch sees no key (cmp for t < l-1)

  KvCacheView cache;  // decode / chunked prefill; default: prefill

  // [B, 3] int64 contiguous, optional: the forward adds, per sequence and branch (cmp, slc, win),
  // the key rows it gathered from memory, summed over kv heads. The CPU backend counts per
  // (query, kv head) the keys each softmax reads; the CUDA backend counts per CTA the key rows
  // it loads (a CTA serves several positions in prefill, so its union is counted once; in
  // decode, m = 1, the two agree). Not written by the backward.
  int64_t* tokens_read = nullptr;
};

// How the CUDA backward computes the selection branch's dq (the other branches' dq is always
// query-major). kQueryMajor: the dq kernel sweeps, for each 64-row tile of (t, g) rows, the union of
// the blocks its positions selected (it computes every row against every block of that union, so
// for G < 64 it does up to 64 / G times the products the rows need). kKeyMajor: the selection
// branch's dK / dV kernel, which visits each (block, position) pair once, also forms dq = dS K and
// adds it to an fp32 accumulator in the workspace with atomics; it needs the sm_90a code, head dims
// Dk <= 128 and deterministic = false. kAuto: kKeyMajor where it applies and pays
// (docs/decisions/0012), else kQueryMajor.
enum class SelectedDq { kAuto, kQueryMajor, kKeyMajor };

struct BackwardParams {
  Config config;
  DType dtype = DType::kFloat32;
  Shape shape;
  Varlen varlen;

  InputTensor q, k, v, k_win, v_win, k_cmp, v_cmp, gates;  // as in ForwardParams
  const int32_t* block_indices = nullptr;  // [B, T, Hkv, n] as written by the forward
  const void* out_branch = nullptr;        // [B, T, Hq, 3, Dv] from the forward
  const void* lse = nullptr;               // [B, T, Hq, 3] from the forward
  InputTensor grad_out;                    // [B, T, Hq, Dv]

  OutputTensor grad_q;      // [B, T, Hq, Dk]
  OutputTensor grad_k;      // [B, T, Hkv, Dk]  also receives the window branch's when k_win is null
  OutputTensor grad_v;      // [B, T, Hkv, Dv]
  OutputTensor grad_k_win;  // [B, T, Hkv, Dk]  required iff k_win is given
  OutputTensor grad_v_win;  // [B, T, Hkv, Dv]  required iff v_win is given
  OutputTensor grad_k_cmp;  // [B, Tc, Hkv, Dk]
  OutputTensor grad_v_cmp;  // [B, Tc, Hkv, Dv]
  OutputTensor grad_gates;  // [B, T, Hq, 3]

  bool deterministic = false;  // bitwise reproducible results (the CPU backend always is)
  SelectedDq selected_dq = SelectedDq::kAuto;  // CUDA only; the CPU backend ignores it
};

}  // namespace nsa
