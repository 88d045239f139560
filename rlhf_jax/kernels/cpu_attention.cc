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
// Every product of tiles (S = Q K^T, dP = dO V^T, O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q) is
// one register-blocked micro-kernel (`gemm`): 4 rows of the left operand against 64 columns of the right,
// 16 vector accumulators kept in registers across the whole inner dimension (GCC/Clang vector extensions:
// one AVX-512 register per 16 floats, two AVX2 or four SSE registers elsewhere). Tiles are copied into
// contiguous buffers padded to whole vectors (the head size to a multiple of 16, zeros beyond), and exp is
// a vectorised polynomial (Cephes' degree-6 expf, ~1 ulp). Masks are the visible key range of each
// query, [first key of its segment, itself], when every segment id of the row is one contiguous run, and
// are tested key by key otherwise; key tiles wholly before a query tile's segments are skipped.
//
// Work is split into items scheduled dynamically over std::threads: the forward's items are (row, head),
// the backward's (row, kv head), so every item owns the rows of out, dq, dk and dv it writes and no two
// threads write the same memory.
//
// Built by `python -m rlhf_jax.kernels.build`; registered and called by `rlhf_jax.kernels.cpu_attention`.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <unordered_map>
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
#define RLHF_JAX_INLINE inline __attribute__((always_inline))

constexpr int64_t V = 16;   // floats per vector
constexpr int64_t BQ = 32;  // query rows per tile
constexpr int64_t BK = 64;  // keys per tile
constexpr int64_t MR = 4;   // rows per micro-kernel call
constexpr int64_t NR = 4;   // vectors (of V floats) per micro-kernel call: 64 columns
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(V * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(V * sizeof(int32_t))));

RLHF_JAX_INLINE vf load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(vf));
  return x;
}
RLHF_JAX_INLINE void store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }
RLHF_JAX_INLINE vf splat(float a) { return vf{} + a; }  // GCC 12 compiles this one to a broadcast

// max and sum of a vector's 16 lanes (a tree of shuffles measured no faster in the forward).
RLHF_JAX_INLINE float reduce_max(vf x) {
  float m = x[0];
  for (int64_t j = 1; j < V; ++j) m = std::max(m, x[j]);
  return m;
}
RLHF_JAX_INLINE float reduce_add(vf x) {
  float total = 0.0f;
  for (int64_t j = 0; j < V; ++j) total += x[j];
  return total;
}

// exp(x) for x <= 0 (every argument here is a score minus its row's maximum or log-sum-exp): Cephes'
// expf, x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 polynomial, 2^n from the exponent bits.
// Arguments below -87 give 0 (the smallest normal float is exp(-87.3)); callers mask -inf themselves.
RLHF_JAX_INLINE vf vexp(vf x) {
  const vf lo = splat(-87.0f);
  const vi tiny = x < lo;  // all-ones lanes where the result underflows
  x = x < lo ? lo : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const vf t = x * splat(1.44269504088896341f) + shifter;
  const vf n = t - shifter;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  const vi bits = ((vi)t - (vi)shifter + 127) << 23;  // 2^n
  const vf y = p * (vf)bits;
  return (vf)((vi)y & ~tiny);
}

// C[r, 0:64*nr) (+)= sum_d A(r, d) B[d, 0:64*nr) for MR rows, A(r, d) = a[r * ars + d * acs], B rows
// ldb apart, C rows ldc apart. R and N are the micro-tile's rows and vectors.
template <int64_t R, int64_t N>
RLHF_JAX_INLINE void micro(const float* a, int64_t ars, int64_t acs, int64_t depth, const float* b,
                           int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  vf acc[R][N];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < N; ++n) acc[r][n] = accumulate ? load(c + r * ldc + n * V) : vf{};
  for (int64_t d = 0; d < depth; ++d) {
    vf bv[N];
    for (int64_t n = 0; n < N; ++n) bv[n] = load(b + d * ldb + n * V);
    for (int64_t r = 0; r < R; ++r) {
      const vf av = splat(a[r * ars + d * acs]);
      for (int64_t n = 0; n < N; ++n) acc[r][n] += av * bv[n];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < N; ++n) store(c + r * ldc + n * V, acc[r][n]);
}

