// Causal grouped-query attention for XLA:CPU through the XLA FFI: a FlashAttention-2 forward (online
// softmax over key blocks, the log-sum-exp kept) and its recomputing backward, float32 only.
//
// Layout (tokens-major, as the model produces them): q [B, T, H, K], k and v [B, T, G, K], segment ids
// [B, T] int32, H = G * Q (query head h reads kv head h / Q). Query t attends to key s when s <= t and
// seg[t] == seg[s] (padding, id 0, attends among itself: the mask `layers.causal_attention` is given).
//
//   forward:  s_ts = scale * q_t . k_s,  p_ts = exp(s_ts - lse_t),  lse_t = log sum_s exp(s_ts),
//             out_t = sum_s p_ts v_s
//   backward: delta_t = dO_t . out_t,  dp_ts = dO_t . v_s,  ds_ts = p_ts (dp_ts - delta_t),
//             dq_t = scale sum_s ds_ts k_s,  dk_s = scale sum_t ds_ts q_t,  dv_s = sum_t p_ts dO_t
//
// Work is split into items scheduled dynamically over std::threads: the forward's items are
// (row, head, query block), the backward's (row, kv head), so every item owns the rows of dk and dv it
// accumulates and no two threads write the same memory. Tiles are BQ queries x BK keys; the key and value
// tiles are transposed to [K, BK] so the score and dP dot products become vectorisable axpy loops over
// the tile's keys (no reassociated reductions: results do not depend on the vector width).
//
// Built by `python -m rlhf_jax.kernels.build`; registered and called by `rlhf_jax.kernels.cpu_attention`.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// With GCC on x86-64 Linux the per-item functions are compiled for AVX-512, AVX2 and baseline x86-64, one
// picked at load time by the CPU (function multiversioning through glibc's ifunc), so a portable build
// is still vectorised wide. Not with Clang (Zig's included): its clones left the inline library
// functions they call undefined, and the library did not load (Zig 0.17). Elsewhere, or with
// -DRLHF_JAX_NO_CLONES, one version for the flags given (-march=native: RLHF_JAX_KERNELS_NATIVE=1).
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && !defined(RLHF_JAX_NO_CLONES)
#define RLHF_JAX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RLHF_JAX_CLONES
#endif

constexpr int64_t BQ = 32;  // query rows per tile
constexpr int64_t BK = 64;  // keys per tile
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct Dims {
  int64_t B, T, H, G, K;
  int64_t Q() const { return H / G; }
  // Offsets of row (b, t) of head h (queries) or kv head g (keys, values).
  int64_t q_at(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * K; }
  int64_t kv_at(int64_t b, int64_t t, int64_t g) const { return ((b * T + t) * G + g) * K; }
};

// Runs fn(item) for item in [0, n) on up to `threads` threads, items taken in order from a shared counter.
template <typename F>
void parallel_for(int64_t n, int64_t threads, F fn) {
  if (threads <= 0) threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  threads = std::min(threads, n);
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  };
  if (threads <= 1) {
    worker();
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int64_t i = 0; i < threads - 1; ++i) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

// y += a * x over n contiguous floats (restrict: the compiler vectorises it without a runtime alias check).
inline void axpy(float* __restrict__ y, const float* __restrict__ x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// tile_T[kk * BK + j] = x[row s0 + j][kk]: a [nk, K] slice of keys or values, transposed.
inline void transpose_tile(const float* x, const Dims& d, int64_t b, int64_t g, int64_t s0, int64_t nk,
                    float* tile_T) {
  for (int64_t j = 0; j < nk; ++j) {
    const float* row = x + d.kv_at(b, s0 + j, g);
    for (int64_t kk = 0; kk < d.K; ++kk) tile_T[kk * BK + j] = row[kk];
  }
}

// out[i * BK + j] = alpha * a_i . tile_T[:, j] for the nq rows a_i = a + q_at(b, t0 + i, h).
inline void row_dots(const float* a, const Dims& d, int64_t b, int64_t t0, int64_t nq, int64_t h, const float* tile_T,
              int64_t nk, float alpha, float* out) {
  for (int64_t i = 0; i < nq; ++i) {
    const float* row = a + d.q_at(b, t0 + i, h);
    float* o = out + i * BK;
    for (int64_t j = 0; j < nk; ++j) o[j] = 0.0f;
    for (int64_t kk = 0; kk < d.K; ++kk) {
      const float x = alpha * row[kk];
      axpy(o, tile_T + kk * BK, x, nk);
    }
  }
}

// Whether key s0 + j is visible from query t0 + i: causal and the same segment.
inline bool allowed(const int32_t* seg_T, int64_t t, int64_t s) { return s <= t && seg_T[s] == seg_T[t]; }

ffi::Error check_dims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                      const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::S32>& seg, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), sd = seg.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || sd.size() != 2)
    return ffi::Error::InvalidArgument("cpu_attention: q, k, v must be rank 4 and segment ids rank 2");
  *d = Dims{qd[0], qd[1], qd[2], kd[2], qd[3]};
  bool ok = kd[0] == d->B && kd[1] == d->T && kd[3] == d->K;
  for (int i = 0; i < 4; ++i) ok = ok && vd[i] == kd[i];
  ok = ok && sd[0] == d->B && sd[1] == d->T && d->G > 0 && d->H % d->G == 0;
  if (!ok)
    return ffi::Error::InvalidArgument(
        "cpu_attention: expected q [B, T, H, K], k and v [B, T, G, K] with G dividing H, ids [B, T]");
  return ffi::Error::Success();
}

