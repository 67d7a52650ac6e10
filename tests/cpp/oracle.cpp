// Brute-force NSA forward oracle. See oracle.h. Deliberately naive: no shortcuts, no shared code.
#include "oracle.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace nsa_oracle {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("nsa_oracle: " + what);
}

void check_config(const Config& cfg) {
  require(cfg.l > 0 && cfg.d > 0 && cfg.l_sel > 0, "l, d, l' must be positive");
  require(cfg.l % cfg.d == 0, "d must divide l");
  require(cfg.l_sel % cfg.d == 0, "d must divide l'");
  require(cfg.n_init >= 0 && cfg.n_local >= 0, "n_init, n_local must be >= 0");
  require(cfg.n >= 1 && cfg.n >= cfg.n_init + cfg.n_local, "n >= n_init + n_local");
  require(cfg.w >= 1, "w must be >= 1");
}

// One branch for one query: dense softmax over the keys whose mask entry is true.
// keys/vals point at key 0 of the right kv head; consecutive keys are `row_k` / `row_v` apart.
struct Attention {
  double lse = -kInf;
  std::vector<double> o;     // [Dv]
  std::vector<double> prob;  // [num_keys]; 0 where masked out
};

Attention attend(const double* qv, int64_t Dk, int64_t Dv, double scale, const std::vector<bool>& mask,
                 const double* keys, int64_t row_k, const double* vals, int64_t row_v) {
  const int64_t num_keys = static_cast<int64_t>(mask.size());
  Attention a;
  a.o.assign(static_cast<size_t>(Dv), 0.0);
  a.prob.assign(static_cast<size_t>(num_keys), 0.0);
  std::vector<double> score(static_cast<size_t>(num_keys), -kInf);
  double mx = -kInf;
  bool any = false;
  for (int64_t s = 0; s < num_keys; ++s) {
    if (!mask[s]) continue;
    double dot = 0.0;
    for (int64_t x = 0; x < Dk; ++x) dot += qv[x] * keys[s * row_k + x];
    score[s] = scale * dot;
    mx = std::max(mx, score[s]);
    any = true;
  }
  if (!any) return a;  // lse = -inf, o = 0
  double sum = 0.0;
  for (int64_t s = 0; s < num_keys; ++s)
    if (mask[s]) sum += std::exp(score[s] - mx);
  for (int64_t s = 0; s < num_keys; ++s) {
    if (!mask[s]) continue;
    const double p = std::exp(score[s] - mx) / sum;
    a.prob[s] = p;
    for (int64_t x = 0; x < Dv; ++x) a.o[x] += p * vals[s * row_v + x];
  }
  a.lse = mx + std::log(sum);
  return a;
}

}  // namespace

int64_t num_cmp_tokens(int64_t T, const Config& cfg) { return T >= cfg.l ? (T - cfg.l) / cfg.d + 1 : 0; }

int64_t num_blocks(int64_t T, const Config& cfg) { return (T + cfg.l_sel - 1) / cfg.l_sel; }

double overlap_weight(const Config& cfg, int64_t i, int64_t j) {
  int64_t count = 0;
  for (int64_t r = i * cfg.d; r < i * cfg.d + cfg.l; ++r)
    if (r >= j * cfg.l_sel && r < (j + 1) * cfg.l_sel) ++count;
  return static_cast<double>(count) / static_cast<double>(cfg.d);
}

std::vector<int32_t> select_blocks(const Config& cfg, int64_t t, const std::vector<double>& P) {
  check_config(cfg);
  const int64_t last = t / cfg.l_sel;  // eligible: j <= floor(t / l')
  require(static_cast<int64_t>(P.size()) > last, "score vector too short");
  std::vector<int64_t> chosen;
  std::vector<int64_t> eligible;
  std::vector<bool> forced(static_cast<size_t>(last + 1), false);
  for (int64_t j = 0; j <= last; ++j) {
    eligible.push_back(j);
    if (j < cfg.n_init) forced[j] = true;
    for (int64_t k = 0; k < cfg.n_local; ++k)
      if (j == last - k) forced[j] = true;
  }
  if (static_cast<int64_t>(eligible.size()) <= cfg.n) {
    chosen = eligible;
  } else {
    std::vector<std::pair<double, int64_t>> candidates;  // (P, j)
    for (int64_t j : eligible) {
      if (forced[j])
        chosen.push_back(j);
      else
        candidates.emplace_back(P[j], j);
    }
    std::sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) {
      if (a.first != b.first) return a.first > b.first;  // P descending
      return a.second < b.second;                         // ties: lower j first
    });
    for (const auto& c : candidates) {
      if (static_cast<int64_t>(chosen.size()) >= cfg.n) break;
      chosen.push_back(c.second);
    }
  }
  std::sort(chosen.begin(), chosen.end());
  std::vector<int32_t> result(static_cast<size_t>(cfg.n), -1);
  for (size_t x = 0; x < chosen.size(); ++x) result[x] = static_cast<int32_t>(chosen[x]);
  return result;
}