template <int64_t R>
RLHF_JAX_INLINE void micro_cols(const float* a, int64_t ars, int64_t acs, int64_t depth, const float* b,
                                int64_t ldb, float* c, int64_t ldc, int64_t vecs, bool accumulate) {
  int64_t n0 = 0;
  for (; n0 + NR <= vecs; n0 += NR) micro<R, NR>(a, ars, acs, depth, b + n0 * V, ldb, c + n0 * V, ldc, accumulate);
  switch (vecs - n0) {
    case 3: micro<R, 3>(a, ars, acs, depth, b + n0 * V, ldb, c + n0 * V, ldc, accumulate); break;
    case 2: micro<R, 2>(a, ars, acs, depth, b + n0 * V, ldb, c + n0 * V, ldc, accumulate); break;
    case 1: micro<R, 1>(a, ars, acs, depth, b + n0 * V, ldb, c + n0 * V, ldc, accumulate); break;
    default: break;
  }
}

// C[rows, vecs * V] (+)= A[rows, depth] B[depth, vecs * V], A(r, d) = a[r * ars + d * acs].
RLHF_JAX_INLINE void gemm(int64_t rows, int64_t vecs, int64_t depth, const float* a, int64_t ars, int64_t acs,
                          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t r0 = 0;
  for (; r0 + MR <= rows; r0 += MR)
    micro_cols<MR>(a + r0 * ars, ars, acs, depth, b, ldb, c + r0 * ldc, ldc, vecs, accumulate);
  switch (rows - r0) {
    case 3: micro_cols<3>(a + r0 * ars, ars, acs, depth, b, ldb, c + r0 * ldc, ldc, vecs, accumulate); break;
    case 2: micro_cols<2>(a + r0 * ars, ars, acs, depth, b, ldb, c + r0 * ldc, ldc, vecs, accumulate); break;
    case 1: micro_cols<1>(a + r0 * ars, ars, acs, depth, b, ldb, c + r0 * ldc, ldc, vecs, accumulate); break;
    default: break;
  }
}

struct Dims {
  int64_t B, T, H, G, K;
  int64_t Q() const { return H / G; }
  int64_t KP() const { return (K + V - 1) / V * V; }  // the head size padded to whole vectors
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

// The visible keys of each query of one row. When each segment id of the row is one contiguous run,
// query t sees exactly the keys [lo[t], t] (lo[t]: the first key of its run) and `contiguous` is set;
// otherwise keys are tested one by one with `visible`.
struct RowMask {
  const int32_t* seg;
  std::vector<int64_t> lo;
  bool contiguous = true;