struct FwdArgs {
  Dims d;
  const float *q_p, *k_p, *v_p;
  const int32_t* seg_p;
  float *out_p, *lse_p;
  float scale;
};

// One forward item: query tile qb of head h of row b.
RLHF_JAX_CLONES void fwd_item(const FwdArgs& a, int64_t item) {
  const Dims& d = a.d;
  const float *q_p = a.q_p, *k_p = a.k_p, *v_p = a.v_p;
  const int32_t* seg_p = a.seg_p;
  float *out_p = a.out_p, *lse_p = a.lse_p;
  const float scale = a.scale;
  const int64_t K = d.K, blocks = (d.T + BQ - 1) / BQ;
  // Longest blocks (the last ones) first: they see the most keys.
  const int64_t qb = blocks - 1 - item % blocks, h = (item / blocks) % d.H, b = item / (blocks * d.H);
  const int64_t g = h / d.Q(), t0 = qb * BQ, t1 = std::min(d.T, t0 + BQ), nq = t1 - t0;
  const int32_t* seg_T = seg_p + b * d.T;
  std::vector<float> kT(K * BK), s(BQ * BK), acc(BQ * K, 0.0f), m(BQ, NEG_INF), l(BQ, 0.0f);
  for (int64_t s0 = 0; s0 < t1; s0 += BK) {  // key blocks up to the causal bound
    const int64_t nk = std::min(t1, s0 + BK) - s0;
    transpose_tile(k_p, d, b, g, s0, nk, kT.data());
    row_dots(q_p, d, b, t0, nq, h, kT.data(), nk, scale, s.data());
    for (int64_t i = 0; i < nq; ++i) {
      float* s_i = s.data() + i * BK;
      float mx = m[i];
      for (int64_t j = 0; j < nk; ++j) {
        if (!allowed(seg_T, t0 + i, s0 + j)) s_i[j] = NEG_INF;
        mx = std::max(mx, s_i[j]);
      }
      if (mx == NEG_INF) continue;  // nothing visible yet in this row
      const float alpha = std::exp(m[i] - mx);  // rescales what the earlier blocks summed
      float sum = 0.0f;
      for (int64_t j = 0; j < nk; ++j) {
        s_i[j] = std::exp(s_i[j] - mx);
        sum += s_i[j];
      }
      l[i] = l[i] * alpha + sum;
      float* acc_i = acc.data() + i * K;
      for (int64_t kk = 0; kk < K; ++kk) acc_i[kk] *= alpha;
      for (int64_t j = 0; j < nk; ++j) {
        const float p = s_i[j];
        if (p == 0.0f) continue;
        axpy(acc_i, v_p + d.kv_at(b, s0 + j, g), p, K);
      }
      m[i] = mx;
    }
  }
  for (int64_t i = 0; i < nq; ++i) {  // the diagonal is always visible, so l > 0
    float* o = out_p + d.q_at(b, t0 + i, h);
    const float inv = 1.0f / l[i];
    for (int64_t kk = 0; kk < K; ++kk) o[kk] = acc[i * K + kk] * inv;
    lse_p[(b * d.H + h) * d.T + t0 + i] = m[i] + std::log(l[i]);
  }
}

ffi::Error AttentionFwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::S32> seg, float scale, int64_t num_threads,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (auto err = check_dims(q, k, v, seg, &d); err.failure()) return err;
  const FwdArgs a{d, q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(),
                  out->typed_data(), lse->typed_data(), scale};
  const int64_t blocks = (d.T + BQ - 1) / BQ;
  parallel_for(d.B * d.H * blocks, num_threads, [&](int64_t item) { fwd_item(a, item); });
  return ffi::Error::Success();
}

