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
//   entries (pixel-contiguous loads): a chunk of classes is gathered into L1, then swept one group of V
//   entries at a time with that group's online state in registers.
// Both are parallel over rows / tiles with at::parallel_for (honours torch.get_num_threads()).
//
// Adding a kind: a case in `coefficients` (row value and backward coefficients) and, if it needs new
// statistics, in the passes; kinds this file does not know raise (never a wrong number).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
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
constexpr int64_t SCORE_WEIGHTED_ENERGY = 4;
constexpr int64_t SCORE_ENTROPY_EXACT = 5;
constexpr int64_t N_SCORES = 6;

constexpr int64_t N_STATS = 5;
constexpr double LOGIT_NORM_EPS = 1e-7;
constexpr double ENTROPY_CLAMP = 1e-7;
// 2048 fp32 classes = 8 KiB per chunk: a chunk is re-read from L1 (max pass, then exp pass)
constexpr int64_t DEFAULT_CHUNK = 2048;
// class-contiguous rows narrower than this take the entry tiles in the forward and the scores (measured on
// a 2-core EPYC at 4096 rows: 4x faster at C = 10, 1.4x at 32, even at 64, slower at 100)
constexpr int64_t ROWS_MIN_CLASSES = 64;

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

  // offsets of entries r0 .. r0+count-1: one division, then stepping through w, h and outer (a run inside
  // one dense map, the common tile, is a plain sequence)
  inline void offsets(int64_t r0, int64_t count, int64_t* out) const {
    if (inner == 1) {  // no spatial dimensions: entry r is row r
      for (int64_t k = 0; k < count; ++k) out[k] = (r0 + k) * s_outer;
      return;
    }
    const int64_t height = inner / width;
    int64_t outer = r0 / inner;
    const int64_t i = r0 - outer * inner;
    const bool dense_map = s_w == 1 && (height == 1 || s_h == width);
    if (dense_map && i + count <= inner) {
      const int64_t first = outer * s_outer + i;
      for (int64_t k = 0; k < count; ++k) out[k] = first + k;
      return;
    }
    int64_t h = i / width;
    int64_t w = i - h * width;
    for (int64_t k = 0; k < count; ++k) {
      out[k] = outer * s_outer + h * s_h + w * s_w;
      if (++w == width) {
        w = 0;
        if (++h == height) {
          h = 0;
          ++outer;
        }
      }
    }
  }

  inline int64_t offset(int64_t r) const {
    const int64_t outer = r / inner;
    const int64_t i = r - outer * inner;
    const int64_t h = i / width;
    return outer * s_outer + h * s_h + (i - h * width) * s_w;
  }
};

// the forward's class-contiguous row traversal pays per row (chunk set-up, horizontal sums, a scalar tail):
// below ROWS_MIN_CLASSES classes the entry tiles, vectorised over entries, are faster even on contiguous rows
// (the backward keeps the rows: its tile stores would be strided)
inline bool by_rows(const View& v, int64_t n_classes) {
  return v.s_class == 1 && n_classes >= ROWS_MIN_CLASSES;
}

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
  // π = 1/d only for the confidence kinds (an exp per entry the others do not pay)
  const bool needs_pi = p.kind == CONFIDENCE_PENALTY || p.kind == MARGIN_CONFIDENCE;
  const acc_t pi = needs_pi ? std::exp(-log_d) : acc_t(0);
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
  acc_t d_w = 0;     // Σ relu(w_c)·exp(v_c − m) (weighted energy only)
  acc_t expect = 0;  // Σ exp(v_c − m)·x_c (exact entropy, LogitNorm's ρ)
  int64_t j_star = 0;
  bool has_nan = false;

  // merge a chunk's max (first index `arg`), and Σ exp(v − shift) taken with `shift` = this chunk's shift
  inline acc_t shift_for(acc_t chunk_max) const {
    const acc_t m_new = std::max(m, chunk_max);
    return m_new == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : m_new;
  }
};

// optional sums of the online pass, beside d and with the same running max (off: no cost)
template <typename acc_t>
struct Extras {
  const acc_t* wr = nullptr;  // relu(w) (C,): d_w for the weighted energy
  bool expect = false;        // Σ exp(v − m)·x for the exact entropy and LogitNorm's ρ
};

template <typename scalar_t, typename acc_t>
inline acc_t load(const scalar_t* x, int64_t i) {
  return static_cast<acc_t>(x[i]);
}

// exp of a vector: for fp32 ATen's exp_u20 (a polynomial, ≤ 20 ulp ≈ 2.4e-6 relative, twice as fast as
// SLEEF's 1-ulp exp, as torch's own CPU softmax uses it), with NaN and +inf passed through as IEEE exp
// does (exp_u20 clamps them to finite numbers); fp64 keeps the 1-ulp exp (gradcheck-grade)
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp(const at::vec::Vectorized<acc_t>& x) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, float>) {
    const Vec r = x.exp_u20();
    const Vec special = (x != x) | (x == Vec(std::numeric_limits<float>::infinity()));
    return Vec::blendv(r, x, special);
  } else {
    return x.exp();
  }
}

// vexp where the caller may know that no argument is NaN or +inf (`finite_or_minus_inf`: a chunk without NaN and
// with a finite max, or a row with a finite lse, whose arguments are then finite or -inf): the special-value
// pass-through would select nothing there and is skipped
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp_known(const at::vec::Vectorized<acc_t>& x, bool finite_or_minus_inf) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return finite_or_minus_inf ? x.exp_u20() : vexp<acc_t>(x);
  } else {
    return x.exp();
  }
}

// ---------------------------------------------------------------------------------------------
// class-contiguous traversal: one row, vectorised over classes
// ---------------------------------------------------------------------------------------------

// Σ_c x_c² of one row with class stride 1 (LogitNorm's norm pass)
template <typename scalar_t, typename acc_t>
acc_t row_sq_norm(const scalar_t* x, int64_t n, int64_t stride) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t c = 0;
  acc_t sq = 0;
  if (stride == 1) {  // vectorised over the classes (bf16/fp16 widened V at a time)
    Vec acc(acc_t(0));
    alignas(64) acc_t tmp[V];
    for (; c + V <= n; c += V) {
      Vec v;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        v = Vec::loadu(x + c);
      } else {
        for (int64_t k = 0; k < V; ++k) tmp[k] = load<scalar_t, acc_t>(x, c + k);
        v = Vec::loadu(tmp);
      }
      acc = at::vec::fmadd(v, v, acc);
    }
    acc.store(tmp);
    for (int64_t k = 0; k < V; ++k) sq += tmp[k];
  }
  for (; c < n; ++c) {
    const acc_t v = load<scalar_t, acc_t>(x, c * stride);
    sq += v * v;
  }
  return sq;
}

// online statistics of v = x·mult over one row (class stride 1), chunk by chunk; `buf` holds CHUNK values
template <typename scalar_t, typename acc_t>
Stats<acc_t> row_stats(
    const scalar_t* x, int64_t n, acc_t mult, int64_t chunk, acc_t* buf, const Extras<acc_t>& ex = Extras<acc_t>()) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  Stats<acc_t> s;
  const bool in_place = std::is_same_v<scalar_t, acc_t> && mult == acc_t(1);
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t len = std::min(chunk, n - c0);
    // 1. the chunk's max, Σv and NaN flag; v is cached in `buf` (L1) unless it is the fp32/fp64 input itself
    const acc_t* vals = buf;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (in_place) vals = x + c0;
    }
    Vec vmax(neg_inf), vsum(acc_t(0));
    const Vec vmult(mult);
    int64_t c = 0;
    for (; c + V <= len; c += V) {
      Vec v;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        v = Vec::loadu(x + c0 + c);
        if (!in_place) {
          v = v * vmult;
          v.store(buf + c);
        }
      } else {
        for (int64_t k = 0; k < V; ++k) buf[c + k] = load<scalar_t, acc_t>(x, c0 + c + k);
        v = Vec::loadu(buf + c) * vmult;
        v.store(buf + c);
      }
      // a plain max (no NaN propagation) and no NaN flag per vector: a NaN makes the chunk's Σv NaN, and
      // only then is the chunk rescanned for one (a NaN row's m, lse and gradient are NaN whatever its max)
      vmax = at::vec::clamp_min(v, vmax);
      vsum = vsum + v;
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
    bool sum_nan = false;
    for (int64_t k = 0; k < V; ++k) {
      csum += lanes[k];
      sum_nan = sum_nan || lanes[k] != lanes[k];
    }
    if (sum_nan) {  // a NaN, or only +inf + (-inf): look
      const int64_t n_vec = len - len % V;
      const acc_t* vals_nan = buf;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (in_place) vals_nan = x + c0;
      }
      for (int64_t i = 0; i < n_vec && !nan; ++i) nan = vals_nan[i] != vals_nan[i];
    }
    s.has_nan = s.has_nan || nan;
    s.sum_v += csum;
    const int64_t n_vec = len - len % V;  // [0, n_vec) in `vals`, the tail in `buf`
    auto value = [&](int64_t i) { return i < n_vec ? vals[i] : buf[i]; };
    // 2. first index of the chunk's max; strictly greater than the running max to move j* (first wins)
    if (cmax > s.m) {
      const Vec vcmax(cmax);
      int64_t arg = 0;
      while (arg + V <= n_vec && (Vec::loadu(vals + arg) == vcmax).zero_mask() == (1 << V) - 1) arg += V;
      while (arg < len && !(value(arg) == cmax)) ++arg;
      s.j_star = c0 + std::min(arg, len - 1);
    }
    // 3. Σ exp(v − shift) over the cached chunk (one exp per element), merged into the running sums
    const acc_t shift = s.shift_for(cmax);
    // v − shift is NaN or +inf only with a NaN or a +inf max in the chunk (a +inf running max makes it -inf)
    const bool plain_exp = !nan && cmax != std::numeric_limits<acc_t>::infinity();
    const Vec vshift(shift), zero(acc_t(0));
    Vec vexp_sum(acc_t(0)), vdw(acc_t(0)), vex(acc_t(0));
    acc_t raw[V];
    for (c = 0; c < n_vec; c += V) {
      // the exact entropy lse − E_p[x] cancels: its p needs the 1-ulp exp (exp_u20's 2e-6 would show)
      const Vec p = ex.expect ? (Vec::loadu(vals + c) - vshift).exp() : vexp_known<acc_t>(Vec::loadu(vals + c) - vshift, plain_exp);
      vexp_sum = vexp_sum + p;
      if (ex.wr != nullptr) vdw = vdw + p * Vec::loadu(ex.wr + c0 + c);
      if (ex.expect) {
        // x in raw units; select before multiplying: p = 0 at -inf lanes, and 0·(-inf) would be NaN
        for (int64_t k = 0; k < V; ++k) raw[k] = load<scalar_t, acc_t>(x, c0 + c + k);
        vex = vex + p * Vec::blendv(zero, Vec::loadu(raw), p > zero);
      }
    }
    acc_t cexp = 0, cdw = 0, cex = 0;
    for (c = n_vec; c < len; ++c) {
      const acc_t p = std::exp(buf[c] - shift);
      cexp += p;
      if (ex.wr != nullptr) cdw += p * ex.wr[c0 + c];
      if (ex.expect) cex += p * (p > 0 ? load<scalar_t, acc_t>(x, c0 + c) : acc_t(0));
    }
    vexp_sum.store(lanes);
    for (int64_t k = 0; k < V; ++k) cexp += lanes[k];
    const acc_t rescale = std::exp(s.m - shift);
    s.d = s.d * rescale + cexp;
    if (ex.wr != nullptr) {
      vdw.store(lanes);
      for (int64_t k = 0; k < V; ++k) cdw += lanes[k];
      s.d_w = s.d_w * rescale + cdw;
    }
    if (ex.expect) {
      vex.store(lanes);
      for (int64_t k = 0; k < V; ++k) cex += lanes[k];
      s.expect = s.expect * rescale + cex;
    }
    s.m = std::max(s.m, cmax);
  }
  return s;
}

