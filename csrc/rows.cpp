// The row family on the CPU: C++ implementations of oodkernels::row_loss_fwd / row_loss_bwd / row_scores.
//
// Same math, statistics and outputs as the Triton template (oodkernels/kernels/rows.py, whose module
// docstring carries the formulas): per entry r, of v = x·mult,
//
//     m = max v, d = Σ exp(v − m), v_y, Σ v, j* = argmax (first on ties), ‖x‖, ρ = Σ q x − x_y (LogitNorm)
//
// forward writes the row values and stats [m, ln d, j*, ‖x‖, ρ] (N_STATS, R) in ACC (fp32, fp64 for
// fp64); backward writes dℓ/dx = γ·(a·p + b·e_y + c/C + h·e_j*) + δ·x into a fresh buffer.
//
// Two traversals of the same per-entry math, chosen by layout:
// * class-contiguous rows (stride_class == 1: (B, C), channels-last): one row at a time, vectorised over
//   classes, in chunks of CHUNK classes that stay in L1 (max, then Σexp over the cached chunk; chunks
//   merge online), so the logits are read from memory once;
// * anything else (NCHW, (N, C, L), transposed): a tile of TILE entries at a time, vectorised over the
//   entries (pixel-contiguous loads), the online state being one vector per statistic, classes looped.
// Both are parallel over rows / tiles with at::parallel_for (honours torch.get_num_threads()).
//
// Adding a kind: a case in `coefficients` (row value and backward coefficients) and, if it needs new
// statistics, in the passes; kinds this file does not know raise (never a wrong number).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;

// criterion kinds (kernels/rows.py)
constexpr int64_t CROSS_ENTROPY = 0;
constexpr int64_t OUTLIER_EXPOSURE = 1;
constexpr int64_t ENERGY = 2;
constexpr int64_t CONFIDENCE_PENALTY = 3;
constexpr int64_t MARGIN_CONFIDENCE = 4;
constexpr int64_t LOGIT_NORM = 5;
constexpr int64_t N_KINDS = 6;
// score kinds
constexpr int64_t SCORE_ENERGY = 0;
constexpr int64_t SCORE_MAX_SOFTMAX = 1;
constexpr int64_t SCORE_MAX_LOGIT = 2;
constexpr int64_t SCORE_ENTROPY = 3;
constexpr int64_t N_SCORES = 4;

constexpr int64_t N_STATS = 5;
constexpr double LOGIT_NORM_EPS = 1e-7;
constexpr double ENTROPY_CLAMP = 1e-7;
// 2048 fp32 classes = 8 KiB per chunk: a chunk is re-read from L1 (max pass, then exp pass)
constexpr int64_t DEFAULT_CHUNK = 2048;

// ---------------------------------------------------------------------------------------------
// layout: logits (N, C, *S) read as [outer, C, inner], entry r -> offset (as kernels/rows.py row_view)
// ---------------------------------------------------------------------------------------------

struct View {
  int64_t n_rows = 0, inner = 1, width = 1;
  int64_t s_outer = 0, s_class = 0, s_h = 0, s_w = 0;

  View(const Tensor& t, bool has_classes) {
    const int64_t first_spatial = has_classes ? 2 : 1;
    const int64_t n_spatial = t.dim() - first_spatial;
    TORCH_CHECK(n_spatial <= 2, "oodkernels (C++): expected at most two spatial dimensions, got shape ", t.sizes());
    s_outer = t.dim() ? t.stride(0) : 0;
    s_class = has_classes ? t.stride(1) : 0;
    if (n_spatial == 1) {
      inner = width = t.size(first_spatial);
      s_w = t.stride(first_spatial);
    } else if (n_spatial == 2) {
      inner = t.size(first_spatial) * t.size(first_spatial + 1);
      width = t.size(first_spatial + 1);
      s_h = t.stride(first_spatial);
      s_w = t.stride(first_spatial + 1);
    }
    width = std::max<int64_t>(width, 1);
    n_rows = (t.dim() ? t.size(0) : 1) * inner;
  }

  inline int64_t offset(int64_t r) const {
    const int64_t outer = r / inner;
    const int64_t i = r - outer * inner;
    const int64_t h = i / width;
    return outer * s_outer + h * s_h + (i - h * width) * s_w;
  }
};

// ---------------------------------------------------------------------------------------------
// per-entry math shared by both traversals
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct Params {
  int64_t kind = 0;
  acc_t alpha = 0, m_in = 0, m_out = 0;
  bool has_ignore = false;
  int64_t ignore_index = 0;
  int64_t n_classes = 0;
  const acc_t* cost = nullptr;  // (C, C) contiguous, ACC
};

