// Decode and chunked prefill in tests (DESIGN.md section 1, "Decode and chunked prefill"): a
// schedule of forward calls through the KV-cache params, each appending tokens of a problem's
// sequences to a cache and querying the last m of them, run on any backend; the results are
// assembled in the problem's row order so that they compare with the prefill's through
// test_util.h (outputs_near, indices_within_ties, expect_16bit_forward_matches_reference). The
// case table is shared by the CPU (test_decode.cpp) and CUDA (test_cuda_decode.cpp) tests.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "test_util.h"

namespace nsa_test {

// Built with AddressSanitizer (the build-asan tree): long cases run shorter there.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kSanitizerBuild = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kSanitizerBuild = true;
#else
inline constexpr bool kSanitizerBuild = false;
#endif
#else
inline constexpr bool kSanitizerBuild = false;
#endif

// One forward call: sequence b's cache holds its positions 0 .. lens[b]-1 (the call appended the
// new ones) and the call queries the last m of them.
struct DecodeCall {
  int64_t m = 1;
  std::vector<int64_t> lens;
};

// Sequences of equal length T in calls of `chunk` queries: [0, chunk), [chunk, 2 chunk), ...;
// the last call takes what is left (a partial chunk).
std::vector<DecodeCall> chunked_schedule(const Problem& problem, int64_t chunk);
// Sequences of any lengths (each >= m), m queries per call: call k (k = 1, 2, ...) holds
// clamp(k*m - offsets[b], m, length of b) tokens of sequence b, until every sequence is complete.
// The cache lengths differ from sequence to sequence; a sequence that has not started or has
// finished queries positions again (a repeated query must give the same result).
std::vector<DecodeCall> staggered_schedule(const Problem& problem, int64_t m, const std::vector<int64_t>& offsets);

struct DecodeOptions {
  // Cache rows past the longest sequence's (and its compressed tokens); never written, so NaN.
  int64_t extra_capacity = 0, extra_cmp_capacity = 0;
  Layout input_layout, output_layout;
  const std::vector<int32_t>* given_indices = nullptr;  // [problem rows, Hkv, n]: each call is given its rows
  bool with_out_branch = true;
  bool query_every_row = true;  // false: the schedule may leave rows unqueried (they stay poisoned)
};

// A forward backend on buffers: poisons the outputs, runs, returns them (read_forward).
using ForwardRunner = std::function<Outputs(Buffers&, nsa::Status*)>;
// nsa::cpu::forward through run_forward.
Outputs cpu_forward_runner(Buffers& buffers, nsa::Status* status);

struct DecodeResult {
  Outputs outputs;  // problem rows, each from the last call that queried it
  std::vector<std::array<int64_t, 3>> tokens_read;  // per call and sequence: call * B + b
  bool ok = false;  // every call succeeded and (query_every_row) every problem row was queried
};

// Runs the schedule on one cache that grows call by call: before each call the rows each
// sequence gained (raw tokens and the compressed tokens now complete) are written, the rest of
// the cache is NaN; the queries' q and gates are written; cache_seqlens and a zeroed tokens_read
// are set; `check_before_run` (if given) inspects the buffers. A failing call is recorded as a
// test failure naming the call, and ends the run.
DecodeResult run_decode(const Problem& problem, const std::vector<DecodeCall>& schedule, const ForwardRunner& run,
                        const DecodeOptions& options = {},
                        const std::function<void(const Buffers&)>& check_before_run = nullptr);

// Every cache row past cache_seqlens[b] (raw k, v, k_win, v_win and compressed k_cmp, v_cmp past
// num_cmp_tokens(seqlens[b])) holds NaN in every element.
::testing::AssertionResult cache_past_seqlens_is_nan(const Buffers& buffers);

// Keys each branch's softmax reads at position t of sequence b, summed over kv heads, given the
// selection in `indices` ([problem rows, Hkv, n]): cmp the visible compressed tokens, slc the
// keys s <= t of the selected blocks, win min(w, t+1) (the CPU backend's tokens_read).
std::array<int64_t, 3> expected_keys_read(const Problem& problem, const std::vector<int32_t>& indices, int64_t b,
                                          int64_t t);
// result.tokens_read of each call equals expected_keys_read summed over the call's queries,
// judged by result.outputs.indices.
::testing::AssertionResult tokens_read_as_expected(const Problem& problem, const std::vector<DecodeCall>& schedule,
                                                   const DecodeResult& result);

// A decode case: a problem and how to cut it into calls.
struct DecodeCase {
  std::string name;
  ProblemSpec spec;
  int64_t chunk = 1;             // m: queries per sequence and call
  std::vector<int64_t> stagger;  // empty: chunked_schedule; else staggered_schedule with these offsets
  int64_t extra_capacity = 0, extra_cmp_capacity = 0;
  bool given_indices = false;    // feed random block_indices (block_indices_given)
  bool with_out_branch = true;   // false: no out_branch, as in inference
};

// gtest prints parameters on failure: the name, not the bytes.
void PrintTo(const DecodeCase& decode_case, std::ostream* os);

std::vector<DecodeCall> schedule_of(const DecodeCase& decode_case, const Problem& problem);
// The case's options, pointing at `given` when the case gives indices.
DecodeOptions options_of(const DecodeCase& decode_case, const std::vector<int32_t>& given);

// A case run through run_decode on one backend: its given indices (random valid block indices when
// the case gives them, else empty), schedule and result. Cases with cache rows past the longest
// sequence also check before each call that every row past a sequence's length is NaN (so that
// reading one shows; the others skip the check, a pass over the cache per call).
struct CaseRun {
  std::vector<int32_t> given;
  std::vector<DecodeCall> schedule;
  DecodeResult result;
};
CaseRun run_case(const DecodeCase& decode_case, const Problem& problem, const ForwardRunner& run);

// The cases both backends run, in `dtype` with Dk = Dv = head_dim: token-by-token decode over
// long sequences for G = 1, 3, 16 (every position, so every compressed-token emission and block
// boundary), other (l, d, l') geometries, chunks of 7, 64 and 300 with a partial last chunk,
// batches with different cache lengths, separate and shared window keys, cache rows past the
// lengths, given block indices, no out_branch. `long_seqlen` is the length of the long
// token-by-token cases.
std::vector<DecodeCase> decode_cases(nsa::DType dtype, int64_t head_dim, int64_t long_seqlen);

}  // namespace nsa_test