// x·mult rounded to ACC before anything is subtracted from it, as the statistics passes (which cache v)
// have it: a contracted x·mult − m (one fused multiply-subtract) would leave the max lane at the product's
// rounding residual instead of exactly 0, and its clamped q at exp(±ulp·|v|) ≠ 1, a visible error in a
// confident row's entropy. fma(x, mult, +0) is that rounded product and cannot be fused any further
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vscale(
    const at::vec::Vectorized<acc_t>& x, const at::vec::Vectorized<acc_t>& mult) {
  return at::vec::fmadd(x, mult, at::vec::Vectorized<acc_t>(acc_t(0)));
}

// pytorch-ood's entropy of one row (class stride 1) from its m and ln d: −Σ_c q_c ln q_c with
// q = clamp(exp(v − m − ln d), 1e-7, 1), v = x·mult (a second read of the row, from cache for rows of a
// few thousand classes). exp is monotone, so q = exp(a) and ln q = a with a = clamp(v − m − ln d, ln 1e-7, 0):
// one exp (vexp: exp_u20 for fp32) and no log per element (the log of the rounded q differs by its rounding,
// ≤ 1 ulp of q). A NaN argument stays NaN through the clamp (ATen's minimum/maximum propagate NaN, as
// torch.clamp)
template <typename scalar_t, typename acc_t>
acc_t row_clamped_entropy(const scalar_t* x, int64_t n, acc_t mult, acc_t m, acc_t log_d) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vmult(mult), vm(m), vlog_d(log_d), lo(static_cast<acc_t>(std::log(ENTROPY_CLAMP))), hi(acc_t(0));
  Vec e(acc_t(0));
  alignas(64) acc_t tmp[V];
  for (int64_t c = 0; c < n; c += V) {
    const int64_t len = std::min<int64_t>(V, n - c);
    Vec v;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v = len == V ? Vec::loadu(x + c) : Vec::loadu(x + c, len);
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // V bf16 values widened in registers (a scalar upcast loop would cost more than the exp)
      if (len == V) at::vec::load_fp32_from_bf16(x + c, v);
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      if (len == V) at::vec::load_fp32_from_fp16(x + c, v);
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      if (len < V) {
        for (int64_t k = 0; k < len; ++k) tmp[k] = load<scalar_t, acc_t>(x, c + k);
        v = Vec::loadu(tmp, len);
      }
    }
    Vec a = at::vec::minimum(at::vec::maximum(vscale<acc_t>(v, vmult) - vm - vlog_d, lo), hi);
    // lanes past the row's end: a = 0 adds 1·0
    if (len < V) a = Vec::set(hi, a, len);
    e = e + vexp<acc_t>(a) * a;
  }
  alignas(64) acc_t lanes[V];
  e.store(lanes);
  acc_t total = 0;
  for (int64_t k = 0; k < V; ++k) total += lanes[k];
  return -total;
}

// ---------------------------------------------------------------------------------------------
// entry-tile traversal: TILE entries at once, vectorised over entries, classes looped
// ---------------------------------------------------------------------------------------------

// 256 fp32 / 128 fp64 entries, whatever the vector width: per class a 1 KiB contiguous run of an NCHW map
// (long runs for the prefetchers; 32-entry tiles touched 19+ streams H·W apart per 128 B), the tile's
// per-entry state in L1
template <typename acc_t>
constexpr int64_t tile_size() {
  constexpr int64_t entries = 1024 / static_cast<int64_t>(sizeof(acc_t));
  static_assert(entries % at::vec::Vectorized<acc_t>::size() == 0, "a tile is whole vectors");
  return entries;
}

// x[base[k] + c·s_class] for the tile's entries, in ACC: a full contiguous run of ACC values is used in
// place, anything else is upcast/gathered into `buf` (padding lanes: finite, results discarded)
template <typename scalar_t, typename acc_t>
inline const acc_t* tile_class(
    const scalar_t* X, const int64_t* base, bool contiguous, int64_t count, int64_t c, int64_t s_class, acc_t* buf) {
  constexpr int64_t T = tile_size<acc_t>();
  if (contiguous) {
    const scalar_t* src = X + base[0] + c * s_class;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (count == T) return src;
    }
    for (int64_t k = 0; k < count; ++k) buf[k] = load<scalar_t, acc_t>(src, k);
  } else {
    for (int64_t k = 0; k < count; ++k) buf[k] = load<scalar_t, acc_t>(X, base[k] + c * s_class);
  }
  for (int64_t k = count; k < T; ++k) buf[k] = 0;
  return buf;
}

// classes per chunk of the tile's forward: 24 classes × TILE values (24 KiB) stay in L1 between the gather and
// the sweeps (a contiguous copy: the class rows are H·W apart and alias in caches); 24, not 16, so that a
// Cityscapes-sized C = 19 is one chunk (no rescale pass)
template <typename acc_t>
constexpr int64_t tile_chunk() {
  return (24 * 1024) / (tile_size<acc_t>() * static_cast<int64_t>(sizeof(acc_t)));
}

// online statistics of a tile: per lane m, d, Σv, j*, NaN flag, d_w, E[x] (structure of arrays, what the
// vectorised epilogues read). Per chunk of classes: (A) v = x·mult of the chunk gathered into `buf`, class by
// class (1 KiB runs of the map, the copy keeps them in L1: the class rows are H·W apart and alias in caches);
// (B) per group of V lanes, with the lanes' state in registers, a max sweep over the cached chunk (m, j*, Σv,
// NaN), then one exp per element (d, d_w, E[x]), the previous chunks' sums rescaled once
template <typename acc_t>
struct TileLanes {
  static constexpr int64_t T = tile_size<acc_t>();
  alignas(64) acc_t m[T], d[T], sum_v[T], arg[T], nan[T], dw[T], ev[T];
  alignas(64) acc_t v_y[T];  // v at each lane's label column (0 without one), where tile_lanes is given labels
};