struct Label {
  int64_t y;  // the target column, or -1 where the entry has none
  bool is_id, is_ood, invalid;
};

template <typename acc_t>
inline Label classify(int64_t y, const Params<acc_t>& p) {
  const bool valid = !(p.has_ignore && y == p.ignore_index);
  Label l;
  l.is_id = valid && y >= 0;
  l.is_ood = valid && y < 0;
  l.invalid = l.is_id && y >= p.n_classes;
  l.y = (l.is_id && !l.invalid) ? y : -1;
  return l;
}

template <typename acc_t>
inline acc_t cost_weight(const Label& l, int64_t j_star, const Params<acc_t>& p) {
  return (p.cost != nullptr && l.is_id && l.y >= 0) ? p.cost[l.y * p.n_classes + j_star] : acc_t(1);
}

template <typename acc_t>
struct Coefficients {
  acc_t loss, a, b, c, h;
};

// row value and backward coefficients (ℓ, a, b, c, h) of one entry: the table of kernels/rows.py
template <typename acc_t>
inline Coefficients<acc_t> coefficients(
    const Params<acc_t>& p, const Label& l, acc_t omega, acc_t m, acc_t log_d, acc_t v_y, acc_t sum_v) {
  const acc_t lse = m + log_d;
  const acc_t ce = (m - v_y) + log_d;
  const acc_t pi = std::exp(-log_d);
  const acc_t zero = 0;
  acc_t loss_id = omega * ce, a_id = omega;
  acc_t loss_ood = zero, a_ood = zero, c_ood = zero, h_ood = zero;
  switch (p.kind) {
    case CROSS_ENTROPY:
    case LOGIT_NORM:
      break;
    case OUTLIER_EXPOSURE:
      loss_ood = p.alpha * (lse - sum_v / acc_t(p.n_classes));
      a_ood = p.alpha;
      c_ood = -p.alpha;
      break;
    case ENERGY: {
      const acc_t h_in = std::max(-lse - p.m_in, zero);
      loss_id = loss_id + p.alpha * h_in * h_in;
      a_id = a_id - acc_t(2) * p.alpha * h_in;
      const acc_t h_out = std::max(p.m_out + lse, zero);
      loss_ood = p.alpha * h_out * h_out;
      a_ood = acc_t(2) * p.alpha * h_out;
      break;
    }
    case CONFIDENCE_PENALTY:
      loss_ood = p.alpha * pi;
      a_ood = -p.alpha * pi;
      h_ood = p.alpha * pi;
      break;
    case MARGIN_CONFIDENCE: {
      loss_ood = std::max(pi - p.alpha, zero);
      const bool kappa = pi > p.alpha;  // strict, like relu's backward
      a_ood = kappa ? -pi : zero;
      h_ood = kappa ? pi : zero;
      break;
    }
    default:
      TORCH_CHECK(false, "oodkernels (C++): unknown row kind ", p.kind);
  }
  Coefficients<acc_t> k;
  k.loss = l.is_id ? loss_id : (l.is_ood ? loss_ood : zero);
  k.a = l.is_id ? a_id : (l.is_ood ? a_ood : zero);
  k.b = l.is_id ? -omega : zero;
  k.c = l.is_ood ? c_ood : zero;
  k.h = l.is_ood ? h_ood : zero;
  return k;
}

// streaming statistics of one entry (or one lane of a tile)
template <typename acc_t>
struct Stats {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t d = 0, sum_v = 0;
  int64_t j_star = 0;
  bool has_nan = false;

  // merge a chunk's max (first index `arg`), and Σ exp(v − shift) taken with `shift` = this chunk's shift
  inline acc_t shift_for(acc_t chunk_max) const {
    const acc_t m_new = std::max(m, chunk_max);
    return m_new == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : m_new;
  }
};

template <typename scalar_t, typename acc_t>
inline acc_t load(const scalar_t* x, int64_t i) {
  return static_cast<acc_t>(x[i]);
}

// ---------------------------------------------------------------------------------------------
// class-contiguous traversal: one row, vectorised over classes
// ---------------------------------------------------------------------------------------------

// Σ_c x_c² of one row with class stride 1 (LogitNorm's norm pass)
template <typename scalar_t, typename acc_t>
acc_t row_sq_norm(const scalar_t* x, int64_t n, int64_t stride) {
  acc_t sq = 0;
  for (int64_t c = 0; c < n; ++c) {
    const acc_t v = load<scalar_t, acc_t>(x, c * stride);
    sq += v * v;
  }
  return sq;
}