  RowMask(const int32_t* seg_T, int64_t T) : seg(seg_T), lo(T) {
    std::vector<int32_t> seen;  // ids whose run has ended
    for (int64_t t = 0; t < T; ++t) {
      if (t > 0 && seg[t] == seg[t - 1]) {
        lo[t] = lo[t - 1];
        continue;
      }
      lo[t] = t;
      if (t > 0) seen.push_back(seg[t - 1]);
      if (std::find(seen.begin(), seen.end(), seg[t]) != seen.end()) contiguous = false;
    }
    if (!contiguous) {  // a later run of an id also sees the earlier ones: start from the id's first key
      std::unordered_map<int32_t, int64_t> first;
      for (int64_t t = 0; t < T; ++t) lo[t] = first.emplace(seg[t], t).first->second;
    }
  }
  bool visible(int64_t t, int64_t s) const { return s <= t && s >= lo[t] && seg[s] == seg[t]; }
  // The first key any of the queries [t0, t1) sees.
  int64_t first_key(int64_t t0, int64_t t1) const {
    int64_t s = t0;
    for (int64_t t = t0; t < t1; ++t) s = std::min(s, lo[t]);
    return s;
  }
};

// Sets s_i[j] (score of query t against key s0 + j, j < BK) to -inf where the key is not visible.
RLHF_JAX_INLINE void mask_row(const RowMask& m, int64_t t, int64_t s0, int64_t nk, float* s_i) {
  if (m.contiguous) {
    const int64_t a = std::max<int64_t>(0, m.lo[t] - s0), e = std::min<int64_t>(nk, t - s0 + 1);
    for (int64_t j = 0; j < std::min<int64_t>(a, BK); ++j) s_i[j] = NEG_INF;
    for (int64_t j = std::max<int64_t>(e, 0); j < BK; ++j) s_i[j] = NEG_INF;
  } else {
    for (int64_t j = 0; j < BK; ++j)
      if (j >= nk || !m.visible(t, s0 + j)) s_i[j] = NEG_INF;
  }
}

// dst[t * KP + kk] = x[row t][kk] of kv head g of row b: [TP, KP], zeros beyond T rows and K columns.
void copy_rows(const float* x, const Dims& d, int64_t b, int64_t g, int64_t TP, float* dst) {
  const int64_t K = d.K, KP = d.KP();
  std::fill(dst, dst + TP * KP, 0.0f);
  for (int64_t t = 0; t < d.T; ++t) std::memcpy(dst + t * KP, x + d.kv_at(b, t, g), K * sizeof(float));
}

// dst[kk * TP + t] = x[row t][kk] of kv head g of row b: [KP, TP], the same rows transposed.
void copy_transposed(const float* x, const Dims& d, int64_t b, int64_t g, int64_t TP, float* dst) {
  std::fill(dst, dst + d.KP() * TP, 0.0f);
  for (int64_t t0 = 0; t0 < d.T; t0 += V) {  // V rows at a time: each destination row written V floats on
    const int64_t t1 = std::min(d.T, t0 + V);
    for (int64_t kk = 0; kk < d.K; ++kk)
      for (int64_t t = t0; t < t1; ++t) dst[kk * TP + t] = x[d.kv_at(b, t, g) + kk];
  }
}

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
  const std::vector<RowMask>* masks;
  float *out_p, *lse_p;
  float scale;
};

