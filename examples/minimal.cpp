// The README's C++ example: one NSA forward on the CPU reference backend, float32, padded layout.
#include <cmath>
#include <cstdio>
#include <vector>

#include "nsa/nsa.h"

int main() {
  const int64_t B = 1, T = 1000, Hq = 8, Hkv = 2, D = 64;
  nsa::Config config;  // paper defaults: l=32, d=16, l'=64, n=16, w=512
  const int64_t Tc = nsa::num_cmp_tokens(T, config.cmp_block, config.cmp_stride);

  auto filled = [](int64_t count, float phase) {  // deterministic stand-in data
    std::vector<float> values(count);
    for (int64_t e = 0; e < count; ++e) values[e] = std::sin(0.37f * float(e) + phase);
    return values;
  };
  std::vector<float> q = filled(B * T * Hq * D, 0), k = filled(B * T * Hkv * D, 1), v = filled(B * T * Hkv * D, 2);
  std::vector<float> k_cmp = filled(B * Tc * Hkv * D, 3), v_cmp = filled(B * Tc * Hkv * D, 4);
  std::vector<float> gates(B * T * Hq * 3, 0.5f), out(B * T * Hq * D), lse(B * T * Hq * 3);
  std::vector<int32_t> block_indices(B * T * Hkv * config.num_selected);

  nsa::ForwardParams p;
  p.config = config;
  p.dtype = nsa::DType::kFloat32;
  p.shape = {B, T, Hq, Hkv, D, D};
  // Contiguous [B, T, H, D]: strides (batch, seq, head) = (T*H*D, H*D, D).
  p.q = {q.data(), T * Hq * D, Hq * D, D};
  p.k = {k.data(), T * Hkv * D, Hkv * D, D};
  p.v = {v.data(), T * Hkv * D, Hkv * D, D};
  p.k_cmp = {k_cmp.data(), Tc * Hkv * D, Hkv * D, D};
  p.v_cmp = {v_cmp.data(), Tc * Hkv * D, Hkv * D, D};
  p.gates = {gates.data(), T * Hq * 3, Hq * 3, 3};
  p.out = {out.data(), T * Hq * D, Hq * D, D};
  p.lse = lse.data();
  p.block_indices = block_indices.data();

  const nsa::Status status = nsa::cpu::forward(p);
  if (!status.ok()) {
    std::fprintf(stderr, "nsa: %s\n", status.message.c_str());
    return 1;
  }
  std::printf("out[0] = %f, blocks selected at t=999 (kv head 0):", out[0]);
  for (int64_t slot = 0; slot < config.num_selected; ++slot)
    std::printf(" %d", block_indices[(999 * Hkv) * config.num_selected + slot]);
  std::printf("\n");
  return 0;
}