template <typename scalar_t, typename acc_t>
void tile_lanes(
    const scalar_t* X,
    const int64_t* base,
    bool contiguous,
    int64_t count,
    int64_t n_classes,
    int64_t s_class,
    const acc_t* mult,
    bool has_mult,
    int64_t chunk,
    TileLanes<acc_t>& out,
    const Extras<acc_t>& ex,
    const acc_t* label = nullptr) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t T = tile_size<acc_t>();
  constexpr int64_t TILE_CHUNK = tile_chunk<acc_t>();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (n_classes == 0) {  // otherwise the first chunk starts the state in registers
    std::fill(out.m, out.m + T, neg_inf);
    for (acc_t* a : {out.d, out.sum_v, out.arg, out.nan, out.dw, out.ev, out.v_y}) std::fill(a, a + T, acc_t(0));
    return;
  }
  alignas(64) acc_t buf[TILE_CHUNK * T];
  // the exact entropy's E[x] is over the raw x: a second cache when v = x·mult differs from it
  const bool raw_copy = ex.expect && has_mult;
  alignas(64) acc_t raw[TILE_CHUNK * T];  // fixed size: a runtime-sized array is not standard C++ (MSVC rejects it)
  const Vec zero(acc_t(0)), vneg_inf(neg_inf), vinf(std::numeric_limits<acc_t>::infinity());
  const int64_t ch = std::max<int64_t>(1, std::min(TILE_CHUNK, chunk));
  for (int64_t c0 = 0; c0 < n_classes; c0 += ch) {
    const int64_t len = std::min(ch, n_classes - c0);
    // A. gather the chunk (padding lanes: 0, finite; their results are discarded)
    for (int64_t i = 0; i < len; ++i) {
      acc_t* slot = buf + i * T;
      const acc_t* x = tile_class<scalar_t, acc_t>(X, base, contiguous, count, c0 + i, s_class, slot);
      if (raw_copy) std::copy(x, x + T, raw + i * T);
      if (has_mult) {
        for (int64_t j = 0; j < T; j += V) (Vec::loadu(x + j) * Vec::loadu(mult + j)).store(slot + j);
      } else if (x != slot) {
        for (int64_t j = 0; j < T; j += V) Vec::loadu(x + j).store(slot + j);
      }
    }
    const acc_t* xs = raw_copy ? raw : buf;
    // B. lane groups, state in registers
    const bool first = c0 == 0;
    for (int64_t j = 0; j < T; j += V) {
      const Vec m_old = first ? vneg_inf : Vec::loadu(out.m + j);
      Vec m = m_old, arg = first ? zero : Vec::loadu(out.arg + j), sum_v = first ? zero : Vec::loadu(out.sum_v + j),
          nan = first ? zero : Vec::loadu(out.nan + j), v_y = first ? zero : Vec::loadu(out.v_y + j);
      // 1. strictly greater moves m and j* (the first maximum wins); a NaN never moves m (the NaN flag takes over)
      for (int64_t i = 0; i < len; ++i) {
        const Vec v = Vec::loadu(buf + i * T + j);
        const Vec col(static_cast<acc_t>(c0 + i));
        nan = nan | (v != v);
        const Vec greater = v > m;
        m = Vec::blendv(m, v, greater);
        arg = Vec::blendv(arg, col, greater);
        sum_v = sum_v + v;
      }
      // v_y picked up from the cached chunk (the labels are random columns: no gather from the map later)
      if (label != nullptr) {
        const Vec y = Vec::loadu(label + j);
        for (int64_t i = 0; i < len; ++i) {
          v_y = Vec::blendv(v_y, Vec::loadu(buf + i * T + j), y == Vec(static_cast<acc_t>(c0 + i)));
        }
      }
      // 2. Σ exp(v − shift), shifted by the new max (0 where it is still -inf: no inf − inf). Without a NaN or a
      //    +inf max among these lanes so far, v − shift is never NaN or +inf, and vexp's pass-through of those
      //    is skipped (the same values: it would select nothing)
      const Vec shift = Vec::blendv(m, zero, m == vneg_inf);
      Vec d = zero, dw = zero, ev = zero;
      if (!first) {
        const Vec rescale = vexp<acc_t>(m_old - shift);
        d = Vec::loadu(out.d + j) * rescale;
        dw = Vec::loadu(out.dw + j) * rescale;
        ev = Vec::loadu(out.ev + j) * rescale;
      }
      bool plain_exp = false;
      if constexpr (std::is_same_v<acc_t, float>) plain_exp = (nan | (m == vinf)).zero_mask() == (1 << V) - 1;
      if (ex.expect) {
        // the exact entropy lse − E_p[x] cancels: its p needs the 1-ulp exp (exp_u20's 2e-6 would show);
        // select before multiplying: p = 0 at -inf lanes, and 0·(-inf) would be NaN
        for (int64_t i = 0; i < len; ++i) {
          const Vec p = (Vec::loadu(buf + i * T + j) - shift).exp();
          d = d + p;
          if (ex.wr != nullptr) dw = dw + p * Vec(ex.wr[c0 + i]);
          ev = ev + p * Vec::blendv(zero, Vec::loadu(xs + i * T + j), p > zero);
        }
      } else if (ex.wr != nullptr) {
        for (int64_t i = 0; i < len; ++i) {
          const Vec p = vexp<acc_t>(Vec::loadu(buf + i * T + j) - shift);
          d = d + p;
          dw = dw + p * Vec(ex.wr[c0 + i]);
        }
      } else if (plain_exp) {
        for (int64_t i = 0; i < len; ++i) d = d + (Vec::loadu(buf + i * T + j) - shift).exp_u20();
      } else {
        for (int64_t i = 0; i < len; ++i) d = d + vexp<acc_t>(Vec::loadu(buf + i * T + j) - shift);
      }
      m.store(out.m + j);
      arg.store(out.arg + j);
      sum_v.store(out.sum_v + j);
      nan.store(out.nan + j);
      d.store(out.d + j);
      dw.store(out.dw + j);
      ev.store(out.ev + j);
      v_y.store(out.v_y + j);
    }
  }
}

// tile_lanes, one Stats per entry (the scalar epilogues)
template <typename scalar_t, typename acc_t>
void tile_stats(
    const scalar_t* X,
    const int64_t* base,
    bool contiguous,
    int64_t count,
    int64_t n_classes,
    int64_t s_class,
    const acc_t* mult,
    bool has_mult,
    int64_t chunk,
    Stats<acc_t>* out,
    const Extras<acc_t>& ex = Extras<acc_t>()) {
  TileLanes<acc_t> l;
  tile_lanes<scalar_t, acc_t>(X, base, contiguous, count, n_classes, s_class, mult, has_mult, chunk, l, ex);
  for (int64_t k = 0; k < count; ++k) {
    out[k].m = l.m[k];
    out[k].d = l.d[k];
    out[k].sum_v = l.sum_v[k];
    out[k].j_star = static_cast<int64_t>(l.arg[k]);
    out[k].has_nan = l.nan[k] != 0;
    out[k].d_w = l.dw[k];
    out[k].expect = l.ev[k];
  }
}