// online statistics of v = x·mult over one row (class stride 1), chunk by chunk; `buf` holds CHUNK values
template <typename scalar_t, typename acc_t>
Stats<acc_t> row_stats(const scalar_t* x, int64_t n, acc_t mult, int64_t chunk, acc_t* buf) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  Stats<acc_t> s;
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t len = std::min(chunk, n - c0);
    // 1. upcast the chunk into L1 and take its max and Σv
    Vec vmax(neg_inf), vsum(acc_t(0)), vnan(acc_t(0));
    const Vec vmult(mult);
    int64_t c = 0;
    for (; c + V <= len; c += V) {
      Vec v;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        v = Vec::loadu(x + c0 + c) * vmult;
      } else {
        for (int64_t k = 0; k < V; ++k) buf[c + k] = load<scalar_t, acc_t>(x, c0 + c + k);
        v = Vec::loadu(buf + c) * vmult;
      }
      v.store(buf + c);
      vmax = at::vec::maximum(vmax, v);
      vsum = vsum + v;
      vnan = vnan | (v != v);
    }
    acc_t cmax = neg_inf, csum = 0;
    bool nan = false;
    for (; c < len; ++c) {
      const acc_t v = load<scalar_t, acc_t>(x, c0 + c) * mult;
      buf[c] = v;
      cmax = (v > cmax) ? v : cmax;
      csum += v;
      nan = nan || (v != v);
    }
    acc_t lanes[V];
    vmax.store(lanes);
    for (int64_t k = 0; k < V; ++k) cmax = (lanes[k] > cmax) ? lanes[k] : cmax;
    vsum.store(lanes);
    for (int64_t k = 0; k < V; ++k) csum += lanes[k];
    vnan.store(lanes);
    for (int64_t k = 0; k < V; ++k) nan = nan || lanes[k] != 0;
    s.has_nan = s.has_nan || nan;
    s.sum_v += csum;
    // 2. first index of the chunk's max; strictly greater than the running max to move j* (first wins)
    if (cmax > s.m) {
      int64_t arg = 0;
      while (arg < len && !(buf[arg] == cmax)) ++arg;
      s.j_star = c0 + std::min(arg, len - 1);
    }
    // 3. Σ exp(v − shift) from the cached chunk, merged into the running sum
    const acc_t shift = s.shift_for(cmax);
    const Vec vshift(shift);
    Vec vexp(acc_t(0));
    c = 0;
    for (; c + V <= len; c += V) vexp = vexp + (Vec::loadu(buf + c) - vshift).exp();
    acc_t cexp = 0;
    for (; c < len; ++c) cexp += std::exp(buf[c] - shift);
    vexp.store(lanes);
    for (int64_t k = 0; k < V; ++k) cexp += lanes[k];
    s.d = s.d * std::exp(s.m - shift) + cexp;
    s.m = std::max(s.m, cmax);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// entry-tile traversal: TILE entries at once, vectorised over entries, classes looped
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
constexpr int64_t tile_size() {
  return 4 * at::vec::Vectorized<acc_t>::size();
}

// x[base[k] + c·s_class] for the tile's entries, upcast; a contiguous run loads as a contiguous block
template <typename scalar_t, typename acc_t>
inline void gather_class(
    const scalar_t* X, const int64_t* base, bool contiguous, int64_t count, int64_t c, int64_t s_class, acc_t* out) {
  constexpr int64_t T = tile_size<acc_t>();
  if (contiguous) {
    const scalar_t* src = X + base[0] + c * s_class;
    for (int64_t k = 0; k < count; ++k) out[k] = load<scalar_t, acc_t>(src, k);
  } else {
    for (int64_t k = 0; k < count; ++k) out[k] = load<scalar_t, acc_t>(X, base[k] + c * s_class);
  }
  for (int64_t k = count; k < T; ++k) out[k] = 0;  // padding lanes: finite, results discarded
}