// One forward item: head h of row b, its query tiles from the last (they see the most keys).
RLHF_JAX_CLONES void fwd_item(const FwdArgs& a, int64_t item) {
  const Dims& d = a.d;
  const int64_t K = d.K, KP = d.KP(), T = d.T, TP = (T + BK - 1) / BK * BK;
  const int64_t h = item % d.H, b = item / d.H, g = h / d.Q();
  const RowMask& mask = (*a.masks)[b];
  std::vector<float> q(BQ * KP, 0.0f), kT(KP * TP), vt(TP * KP), s(BQ * BK), acc(BQ * KP), m(BQ), l(BQ);
  copy_transposed(a.k_p, d, b, g, TP, kT.data());
  copy_rows(a.v_p, d, b, g, TP, vt.data());
  for (int64_t t0 = (T - 1) / BQ * BQ; t0 >= 0; t0 -= BQ) {
    const int64_t t1 = std::min(T, t0 + BQ), nq = t1 - t0;
    for (int64_t i = 0; i < nq; ++i) {  // the query tile, the score scale folded in
      const float* row = a.q_p + d.q_at(b, t0 + i, h);
      for (int64_t kk = 0; kk < K; ++kk) q[i * KP + kk] = a.scale * row[kk];
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(m.begin(), m.end(), NEG_INF);
    std::fill(l.begin(), l.end(), 0.0f);
    for (int64_t s0 = mask.first_key(t0, t1) / BK * BK; s0 < t1; s0 += BK) {  // up to the causal bound
      const int64_t nk = std::min(t1, s0 + BK) - s0;
      gemm(nq, BK / V, KP, q.data(), KP, 1, kT.data() + s0, TP, s.data(), BK, false);  // S = (scale Q) K^T
      for (int64_t i = 0; i < nq; ++i) {
        float* s_i = s.data() + i * BK;
        mask_row(mask, t0 + i, s0, nk, s_i);
        vf mv = load(s_i);
        for (int64_t j = V; j < BK; j += V) {
          const vf x = load(s_i + j);
          mv = x > mv ? x : mv;
        }
        const float mx = std::max(m[i], reduce_max(mv));
        if (mx == NEG_INF) {  // nothing visible yet in this row
          std::fill(s_i, s_i + BK, 0.0f);
          continue;
        }
        const float alpha = m[i] == NEG_INF ? 0.0f : std::exp(m[i] - mx);  // rescales the earlier blocks
        vf sum = vf{};
        for (int64_t j = 0; j < BK; j += V) {
          const vf x = load(s_i + j);
          const vf e = vexp(x - splat(mx));
          const vf p = (vf)((vi)e & (vi)(x != splat(NEG_INF)));  // masked keys exactly 0
          store(s_i + j, p);
          sum += p;
        }
        l[i] = l[i] * alpha + reduce_add(sum);
        float* acc_i = acc.data() + i * KP;
        for (int64_t kk = 0; kk < KP; kk += V) store(acc_i + kk, load(acc_i + kk) * splat(alpha));
        m[i] = mx;
      }
      gemm(nq, KP / V, BK, s.data(), BK, 1, vt.data() + s0 * KP, KP, acc.data(), KP, true);  // O += P V
    }
    for (int64_t i = 0; i < nq; ++i) {  // the diagonal is always visible, so l > 0
      float* o = a.out_p + d.q_at(b, t0 + i, h);
      const float inv = 1.0f / l[i];
      for (int64_t kk = 0; kk < K; ++kk) o[kk] = acc[i * KP + kk] * inv;
      a.lse_p[(b * d.H + h) * T + t0 + i] = m[i] + std::log(l[i]);
    }
  }
}

ffi::Error AttentionFwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::S32> seg, float scale, int64_t num_threads,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (auto err = check_dims(q, k, v, seg, &d); err.failure()) return err;
  std::vector<RowMask> masks;
  masks.reserve(d.B);
  for (int64_t b = 0; b < d.B; ++b) masks.emplace_back(seg.typed_data() + b * d.T, d.T);
  const FwdArgs a{d, q.typed_data(), k.typed_data(), v.typed_data(), &masks,
                  out->typed_data(), lse->typed_data(), scale};
  parallel_for(d.B * d.H, num_threads, [&](int64_t item) { fwd_item(a, item); });
  return ffi::Error::Success();
}

struct BwdArgs {
  Dims d;
  const float *q_p, *k_p, *v_p;
  const std::vector<RowMask>* masks;
  const float *out_p, *lse_p, *do_p;
  float *dq_p, *dk_p, *dv_p;
  float scale;
};