// row_clamped_entropy for a tile's lanes, vectorised over the lanes (per class a contiguous run of the
// tile's entries, as tile_lanes reads them); m and log_d per lane (padding lanes: any finite values),
// the entropies written to out[0 .. T)
template <typename scalar_t, typename acc_t>
void tile_clamped_entropy(
    const scalar_t* X,
    const int64_t* base,
    bool contiguous,
    int64_t count,
    int64_t n_classes,
    int64_t s_class,
    acc_t mult,
    const acc_t* m,
    const acc_t* log_d,
    acc_t* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t T = tile_size<acc_t>();
  constexpr int64_t NV = T / V;
  const bool has_mult = mult != acc_t(1);
  const Vec vmult(mult), lo(static_cast<acc_t>(std::log(ENTROPY_CLAMP))), hi(acc_t(0));
  Vec e[NV], vm[NV], vlog_d[NV];
  for (int64_t j = 0; j < NV; ++j) {
    e[j] = Vec(acc_t(0));
    vm[j] = Vec::loadu(m + j * V);
    vlog_d[j] = Vec::loadu(log_d + j * V);
  }
  alignas(64) acc_t buf[T];
  for (int64_t c = 0; c < n_classes; ++c) {
    const acc_t* x = tile_class<scalar_t, acc_t>(X, base, contiguous, count, c, s_class, buf);
    for (int64_t j = 0; j < NV; ++j) {
      Vec v = Vec::loadu(x + j * V);
      if (has_mult) v = vscale<acc_t>(v, vmult);
      const Vec a = at::vec::minimum(at::vec::maximum(v - vm[j] - vlog_d[j], lo), hi);
      e[j] = e[j] + vexp<acc_t>(a) * a;
    }
  }
  for (int64_t j = 0; j < NV; ++j) (Vec(acc_t(0)) - e[j]).store(out + j * V);
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
  // the energy variants (row_loss_energy_fwd / _bwd); all null for the plain ops
  const acc_t* wr = nullptr;         // relu(class_weight) (C,): the weighted energy and its gradient
  acc_t* energy = nullptr;           // forward: (R,) energy output E
  const acc_t* GE = nullptr;         // backward: upstream gradient of E, stride s_ge
  int64_t s_ge = 0;
  const acc_t* energy_in = nullptr;  // backward with weights: the forward's E
  acc_t* gw_partial = nullptr;       // backward with weights: (blocks, C) partial column sums of dL/dw

  // LogitNorm's ‖x‖ of entry r (a pass of its own: the softmax is over x/s and s needs the norm)
  acc_t norm(int64_t base) const {
    return std::sqrt(row_sq_norm<scalar_t, acc_t>(X + base, p.n_classes, xv.s_class));
  }

  Extras<acc_t> extras() const {
    Extras<acc_t> ex;
    ex.wr = energy != nullptr ? wr : nullptr;
    // LogitNorm's ρ = E_softmax(v)[x] − x_y needs Σ exp(v − m)·x: summed in the statistics pass itself
    ex.expect = p.kind == LOGIT_NORM;
    return ex;
  }

  // finish entry r: row value, statistics and the energy output
  void finish(int64_t r, int64_t target, int64_t base, Stats<acc_t> s, acc_t mult, acc_t norm_r, acc_t* loss,
              acc_t* stats) const {
    const int64_t R = xv.n_rows;
    const Label l = classify(target, p);
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
    // LogitNorm's ρ = E_softmax(v)[x] − x_y (x raw, p = 0 lanes adding 0: no 0·inf)
    const acc_t x_y = l.y >= 0 ? load<scalar_t, acc_t>(X, base + l.y * xv.s_class) : acc_t(0);
    stats[4 * R + r] = p.kind == LOGIT_NORM ? s.expect / s.d - x_y : acc_t(0);
    // E = −lse, or the max-subtracted weighted energy −(m + ln d_w) (fix g)
    if (energy != nullptr) energy[r] = wr != nullptr ? -(s.m + std::log(s.d_w)) : -(s.m + log_d);
  }

  // the kinds whose tile epilogues run vectorised over the lanes (ω = 1 without a cost matrix, no LogitNorm
  // scale); the others take the scalar `coefficients` path entry by entry
  bool vector_epilogue() const {
    // the lanes compare label columns in ACC: exact up to 2^24 classes in fp32
    const bool exact_columns = p.n_classes <= (int64_t(1) << std::numeric_limits<acc_t>::digits);
    return exact_columns && p.cost == nullptr &&
        (p.kind == CROSS_ENTROPY || p.kind == OUTLIER_EXPOSURE || p.kind == ENERGY);
  }

  // the labels of a tile's entries as lane arrays (vector_epilogue kinds): ID / OOD / invalid flags and the
  // label column (-1 where there is none, and in the padding lanes), read by tile_lanes and finish_tile
  struct TileLabels {
    static constexpr int64_t T = tile_size<acc_t>();
    alignas(64) acc_t is_id[T], is_ood[T], invalid[T], col[T];
  };

  void tile_labels(int64_t count, const int64_t* ybase, TileLabels& out) const {
    constexpr int64_t T = tile_size<acc_t>();
    for (int64_t k = 0; k < count; ++k) {
      const Label l = classify(y.data[ybase[k]], p);
      out.is_id[k] = l.is_id ? acc_t(1) : acc_t(0);
      out.is_ood[k] = l.is_ood ? acc_t(1) : acc_t(0);
      out.invalid[k] = l.invalid ? acc_t(1) : acc_t(0);
      out.col[k] = static_cast<acc_t>(l.y);  // exact, as j* in the stats: l.y < C ≤ 2^24
    }
    for (int64_t k = count; k < T; ++k) {
      out.is_id[k] = out.is_ood[k] = out.invalid[k] = 0;
      out.col[k] = -1;
    }
  }

  // `finish` of a tile's entries r0 .. r0+count-1 at once (vector_epilogue kinds): the same formulas as
  // `coefficients`, lane by lane, from the tile's statistics (v_y included) and labels
  void finish_tile(int64_t r0, int64_t count, const TileLabels& labels, const TileLanes<acc_t>& s, acc_t* loss,
                   acc_t* stats) const {
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    constexpr int64_t T = tile_size<acc_t>();
    const int64_t R = xv.n_rows;
    const bool weighted_energy = energy != nullptr && wr != nullptr;
    const acc_t *is_id = labels.is_id, *is_ood = labels.is_ood, *invalid = labels.invalid, *v_y = s.v_y;
    alignas(64) acc_t log_d[T];
    const Vec zero(acc_t(0)), vnan(std::numeric_limits<acc_t>::quiet_NaN());
    const Vec valpha(p.alpha), vm_in(p.m_in), vm_out(p.m_out), vC(static_cast<acc_t>(p.n_classes));
    alignas(64) acc_t lo[T], sm[T], en[T];
    for (int64_t o = 0; o < T; o += V) {
      const Vec m = Vec::blendv(Vec::loadu(s.m + o), vnan, Vec::loadu(s.nan + o) != zero);
      // SLEEF's 1-ulp vector log (the scalar path's std::log, a lane at a time, cost more than the tile's exps)
      const Vec ld = Vec::loadu(s.d + o).log();
      ld.store(log_d + o);
      const Vec lse = m + ld;
      Vec loss_id = (m - Vec::loadu(v_y + o)) + ld;
      Vec loss_ood = zero;
      if (p.kind == OUTLIER_EXPOSURE) {
        loss_ood = valpha * (lse - Vec::loadu(s.sum_v + o) / vC);
      } else if (p.kind == ENERGY) {
        const Vec h_in = at::vec::maximum(lse.neg() - vm_in, zero);
        loss_id = loss_id + valpha * h_in * h_in;
        const Vec h_out = at::vec::maximum(vm_out + lse, zero);
        loss_ood = valpha * h_out * h_out;
      }
      Vec value = Vec::blendv(Vec::blendv(zero, loss_ood, Vec::loadu(is_ood + o) != zero), loss_id,
                              Vec::loadu(is_id + o) != zero);
      value = Vec::blendv(value, vnan, Vec::loadu(invalid + o) != zero);
      value.store(lo + o);
      m.store(sm + o);
      // E = −lse, or the max-subtracted weighted energy −(m + ln d_w) (fix g)
      if (energy != nullptr) (weighted_energy ? m + Vec::loadu(s.dw + o).log() : lse).neg().store(en + o);
    }
    std::copy(lo, lo + count, loss + r0);
    std::copy(sm, sm + count, stats + r0);
    std::copy(log_d, log_d + count, stats + R + r0);
    std::copy(s.arg, s.arg + count, stats + 2 * R + r0);
    std::fill(stats + 3 * R + r0, stats + 3 * R + r0 + count, acc_t(0));
    std::fill(stats + 4 * R + r0, stats + 4 * R + r0 + count, acc_t(0));
    if (energy != nullptr) std::copy(en, en + count, energy + r0);
  }

  acc_t mult_of(acc_t norm_r) const {
    return p.kind == LOGIT_NORM ? acc_t(1) / (p.alpha * (norm_r + acc_t(LOGIT_NORM_EPS))) : acc_t(1);
  }

  void forward(acc_t* loss, acc_t* stats) const {
    const int64_t R = xv.n_rows, C = p.n_classes;
    const Extras<acc_t> ex = extras();
    if (by_rows(xv, p.n_classes)) {
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf(chunk);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t base = xv.offset(r);
          const acc_t norm_r = p.kind == LOGIT_NORM ? norm(base) : acc_t(0);
          const acc_t mult = mult_of(norm_r);
          const Stats<acc_t> s = row_stats<scalar_t, acc_t>(X + base, C, mult, chunk, buf.data(), ex);
          finish(r, y.at(r), base, s, mult, norm_r, loss, stats);
        }
      });
      return;
    }
    constexpr int64_t T = tile_size<acc_t>();
    const int64_t n_tiles = (R + T - 1) / T;
    at::parallel_for(0, n_tiles, std::max<int64_t>(1, 4096 / (T * std::max<int64_t>(C, 1))), [&](int64_t tb, int64_t te) {
      int64_t base[T], ybase[T];
      acc_t mult[T], norms[T];
      Stats<acc_t> s[T];
      TileLanes<acc_t> lanes;
      TileLabels labels;
      const bool vec = vector_epilogue();
      for (int64_t t = tb; t < te; ++t) {
        const int64_t r0 = t * T, count = std::min(T, R - r0);
        bool contiguous = true;
        xv.offsets(r0, count, base);
        y.view.offsets(r0, count, ybase);
        for (int64_t k = 0; k < count; ++k) {
          contiguous = contiguous && base[k] == base[0] + k;
          norms[k] = p.kind == LOGIT_NORM ? norm(base[k]) : acc_t(0);
          mult[k] = mult_of(norms[k]);
        }
        for (int64_t k = count; k < T; ++k) mult[k] = 1;
        if (vec) {
          tile_labels(count, ybase, labels);
          tile_lanes<scalar_t, acc_t>(X, base, contiguous, count, C, xv.s_class, mult, false, chunk, lanes, ex, labels.col);
          finish_tile(r0, count, labels, lanes, loss, stats);
          continue;
        }
        tile_stats<scalar_t, acc_t>(X, base, contiguous, count, C, xv.s_class, mult, p.kind == LOGIT_NORM, chunk, s, ex);
        for (int64_t k = 0; k < count; ++k) {
          finish(r0 + k, y.data[ybase[k]], base[k], s[k], mult[k], norms[k], loss, stats);
        }
      }
    });
  }

  // ---------------------------------------------------------------------------------------------
  // backward: per entry the coefficients, then one read of the row and one write of the gradient
  // ---------------------------------------------------------------------------------------------

  struct Grad {
    acc_t a, b, c, h, delta, mult, lse;
    int64_t y, j_star;
    acc_t ge, energy;  // weighted energy: γ_E and E (the term −γ_E·relu(w)·exp(x + E))
  };

  Grad grad_coefficients(int64_t r, int64_t target, const acc_t* stats, const acc_t* G, int64_t s_g) const {
    const int64_t R = xv.n_rows;
    const Label l = classify(target, p);
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
    g.ge = 0;
    g.energy = 0;
    if (GE != nullptr) {
      // dE/dx = −p for E = −lse (folded into a); the weighted energy's −q is a term of its own
      g.ge = GE[r * s_ge];
      if (wr == nullptr) {
        g.a -= g.ge;
      } else {
        g.energy = energy_in[r];
      }
    }
    return g;
  }

  // grad_coefficients of a tile's entries r0 .. r0+count-1 at once (vector_epilogue kinds: ω = 1, mult = 1,
  // δ = 0, h = 0), the same formulas lane by lane; padding lanes get zero coefficients and no target
  void tile_grad_coefficients(int64_t r0, int64_t count, const int64_t* ybase, const acc_t* stats, const acc_t* G,
                              int64_t s_g, acc_t* a, acc_t* b, acc_t* cc, acc_t* lse, acc_t* nge, acc_t* en,
                              int64_t* yk) const {
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    constexpr int64_t T = tile_size<acc_t>();
    const int64_t R = xv.n_rows;
    alignas(64) acc_t is_id[T], is_ood[T], gamma[T], m[T], log_d[T];
    for (int64_t k = 0; k < T; ++k) {
      if (k < count) {
        const Label l = classify(y.data[ybase[k]], p);
        is_id[k] = l.is_id ? acc_t(1) : acc_t(0);
        is_ood[k] = l.is_ood ? acc_t(1) : acc_t(0);
        yk[k] = l.y;
        gamma[k] = G[(r0 + k) * s_g];
        m[k] = stats[r0 + k];
        log_d[k] = stats[R + r0 + k];
        nge[k] = GE != nullptr ? -GE[(r0 + k) * s_ge] : acc_t(0);
        en[k] = GE != nullptr && wr != nullptr ? energy_in[r0 + k] : acc_t(0);
      } else {
        is_id[k] = is_ood[k] = gamma[k] = m[k] = log_d[k] = nge[k] = en[k] = 0;
        yk[k] = -1;
      }
    }
    const Vec zero(acc_t(0)), one(acc_t(1)), two(acc_t(2));
    const Vec valpha(p.alpha), vm_in(p.m_in), vm_out(p.m_out), vC(static_cast<acc_t>(p.n_classes));
    const bool fold_energy = GE != nullptr && wr == nullptr;
    for (int64_t o = 0; o < T; o += V) {
      const Vec l = Vec::loadu(m + o) + Vec::loadu(log_d + o);
      const Vec id = Vec::loadu(is_id + o) != zero, ood = Vec::loadu(is_ood + o) != zero;
      Vec a_id = one, a_ood = zero, c_ood = zero;
      if (p.kind == OUTLIER_EXPOSURE) {
        a_ood = valpha;
        c_ood = valpha.neg();
      } else if (p.kind == ENERGY) {
        const Vec h_in = at::vec::maximum(l.neg() - vm_in, zero);
        a_id = a_id - two * valpha * h_in;
        const Vec h_out = at::vec::maximum(vm_out + l, zero);
        a_ood = two * valpha * h_out;
      }
      const Vec g = Vec::loadu(gamma + o);
      Vec va = g * Vec::blendv(Vec::blendv(zero, a_ood, ood), a_id, id);
      // dE/dx = −p for E = −lse, folded into a (the weighted energy's term is applied per class)
      if (fold_energy) va = va + Vec::loadu(nge + o);
      va.store(a + o);
      (g * Vec::blendv(zero, one.neg(), id)).store(b + o);
      (g * Vec::blendv(zero, c_ood, ood) / vC).store(cc + o);
      l.store(lse + o);
    }
  }

  // backward work is split into fixed blocks (rows, or tiles of T entries), independent of the thread
  // count, so the per-block partial sums of dL/dw add up in the same order on every run
  int64_t block_rows() const {
    return std::max<int64_t>(1, 16384 / std::max<int64_t>(p.n_classes, 1));
  }
  int64_t block_tiles() const {
    return std::max<int64_t>(1, 4096 / (tile_size<acc_t>() * std::max<int64_t>(p.n_classes, 1)));
  }
  int64_t n_blocks(const View& dv) const {
    const int64_t R = xv.n_rows;
    if (xv.s_class == 1 && dv.s_class == 1) return (R + block_rows() - 1) / block_rows();
    const int64_t n_tiles = (R + tile_size<acc_t>() - 1) / tile_size<acc_t>();
    return (n_tiles + block_tiles() - 1) / block_tiles();
  }

  void backward(const acc_t* stats, const acc_t* G, int64_t s_g, scalar_t* D, const View& dv) const {
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const int64_t R = xv.n_rows, C = p.n_classes;
    const bool logit_norm = p.kind == LOGIT_NORM;
    const bool weighted = wr != nullptr && GE != nullptr;
    const Vec zero(acc_t(0));
    if (xv.s_class == 1 && dv.s_class == 1) {
      const int64_t rb = block_rows();
      at::parallel_for(0, (R + rb - 1) / rb, 1, [&](int64_t bb, int64_t be) {
        std::vector<acc_t> buf(chunk);
        for (int64_t blk = bb; blk < be; ++blk) {
          acc_t* gwp = weighted ? gw_partial + blk * C : nullptr;
          for (int64_t r = blk * rb; r < std::min(R, (blk + 1) * rb); ++r) {
            const Grad g = grad_coefficients(r, y.at(r), stats, G, s_g);
            const scalar_t* x = X + xv.offset(r);
            scalar_t* out = D + dv.offset(r);
            const Vec va(g.a), vc(g.c), vmult(g.mult), vlse(g.lse), vdelta(g.delta), vnge(-g.ge), venergy(g.energy);
            // a finite lse: the row has no NaN and no +inf, so z − lse is finite or -inf
            const bool plain_exp = std::isfinite(g.lse);
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
                Vec gv = va * vexp_known<acc_t>(xv_ * vmult - vlse, plain_exp) + vc;
                // only LogitNorm has the δ·x term (elsewhere 0·x would turn -inf logits into NaN)
                if (logit_norm) gv = gv + vdelta * xv_;
                if (weighted) {
                  // dq = −γ_E·e^(x − m)/d_w from the saved E; dE/dw_c = dq·1[w_c > 0]
                  const Vec w = Vec::loadu(wr + c0 + c);
                  const Vec dq = vnge * vexp<acc_t>(xv_ + venergy);
                  gv = gv + dq * w;
                  (Vec::loadu(gwp + c0 + c) + Vec::blendv(zero, dq, w > zero)).store(gwp + c0 + c);
                }
                gv.store(buf.data() + c);
              }
              for (; c < len; ++c) {
                const acc_t xs = load<scalar_t, acc_t>(x, c0 + c);
                acc_t gs = g.a * std::exp(xs * g.mult - g.lse) + g.c;
                if (logit_norm) gs += g.delta * xs;
                if (weighted) {
                  const acc_t dq = -g.ge * std::exp(xs + g.energy);
                  gs += dq * wr[c0 + c];
                  if (wr[c0 + c] > 0) gwp[c0 + c] += dq;
                }
                buf[c] = gs;
              }
              // one-hot terms in ACC, before the single rounding store
              if (g.y >= c0 && g.y < c0 + len) buf[g.y - c0] += g.b;
              if (g.j_star >= c0 && g.j_star < c0 + len) buf[g.j_star - c0] += g.h;
              for (c = 0; c < len; ++c) out[c0 + c] = static_cast<scalar_t>(buf[c]);
            }
          }
        }
      });
      return;
    }
    constexpr int64_t T = tile_size<acc_t>();
    constexpr int64_t NV = T / V;
    const int64_t n_tiles = (R + T - 1) / T;
    const int64_t tbk = block_tiles();
    at::parallel_for(0, (n_tiles + tbk - 1) / tbk, 1, [&](int64_t bb, int64_t be) {
      int64_t base[T], dbase[T], ybase[T];
      alignas(64) acc_t a[T], cc[T], mult[T], lse[T], delta[T], nge[T], en[T], buf[T], out[T], bk[T], hk[T];
      int64_t yk[T], jk[T];
      const bool vec = vector_epilogue();
      for (int64_t blk = bb; blk < be; ++blk) {
        acc_t* gwp = weighted ? gw_partial + blk * C : nullptr;
        for (int64_t t = blk * tbk; t < std::min(n_tiles, (blk + 1) * tbk); ++t) {
          const int64_t r0 = t * T, count = std::min(T, R - r0);
          bool contiguous = true, dcontiguous = true;
          xv.offsets(r0, count, base);
          dv.offsets(r0, count, dbase);
          y.view.offsets(r0, count, ybase);
          for (int64_t k = 0; k < count; ++k) {
            contiguous = contiguous && base[k] == base[0] + k;
            dcontiguous = dcontiguous && dbase[k] == dbase[0] + k;
          }
          if (vec) {
            // mult = 1, δ = 0 and h = 0: none of them is read (no LogitNorm term, no e_j* term)
            tile_grad_coefficients(r0, count, ybase, stats, G, s_g, a, bk, cc, lse, nge, en, yk);
          } else {
            for (int64_t k = 0; k < T; ++k) {
              const Grad g = k < count ? grad_coefficients(r0 + k, y.data[ybase[k]], stats, G, s_g)
                                       : Grad{0, 0, 0, 0, 0, 1, 0, -1, -1, 0, 0};
              a[k] = g.a;
              bk[k] = g.b;
              cc[k] = g.c;
              hk[k] = g.h;
              mult[k] = g.mult;
              lse[k] = g.lse;
              delta[k] = g.delta;
              nge[k] = -g.ge;
              en[k] = g.energy;
              yk[k] = g.y;
              jk[k] = g.j_star;
            }
          }
          // every lane's lse finite (padding lanes: 0): no NaN and no +inf in the tile, z − lse is finite or -inf
          bool plain_exp = true;
          for (int64_t k = 0; k < T; ++k) plain_exp = plain_exp && std::isfinite(lse[k]);
          for (int64_t c = 0; c < C; ++c) {
            const acc_t* x = tile_class<scalar_t, acc_t>(X, base, contiguous, count, c, xv.s_class, buf);
            // a full contiguous fp32/fp64 run is written in place (one-hot terms added there, still in ACC)
            bool direct = false;
            acc_t* o = out;
            if constexpr (std::is_same_v<scalar_t, acc_t>) {
              if (dcontiguous && count == T) {
                o = D + dbase[0] + c * dv.s_class;
                direct = true;
              }
            }
            Vec dq_sum(acc_t(0));
            for (int64_t j = 0; j < NV; ++j) {
              const Vec xs = Vec::loadu(x + j * V);
              // mult = 1 except for LogitNorm (x·1 would be a multiply per element for nothing)
              const Vec z = logit_norm ? xs * Vec::loadu(mult + j * V) : xs;
              Vec gv = Vec::loadu(a + j * V) * vexp_known<acc_t>(z - Vec::loadu(lse + j * V), plain_exp) +
                  Vec::loadu(cc + j * V);
              if (logit_norm) gv = gv + Vec::loadu(delta + j * V) * xs;
              if (weighted) {
                // padding lanes have γ_E = 0: their dq is 0
                const Vec dq = Vec::loadu(nge + j * V) * vexp<acc_t>(xs + Vec::loadu(en + j * V));
                gv = gv + dq * Vec(wr[c]);
                dq_sum = dq_sum + dq;
              }
              gv.store(o + j * V);
            }
            if (weighted && wr[c] > 0) {
              alignas(64) acc_t lanes[V];
              dq_sum.store(lanes);
              acc_t total = 0;
              for (int64_t k = 0; k < V; ++k) total += lanes[k];
              gwp[c] += total;
            }
            if (direct) continue;  // its one-hot terms are added after the class loop, in ACC all the same
            for (int64_t k = 0; k < count; ++k) {
              if (yk[k] == c) o[k] += bk[k];
              if (!vec && jk[k] == c) o[k] += hk[k];
            }
            if (dcontiguous) {
              scalar_t* dst = D + dbase[0] + c * dv.s_class;
              for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<scalar_t>(out[k]);
            } else {
              for (int64_t k = 0; k < count; ++k) D[dbase[k] + c * dv.s_class] = static_cast<scalar_t>(out[k]);
            }
          }
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            if (dcontiguous && count == T) {
              for (int64_t k = 0; k < count; ++k) {
                if (yk[k] >= 0) D[dbase[k] + yk[k] * dv.s_class] += bk[k];
                if (!vec && jk[k] >= 0) D[dbase[k] + jk[k] * dv.s_class] += hk[k];
              }
            }
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

// relu(w) of a class-weight vector (C,) in ACC, contiguous (the kernels read relu(w) and 1[w > 0] from it)
Tensor relu_weights(const std::optional<Tensor>& class_weight, at::ScalarType acc, int64_t n_classes, const char* op) {
  TORCH_CHECK(
      class_weight->numel() == n_classes,
      "oodkernels::",
      op,
      ": class_weight must have C = ",
      n_classes,
      " entries, got shape ",
      class_weight->sizes());
  return class_weight->reshape({n_classes}).to(acc).clamp_min(0).contiguous();
}

// the RowKernel of one call: logits read in place, int64 targets, the criterion's parameters and the cost
// matrix already in ACC (`cost_acc` undefined: none); shared by the forward and the backward entry points
template <typename scalar_t, typename acc_t>
RowKernel<scalar_t, acc_t> make_row_kernel(
    const Tensor& logits,
    const View& xv,
    const Tensor& y,
    const Tensor& cost_acc,
    int64_t kind,
    double alpha,
    double m_in,
    double m_out,
    std::optional<int64_t> ignore_index,
    int64_t block_c) {
  RowKernel<scalar_t, acc_t> k{
      logits.const_data_ptr<scalar_t>(),
      xv,
      Targets{y.const_data_ptr<int64_t>(), View(y, false)},
      make_params<acc_t>(kind, alpha, m_in, m_out, ignore_index, logits.size(1)),
      chunk_of(block_c)};
  if (cost_acc.defined()) k.p.cost = cost_acc.const_data_ptr<acc_t>();
  return k;
}

// the forward of row_loss_fwd and row_loss_energy_fwd: (values, energy or {}, stats)
std::tuple<Tensor, Tensor, Tensor> row_forward(
    const char* op,
    const Tensor& logits,
    const Tensor& targets,
    const std::optional<Tensor>& cost,
    int64_t kind,
    double alpha,
    double m_in,
    double m_out,
    std::optional<int64_t> ignore_index,
    int64_t block_c,
    bool return_energy,
    const std::optional<Tensor>& class_weight) {
  check_logits(logits, op);
  check_kind(kind, op);
  const auto acc = acc_type(logits.scalar_type());
  const View xv(logits, true);
  const int64_t R = targets.numel();
  const int64_t C = logits.size(1);
  TORCH_CHECK(R == xv.n_rows, "oodkernels::", op, ": targets have ", R, " entries, logits ", xv.n_rows);
  Tensor loss = at::empty({R}, logits.options().dtype(acc));
  Tensor stats = at::empty({N_STATS, R}, logits.options().dtype(acc));
  Tensor energy = at::empty({return_energy ? R : 0}, logits.options().dtype(acc));
  if (R == 0) return {loss, energy, stats};
  const Tensor wr = class_weight.has_value() ? relu_weights(class_weight, acc, C, op) : Tensor();
  // targets of any integer dtype: int64 is read in place, others are converted (O(R))
  const Tensor y = targets.scalar_type() == at::kLong ? targets : targets.to(at::kLong);
  const Tensor cost_acc = cost.has_value() ? cost->to(acc).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cpu_row_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto k = make_row_kernel<scalar_t, acc_t>(logits, xv, y, cost_acc, kind, alpha, m_in, m_out, ignore_index, block_c);
    if (return_energy) {
      k.energy = energy.mutable_data_ptr<acc_t>();
      if (wr.defined()) k.wr = wr.const_data_ptr<acc_t>();
    }
    k.forward(loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>());
  });
  return {loss, energy, stats};
}

// the backward of row_loss_bwd and row_loss_energy_bwd: (grad, dL/dw or {})
std::tuple<Tensor, Tensor> row_backward(
    const char* op,
    const Tensor& grad_values,
    const std::optional<Tensor>& grad_energy,
    const Tensor& logits,
    const Tensor& targets,
    const std::optional<Tensor>& cost,
    const Tensor& stats,
    const std::optional<Tensor>& energy,
    const std::optional<Tensor>& class_weight,
    int64_t kind,
    double alpha,
    double m_in,
    double m_out,
    std::optional<int64_t> ignore_index,
    int64_t block_c) {
  check_logits(logits, op);
  check_kind(kind, op);
  const auto acc = acc_type(logits.scalar_type());
  const int64_t C = logits.size(1);
  // preserve_format keeps dense strides (NCHW, channels-last, transposed), else contiguous
  Tensor grad = at::empty_like(logits);
  const View xv(logits, true), dv(grad, true);
  const bool weighted = class_weight.has_value() && grad_energy.has_value();
  Tensor grad_w = class_weight.has_value() ? at::zeros({C}, stats.options().dtype(acc)) : Tensor();
  if (xv.n_rows == 0 || C == 0) return {grad.zero_(), grad_w};
  const Tensor y = targets.scalar_type() == at::kLong ? targets : targets.to(at::kLong);
  const Tensor st = stats.scalar_type() == acc ? stats.contiguous() : stats.to(acc).contiguous();
  const Tensor go = grad_values.scalar_type() == acc ? grad_values : grad_values.to(acc);
  const int64_t s_g = go.dim() ? go.stride(0) : 0;
  Tensor ge, en, wr, partial;
  if (grad_energy.has_value()) ge = grad_energy->scalar_type() == acc ? *grad_energy : grad_energy->to(acc);
  if (weighted) {
    TORCH_CHECK(energy.has_value(), "oodkernels::", op, ": the weighted energy gradient needs the forward's energy");
    en = energy->to(acc).contiguous();
    wr = relu_weights(class_weight, acc, C, op);
  }
  const Tensor cost_acc = cost.has_value() ? cost->to(acc).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cpu_row_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto k = make_row_kernel<scalar_t, acc_t>(logits, xv, y, cost_acc, kind, alpha, m_in, m_out, ignore_index, block_c);
    if (ge.defined()) {
      k.GE = ge.const_data_ptr<acc_t>();
      k.s_ge = ge.dim() ? ge.stride(0) : 0;
    }
    if (weighted) {
      k.wr = wr.const_data_ptr<acc_t>();
      k.energy_in = en.const_data_ptr<acc_t>();
      partial = at::zeros({k.n_blocks(dv), C}, stats.options().dtype(acc));
      k.gw_partial = partial.mutable_data_ptr<acc_t>();
    }
    k.backward(st.const_data_ptr<acc_t>(), go.const_data_ptr<acc_t>(), s_g, grad.mutable_data_ptr<scalar_t>(), dv);
    if (weighted) {
      // the blocks' partial sums in block order: the same bits on every run and thread count
      acc_t* out = grad_w.mutable_data_ptr<acc_t>();
      const acc_t* part = partial.const_data_ptr<acc_t>();
      for (int64_t b = 0; b < partial.size(0); ++b) {
        for (int64_t c = 0; c < C; ++c) out[c] += part[b * C + c];
      }
    }
  });
  return {grad, grad_w};
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
  auto [loss, energy, stats] = row_forward(
      "cpu_row_loss_fwd", logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_c, false, std::nullopt);
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
  return std::get<0>(row_backward(
      "cpu_row_loss_bwd",
      grad_values,
      std::nullopt,
      logits,
      targets,
      cost,
      stats,
      std::nullopt,
      std::nullopt,
      kind,
      alpha,
      m_in,
      m_out,
      ignore_index,
      block_c));
}