Outputs forward(const Config& cfg, const Inputs& in, const int32_t* given_indices) {
  check_config(cfg);
  require(in.T >= 0 && in.Hq >= 1 && in.Hkv >= 1 && in.Dk >= 1 && in.Dv >= 1, "bad shape");
  require(in.Hq % in.Hkv == 0, "Hkv must divide Hq");
  const int64_t T = in.T, Hq = in.Hq, Hkv = in.Hkv, Dk = in.Dk, Dv = in.Dv;
  const int64_t G = Hq / Hkv;
  const int64_t Tc = num_cmp_tokens(T, cfg);
  const int64_t NB = num_blocks(T, cfg);
  const int64_t n = cfg.n;
  const double scale = cfg.scale != 0.0 ? cfg.scale : 1.0 / std::sqrt(static_cast<double>(Dk));
  const double* k_win = in.k_win ? in.k_win : in.k;
  const double* v_win = in.v_win ? in.v_win : in.v;
  require(T == 0 || (in.q && in.k && in.v && in.gates), "missing input");
  require(Tc == 0 || (in.k_cmp && in.v_cmp), "missing compressed input");

  Outputs res;
  res.out.assign(static_cast<size_t>(T * Hq * Dv), 0.0);
  res.out_branch.assign(static_cast<size_t>(T * Hq * 3 * Dv), 0.0);
  res.lse.assign(static_cast<size_t>(T * Hq * 3), -kInf);
  res.indices.assign(static_cast<size_t>(T * Hkv * n), -1);
  res.scores.assign(static_cast<size_t>(T * Hkv * NB), -kInf);

  // Eq. 9 weights, each counted raw token by raw token.
  std::vector<double> weight(static_cast<size_t>(Tc * NB), 0.0);
  for (int64_t i = 0; i < Tc; ++i)
    for (int64_t j = 0; j < NB; ++j) weight[i * NB + j] = overlap_weight(cfg, i, j);

  for (int64_t t = 0; t < T; ++t) {
    // cmp mask: compressed token i visible iff i*d + l - 1 <= t.
    std::vector<bool> cmp_mask(static_cast<size_t>(Tc), false);
    for (int64_t i = 0; i < Tc; ++i) cmp_mask[i] = (i * cfg.d + cfg.l - 1 <= t);
    // win mask: max(0, t-w+1) <= s <= t.
    std::vector<bool> win_mask(static_cast<size_t>(T), false);
    for (int64_t s = 0; s < T; ++s) win_mask[s] = (s >= std::max<int64_t>(0, t - cfg.w + 1) && s <= t);

    for (int64_t g = 0; g < Hkv; ++g) {
      // cmp branch for the G query heads of this kv head, and the scores P(t, j).
      std::vector<Attention> cmp(static_cast<size_t>(G));
      std::vector<double> P(static_cast<size_t>(NB), 0.0);
      for (int64_t hg = 0; hg < G; ++hg) {
        const int64_t h = g * G + hg;
        cmp[hg] = attend(in.q + (t * Hq + h) * Dk, Dk, Dv, scale, cmp_mask, in.k_cmp + g * Dk, Hkv * Dk,
                         in.v_cmp + g * Dv, Hkv * Dv);
        for (int64_t j = 0; j < NB; ++j) {
          double p_slc = 0.0;
          for (int64_t i = 0; i < Tc; ++i) p_slc += cmp[hg].prob[i] * weight[i * NB + j];
          P[j] += p_slc;
        }
      }
      for (int64_t j = 0; j < NB; ++j) {
        if (j > t / cfg.l_sel) P[j] = -kInf;
        res.scores[(t * Hkv + g) * NB + j] = P[j];
      }

      // The selected set.
      std::vector<int32_t> sel;
      if (given_indices) {
        const int32_t* row = given_indices + (t * Hkv + g) * n;
        std::vector<int32_t> given;
        for (int64_t x = 0; x < n; ++x) {
          if (row[x] == -1) continue;
          require(row[x] >= 0 && row[x] <= t / cfg.l_sel, "given index out of range");
          require(std::find(given.begin(), given.end(), row[x]) == given.end(), "given index repeated");
          given.push_back(row[x]);
        }
        std::sort(given.begin(), given.end());
        sel.assign(static_cast<size_t>(n), -1);
        std::copy(given.begin(), given.end(), sel.begin());
      } else {
        sel = select_blocks(cfg, t, P);
      }
      std::copy(sel.begin(), sel.end(), res.indices.begin() + (t * Hkv + g) * n);
      std::vector<bool> block_selected(static_cast<size_t>(NB), false);
      for (int32_t j : sel)
        if (j >= 0) block_selected[j] = true;
      // slc mask: s <= t and block s / l' selected.
      std::vector<bool> slc_mask(static_cast<size_t>(T), false);
      for (int64_t s = 0; s < T; ++s) slc_mask[s] = (s <= t && block_selected[s / cfg.l_sel]);

      for (int64_t hg = 0; hg < G; ++hg) {
        const int64_t h = g * G + hg;
        const double* qv = in.q + (t * Hq + h) * Dk;
        Attention slc = attend(qv, Dk, Dv, scale, slc_mask, in.k + g * Dk, Hkv * Dk, in.v + g * Dv, Hkv * Dv);
        Attention win = attend(qv, Dk, Dv, scale, win_mask, k_win + g * Dk, Hkv * Dk, v_win + g * Dv, Hkv * Dv);
        const Attention* branch[3] = {&cmp[hg], &slc, &win};
        for (int b = 0; b < 3; ++b) {
          const double gate = in.gates[(t * Hq + h) * 3 + b];
          res.lse[(t * Hq + h) * 3 + b] = branch[b]->lse;
          for (int64_t x = 0; x < Dv; ++x) {
            res.out_branch[((t * Hq + h) * 3 + b) * Dv + x] = branch[b]->o[x];
            res.out[(t * Hq + h) * Dv + x] += gate * branch[b]->o[x];
          }
        }
      }
    }
  }
  return res;
}

}  // namespace nsa_oracle