// online statistics of a tile: per lane m, d, Σv, j*, NaN flag (vectorised over lanes)
template <typename scalar_t, typename acc_t>
void tile_stats(
    const scalar_t* X,
    const int64_t* base,
    bool contiguous,
    int64_t count,
    int64_t n_classes,
    int64_t s_class,
    const acc_t* mult,
    Stats<acc_t>* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t T = tile_size<acc_t>();
  constexpr int64_t NV = T / V;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  Vec m[NV], d[NV], sum_v[NV], arg[NV], nan[NV], vmult[NV];
  for (int64_t j = 0; j < NV; ++j) {
    m[j] = Vec(neg_inf);
    d[j] = sum_v[j] = arg[j] = nan[j] = Vec(acc_t(0));
    vmult[j] = Vec::loadu(mult + j * V);
  }
  alignas(64) acc_t x[T];
  const Vec zero(acc_t(0)), vneg_inf(neg_inf);
  for (int64_t c = 0; c < n_classes; ++c) {
    gather_class<scalar_t, acc_t>(X, base, contiguous, count, c, s_class, x);
    const Vec col(static_cast<acc_t>(c));
    for (int64_t j = 0; j < NV; ++j) {
      const Vec v = Vec::loadu(x + j * V) * vmult[j];
      const Vec is_nan = v != v;
      nan[j] = nan[j] | is_nan;
      // strictly greater: the first maximum wins; a NaN never moves m (the NaN flag takes over)
      const Vec greater = v > m[j];
      const Vec m_new = Vec::blendv(m[j], v, greater);
      arg[j] = Vec::blendv(arg[j], col, greater);
      // an all -inf prefix keeps m = -inf: shift by 0 there so that no inf − inf appears
      const Vec shift = Vec::blendv(m_new, zero, m_new == vneg_inf);
      d[j] = d[j] * (m[j] - shift).exp() + (Vec::blendv(v, vneg_inf, is_nan) - shift).exp();
      sum_v[j] = sum_v[j] + v;
      m[j] = m_new;
    }
  }
  alignas(64) acc_t lm[T], ld[T], ls[T], la[T], ln[T];
  for (int64_t j = 0; j < NV; ++j) {
    m[j].store(lm + j * V);
    d[j].store(ld + j * V);
    sum_v[j].store(ls + j * V);
    arg[j].store(la + j * V);
    nan[j].store(ln + j * V);
  }
  for (int64_t k = 0; k < count; ++k) {
    out[k].m = lm[k];
    out[k].d = ld[k];
    out[k].sum_v = ls[k];
    out[k].j_star = static_cast<int64_t>(la[k]);
    out[k].has_nan = ln[k] != 0;
  }
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// the entry's targets as int64, read through their strides
struct Targets {
  const int64_t* data;
  View view;
  inline int64_t at(int64_t r) const {
    return data[view.offset(r)];
  }
};

template <typename scalar_t, typename acc_t>
struct RowKernel {
  const scalar_t* X;
  View xv;
  Targets y;
  Params<acc_t> p;
  int64_t chunk;

  // LogitNorm's ‖x‖ of entry r (a pass of its own: the softmax is over x/s and s needs the norm)
  acc_t norm(int64_t base) const {
    return std::sqrt(row_sq_norm<scalar_t, acc_t>(X + base, p.n_classes, xv.s_class));
  }

  // LogitNorm's ρ = E_softmax(v)[x] − x_y (p = 0 lanes select 0, so -inf logits give no 0·inf)
  acc_t rho(int64_t base, const Stats<acc_t>& s, acc_t mult, int64_t target) const {
    acc_t e = 0;
    const acc_t shift = s.m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : s.m;
    for (int64_t c = 0; c < p.n_classes; ++c) {
      const acc_t x = load<scalar_t, acc_t>(X, base + c * xv.s_class);
      const acc_t q = std::exp(x * mult - shift);
      e += q * (q > 0 ? x : acc_t(0));
    }
    const acc_t x_y = target >= 0 ? load<scalar_t, acc_t>(X, base + target * xv.s_class) : acc_t(0);
    return e / s.d - x_y;
  }

  // finish entry r: row value and statistics
  void finish(int64_t r, int64_t base, Stats<acc_t> s, acc_t mult, acc_t norm_r, acc_t* loss, acc_t* stats) const {
    const int64_t R = xv.n_rows;
    const Label l = classify(y.at(r), p);
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    if (s.has_nan) s.m = nan;
    const acc_t log_d = std::log(s.d);
    const acc_t v_y = l.y >= 0 ? load<scalar_t, acc_t>(X, base + l.y * xv.s_class) * mult : acc_t(0);
    const acc_t omega = cost_weight(l, s.j_star, p);
    const Coefficients<acc_t> k = coefficients(p, l, omega, s.m, log_d, v_y, s.sum_v);
    loss[r] = l.invalid ? nan : k.loss;
    stats[r] = s.m;
    stats[R + r] = log_d;
    stats[2 * R + r] = static_cast<acc_t>(s.j_star);
    stats[3 * R + r] = norm_r;
    stats[4 * R + r] = p.kind == LOGIT_NORM ? rho(base, s, mult, l.y) : acc_t(0);
  }

  acc_t mult_of(acc_t norm_r) const {
    return p.kind == LOGIT_NORM ? acc_t(1) / (p.alpha * (norm_r + acc_t(LOGIT_NORM_EPS))) : acc_t(1);
  }

  void forward(acc_t* loss, acc_t* stats) const {
    const int64_t R = xv.n_rows, C = p.n_classes;
    if (xv.s_class == 1) {
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf(chunk);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t base = xv.offset(r);
          const acc_t norm_r = p.kind == LOGIT_NORM ? norm(base) : acc_t(0);
          const acc_t mult = mult_of(norm_r);
          finish(r, base, row_stats<scalar_t, acc_t>(X + base, C, mult, chunk, buf.data()), mult, norm_r, loss, stats);
        }
      });
      return;
    }
    constexpr int64_t T = tile_size<acc_t>();
    const int64_t n_tiles = (R + T - 1) / T;
    at::parallel_for(0, n_tiles, std::max<int64_t>(1, 4096 / (T * std::max<int64_t>(C, 1))), [&](int64_t tb, int64_t te) {
      int64_t base[T];
      acc_t mult[T], norms[T];
      Stats<acc_t> s[T];
      for (int64_t t = tb; t < te; ++t) {
        const int64_t r0 = t * T, count = std::min(T, R - r0);
        bool contiguous = true;
        for (int64_t k = 0; k < count; ++k) {
          base[k] = xv.offset(r0 + k);
          contiguous = contiguous && base[k] == base[0] + k;
          norms[k] = p.kind == LOGIT_NORM ? norm(base[k]) : acc_t(0);
          mult[k] = mult_of(norms[k]);
        }
        for (int64_t k = count; k < T; ++k) mult[k] = 1;
        tile_stats<scalar_t, acc_t>(X, base, contiguous, count, C, xv.s_class, mult, s);
        for (int64_t k = 0; k < count; ++k) finish(r0 + k, base[k], s[k], mult[k], norms[k], loss, stats);
      }
    });
  }

  // ---------------------------------------------------------------------------------------------
  // backward: per entry the coefficients, then one read of the row and one write of the gradient
  // ---------------------------------------------------------------------------------------------

  struct Grad {
    acc_t a, b, c, h, delta, mult, lse;
    int64_t y, j_star;
  };

  Grad grad_coefficients(int64_t r, const acc_t* stats, const acc_t* G, int64_t s_g) const {
    const int64_t R = xv.n_rows;
    const Label l = classify(y.at(r), p);
    const acc_t m = stats[r], log_d = stats[R + r];
    const int64_t j_star = static_cast<int64_t>(stats[2 * R + r]);
    const acc_t omega = cost_weight(l, j_star, p);
    // v_y and Σv only enter the row value, not the coefficients
    Coefficients<acc_t> k = coefficients(p, l, omega, m, log_d, acc_t(0), acc_t(0));
    Grad g;
    g.mult = 1;
    g.delta = 0;
    if (p.kind == LOGIT_NORM) {  // softmax over z = x/s, plus the derivative of s itself
      const acc_t norm_r = stats[3 * R + r], rho = stats[4 * R + r];
      const acc_t scale = p.alpha * (norm_r + acc_t(LOGIT_NORM_EPS));  // the forward's s, bitwise
      g.mult = acc_t(1) / scale;
      g.delta = (l.is_id && norm_r > 0) ? -omega * p.alpha * rho / (norm_r * scale * scale) : acc_t(0);
      k.a *= g.mult;
      k.b *= g.mult;
    }
    const acc_t gamma = G[r * s_g];
    g.a = gamma * k.a;
    g.b = gamma * k.b;
    g.c = gamma * k.c / acc_t(p.n_classes);
    g.h = gamma * k.h;
    g.delta = gamma * g.delta;
    g.lse = m + log_d;
    g.y = l.y;
    g.j_star = j_star;
    return g;
  }

  void backward(const acc_t* stats, const acc_t* G, int64_t s_g, scalar_t* D, const View& dv) const {
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const int64_t R = xv.n_rows, C = p.n_classes;
    const bool logit_norm = p.kind == LOGIT_NORM;
    if (xv.s_class == 1 && dv.s_class == 1) {
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf(chunk);
        for (int64_t r = begin; r < end; ++r) {
          const Grad g = grad_coefficients(r, stats, G, s_g);
          const scalar_t* x = X + xv.offset(r);
          scalar_t* out = D + dv.offset(r);
          const Vec va(g.a), vc(g.c), vmult(g.mult), vlse(g.lse), vdelta(g.delta);
          for (int64_t c0 = 0; c0 < C; c0 += chunk) {
            const int64_t len = std::min(chunk, C - c0);
            int64_t c = 0;
            for (; c + V <= len; c += V) {
              Vec xv_;
              if constexpr (std::is_same_v<scalar_t, acc_t>) {
                xv_ = Vec::loadu(x + c0 + c);
              } else {
                for (int64_t k = 0; k < V; ++k) buf[c + k] = load<scalar_t, acc_t>(x, c0 + c + k);
                xv_ = Vec::loadu(buf.data() + c);
              }
              Vec gv = va * (xv_ * vmult - vlse).exp() + vc;
              // only LogitNorm has the δ·x term (elsewhere 0·x would turn -inf logits into NaN)
              if (logit_norm) gv = gv + vdelta * xv_;
              gv.store(buf.data() + c);
            }
            for (; c < len; ++c) {
              const acc_t xs = load<scalar_t, acc_t>(x, c0 + c);
              acc_t gs = g.a * std::exp(xs * g.mult - g.lse) + g.c;
              if (logit_norm) gs += g.delta * xs;
              buf[c] = gs;
            }
            // one-hot terms in ACC, before the single rounding store
            if (g.y >= c0 && g.y < c0 + len) buf[g.y - c0] += g.b;
            if (g.j_star >= c0 && g.j_star < c0 + len) buf[g.j_star - c0] += g.h;
            for (c = 0; c < len; ++c) out[c0 + c] = static_cast<scalar_t>(buf[c]);
          }
        }
      });
      return;
    }
    constexpr int64_t T = tile_size<acc_t>();
    constexpr int64_t NV = T / V;
    const int64_t n_tiles = (R + T - 1) / T;
    at::parallel_for(0, n_tiles, std::max<int64_t>(1, 4096 / (T * std::max<int64_t>(C, 1))), [&](int64_t tb, int64_t te) {
      int64_t base[T], dbase[T];
      alignas(64) acc_t a[T], cc[T], mult[T], lse[T], delta[T], x[T], out[T];
      Grad g[T];
      for (int64_t t = tb; t < te; ++t) {
        const int64_t r0 = t * T, count = std::min(T, R - r0);
        bool contiguous = true, dcontiguous = true;
        for (int64_t k = 0; k < T; ++k) {
          if (k < count) {
            base[k] = xv.offset(r0 + k);
            dbase[k] = dv.offset(r0 + k);
            contiguous = contiguous && base[k] == base[0] + k;
            dcontiguous = dcontiguous && dbase[k] == dbase[0] + k;
            g[k] = grad_coefficients(r0 + k, stats, G, s_g);
          } else {
            g[k] = Grad{0, 0, 0, 0, 0, 1, 0, -1, -1};
          }
          a[k] = g[k].a;
          cc[k] = g[k].c;
          mult[k] = g[k].mult;
          lse[k] = g[k].lse;
          delta[k] = g[k].delta;
        }
        for (int64_t c = 0; c < C; ++c) {
          gather_class<scalar_t, acc_t>(X, base, contiguous, count, c, xv.s_class, x);
          for (int64_t j = 0; j < NV; ++j) {
            const Vec xs = Vec::loadu(x + j * V);
            Vec gv = Vec::loadu(a + j * V) * (xs * Vec::loadu(mult + j * V) - Vec::loadu(lse + j * V)).exp() +
                Vec::loadu(cc + j * V);
            if (logit_norm) gv = gv + Vec::loadu(delta + j * V) * xs;
            gv.store(out + j * V);
          }
          for (int64_t k = 0; k < count; ++k) {
            if (g[k].y == c) out[k] += g[k].b;
            if (g[k].j_star == c) out[k] += g[k].h;
          }
          if (dcontiguous) {
            scalar_t* dst = D + dbase[0] + c * dv.s_class;
            for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<scalar_t>(out[k]);
          } else {
            for (int64_t k = 0; k < count; ++k) D[dbase[k] + c * dv.s_class] = static_cast<scalar_t>(out[k]);
          }
        }
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// operator entry points (schemas of oodkernels/ops/row_ops.py)
// ---------------------------------------------------------------------------------------------

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits(const Tensor& logits, const char* op) {
  TORCH_CHECK(logits.device().is_cpu(), "oodkernels::", op, ": expected CPU logits, got ", logits.device());
  TORCH_CHECK(logits.dim() >= 2, "oodkernels::", op, ": expected logits of shape (N, C, *S), got ", logits.sizes());
}

void check_kind(int64_t kind, const char* op) {
  TORCH_CHECK(
      kind >= 0 && kind < N_KINDS,
      "oodkernels::",
      op,
      ": row kind ",
      kind,
      " is not implemented by the C++ backend (it knows kinds 0..",
      N_KINDS - 1,
      "); run it with OODKERNELS_BACKEND=triton or reference");
}

template <typename acc_t>
Params<acc_t> make_params(
    int64_t kind, double alpha, double m_in, double m_out, std::optional<int64_t> ignore_index, int64_t n_classes) {
  Params<acc_t> p;
  p.kind = kind;
  // scalars rounded once to ACC at entry, as the Triton kernels do
  p.alpha = static_cast<acc_t>(alpha);
  p.m_in = static_cast<acc_t>(m_in);
  p.m_out = static_cast<acc_t>(m_out);
  p.has_ignore = ignore_index.has_value();
  p.ignore_index = ignore_index.value_or(0);
  p.n_classes = n_classes;
  return p;
}

int64_t chunk_of(int64_t block_c) {
  // block_c > 0 (tests) forces small class chunks, exercising the online merge across chunks
  return block_c > 0 ? block_c : DEFAULT_CHUNK;
}

std::tuple<Tensor, Tensor> cpu_row_loss_fwd(
    const Tensor& logits,
    const Tensor& targets,
    const std::optional<Tensor>& cost,
    int64_t kind,
    double alpha,
    double m_in,
    double m_out,
    std::optional<int64_t> ignore_index,
    int64_t block_r,
    int64_t block_c) {
  check_logits(logits, "cpu_row_loss_fwd");
  check_kind(kind, "cpu_row_loss_fwd");
  const auto acc = acc_type(logits.scalar_type());
  const View xv(logits, true);
  const int64_t R = targets.numel();
  TORCH_CHECK(R == xv.n_rows, "oodkernels::cpu_row_loss_fwd: targets have ", R, " entries, logits ", xv.n_rows);
  Tensor loss = at::empty({R}, logits.options().dtype(acc));
  Tensor stats = at::empty({N_STATS, R}, logits.options().dtype(acc));
  if (R == 0) return {loss, stats};
  // targets of any integer dtype: int64 is read in place, others are converted (O(R))
  const Tensor y = targets.scalar_type() == at::kLong ? targets : targets.to(at::kLong);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cpu_row_loss_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor cost_acc;
    RowKernel<scalar_t, acc_t> k{
        logits.const_data_ptr<scalar_t>(),
        xv,
        Targets{y.const_data_ptr<int64_t>(), View(y, false)},
        make_params<acc_t>(kind, alpha, m_in, m_out, ignore_index, logits.size(1)),
        chunk_of(block_c)};
    if (cost.has_value()) {
      cost_acc = cost->to(acc).contiguous();
      k.p.cost = cost_acc.const_data_ptr<acc_t>();
    }
    k.forward(loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>());
  });
  return {loss, stats};
}

Tensor cpu_row_loss_bwd(
    const Tensor& grad_values,
    const Tensor& logits,
    const Tensor& targets,
    const std::optional<Tensor>& cost,
    const Tensor& stats,
    int64_t kind,
    double alpha,
    double m_in,
    double m_out,
    std::optional<int64_t> ignore_index,
    int64_t block_r,
    int64_t block_c) {
  check_logits(logits, "cpu_row_loss_bwd");
  check_kind(kind, "cpu_row_loss_bwd");
  const auto acc = acc_type(logits.scalar_type());
  // preserve_format keeps dense strides (NCHW, channels-last, transposed), else contiguous
  Tensor grad = at::empty_like(logits);
  const View xv(logits, true), dv(grad, true);
  if (xv.n_rows == 0 || logits.size(1) == 0) return grad.zero_();
  const Tensor y = targets.scalar_type() == at::kLong ? targets : targets.to(at::kLong);
  const Tensor st = stats.scalar_type() == acc ? stats.contiguous() : stats.to(acc).contiguous();
  const Tensor go = grad_values.scalar_type() == acc ? grad_values : grad_values.to(acc);
  const int64_t s_g = go.dim() ? go.stride(0) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cpu_row_loss_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor cost_acc;
    RowKernel<scalar_t, acc_t> k{
        logits.const_data_ptr<scalar_t>(),
        xv,
        Targets{y.const_data_ptr<int64_t>(), View(y, false)},
        make_params<acc_t>(kind, alpha, m_in, m_out, ignore_index, logits.size(1)),
        chunk_of(block_c)};
    if (cost.has_value()) {
      cost_acc = cost->to(acc).contiguous();
      k.p.cost = cost_acc.const_data_ptr<acc_t>();
    }
    k.backward(st.const_data_ptr<acc_t>(), go.const_data_ptr<acc_t>(), s_g, grad.mutable_data_ptr<scalar_t>(), dv);
  });
  return grad;
}