std::tuple<Tensor, Tensor, Tensor> cpu_row_loss_energy_fwd(
    const Tensor& logits,
    const Tensor& targets,
    const std::optional<Tensor>& cost,
    int64_t kind,
    double alpha,
    double m_in,
    double m_out,
    std::optional<int64_t> ignore_index,
    int64_t block_r,
    int64_t block_c,
    const std::optional<Tensor>& class_weight) {
  return row_forward(
      "cpu_row_loss_energy_fwd", logits, targets, cost, kind, alpha, m_in, m_out, ignore_index, block_c, true, class_weight);
}

std::tuple<Tensor, Tensor> cpu_row_loss_energy_bwd(
    const Tensor& grad_values,
    const Tensor& grad_energy,
    const Tensor& logits,
    const Tensor& targets,
    const std::optional<Tensor>& cost,
    const Tensor& stats,
    const Tensor& energy,
    const std::optional<Tensor>& class_weight,
    int64_t kind,
    double alpha,
    double m_in,
    double m_out,
    std::optional<int64_t> ignore_index,
    int64_t block_r,
    int64_t block_c) {
  auto [grad, grad_w] = row_backward(
      "cpu_row_loss_energy_bwd",
      grad_values,
      grad_energy,
      logits,
      targets,
      cost,
      stats,
      energy,
      class_weight,
      kind,
      alpha,
      m_in,
      m_out,
      ignore_index,
      block_c);
  // (0,) without class weights, as the public op returns
  if (!grad_w.defined()) grad_w = at::empty({0}, stats.options().dtype(acc_type(logits.scalar_type())));
  return {grad, grad_w};
}