struct BwdArgs {
  Dims d;
  const float *q_p, *k_p, *v_p;
  const int32_t* seg_p;
  const float *out_p, *lse_p, *do_p;
  float *dq_p, *dk_p, *dv_p;
  float scale;
};

// One backward item, (row b, kv head g): it alone writes dk and dv of that kv head, and dq of its query
// heads.
RLHF_JAX_CLONES void bwd_item(const BwdArgs& a, int64_t item) {
  const Dims& d = a.d;
  const float *q_p = a.q_p, *k_p = a.k_p, *v_p = a.v_p;
  const float *out_p = a.out_p, *lse_p = a.lse_p, *do_p = a.do_p;
  const int32_t* seg_p = a.seg_p;
  float *dq_p = a.dq_p, *dk_p = a.dk_p, *dv_p = a.dv_p;
  const float scale = a.scale;
  const int64_t K = d.K, blocks = (d.T + BQ - 1) / BQ;
  const int64_t g = item % d.G, b = item / d.G;
  const int32_t* seg_T = seg_p + b * d.T;
  for (int64_t t = 0; t < d.T; ++t) {
    std::fill_n(dk_p + d.kv_at(b, t, g), K, 0.0f);
    std::fill_n(dv_p + d.kv_at(b, t, g), K, 0.0f);
  }
  std::vector<float> kT(K * BK), vT(K * BK), p(BQ * BK), dp(BQ * BK), dq_acc(BQ * K), delta(BQ);
  for (int64_t h = g * d.Q(); h < (g + 1) * d.Q(); ++h) {
    for (int64_t qb = 0; qb < blocks; ++qb) {
      const int64_t t0 = qb * BQ, t1 = std::min(d.T, t0 + BQ), nq = t1 - t0;
      const float* lse_T = lse_p + (b * d.H + h) * d.T;
      for (int64_t i = 0; i < nq; ++i) {  // delta = rowsum(dO * O)
        const float *o = out_p + d.q_at(b, t0 + i, h), *g_o = do_p + d.q_at(b, t0 + i, h);
        float acc = 0.0f;
        for (int64_t kk = 0; kk < K; ++kk) acc += g_o[kk] * o[kk];
        delta[i] = acc;
      }
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
      for (int64_t s0 = 0; s0 < t1; s0 += BK) {
        const int64_t nk = std::min(t1, s0 + BK) - s0;
        transpose_tile(k_p, d, b, g, s0, nk, kT.data());
        transpose_tile(v_p, d, b, g, s0, nk, vT.data());
        row_dots(q_p, d, b, t0, nq, h, kT.data(), nk, scale, p.data());
        row_dots(do_p, d, b, t0, nq, h, vT.data(), nk, 1.0f, dp.data());
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t t = t0 + i;
          float *p_i = p.data() + i * BK, *ds_i = dp.data() + i * BK;
          for (int64_t j = 0; j < nk; ++j) {
            p_i[j] = allowed(seg_T, t, s0 + j) ? std::exp(p_i[j] - lse_T[t]) : 0.0f;
            ds_i[j] = scale * p_i[j] * (ds_i[j] - delta[i]);  // dS, with the score scale folded in
          }
          const float *q_i = q_p + d.q_at(b, t, h), *do_i = do_p + d.q_at(b, t, h);
          float* dq_i = dq_acc.data() + i * K;
          for (int64_t j = 0; j < nk; ++j) {
            if (p_i[j] == 0.0f && ds_i[j] == 0.0f) continue;
            const int64_t at = d.kv_at(b, s0 + j, g);
            axpy(dv_p + at, do_i, p_i[j], K);
            axpy(dk_p + at, q_i, ds_i[j], K);
            axpy(dq_i, k_p + at, ds_i[j], K);
          }
        }
      }
      for (int64_t i = 0; i < nq; ++i)
        std::copy_n(dq_acc.data() + i * K, K, dq_p + d.q_at(b, t0 + i, h));
    }
  }
}

ffi::Error AttentionBwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                            ffi::Buffer<ffi::F32> d_out, float scale, int64_t num_threads,
                            ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                            ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (auto err = check_dims(q, k, v, seg, &d); err.failure()) return err;
  const BwdArgs a{d, q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(), out.typed_data(),
                  lse.typed_data(), d_out.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data(),
                  scale};
  parallel_for(d.B * d.G, num_threads, [&](int64_t item) { bwd_item(a, item); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RlhfJaxCpuAttentionFwd, AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, T, H, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [B, T, G, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [B, T, G, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // segment ids [B, T]
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("num_threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, T, H, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse [B, H, T]
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RlhfJaxCpuAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // segment ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("num_threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
);