Tensor cpu_row_scores(const Tensor& logits, int64_t which, double t, int64_t block_r, int64_t block_c) {
  check_logits(logits, "cpu_row_scores");
  TORCH_CHECK(
      which >= 0 && which < N_SCORES,
      "oodkernels::cpu_row_scores: score kind ",
      which,
      " is not implemented by the C++ backend (it knows 0..",
      N_SCORES - 1,
      ")");
  const auto acc = acc_type(logits.scalar_type());
  const View xv(logits, true);
  Tensor out = at::empty({xv.n_rows}, logits.options().dtype(acc));
  if (xv.n_rows == 0) return out;
  // the scores reuse the loss traversal with no target: a zero-size target view, never read
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cpu_row_scores", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t tt = static_cast<acc_t>(t);
    const acc_t mult = acc_t(1) / tt;
    const scalar_t* X = logits.const_data_ptr<scalar_t>();
    const int64_t C = logits.size(1);
    const int64_t chunk = chunk_of(block_c);
    acc_t* O = out.mutable_data_ptr<acc_t>();
    auto score = [&](int64_t base, Stats<acc_t> s) -> acc_t {
      const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      const acc_t m = s.has_nan ? nan : s.m;
      const acc_t log_d = std::log(s.d);
      switch (which) {
        case SCORE_ENERGY:
          return -tt * (m + log_d);
        case SCORE_MAX_SOFTMAX:
          return -std::exp(-log_d);
        case SCORE_MAX_LOGIT:
          return -m;
        default: {  // entropy of the clamped softmax, as pytorch-ood defines it: needs lse first
          if (m != m) return nan;
          acc_t e = 0;
          for (int64_t c = 0; c < C; ++c) {
            acc_t q = std::exp(load<scalar_t, acc_t>(X, base + c * xv.s_class) * mult - m - log_d);
            q = std::min(std::max(q, acc_t(ENTROPY_CLAMP)), acc_t(1));
            e -= q * std::log(q);
          }
          return e;
        }
      }
    };
    const int64_t R = xv.n_rows;
    if (xv.s_class == 1) {
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf(chunk);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t base = xv.offset(r);
          O[r] = score(base, row_stats<scalar_t, acc_t>(X + base, C, mult, chunk, buf.data()));
        }
      });
    } else {
      constexpr int64_t T = tile_size<acc_t>();
      at::parallel_for(0, (R + T - 1) / T, 1, [&](int64_t tb, int64_t te) {
        int64_t base[T];
        acc_t mults[T];
        Stats<acc_t> s[T];
        for (int64_t k = 0; k < T; ++k) mults[k] = k < T ? mult : acc_t(1);
        for (int64_t tile = tb; tile < te; ++tile) {
          const int64_t r0 = tile * T, count = std::min(T, R - r0);
          bool contiguous = true;
          for (int64_t k = 0; k < count; ++k) {
            base[k] = xv.offset(r0 + k);
            contiguous = contiguous && base[k] == base[0] + k;
          }
          tile_stats<scalar_t, acc_t>(X, base, contiguous, count, C, xv.s_class, mults, s);
          for (int64_t k = 0; k < count; ++k) O[r0 + k] = score(base[k], s[k]);
        }
      });
    }
  });
  return out;
}

}  // namespace

// The public schemas are the Python custom ops (oodkernels/ops/row_ops.py), which dispatch here for CPU
// tensors; these implementation ops take the same arguments.
TORCH_LIBRARY_FRAGMENT(oodkernels, m) {
  m.def(
      "cpu_row_loss_fwd(Tensor logits, Tensor targets, Tensor? cost, int kind, float alpha, float m_in, "
      "float m_out, int? ignore_index, int block_r, int block_c) -> (Tensor, Tensor)");
  m.def(
      "cpu_row_loss_bwd(Tensor grad_values, Tensor logits, Tensor targets, Tensor? cost, Tensor stats, int kind, "
      "float alpha, float m_in, float m_out, int? ignore_index, int block_r, int block_c) -> Tensor");
  m.def("cpu_row_scores(Tensor logits, int which, float t, int block_r, int block_c) -> Tensor");
}

TORCH_LIBRARY_IMPL(oodkernels, CPU, m) {
  m.impl("cpu_row_loss_fwd", &cpu_row_loss_fwd);
  m.impl("cpu_row_loss_bwd", &cpu_row_loss_bwd);
  m.impl("cpu_row_scores", &cpu_row_scores);
}