Tensor cpu_row_scores(
    const Tensor& logits,
    int64_t which,
    double t,
    int64_t block_r,
    int64_t block_c,
    const std::optional<Tensor>& class_weight) {
  check_logits(logits, "cpu_row_scores");
  TORCH_CHECK(
      which >= 0 && which < N_SCORES,
      "oodkernels::cpu_row_scores: score kind ",
      which,
      " is not implemented by the C++ backend (it knows 0..",
      N_SCORES - 1,
      ")");
  TORCH_CHECK(
      which != SCORE_WEIGHTED_ENERGY || class_weight.has_value(),
      "oodkernels::cpu_row_scores: class_weight: required for the weighted energy score");
  const auto acc = acc_type(logits.scalar_type());
  const View xv(logits, true);
  const int64_t C = logits.size(1);
  Tensor out = at::empty({xv.n_rows}, logits.options().dtype(acc));
  if (xv.n_rows == 0) return out;
  const Tensor wr =
      which == SCORE_WEIGHTED_ENERGY ? relu_weights(class_weight, acc, C, "cpu_row_scores") : Tensor();
  // the scores reuse the loss traversal with no target: a zero-size target view, never read
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cpu_row_scores", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t tt = static_cast<acc_t>(t);
    const acc_t mult = acc_t(1) / tt;
    const scalar_t* X = logits.const_data_ptr<scalar_t>();
    const int64_t chunk = chunk_of(block_c);
    acc_t* O = out.mutable_data_ptr<acc_t>();
    Extras<acc_t> ex;
    if (wr.defined()) ex.wr = wr.const_data_ptr<acc_t>();
    ex.expect = which == SCORE_ENTROPY_EXACT;
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
        case SCORE_WEIGHTED_ENERGY:  // max-subtracted (fix g): +inf where every weight is <= 0
          return -(m + std::log(s.d_w));
        case SCORE_ENTROPY_EXACT:  // H = lse − E_p[x], from the one read (no clamp)
          return log_d - (s.expect / s.d - m);
        default:  // entropy of the clamped softmax, as pytorch-ood defines it: needs lse first (the tile
                  // traversal takes tile_clamped_entropy instead)
          return m != m ? nan : row_clamped_entropy<scalar_t, acc_t>(X + base, C, mult, m, log_d);
      }
    };
    const int64_t R = xv.n_rows;
    if (by_rows(xv, C)) {
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf(chunk);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t base = xv.offset(r);
          O[r] = score(base, row_stats<scalar_t, acc_t>(X + base, C, mult, chunk, buf.data(), ex));
        }
      });
    } else {
      constexpr int64_t T = tile_size<acc_t>();
      at::parallel_for(0, (R + T - 1) / T, std::max<int64_t>(1, 4096 / (T * std::max<int64_t>(C, 1))), [&](int64_t tb, int64_t te) {
        int64_t base[T];
        acc_t mults[T];
        Stats<acc_t> s[T];
        alignas(64) acc_t m[T], log_d[T], ent[T];
        for (int64_t k = 0; k < T; ++k) mults[k] = mult;
        for (int64_t tile = tb; tile < te; ++tile) {
          const int64_t r0 = tile * T, count = std::min(T, R - r0);
          bool contiguous = true;
          xv.offsets(r0, count, base);
          for (int64_t k = 0; k < count; ++k) contiguous = contiguous && base[k] == base[0] + k;
          tile_stats<scalar_t, acc_t>(X, base, contiguous, count, C, xv.s_class, mults, mult != acc_t(1), chunk, s, ex);
          if (which == SCORE_ENTROPY) {
            for (int64_t k = 0; k < T; ++k) {
              const bool live = k < count && !s[k].has_nan;
              m[k] = live ? s[k].m : acc_t(0);
              log_d[k] = live ? std::log(s[k].d) : acc_t(0);
            }
            tile_clamped_entropy<scalar_t, acc_t>(X, base, contiguous, count, C, xv.s_class, mult, m, log_d, ent);
            const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
            for (int64_t k = 0; k < count; ++k) O[r0 + k] = s[k].has_nan ? nan : ent[k];
            continue;
          }
          for (int64_t k = 0; k < count; ++k) O[r0 + k] = score(base[k], s[k]);
        }
      });
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// the reduced op: masks, weights and the reduction's normalisers inside, as the Triton kernels do
// ---------------------------------------------------------------------------------------------

// reductions (kernels/codes.py REDUCE_*) and the totals' layout (TOTAL_*)
constexpr int64_t REDUCE_NONE = 0;
constexpr int64_t REDUCE_MEAN_ID = 1;
constexpr int64_t REDUCE_MEAN_VALID = 2;
constexpr int64_t REDUCE_MEAN_GROUPS = 3;
constexpr int64_t REDUCE_SUM = 4;
constexpr int64_t REDUCE_GROUP_SUMS = 5;
constexpr int64_t TOTAL_SUM_ID = 0;
constexpr int64_t TOTAL_SUM_OOD = 1;
constexpr int64_t TOTAL_N_ID = 2;
constexpr int64_t TOTAL_N_OOD = 3;
constexpr int64_t TOTAL_MAX_LABEL = 4;
constexpr int64_t N_TOTALS = 5;

// one call's entries as the reduction sees them: raw labels, validity, weights
struct ReducedCall {
  Tensor labels;  // (R,) int64, the caller's labels
  Tensor kernel_targets;  // the labels the row kernel reads (BackgroundClass: OOD -> the background column)
  Tensor weight;  // (R,) ACC or undefined
  bool has_ignore = false;
  int64_t ignore_index = 0;
  bool id_only = false;

  ReducedCall(
      const Tensor& targets,
      const std::optional<Tensor>& w,
      at::ScalarType acc,
      int64_t kind,
      std::optional<int64_t> ignore,
      std::optional<int64_t> background) {
    labels = targets.reshape({-1}).to(at::kLong).contiguous();
    has_ignore = ignore.has_value();
    ignore_index = ignore.value_or(0);
    id_only = (kind == CROSS_ENTROPY || kind == LOGIT_NORM) && !background.has_value();
    if (w.has_value()) weight = w->expand(targets.sizes()).reshape({-1}).to(acc).contiguous();
    // int64 targets are read in place; narrower ones are converted here once (the row kernel reads int64)
    kernel_targets = targets.scalar_type() == at::kLong ? targets : labels.view(targets.sizes());
    if (background.has_value()) {
      Tensor remapped = labels.clone();
      int64_t* y = remapped.mutable_data_ptr<int64_t>();
      for (int64_t r = 0; r < remapped.numel(); ++r) {
        if (y[r] < 0 && !(has_ignore && y[r] == ignore_index)) y[r] = *background;
      }
      kernel_targets = remapped.reshape(targets.sizes());
    }
  }

  inline bool valid(int64_t label) const {
    return !(has_ignore && label == ignore_index);
  }
  inline bool contributes(int64_t label) const {
    return valid(label) && (!id_only || label >= 0);
  }
};

std::tuple<Tensor, Tensor, Tensor> cpu_row_loss_reduced_fwd(
    const Tensor& logits,
    const Tensor& targets,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& cost,
    int64_t kind,
    double alpha,
    double m_in,
    double m_out,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> background,
    int64_t reduction,
    bool checks,
    int64_t block_r,
    int64_t block_c) {
  const char* op = "cpu_row_loss_reduced_fwd";
  TORCH_CHECK(
      reduction >= REDUCE_NONE && reduction <= REDUCE_GROUP_SUMS, "oodkernels::", op, ": unknown reduction ", reduction);
  const auto acc = acc_type(logits.scalar_type());
  const ReducedCall call(targets, weight, acc, kind, ignore_index, background);
  auto [values, energy, stats] = row_forward(
      op, logits, call.kernel_targets, cost, kind, alpha, m_in, m_out, ignore_index, block_c, false, std::nullopt);
  const int64_t R = call.labels.numel();
  const bool none = reduction == REDUCE_NONE;
  const bool group_sums = reduction == REDUCE_GROUP_SUMS;
  Tensor out = group_sums ? at::empty({2}, logits.options().dtype(at::kDouble))
                          : at::empty(none ? at::IntArrayRef{R} : at::IntArrayRef{}, logits.options());
  Tensor totals = at::empty({checks || !none ? N_TOTALS : 0}, logits.options().dtype(at::kDouble));
  Tensor weighted = none ? at::empty({R}, values.options()) : Tensor();
  double sum_id = 0, sum_ood = 0, n_id = 0, n_ood = 0, top = -1;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "cpu_row_reduce", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* w = call.weight.defined() ? call.weight.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* rows_out = none ? weighted.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t* y = call.labels.const_data_ptr<int64_t>();
    // in entry order, one thread: the same bits on every run
    for (int64_t r = 0; r < R; ++r) {
      const int64_t label = y[r];
      scalar_t term = 0;
      if (call.contributes(label)) term = w ? v[r] * w[r] : v[r];
      if (rows_out) rows_out[r] = term;
      if (!call.valid(label)) continue;
      top = std::max(top, static_cast<double>(label));
      if (label >= 0) {
        sum_id += term;
        n_id += 1;
      } else {
        sum_ood += term;
        n_ood += 1;
      }
    }
  });
  if (totals.numel()) {
    double* t = totals.mutable_data_ptr<double>();
    t[TOTAL_SUM_ID] = sum_id, t[TOTAL_SUM_OOD] = sum_ood, t[TOTAL_N_ID] = n_id, t[TOTAL_N_OOD] = n_ood;
    t[TOTAL_MAX_LABEL] = top;
  }
  if (none) {
    out.copy_(weighted);
  } else if (group_sums) {
    // the two sums, for a process group's normalisers (ops/rows.py divides them by the global counts)
    double* o = out.mutable_data_ptr<double>();
    o[0] = sum_id, o[1] = sum_ood;
  } else {
    double loss = sum_id + sum_ood;
    if (reduction == REDUCE_MEAN_ID) loss = sum_id / std::max(n_id, 1.0);
    if (reduction == REDUCE_MEAN_VALID) loss = (sum_id + sum_ood) / (n_id + n_ood);
    if (reduction == REDUCE_MEAN_GROUPS) loss = sum_id / std::max(n_id, 1.0) + sum_ood / std::max(n_ood, 1.0);
    out.fill_(loss);
  }
  return {out, totals, stats};
}

