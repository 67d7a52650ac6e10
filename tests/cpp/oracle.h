// Brute-force oracle for the NSA forward (DESIGN.md section 1), written apart from the
// reference: it includes no nsa header and shares no code with src/. Everything is fp64 and
// as plain as possible: explicit boolean masks per branch, dense softmax over the masked
// scores, the Eq. 9 weights counted raw token by raw token, top-n by sorting.
//
// One sequence at a time, contiguous row-major arrays:
//   q [T, Hq, Dk]; k, k_win [T, Hkv, Dk]; v, v_win [T, Hkv, Dv];
//   k_cmp [Tc, Hkv, Dk]; v_cmp [Tc, Hkv, Dv]; gates [T, Hq, 3] (cmp, slc, win).
// Query head h belongs to kv head h / G, G = Hq / Hkv.
#pragma once

#include <cstdint>
#include <vector>

namespace nsa_oracle {

struct Config {
  int64_t l = 32;        // compression block
  int64_t d = 16;        // compression stride
  int64_t l_sel = 64;    // selection block l'
  int64_t n = 16;        // selected blocks, forced ones included
  int64_t n_init = 1;    // blocks 0 .. n_init-1 forced
  int64_t n_local = 2;   // blocks floor(t/l') - k, k < n_local, forced
  int64_t w = 512;       // window
  double scale = 0.0;    // 0: 1/sqrt(Dk)
};

struct Inputs {
  int64_t T = 0, Hq = 0, Hkv = 0, Dk = 0, Dv = 0;
  const double* q = nullptr;
  const double* k = nullptr;
  const double* v = nullptr;
  const double* k_win = nullptr;  // nullptr: k
  const double* v_win = nullptr;  // nullptr: v
  const double* k_cmp = nullptr;  // may be nullptr when Tc == 0
  const double* v_cmp = nullptr;
  const double* gates = nullptr;
};

struct Outputs {
  std::vector<double> out;         // [T, Hq, Dv]
  std::vector<double> out_branch;  // [T, Hq, 3, Dv]
  std::vector<double> lse;         // [T, Hq, 3]; -inf where a branch sees no key
  std::vector<int32_t> indices;    // [T, Hkv, n] ascending, -1 padded (the blocks attended)
  std::vector<double> scores;      // [T, Hkv, num_blocks(T)] P(t, j) of Eq. 10; -inf for j > t / l'
};

// Tc = T >= l ? (T - l) / d + 1 : 0.
int64_t num_cmp_tokens(int64_t T, const Config& cfg);
// Selection blocks touching [0, T): ceil(T / l').
int64_t num_blocks(int64_t T, const Config& cfg);

// Eq. 9 weight of compressed token i in selection block j, counted raw token by raw token:
// |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d.
double overlap_weight(const Config& cfg, int64_t i, int64_t j);

// Top-n for one (t, kv head) from the scores P[0 .. num_blocks) (only j <= t / l' are read):
// forced blocks, then highest P with ties to the lower j; ascending, -1 padded to n.
std::vector<int32_t> select_blocks(const Config& cfg, int64_t t, const std::vector<double>& P);

// The whole forward for one sequence. given_indices: [T, Hkv, n] (any order, -1 ignored)
// replaces the scoring; scores are still computed and reported. Throws std::invalid_argument
// on an invalid config or shape.
Outputs forward(const Config& cfg, const Inputs& in, const int32_t* given_indices = nullptr);

}  // namespace nsa_oracle