// One backward item, (row b, kv head g): it alone writes dk and dv of that kv head, and dq of its query
// heads. Per query head: key tiles outer, query tiles from the key tile's diagonal on.
RLHF_JAX_CLONES void bwd_item(const BwdArgs& a, int64_t item) {
  const Dims& d = a.d;
  const int64_t K = d.K, KP = d.KP(), T = d.T;
  const int64_t g = item % d.G, b = item / d.G;
  const RowMask& mask = (*a.masks)[b];
  const int64_t TP = (T + BK - 1) / BK * BK;  // rows padded to whole key tiles
  std::vector<float> q(TP * KP, 0.0f), dout(TP * KP, 0.0f), dq(TP * KP), dk(TP * KP, 0.0f), dv(TP * KP, 0.0f),
      delta(T), kT(KP * TP), vT(KP * TP), kt(TP * KP), p(BQ * BK), ds(BQ * BK);
  copy_transposed(a.k_p, d, b, g, TP, kT.data());
  copy_transposed(a.v_p, d, b, g, TP, vT.data());
  copy_rows(a.k_p, d, b, g, TP, kt.data());
  for (int64_t h = g * d.Q(); h < (g + 1) * d.Q(); ++h) {
    const float* lse_T = a.lse_p + (b * d.H + h) * T;
    for (int64_t t = 0; t < T; ++t) {  // this head's queries and output gradients; delta = rowsum(dO * O)
      const float *q_t = a.q_p + d.q_at(b, t, h), *do_t = a.do_p + d.q_at(b, t, h), *o_t = a.out_p + d.q_at(b, t, h);
      float acc = 0.0f;
      for (int64_t kk = 0; kk < K; ++kk) {
        q[t * KP + kk] = q_t[kk];
        dout[t * KP + kk] = do_t[kk];
        acc += do_t[kk] * o_t[kk];
      }
      delta[t] = acc;
    }
    std::fill(dq.begin(), dq.end(), 0.0f);
    for (int64_t s0 = 0; s0 < T; s0 += BK) {
      const int64_t nk = std::min(T, s0 + BK) - s0;
      for (int64_t t0 = s0 / BQ * BQ; t0 < T; t0 += BQ) {  // queries at or after the tile's first key
        const int64_t t1 = std::min(T, t0 + BQ), nq = t1 - t0;
        if (mask.first_key(t0, t1) >= s0 + nk) continue;  // no query here sees this key tile
        gemm(nq, BK / V, KP, q.data() + t0 * KP, KP, 1, kT.data() + s0, TP, p.data(), BK, false);  // Q K^T
        gemm(nq, BK / V, KP, dout.data() + t0 * KP, KP, 1, vT.data() + s0, TP, ds.data(), BK, false);  // dP
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t t = t0 + i;
          float *p_i = p.data() + i * BK, *ds_i = ds.data() + i * BK;
          for (int64_t j = 0; j < BK; ++j) p_i[j] *= a.scale;
          mask_row(mask, t, s0, nk, p_i);
          for (int64_t j = 0; j < BK; j += V) {
            const vf x = load(p_i + j);
            const vf e = vexp(x - splat(lse_T[t]));
            const vf pv = (vf)((vi)e & (vi)(x != splat(NEG_INF)));
            store(p_i + j, pv);
            // dS, with the score scale folded in
            store(ds_i + j, splat(a.scale) * pv * (load(ds_i + j) - splat(delta[t])));
          }
        }
        for (int64_t i = nq; i < BQ; ++i) {  // rows past T: zero, so the transposed products skip them
          std::fill(p.data() + i * BK, p.data() + (i + 1) * BK, 0.0f);
          std::fill(ds.data() + i * BK, ds.data() + (i + 1) * BK, 0.0f);
        }
        // dV[s0 + j] += sum_i P[i, j] dO[t0 + i]; dK[s0 + j] += sum_i dS[i, j] Q[t0 + i]
        gemm(BK, KP / V, nq, p.data(), 1, BK, dout.data() + t0 * KP, KP, dv.data() + s0 * KP, KP, true);
        gemm(BK, KP / V, nq, ds.data(), 1, BK, q.data() + t0 * KP, KP, dk.data() + s0 * KP, KP, true);
        gemm(nq, KP / V, BK, ds.data(), BK, 1, kt.data() + s0 * KP, KP, dq.data() + t0 * KP, KP, true);  // dQ += dS K
      }
    }
    for (int64_t t = 0; t < T; ++t) std::memcpy(a.dq_p + d.q_at(b, t, h), dq.data() + t * KP, K * sizeof(float));
  }
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(a.dk_p + d.kv_at(b, t, g), dk.data() + t * KP, K * sizeof(float));
    std::memcpy(a.dv_p + d.kv_at(b, t, g), dv.data() + t * KP, K * sizeof(float));
  }
}

ffi::Error AttentionBwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                            ffi::Buffer<ffi::F32> d_out, float scale, int64_t num_threads,
                            ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                            ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (auto err = check_dims(q, k, v, seg, &d); err.failure()) return err;
  std::vector<RowMask> masks;
  masks.reserve(d.B);
  for (int64_t b = 0; b < d.B; ++b) masks.emplace_back(seg.typed_data() + b * d.T, d.T);
  const BwdArgs a{d, q.typed_data(), k.typed_data(), v.typed_data(), &masks, out.typed_data(),
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