Tensor cpu_row_loss_reduced_bwd(
    const Tensor& grad_out,
    const Tensor& logits,
    const Tensor& targets,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& cost,
    const Tensor& totals,
    const Tensor& stats,
    int64_t kind,
    double alpha,
    double m_in,
    double m_out,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> background,
    int64_t reduction,
    int64_t block_r,
    int64_t block_c) {
  const auto acc = acc_type(logits.scalar_type());
  const ReducedCall call(targets, weight, acc, kind, ignore_index, background);
  const int64_t R = call.labels.numel();
  const bool none = reduction == REDUCE_NONE;
  Tensor gamma = at::empty({R}, logits.options().dtype(acc));
  const Tensor go = grad_out.reshape({-1}).to(acc).contiguous();
  double nu_id = 1, nu_ood = 1;
  if (!none) {
    const Tensor t = totals.to(at::kDouble).contiguous();
    const double n_id = t.const_data_ptr<double>()[TOTAL_N_ID], n_ood = t.const_data_ptr<double>()[TOTAL_N_OOD];
    if (reduction == REDUCE_MEAN_ID) nu_id = 1.0 / std::max(n_id, 1.0);
    if (reduction == REDUCE_MEAN_VALID) nu_id = nu_ood = 1.0 / (n_id + n_ood);
    if (reduction == REDUCE_MEAN_GROUPS) {
      nu_id = 1.0 / std::max(n_id, 1.0);
      nu_ood = 1.0 / std::max(n_ood, 1.0);
    }
  }
  // GROUP_SUMS: grad_out holds dL/dΣ_ID and dL/dΣ_OOD, each row's γ is w times its group's
  const bool group_sums = reduction == REDUCE_GROUP_SUMS;
  TORCH_CHECK(
      !group_sums || grad_out.numel() == 2,
      "oodkernels::cpu_row_loss_reduced_bwd: expected the (2,) gradient of the group sums, got ",
      grad_out.sizes());
  AT_DISPATCH_FLOATING_TYPES(gamma.scalar_type(), "cpu_row_gamma", [&] {
    const scalar_t* g = go.const_data_ptr<scalar_t>();
    const scalar_t* w = call.weight.defined() ? call.weight.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* y = call.labels.const_data_ptr<int64_t>();
    scalar_t* out = gamma.mutable_data_ptr<scalar_t>();
    // the normalisers rounded to ACC once, as the reference's reciprocal of the count in ACC
    const scalar_t id_scale = static_cast<scalar_t>(nu_id), ood_scale = static_cast<scalar_t>(nu_ood);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t label = y[r];
      if (!call.contributes(label)) {
        out[r] = 0;
        continue;
      }
      scalar_t value = none ? g[r] : group_sums ? g[label >= 0 ? 0 : 1] : g[0] * (label >= 0 ? id_scale : ood_scale);
      out[r] = w ? value * w[r] : value;
    }
  });
  return std::get<0>(row_backward(
      "cpu_row_loss_reduced_bwd",
      gamma,
      std::nullopt,
      logits,
      call.kernel_targets,
      cost,
      stats,
      std::nullopt,
      std::nullopt,
      kind,
      alpha,
      m_in,
      m_out,
      ignore_index,
      block_c));
}

// the reduced op with its backward, for eager calls: one dispatcher call per step and no Python autograd
// layer (at 256 x 10 those layers cost more than the criterion). The custom op oodkernels::row_loss_reduced_fwd
// (ops/row_ops.py) stays what torch.compile, opcheck and fake tensors see; this is the same math.
class ReducedRowStep : public torch::autograd::Function<ReducedRowStep> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      const Tensor& logits,
      const Tensor& targets,
      const std::optional<Tensor>& weight,
      const std::optional<Tensor>& cost,
      int64_t kind,
      double alpha,
      double m_in,
      double m_out,
      std::optional<int64_t> ignore_index,
      std::optional<int64_t> background,
      int64_t reduction,
      bool checks,
      int64_t block_r,
      int64_t block_c) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, totals, stats] = cpu_row_loss_reduced_fwd(
        logits, targets, weight, cost, kind, alpha, m_in, m_out, ignore_index, background, reduction, checks, block_r,
        block_c);
    ctx->mark_non_differentiable({totals});
    ctx->save_for_backward({logits, targets, weight.value_or(Tensor()), cost.value_or(Tensor()), totals, stats});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["m_in"] = m_in;
    ctx->saved_data["m_out"] = m_out;
    ctx->saved_data["ignore_index"] = ignore_index.has_value() ? c10::IValue(*ignore_index) : c10::IValue();
    ctx->saved_data["background"] = background.has_value() ? c10::IValue(*background) : c10::IValue();
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["block_c"] = block_c;
    ctx->saved_data["weight_requires_grad"] = weight.has_value() && weight->requires_grad();
    return {out, totals};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    TORCH_CHECK(
        !ctx->saved_data["weight_requires_grad"].toBool(),
        "oodkernels::cpu_row_loss_reduced_step: no gradient for the per-entry weight; the row criteria run "
        "row_loss_fwd and a torch reduction when the weight requires grad");
    auto saved = ctx->get_saved_variables();
    const auto optional = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
    const auto optional_int = [](const c10::IValue& v) {
      return v.isNone() ? std::optional<int64_t>() : std::optional<int64_t>(v.toInt());
    };
    Tensor grad_logits;
    if (grads[0].defined() && at::GradMode::is_enabled()) {
      // create_graph: the custom op oodkernels::row_loss_reduced_bwd (ops/row_ops.py), whose own backward
      // raises the fused kernels' double-backward error, as every other fused row call does
      const auto& op = c10::Dispatcher::singleton().findSchemaOrThrow("oodkernels::row_loss_reduced_bwd", "");
      const auto none_if_undefined = [](const Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); };
      std::vector<c10::IValue> stack{
          grads[0], saved[0], saved[1], none_if_undefined(saved[2]), none_if_undefined(saved[3]), saved[4],
          saved[5], ctx->saved_data["kind"], ctx->saved_data["alpha"], ctx->saved_data["m_in"],
          ctx->saved_data["m_out"], ctx->saved_data["ignore_index"], ctx->saved_data["background"],
          ctx->saved_data["reduction"], c10::IValue(int64_t(0)), ctx->saved_data["block_c"]};
      op.callBoxed(&stack);
      grad_logits = stack[0].toTensor();
    } else if (grads[0].defined()) {
      grad_logits = cpu_row_loss_reduced_bwd(
          grads[0], saved[0], saved[1], optional(saved[2]), optional(saved[3]), saved[4], saved[5],
          ctx->saved_data["kind"].toInt(), ctx->saved_data["alpha"].toDouble(), ctx->saved_data["m_in"].toDouble(),
          ctx->saved_data["m_out"].toDouble(), optional_int(ctx->saved_data["ignore_index"]),
          optional_int(ctx->saved_data["background"]), ctx->saved_data["reduction"].toInt(), 0,
          ctx->saved_data["block_c"].toInt());
    }
    torch::autograd::variable_list out(14);
    out[0] = grad_logits;
    return out;
  }
};

std::tuple<Tensor, Tensor> cpu_row_loss_reduced_step(
    const Tensor& logits,
    const Tensor& targets,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& cost,
    int64_t kind,
    double alpha,
    double m_in,
    double m_out,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> background,
    int64_t reduction,
    bool checks,
    int64_t block_r,
    int64_t block_c) {
  auto outs = ReducedRowStep::apply(
      logits, targets, weight, cost, kind, alpha, m_in, m_out, ignore_index, background, reduction, checks, block_r,
      block_c);
  return {outs[0], outs[1]};
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
  m.def(
      "cpu_row_scores(Tensor logits, int which, float t, int block_r, int block_c, Tensor? class_weight=None) "
      "-> Tensor");
  m.def(
      "cpu_row_loss_energy_fwd(Tensor logits, Tensor targets, Tensor? cost, int kind, float alpha, float m_in, "
      "float m_out, int? ignore_index, int block_r, int block_c, Tensor? class_weight) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cpu_row_loss_energy_bwd(Tensor grad_values, Tensor grad_energy, Tensor logits, Tensor targets, Tensor? cost, "
      "Tensor stats, Tensor energy, Tensor? class_weight, int kind, float alpha, float m_in, float m_out, "
      "int? ignore_index, int block_r, int block_c) -> (Tensor, Tensor)");
  m.def(
      "cpu_row_loss_reduced_fwd(Tensor logits, Tensor targets, Tensor? weight, Tensor? cost, int kind, float alpha, "
      "float m_in, float m_out, int? ignore_index, int? background, int reduction, bool checks, int block_r, "
      "int block_c) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cpu_row_loss_reduced_bwd(Tensor grad_out, Tensor logits, Tensor targets, Tensor? weight, Tensor? cost, "
      "Tensor totals, Tensor stats, int kind, float alpha, float m_in, float m_out, int? ignore_index, "
      "int? background, int reduction, int block_r, int block_c) -> Tensor");
  m.def(
      "cpu_row_loss_reduced_step(Tensor logits, Tensor targets, Tensor? weight, Tensor? cost, int kind, "
      "float alpha, float m_in, float m_out, int? ignore_index, int? background, int reduction, bool checks, "
      "int block_r, int block_c) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(oodkernels, CPU, m) {
  m.impl("cpu_row_loss_fwd", &cpu_row_loss_fwd);
  m.impl("cpu_row_loss_bwd", &cpu_row_loss_bwd);
  m.impl("cpu_row_scores", &cpu_row_scores);
  m.impl("cpu_row_loss_energy_fwd", &cpu_row_loss_energy_fwd);
  m.impl("cpu_row_loss_energy_bwd", &cpu_row_loss_energy_bwd);
  m.impl("cpu_row_loss_reduced_fwd", &cpu_row_loss_reduced_fwd);
  m.impl("cpu_row_loss_reduced_bwd", &cpu_row_loss_reduced_bwd);
}

TORCH_LIBRARY_IMPL(oodkernels, Autograd, m) {
  m.impl("cpu_row_loss_reduced_step", &cpu_row_loss_reduced_step);
}
