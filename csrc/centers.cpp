// The center family on the CPU: C++ implementations of oodkernels::center_sq_distances(_bwd) and
// center_loss_fwd / center_loss_bwd (schemas and semantics: oodkernels/ops/center_ops.py; the math:
// oodkernels/kernels/centers.py, whose docstring carries the formulas).
//
// Distances. The cross term is a GEMM through ATen (at::mm in fp32, fp64 for fp64 inputs; bf16/fp16
// features and centers are upcast first, as the reference does); the norms are ATen's pow(2).sum(1) of the
// same upcast tensors; centers s·I (CAC's anchors) take s·x instead of the GEMM, bitwise its result (see
// scaled_identity), and one center with rows of at least one vector takes one pass per row (see OneCenter,
// within rounding of the reference). A per-row pass (at::parallel_for over rows, at::vec over centers) then forms
//
//     raw_ik = (‖x_i‖² + ‖m_k‖²) − 2·(x·mᵀ)_ik,        d_ik = max(raw_ik, 0)
//
// in the reference's order, so the distances are bitwise the reference's wherever the GEMM is called on the
// same operands (one chunk of rows). The loss ops call the GEMM on chunks of rows so that the (rows, K)
// scratch of the cross term stays bounded (at most CHUNK_ELEMENTS accumulator values; `block_b` > 0 forces
// the chunk, for tests); no (B, K, D) tensor exists anywhere, and the losses never write a (B, K) output in
// the forward. CENTER needs only the target column: its raw_iy is one dot product per row, no GEMM.
//
// Each row then computes the criterion's term (forward: value and the stats [raw_y, S or lse(−d), T]) or
// G = γ·∂ℓ/∂d masked by the clamp 1[raw >= 0] (backward), exactly as the Triton epilogues do; the backward
// recomputes the raw row with the same chunking, so it sees bitwise the forward's distances. The distance
// op's backward reads the clamp mask from its saved output instead (d > 0 passes), and recomputes only the
// chunks of rows that hold an exact 0, again with the forward's chunking.
//
// With `centers` absent, x is a (B, K) distance matrix (any float dtype, any strides): no clamp, and the
// backward's G is the gradient of the distances themselves, in their dtype.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// criterion kinds (kernels/centers.py)
constexpr int64_t CAC = 0;
constexpr int64_t CENTER = 1;
constexpr int64_t MCHAD = 2;
constexpr int64_t N_STATS = 3;
constexpr double CAC_EXPONENT_MAX = 50.0;
constexpr double CENTER_CLAMP_MIN = 1e-12;
constexpr double CENTER_CLAMP_MAX = 1e12;
// 4M accumulator values (16 MiB in fp32) of cross-term scratch per GEMM chunk
constexpr int64_t CHUNK_ELEMENTS = int64_t(1) << 22;

at::ScalarType acc_of(const Tensor& x, const std::optional<Tensor>& centers) {
  const bool fp64 = x.scalar_type() == at::kDouble || (centers.has_value() && centers->scalar_type() == at::kDouble);
  return fp64 ? at::kDouble : at::kFloat;
}

// t in `dtype`: itself when it already is (Tensor::to would still cost a dispatcher call, ~2 us, and the center
// ops make a dozen such calls per step)
Tensor in_dtype(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

void check_features(const Tensor& x, const Tensor& centers, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && centers.device().is_cpu(), "oodkernels::", op, ": expected CPU tensors");
  TORCH_CHECK(
      x.dim() == 2 && centers.dim() == 2 && x.size(1) == centers.size(1),
      "oodkernels::",
      op,
      ": expected features (B, D) and centers (K, D), got ",
      x.sizes(),
      " and ",
      centers.sizes());
  TORCH_CHECK(
      at::isFloatingType(x.scalar_type()) && at::isFloatingType(centers.scalar_type()),
      "oodkernels::",
      op,
      ": expected floating-point features and centers, got ",
      x.scalar_type(),
      " and ",
      centers.scalar_type());
}

// exp over a vector. fp64 (and CPUs without AVX2): ATen's (SLEEF's) exp. fp32 on AVX2/AVX-512: our own, because
// SLEEF's 1-ULP expf was most of the CAC and MCHAD loss kernels (409600 exps: 274 us SLEEF, 176 us this one, one
// thread of this EPYC). The method is Cody and Waite's: x = n·ln2 + r with |r| <= ln2/2 (ln2 split in two
// constants so that n·ln2 is exact), e^r by Cephes' polynomial 1 + r + r²·P5(r), and 2^n applied as two
// power-of-two factors, each built from its exponent bits, so that subnormal results keep their precision. Within
// 1 ULP of the correctly rounded e^x over [-110, 90] (tests/test_cpp_centers.py checks it through a loss).
// The clamp propagates NaN (max/min return their second operand when either is NaN); above 89 the product
// overflows to +inf and below -104 it rounds to 0, as exp does.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vec_exp(const at::vec::Vectorized<acc_t>& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
template <>
inline at::vec::Vectorized<float> vec_exp<float>(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  const Vec xc = at::vec::clamp(x, Vec(-104.0f), Vec(89.0f));
  const Vec n = (xc * Vec(1.44269504088896341f)).round();
  // r = x − n·ln2 with ln2 = 0.693359375 − 2.12194440e-4 (the first part has 9 significant bits: n·it is exact)
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), xc);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  const Vec e_r = at::vec::fmadd(p, r * r, r + Vec(1.0f));
  // 2^n = 2^a · 2^b, a = floor(n/2), b = n − a, both in [-75, 64]: normal floats whose bits are (k + 127)·2^23
  // (exact in fp32 and in int32)
  const Vec a = (n * Vec(0.5f)).floor();
  const Vec b = n - a;
  auto power_of_two = [](const Vec& k) {
    const Vec bits = at::vec::fmadd(k, Vec(8388608.0f), Vec(1065353216.0f));  // 2^23·k + 127·2^23
    return at::vec::cast<float>(at::vec::convert_to_int_of_same_size(bits));
  };
  return e_r * power_of_two(a) * power_of_two(b);
}
#endif

template <typename acc_t>
inline acc_t hsum(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto a, auto b) { return a + b; }, v);
}

template <typename acc_t>
inline acc_t hmax(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto a, auto b) { return at::vec::maximum(a, b); }, v);
}

// Temporaries that never leave an operator (the norms' squares, the distance backward's masked G) live in a
// buffer kept per thread and purpose, reused across calls: a fresh multi-MiB tensor is touched for the first time
// every step (the norms' pow(2) took ~35 us for (4096, 128) fp32 in a loop of its own, and 358 us on average per
// call inside the MCHAD training step under the profiler, 80 us with this buffer). At most SCRATCH_MAX_BYTES are
// kept per purpose; larger temporaries are allocated as usual.
constexpr int64_t SCRATCH_MAX_BYTES = int64_t(64) << 20;
enum ScratchPurpose { SCRATCH_SQUARES = 0, SCRATCH_MASKED_GRAD = 1, N_SCRATCH = 2 };

// an uninitialised contiguous tensor of `sizes` and `dtype` on the CPU, valid until the next call for `purpose`
// on this thread
Tensor scratch(ScratchPurpose purpose, at::IntArrayRef sizes, at::ScalarType dtype) {
  thread_local std::array<Tensor, N_SCRATCH> buffers;
  int64_t numel = 1;
  for (int64_t n : sizes) numel *= n;
  const int64_t bytes = numel * int64_t(c10::elementSize(dtype));
  if (bytes > SCRATCH_MAX_BYTES) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  Tensor& buffer = buffers[purpose];
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = at::empty({std::max<int64_t>(bytes, 1 << 16)}, at::TensorOptions().dtype(at::kByte));
  }
  return at::from_blob(buffer.data_ptr(), sizes, at::TensorOptions().dtype(dtype));  // no dispatcher calls
}

// s when the centers m (K, D) are s·I: K = D, every diagonal entry s, every other entry ±0 (CAC's anchors are
// magnitude · identity). Then each product a·mᵀ or g·m has one nonzero term per entry, a_ik·s, which the GEMM
// rounds exactly as a multiply does (the other terms add exact zeros), so the product is a scaled copy instead of
// a 2·B·K·D-FLOP GEMM. The scan stops at the first entry that breaks the pattern (for dense centers, m[0][1]).
template <typename acc_t>
std::optional<acc_t> scaled_identity(const Tensor& m) {
  if (m.dim() != 2 || m.size(0) != m.size(1) || m.size(0) == 0) return std::nullopt;
  const auto a = m.accessor<acc_t, 2>();
  const int64_t K = m.size(0);
  const acc_t s = a[0][0];
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < K; ++j) {
      const acc_t v = a[k][j];
      if (j == k ? !(v == s) : v != acc_t(0)) return std::nullopt;
    }
  }
  return s;
}

// A·S for S = s·I (A (n, K), fresh and contiguous): s·A, except the rows whose `row_check` value is not finite
// (a row's squared norm or sum: inf or NaN whenever one of its entries is), which take the GEMM with
// `gemm_operand` (S, or Sᵀ) so that inf·0 = NaN spreads over the row as the GEMM spreads it
template <typename acc_t>
Tensor times_scaled_identity(const Tensor& a, acc_t s, const Tensor& gemm_operand, const acc_t* row_check) {
  Tensor out = a.mul(s).contiguous();
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < a.size(0); ++i) {
    if (!std::isfinite(row_check[i])) rows.push_back(i);
  }
  if (!rows.empty()) {
    const Tensor index = at::tensor(rows, at::TensorOptions().dtype(at::kLong));
    out.index_copy_(0, index, at::mm(a.index_select(0, index), gemm_operand));
  }
  return out;
}

// The clamped-expansion geometry in ACC: upcast operands (views when already ACC), the norms, and the
// row-chunked GEMM. The features' row norms and the center norms are ATen reductions of the upcast operands,
// the reference's own expressions.
template <typename acc_t>
struct Geometry {
  Tensor xa, ma, xn, mn;
  int64_t B, K, D;
  // the norms' data, read once here: Tensor::const_data_ptr checks the dtype and storage on every call, which
  // cost more than the row itself when K is small
  const acc_t* XN;
  const acc_t* MN;
  const acc_t* XA;
  const acc_t* MA;
  // s when the centers are s·I (CAC's anchors): the cross term is then s·x, no GEMM
  std::optional<acc_t> identity;

  Geometry(const Tensor& x, const Tensor& centers, at::ScalarType acc) {
    xa = in_dtype(x, acc);
    ma = in_dtype(centers, acc);
    // the reference's pow(2).sum(1); contiguous squares go into a reused buffer (same ops, same layout, same bits)
    if (xa.is_contiguous()) {
      Tensor squares = scratch(SCRATCH_SQUARES, xa.sizes(), acc);
      xn = at::pow_out(squares, xa, 2).sum(1).contiguous();
    } else {
      xn = xa.pow(2).sum(1).contiguous();  // pow keeps xa's layout, and the sum's order follows it
    }
    mn = ma.pow(2).sum(1).contiguous();
    B = x.size(0);
    K = centers.size(0);
    D = x.size(1);
    XN = xn.const_data_ptr<acc_t>();
    MN = mn.const_data_ptr<acc_t>();
    XA = xa.const_data_ptr<acc_t>();
    MA = ma.const_data_ptr<acc_t>();
    identity = scaled_identity<acc_t>(ma);
  }

  // rows [r0, r0 + n) of x·mᵀ, (n, K) contiguous, fresh (the caller may overwrite it)
  Tensor cross(int64_t r0, int64_t n) const {
    if (identity) return times_scaled_identity<acc_t>(xa.narrow(0, r0, n), *identity, ma.t(), XN + r0);
    return at::mm(xa.narrow(0, r0, n), ma.t()).contiguous();
  }

  // raw_i· = (xn_i + mn_·) − 2·cross_i·, written over the cross row
  void raw_row(int64_t i, acc_t* row) const {
    using Vec = at::vec::Vectorized<acc_t>;
    const acc_t xs = XN[i];
    const Vec xi(xs);
    const Vec two(acc_t(2));
    int64_t c = 0;
    for (; c + Vec::size() <= K; c += Vec::size()) {
      ((xi + Vec::loadu(MN + c)) - two * Vec::loadu(row + c)).store(row + c);
    }
    for (; c < K; ++c) row[c] = (xs + MN[c]) - acc_t(2) * row[c];
  }
};

int64_t chunk_rows(int64_t block_b, int64_t K) {
  return block_b > 0 ? block_b : std::max<int64_t>(1, CHUNK_ELEMENTS / std::max<int64_t>(K, 1));
}

int64_t grain(int64_t K, int64_t D = 0) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(K + D, 1));
}

// ---------------------------------------------------------------------------------------------
// distances
// ---------------------------------------------------------------------------------------------

// One center (DeepSVDD/SAD) and rows of at least one vector: the cross term is a matrix-vector product, which
// MKL's sgemm ran at a fraction of the bandwidth (118 us for 4096 x 128 fp32 on this EPYC, against one read of
// 2 MiB), and the norms' pow(2).sum(1) writes a (B, D) temporary. One pass over each row forms ‖x_i‖² and
// ⟨x_i, μ⟩ together instead. Its summation order is ours, not the GEMM's: these distances equal the reference's
// within rounding, not bitwise. Narrower rows keep the GEMM and its bits (the contract's cancellation cases).
template <typename acc_t>
bool takes_one_center_pass(int64_t K, int64_t D) {
  return K == 1 && D >= at::vec::Vectorized<acc_t>::size();
}

template <typename acc_t>
struct OneCenter {
  Tensor xa, ma;
  const acc_t* X;
  const acc_t* M;
  int64_t sx0, sx1, D;
  acc_t mn;  // ‖μ‖², the reference's own expression

  OneCenter(const Tensor& x, const Tensor& centers, at::ScalarType acc) {
    xa = in_dtype(x, acc);
    ma = in_dtype(centers, acc).contiguous();
    X = xa.const_data_ptr<acc_t>();
    M = ma.const_data_ptr<acc_t>();
    sx0 = xa.stride(0);
    sx1 = xa.stride(1);
    D = xa.size(1);
    mn = ma.pow(2).sum(1).item<acc_t>();
  }

  // raw_i = (‖x_i‖² + ‖μ‖²) − 2·⟨x_i, μ⟩
  acc_t raw(int64_t i) const {
    using Vec = at::vec::Vectorized<acc_t>;
    const acc_t* row = X + i * sx0;
    acc_t norm = 0, dot = 0;
    if (sx1 == 1) {
      Vec vn(acc_t(0)), vd(acc_t(0));
      int64_t d = 0;
      for (; d + Vec::size() <= D; d += Vec::size()) {
        const Vec a = Vec::loadu(row + d);
        vn = at::vec::fmadd(a, a, vn);
        vd = at::vec::fmadd(a, Vec::loadu(M + d), vd);
      }
      if (d < D) {
        const Vec a = Vec::loadu(row + d, D - d);  // zero-filled lanes add nothing
        vn = at::vec::fmadd(a, a, vn);
        vd = at::vec::fmadd(a, Vec::loadu(M + d, D - d), vd);
      }
      norm = hsum(vn);
      dot = hsum(vd);
    } else {
      for (int64_t d = 0; d < D; ++d) {
        const acc_t a = row[d * sx1];
        norm += a * a;
        dot += a * M[d];
      }
    }
    return (norm + mn) - acc_t(2) * dot;
  }
};


Tensor cpu_center_sq_distances(
    const Tensor& x,
    const Tensor& centers,
    at::ScalarType out_dtype,
    bool tf32,
    int64_t block_b,
    int64_t block_k,
    int64_t block_d) {
  check_features(x, centers, "cpu_center_sq_distances");
  const auto acc = acc_of(x, centers);
  if (x.size(0) == 0 || centers.size(0) == 0) return at::empty({x.size(0), centers.size(0)}, x.options().dtype(out_dtype));
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(acc, "cpu_center_sq_distances", [&] {
    using acc_t = scalar_t;
    using Vec = at::vec::Vectorized<acc_t>;
    if (takes_one_center_pass<acc_t>(centers.size(0), x.size(1))) {
      const OneCenter<acc_t> one(x, centers, acc);
      out = at::empty({x.size(0), 1}, x.options().dtype(acc));
      acc_t* O = out.mutable_data_ptr<acc_t>();
      at::parallel_for(0, x.size(0), grain(0, one.D), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) O[i] = std::max(one.raw(i), acc_t(0));
      });
      return;
    }
    const Geometry<acc_t> g(x, centers, acc);
    const int64_t K = g.K;
    // one GEMM per chunk of rows (the backward recomputes a chunk with the same call: bitwise these values);
    // one chunk (B·K up to CHUNK_ELEMENTS) is the whole output, clamped in place
    const int64_t rows = chunk_rows(block_b, K);
    out = rows >= g.B ? g.cross(0, g.B) : at::empty({g.B, K}, x.options().dtype(acc));
    acc_t* O = out.mutable_data_ptr<acc_t>();
    for (int64_t r0 = 0; r0 < g.B; r0 += rows) {
      const int64_t n = std::min(rows, g.B - r0);
      if (rows < g.B) out.narrow(0, r0, n).copy_(g.cross(r0, n));
      at::parallel_for(r0, r0 + n, grain(K), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) g.raw_row(i, O + i * K);
        // the clamp over the rows as one flat run: a few centers (DeepSVDD: one) would otherwise cost a
        // partial-vector load and store per row
        acc_t* run = O + begin * K;
        at::vec::map([](Vec v) { return at::vec::maximum(v, Vec(acc_t(0))); }, run, run, (end - begin) * K);
      });
    }
  });
  return in_dtype(out, out_dtype);
}

// The gradient products dX = 2·(rowsum(G)⊙X − G·M) and dM = 2·(colsum(G)⊙M − Gᵀ·X), shared by the distance op's
// backward and the one-call losses' eager backward. G is often sparse (CenterLoss's gradient reaches only each
// row's target column), so with at most one nonzero in SPARSE_DIVISOR entries the two products run over the
// nonzeros only, O(nnz·D) instead of two O(B·K·D) GEMMs (dM accumulated per thread, then summed); so do they with
// at most ROW_LOOP_MAX_CENTERS centers; otherwise two ATen GEMMs (at::mm) run, each followed by one in-place pass
// for the sum(G) term.
constexpr int64_t SPARSE_DIVISOR = 8;
// with this few centers the "GEMMs" are rank-K updates: the row loop does the same products in one pass over
// X, where a GEMM call would cost more than its few FLOPs (DeepSVDD/SAD: K = 1)
constexpr int64_t ROW_LOOP_MAX_CENTERS = 8;

// What the products read of G (B, K) besides G itself, gathered in the pass that writes or first reads G: each row's
// nonzeros (they pick the loops), and rowsum(G) (B,) and colsum(G) (K,) for the dense path's rank-one terms (two
// ATen reductions, two more passes over G, otherwise; ~100 us each inside the MCHAD step at 4096 x 100).
template <typename acc_t>
struct GradSummary {
  std::vector<int64_t> row_nnz;
  Tensor row_totals, col_totals;  // ACC; undefined where a later change to G made them stale (ATen sums G then)
  acc_t* rows = nullptr;
  acc_t* col_partials = nullptr;  // one K-row per thread, summed by finish()
  int64_t K = 0;

  GradSummary(int64_t B, int64_t K_, at::ScalarType acc) : row_nnz(B, 0), K(K_) {
    row_totals = at::empty({B}, at::TensorOptions().dtype(acc));
    col_totals = at::zeros({at::get_num_threads(), K}, at::TensorOptions().dtype(acc));
    rows = row_totals.mutable_data_ptr<acc_t>();
    col_partials = col_totals.mutable_data_ptr<acc_t>();
  }

  // this thread's column sums (K,): inside at::parallel_for only, read once per task
  acc_t* thread_cols() const {
    return col_partials + int64_t(at::get_thread_num()) * K;
  }

  // row i of G (contiguous, in L1 right after its write): its nonzeros, its sum, its entries added to `cols`
  // (thread_cols())
  void add_row(int64_t i, const acc_t* row, acc_t* cols) {
    using Vec = at::vec::Vectorized<acc_t>;
    int64_t nnz = 0, c = 0;
    acc_t sum = 0;
    if (K >= Vec::size()) {  // fewer centers (DeepSVDD: one) take the scalar loop alone: no horizontal sum
      Vec total(acc_t(0));
      for (; c + Vec::size() <= K; c += Vec::size()) {
        const Vec v = Vec::loadu(row + c);
        total = total + v;
        (Vec::loadu(cols + c) + v).store(cols + c);
        nnz += Vec::size() - __builtin_popcount(v.zero_mask());
      }
      sum = hsum(total);
    }
    for (; c < K; ++c) {
      sum += row[c];
      cols[c] += row[c];
      nnz += row[c] != acc_t(0);
    }
    rows[i] = sum;
    row_nnz[i] = nnz;
  }

  // after the pass: the threads' column sums added in thread order
  void finish() {
    col_totals = col_totals.sum(0);
  }

  void forget_totals() {
    row_totals = Tensor();
    col_totals = Tensor();
  }
};

// the summary of a G (B, K) contiguous in ACC that was written elsewhere (the loss backward's), one pass
template <typename acc_t>
GradSummary<acc_t> summarize(const Tensor& G) {
  const int64_t B = G.size(0), K = G.size(1);
  const acc_t* P = G.const_data_ptr<acc_t>();
  GradSummary<acc_t> summary(B, K, G.scalar_type());
  at::parallel_for(0, B, grain(K), [&](int64_t begin, int64_t end) {
    acc_t* cols = summary.thread_cols();
    for (int64_t i = begin; i < end; ++i) summary.add_row(i, P + i * K, cols);
  });
  summary.finish();
  return summary;
}

// the products from G (B, K), contiguous in ACC, and its summary; in the inputs' dtypes, a (0,) placeholder for an
// input that needs no gradient
template <typename acc_t>
std::tuple<Tensor, Tensor> gradient_products(
    const Tensor& G,
    const GradSummary<acc_t>& summary,
    const Tensor& x,
    const Tensor& centers,
    bool need_x,
    bool need_m) {
  const std::vector<int64_t>& row_nnz = summary.row_nnz;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t B = G.size(0), K = G.size(1), D = x.size(1);
  const acc_t* O = G.const_data_ptr<acc_t>();
  const auto acc = G.scalar_type();
  Tensor grad_x = at::empty({0}, x.options()), grad_m = at::empty({0}, centers.options());
  const Tensor xa = in_dtype(x, acc).contiguous();
  const Tensor ma = in_dtype(centers, acc).contiguous();
  int64_t nnz = 0;
  for (int64_t v : row_nnz) nnz += v;
  if (nnz * SPARSE_DIVISOR > B * K && K > ROW_LOOP_MAX_CENTERS) {
    // the GEMM into a fresh output, then 2·(sum(G)⊙operand − product) in place, one pass: addmm would first
    // copy a (B, D) rowsum(G)⊙X temporary into its output (two more passes and an allocation)
    auto gemm_then_rank_one = [&](Tensor& product, const Tensor& operand, const Tensor& totals) {
      acc_t* P = product.mutable_data_ptr<acc_t>();
      const acc_t* A = operand.const_data_ptr<acc_t>();
      const acc_t* T = totals.const_data_ptr<acc_t>();
      at::parallel_for(0, product.size(0), grain(D), [&](int64_t begin, int64_t end) {
        const Vec two(acc_t(2));
        for (int64_t r = begin; r < end; ++r) {
          const Vec scale(acc_t(2) * T[r]);
          at::vec::map2(
              [scale, two](Vec p, Vec a) { return scale * a - two * p; }, P + r * D, P + r * D, A + r * D, D);
        }
      });
    };
    if (need_x) {
      const Tensor totals = summary.row_totals.defined() ? summary.row_totals : G.sum(1);
      const auto identity = scaled_identity<acc_t>(ma);
      Tensor product = identity ? times_scaled_identity<acc_t>(G, *identity, ma, totals.const_data_ptr<acc_t>())
                                : at::mm(G, ma).contiguous();  // (B, D)
      gemm_then_rank_one(product, xa, totals);
      grad_x = in_dtype(product, x.scalar_type());
    }
    if (need_m) {
      Tensor product = at::mm(G.t(), xa).contiguous();  // (K, D)
      gemm_then_rank_one(product, ma, summary.col_totals.defined() ? summary.col_totals : G.sum(0));
      grad_m = in_dtype(product, centers.scalar_type());
    }
    return {grad_x, grad_m};
  }
  const acc_t* X = xa.const_data_ptr<acc_t>();
  const acc_t* M = ma.const_data_ptr<acc_t>();
  if (need_x && takes_one_center_pass<acc_t>(K, D)) {
    // one center, rows of at least one vector (DeepSVDD/SAD): dX_i = 2·g_i·(x_i − μ), one pass per row; the
    // forward's one-center pass is within rounding of the reference too, not bitwise
    Tensor gx = at::empty({B, D}, x.options().dtype(acc));
    acc_t* GX = gx.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t* out = GX + i * D;
        if (O[i] == acc_t(0)) {
          std::fill(out, out + D, acc_t(0));  // the clamp or the loss stopped it: NaN features stay out
          continue;
        }
        const Vec scale(acc_t(2) * O[i]);
        at::vec::map2([scale](Vec xv, Vec m) { return scale * (xv - m); }, out, X + i * D, M, D);
      }
    });
    grad_x = in_dtype(gx, x.scalar_type());
  } else if (need_x) {
    // every row is written whole (no zero fill of the (B, D) output first): 2·rowsum(G)_i·x_i, then the
    // nonzeros' −2·g·m_c
    Tensor gx = at::empty({B, D}, x.options().dtype(acc));
    acc_t* GX = gx.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t* out = GX + i * D;
        if (row_nnz[i] == 0) {
          std::fill(out, out + D, acc_t(0));
          continue;
        }
        const acc_t* g_row = O + i * K;
        acc_t rowsum = 0;
        for (int64_t c = 0; c < K; ++c) rowsum += g_row[c];
        const Vec scale(acc_t(2) * rowsum);
        at::vec::map([scale](Vec xv) { return scale * xv; }, out, X + i * D, D);
        for (int64_t c = 0, seen = 0; c < K && seen < row_nnz[i]; ++c) {
          const acc_t gv = g_row[c];
          if (gv == acc_t(0)) continue;
          ++seen;
          // out −= 2·g·m_c
          at::vec::map2([gv](Vec o, Vec m) { return o - Vec(acc_t(2) * gv) * m; }, out, out, M + c * D, D);
        }
      }
    });
    grad_x = in_dtype(gx, x.scalar_type());
  }
  if (need_m) {
    // per-thread partial sums of Σ_i g_ic·x_i and colsum(G), then one reduction
    const int threads = at::get_num_threads();
    Tensor partial = at::zeros({threads, K, D + 1}, x.options().dtype(acc));
    acc_t* P = partial.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, grain(D), [&](int64_t begin, int64_t end) {
      acc_t* mine = P + int64_t(at::get_thread_num()) * K * (D + 1);
      for (int64_t i = begin; i < end; ++i) {
        if (row_nnz[i] == 0) continue;
        for (int64_t c = 0, seen = 0; c < K && seen < row_nnz[i]; ++c) {
          const acc_t gv = O[i * K + c];
          if (gv == acc_t(0)) continue;
          ++seen;
          acc_t* acc_row = mine + c * (D + 1);
          at::vec::map2([gv](Vec a, Vec xv) { return a + Vec(gv) * xv; }, acc_row, acc_row, X + i * D, D);
          acc_row[D] += gv;
        }
      }
    });
    // the threads' partials summed in thread order, then dM_c = 2·(colsum_c·m_c − Σ_i g_ic·x_i), one pass
    Tensor gm = at::empty({K, D}, centers.options().dtype(acc));
    acc_t* GM = gm.mutable_data_ptr<acc_t>();
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> total(D + 1);
      for (int64_t c = begin; c < end; ++c) {
        std::fill(total.begin(), total.end(), acc_t(0));
        for (int t = 0; t < threads; ++t) {
          const acc_t* part = P + (int64_t(t) * K + c) * (D + 1);
          for (int64_t d = 0; d <= D; ++d) total[d] += part[d];
        }
        for (int64_t d = 0; d < D; ++d) GM[c * D + d] = (total[D] * M[c * D + d] - total[d]) * acc_t(2);
      }
    });
    grad_m = in_dtype(gm, centers.scalar_type());
  }
  return {grad_x, grad_m};
}

// The distance op's backward: G = grad·1[raw >= 0], then the products.
//
// The clamp mask comes from the forward's clamped distances: d > 0 passes; a chunk of rows holding an exact
// d == 0 recomputes its raw rows with the forward's GEMM call (bitwise its values) to pass raw == 0 (as
// torch.clamp(min=0) does) and stop raw < 0. Chunks without a zero run no GEMM.
std::tuple<Tensor, Tensor> cpu_center_sq_distances_grads(
    const Tensor& grad,
    const Tensor& dist,
    const Tensor& x,
    const Tensor& centers,
    bool need_x,
    bool need_m,
    bool tf32,
    int64_t block_b,
    int64_t block_k,
    int64_t block_d) {
  check_features(x, centers, "cpu_center_sq_distances_grads");
  const auto acc = acc_of(x, centers);
  const int64_t B = x.size(0), K = centers.size(0), D = x.size(1);
  for (const Tensor* t : {&grad, &dist}) {
    TORCH_CHECK(
        t->dim() == 2 && t->size(0) == B && t->size(1) == K,
        "oodkernels::cpu_center_sq_distances_grads: grad and dist must have shape (",
        B,
        ", ",
        K,
        "), got ",
        t->sizes());
  }
  // an input that needs no gradient gets a (0,) placeholder
  Tensor grad_x = at::empty({0}, x.options()), grad_m = at::empty({0}, centers.options());
  if (B == 0 || K == 0 || D == 0 || !(need_x || need_m)) {
    if (need_x) grad_x = at::zeros_like(x, at::MemoryFormat::Contiguous);
    if (need_m) grad_m = at::zeros_like(centers, at::MemoryFormat::Contiguous);
    return {grad_x, grad_m};
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "cpu_center_sq_distances_grads", [&] {
    using acc_t = scalar_t;
    using Vec = at::vec::Vectorized<acc_t>;
    const Tensor go = in_dtype(grad, acc);  // any strides: read through them
    const Tensor d = in_dtype(dist, acc);  // exact: a clamped value is 0 or positive in every float dtype
    const acc_t* GI = go.const_data_ptr<acc_t>();
    const acc_t* DI = d.const_data_ptr<acc_t>();
    const int64_t s0 = go.stride(0), s1 = go.stride(1), t0 = d.stride(0), t1 = d.stride(1);
    std::vector<char> row_has_zero(B, 0), row_masked(B, 0);
    GradSummary<acc_t> summary(B, K, acc);
    std::vector<int64_t>& row_nnz = summary.row_nnz;
    // 1. the mask from d, one pass over the rows (vectorised where both rows are contiguous): each masked row
    // G_i· = grad_i·1[d_i· > 0] goes through a row buffer into the summary, and is only written out below if some
    // entry was masked (d = 0, or NaN): a training step's distances are positive, and G is then grad itself
    const bool dense_rows = s1 == 1 && t1 == 1;
    at::parallel_for(0, B, grain(K), [&](int64_t begin, int64_t end) {
      const Vec zero_vec(acc_t(0));
      acc_t* cols = summary.thread_cols();
      std::vector<acc_t> buffer(K);
      acc_t* row = buffer.data();
      for (int64_t i = begin; i < end; ++i) {
        char zero = 0, masked = 0;
        int64_t c = 0;
        if (dense_rows) {
          for (; c + Vec::size() <= K; c += Vec::size()) {
            const Vec dv = Vec::loadu(DI + i * t0 + c);
            const Vec passes = dv > zero_vec;
            Vec::blendv(zero_vec, Vec::loadu(GI + i * s0 + c), passes).store(row + c);
            zero |= dv.zero_mask() != 0;
            masked |= passes.zero_mask() != 0;  // a lane of `passes` is all ones or 0
          }
        }
        for (; c < K; ++c) {
          const acc_t dv = DI[i * t0 + c * t1];
          row[c] = dv > acc_t(0) ? GI[i * s0 + c * s1] : acc_t(0);
          zero |= dv == acc_t(0);
          masked |= !(dv > acc_t(0));
        }
        row_has_zero[i] = zero;
        row_masked[i] = masked;
        summary.add_row(i, row, cols);
      }
    });
    summary.finish();
    const bool any_masked = std::any_of(row_masked.begin(), row_masked.end(), [](char z) { return z != 0; });
    Tensor G = go;
    if (any_masked || !go.is_contiguous()) {
      G = scratch(SCRATCH_MASKED_GRAD, {B, K}, acc);  // read by the products below, never returned
      acc_t* O = G.mutable_data_ptr<acc_t>();
      at::parallel_for(0, B, grain(K), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          for (int64_t c = 0; c < K; ++c) O[i * K + c] = DI[i * t0 + c * t1] > acc_t(0) ? GI[i * s0 + c * s1] : acc_t(0);
        }
      });
    }
    acc_t* O = G.data_ptr<acc_t>();  // written below only where G is the masked copy (rows with a zero)
    // 2. the exact zeros: raw recomputed as the forward computed it (bitwise), row by row on the one-center pass,
    // else per forward chunk of rows that holds one
    const bool any_zero = std::any_of(row_has_zero.begin(), row_has_zero.end(), [](char z) { return z != 0; });
    if (any_zero) summary.forget_totals();  // the pass below may let gradient through at raw == 0
    if (any_zero && takes_one_center_pass<acc_t>(K, D)) {
      const OneCenter<acc_t> one(x, centers, acc);
      for (int64_t i = 0; i < B; ++i) {
        // torch.clamp(min=0) passes the gradient where raw >= 0 (at exactly 0 too)
        if (row_has_zero[i] && one.raw(i) >= acc_t(0)) {
          O[i] = GI[i * s0];
          row_nnz[i] += O[i] != acc_t(0);
        }
      }
    } else if (any_zero) {
      const Geometry<acc_t> geometry(x, centers, acc);
      const int64_t rows = chunk_rows(block_b, K);
      for (int64_t r0 = 0; r0 < B; r0 += rows) {
        const int64_t n = std::min(rows, B - r0);
        if (std::none_of(row_has_zero.begin() + r0, row_has_zero.begin() + r0 + n, [](char z) { return z != 0; })) {
          continue;
        }
        Tensor raw = geometry.cross(r0, n);
        acc_t* R = raw.mutable_data_ptr<acc_t>();
        at::parallel_for(r0, r0 + n, grain(K), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            if (!row_has_zero[i]) continue;
            acc_t* raw_row = R + (i - r0) * K;
            geometry.raw_row(i, raw_row);
            for (int64_t c = 0; c < K; ++c) {
              // torch.clamp(min=0) passes the gradient where raw >= 0 (at exactly 0 too)
              if (DI[i * t0 + c * t1] == acc_t(0) && raw_row[c] >= acc_t(0)) {
                O[i * K + c] = GI[i * s0 + c * s1];
                row_nnz[i] += O[i * K + c] != acc_t(0);
              }
            }
          }
        });
      }
    }
    // 3. the products
    std::tie(grad_x, grad_m) = gradient_products<acc_t>(G, summary, x, centers, need_x, need_m);
  });
  return {grad_x, grad_m};
}

// ---------------------------------------------------------------------------------------------
// distances to assigned centers (II's intra-class spread)
// ---------------------------------------------------------------------------------------------

void check_assigned(const Tensor& x, const Tensor& centers, const Tensor& index, const char* op) {
  check_features(x, centers, op);
  TORCH_CHECK(
      index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == x.size(0),
      "oodkernels::",
      op,
      ": expected a CPU int64 index of shape (",
      x.size(0),
      ",), got ",
      index.scalar_type(),
      " ",
      index.sizes());
  // an index >= K would read outside the centers: one scan of B integers rules it out (a negative index is a
  // row without a center)
  const Tensor idx = index.contiguous();
  const int64_t* I = idx.const_data_ptr<int64_t>();
  const int64_t K = centers.size(0);
  for (int64_t i = 0; i < index.size(0); ++i) {
    TORCH_CHECK(I[i] < K, "oodkernels::", op, ": index[", i, "] = ", I[i], " is not below ", K);
  }
}

// s_i = Σ_d (x_id − m_{index_i, d})², one pass over the rows, accumulated in ACC, returned in the promoted dtype; a
// row with a negative index has no center: s_i = 0, its features unread
Tensor cpu_assigned_sq_distances(const Tensor& x, const Tensor& centers, const Tensor& index) {
  check_assigned(x, centers, index, "cpu_assigned_sq_distances");
  const auto acc = acc_of(x, centers);
  const auto out_dtype = at::promote_types(x.scalar_type(), centers.scalar_type());
  const int64_t B = x.size(0), D = x.size(1);
  Tensor out = at::empty({B}, x.options().dtype(acc));
  if (B == 0) return out.to(out_dtype);
  AT_DISPATCH_FLOATING_TYPES(acc, "cpu_assigned_sq_distances", [&] {
    using acc_t = scalar_t;
    using Vec = at::vec::Vectorized<acc_t>;
    const Tensor xa = in_dtype(x, acc).contiguous(), ma = in_dtype(centers, acc).contiguous(), idx = index.contiguous();
    const acc_t* X = xa.const_data_ptr<acc_t>();
    const acc_t* M = ma.const_data_ptr<acc_t>();
    const int64_t* I = idx.const_data_ptr<int64_t>();
    acc_t* O = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        O[i] = D == 0 || I[i] < 0 ? acc_t(0)
                                  : at::vec::map2_reduce_all<acc_t>(
                            [](Vec a, Vec b) {
                              const Vec diff = a - b;
                              return diff * diff;
                            },
                            [](Vec a, Vec b) { return a + b; },
                            X + i * D,
                            M + I[i] * D,
                            D);
      }
    });
  });
  return in_dtype(out, out_dtype);
}

// dX_i = 2·g_i·(x_i − m_{index_i}); dM_c = −2·Σ_{i: index_i = c} g_i·(x_i − m_c), each class's rows summed in row
// order (a counting sort groups them; one class per task, so no partial sums and no atomics). A row without a
// center (negative index) gets dX_i = 0 exactly and adds nothing to dM.
std::tuple<Tensor, Tensor> cpu_assigned_sq_distances_grads(
    const Tensor& grad,
    const Tensor& x,
    const Tensor& centers,
    const Tensor& index,
    bool need_x,
    bool need_m) {
  check_assigned(x, centers, index, "cpu_assigned_sq_distances_grads");
  const int64_t B = x.size(0), K = centers.size(0), D = x.size(1);
  TORCH_CHECK(
      grad.dim() == 1 && grad.size(0) == B,
      "oodkernels::cpu_assigned_sq_distances_grads: grad must have shape (",
      B,
      ",), got ",
      grad.sizes());
  const auto acc = acc_of(x, centers);
  Tensor grad_x = at::empty({0}, x.options()), grad_m = at::empty({0}, centers.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "cpu_assigned_sq_distances_grads", [&] {
    using acc_t = scalar_t;
    using Vec = at::vec::Vectorized<acc_t>;
    const Tensor xa = in_dtype(x, acc).contiguous(), ma = in_dtype(centers, acc).contiguous(), idx = index.contiguous();
    const Tensor go = in_dtype(grad, acc).contiguous();
    const acc_t* X = xa.const_data_ptr<acc_t>();
    const acc_t* M = ma.const_data_ptr<acc_t>();
    const acc_t* G = go.const_data_ptr<acc_t>();
    const int64_t* I = idx.const_data_ptr<int64_t>();
    if (need_x) {
      Tensor gx = at::empty({B, D}, x.options().dtype(acc));
      acc_t* GX = gx.mutable_data_ptr<acc_t>();
      at::parallel_for(0, B, grain(D), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          if (I[i] < 0) {
            std::fill(GX + i * D, GX + (i + 1) * D, acc_t(0));
            continue;
          }
          const Vec scale(acc_t(2) * G[i]);
          at::vec::map2([scale](Vec a, Vec b) { return scale * (a - b); }, GX + i * D, X + i * D, M + I[i] * D, D);
        }
      });
      grad_x = in_dtype(gx, x.scalar_type());
    }
    if (need_m) {
      // rows grouped by class, in row order: starts[c] .. starts[c + 1] of `order`
      std::vector<int64_t> starts(K + 1, 0), order(B);
      for (int64_t i = 0; i < B; ++i) {
        if (I[i] >= 0) ++starts[I[i] + 1];
      }
      for (int64_t c = 0; c < K; ++c) starts[c + 1] += starts[c];
      std::vector<int64_t> next(starts.begin(), starts.end() - 1);
      for (int64_t i = 0; i < B; ++i) {
        if (I[i] >= 0) order[next[I[i]]++] = i;
      }
      Tensor gm = at::zeros({K, D}, centers.options().dtype(acc));
      acc_t* GM = gm.mutable_data_ptr<acc_t>();
      at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          acc_t* out = GM + c * D;
          const acc_t* m = M + c * D;
          for (int64_t r = starts[c]; r < starts[c + 1]; ++r) {
            const int64_t i = order[r];
            const Vec gv(G[i]);
            // out += g_i·(x_i − m_c)
            at::vec::map3([gv](Vec o, Vec a, Vec b) { return o + gv * (a - b); }, out, out, X + i * D, m, D);
          }
          at::vec::map([](Vec o) { return Vec(acc_t(-2)) * o; }, out, out, D);
        }
      });
      grad_m = in_dtype(gm, centers.scalar_type());
    }
  });
  return {grad_x, grad_m};
}

// ---------------------------------------------------------------------------------------------
// fused losses
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct LossParams {
  int64_t kind;
  acc_t p0, w_c, w_n, w_o, m_sq;
  int64_t K;
  bool features;  // raw rows are clamped expansions (else given distances, no clamp)
};

struct Label {
  bool is_id, is_ood, has_target;
  int64_t y_safe;
};

inline Label classify(int64_t y, int64_t K) {
  Label l;
  l.is_id = y >= 0;
  l.is_ood = y < 0;
  l.has_target = l.is_id && y < K;
  l.y_safe = l.has_target ? y : 0;
  return l;
}

// (clamp(relu(d_y − r), 1e-12, 1e12) + (K − 1)·1e-12, whether the gradient passes); no target: K·1e-12
template <typename acc_t>
inline std::pair<acc_t, bool> center_term(acc_t d_y, acc_t radius, bool has_target, int64_t K) {
  const acc_t lo = static_cast<acc_t>(CENTER_CLAMP_MIN), hi = static_cast<acc_t>(CENTER_CLAMP_MAX);
  const acc_t t = d_y - radius;
  const acc_t pulled = has_target ? std::min(std::max(t, lo), hi) : lo;
  return {pulled + static_cast<acc_t>(K - 1) * lo, has_target && t >= lo && t <= hi};
}

template <typename acc_t>
inline acc_t target_distance(acc_t raw_y, const Label& l, const LossParams<acc_t>& p) {
  const acc_t d_y = p.features ? std::max(raw_y, acc_t(0)) : raw_y;
  // a label >= K has no target column: NaN, as the reference's gather gives
  return (l.is_id && !l.has_target) ? std::numeric_limits<acc_t>::quiet_NaN() : d_y;
}

// fn(c, n, valid) for each V-wide chunk [c, c + n) of a row of K values: the full chunks, then the rest. With
// K >= V the rest is the row's last V values, read whole (no partial load); lanes that an earlier chunk already
// visited are cleared from `valid` when `Reduce` (sums must count each column once) and kept otherwise (an
// elementwise pass recomputes and stores the same values again). With K < V the one chunk is a partial load,
// `valid` holding the lanes below K.
template <typename acc_t, bool Reduce, typename Fn>
inline void for_each_chunk(int64_t K, Fn fn) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec every_lane = Vec(acc_t(0)) == Vec(acc_t(0));
  int64_t c = 0;
  for (; c + V <= K; c += V) fn(c, V, every_lane);
  if (c == K) return;
  if (K >= V) {
    const Vec lanes = Vec::arange(acc_t(0), acc_t(1)) + Vec(static_cast<acc_t>(K - V));
    fn(K - V, V, Reduce ? lanes >= Vec(static_cast<acc_t>(c)) : every_lane);
  } else {
    fn(c, K - c, Vec::arange(static_cast<acc_t>(c), acc_t(1)) < Vec(static_cast<acc_t>(K)));
  }
}

// the lanes of chunk [c, c + V) other than column y (every lane when y is outside the chunk)
template <typename acc_t>
inline at::vec::Vectorized<acc_t> lanes_other_than(int64_t y, int64_t c, const at::vec::Vectorized<acc_t>& valid) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (y < c || y >= c + Vec::size()) return valid;
  return valid & (Vec::arange(acc_t(0), acc_t(1)) != Vec(static_cast<acc_t>(y - c)));
}

// forward of one row from its raw distances `raw` (K values), up to its logarithm: the stats (s1, s2) and the
// value without its log term, which finish_rows adds for all rows at once (vectorised over the rows: one scalar
// log1p per row cost as much as the row's exps at K = 100). CAC: s1 = S = Σ_{c≠y} e_c, s2 = T, value pending
// α·d_y + log1p(S); MCHAD: s1 = Σ_c exp(−d_c − shift), s2 = shift, value pending + w_n·(lse + d_y); Center: the
// value.
template <typename acc_t>
inline void forward_row(
    const acc_t* raw, acc_t raw_y, const Label& l, const LossParams<acc_t>& p, acc_t* value, acc_t* s1, acc_t* s2) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t K = p.K;
  const acc_t d_y = target_distance(raw_y, l, p);
  const Vec zero(acc_t(0));
  auto dist = [&](int64_t c, int64_t n) {
    const Vec r = Vec::loadu(raw + c, n);
    return p.features ? at::vec::maximum(r, zero) : r;
  };
  *s1 = 0;
  *s2 = 0;
  *value = 0;
  if (p.kind == CAC) {
    const Vec vdy(d_y), cap(static_cast<acc_t>(CAC_EXPONENT_MAX));
    Vec s(acc_t(0)), t(acc_t(0));
    for_each_chunk<acc_t, true>(K, [&](int64_t c, int64_t n, const Vec& valid) {
      const Vec gap = vdy - dist(c, n);
      // the tuplet sum is over c ≠ y
      const Vec e = vec_exp<acc_t>(at::vec::minimum(gap, cap)) & lanes_other_than<acc_t>(l.y_safe, c, valid);
      s = s + e;
      t = t + (e & (gap <= cap));  // torch.clamp passes the gradient at the bound
    });
    *s1 = hsum(s);
    *s2 = hsum(t);
  } else if (p.kind == CENTER) {
    *value = l.is_id ? center_term(d_y, p.p0, l.has_target, K).first : acc_t(0);
  } else {
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    // lse(−d) in two passes over the row (it is in L1), and an OOD row's push Σ relu(m² − d²)
    Vec vmax(neg_inf), push(acc_t(0));
    const Vec msq(p.m_sq);
    auto first_pass = [&](auto with_push) {
      for_each_chunk<acc_t, true>(K, [&](int64_t c, int64_t n, const Vec& valid) {
        const Vec d = dist(c, n);
        vmax = at::vec::maximum(vmax, Vec::blendv(Vec(neg_inf), zero - d, valid));
        if constexpr (decltype(with_push)::value) push = push + (at::vec::maximum(msq - d * d, zero) & valid);
      });
    };
    if (l.is_ood) {
      first_pass(std::true_type{});
    } else {
      first_pass(std::false_type{});
    }
    const acc_t mx = hmax(vmax);
    const Vec shift(mx == neg_inf ? acc_t(0) : mx);
    Vec sum(acc_t(0));
    for_each_chunk<acc_t, true>(K, [&](int64_t c, int64_t n, const Vec& valid) {
      sum = sum + (vec_exp<acc_t>(zero - dist(c, n) - shift) & valid);
    });
    *s1 = hsum(sum);
    *s2 = mx;
    if (l.is_id) {
      *value = p.w_c * (center_term(d_y, p.p0, l.has_target, K).first / static_cast<acc_t>(K));
    } else if (l.is_ood) {
      *value = p.w_o * hsum(push);
    }
  }
}

// the forward's logarithms, for all rows at once (ATen's vectorised log1p / log over the (B,) sums), then each
// row's value and final stats: CAC value α·d_y + log1p(S); MCHAD lse = shift + log(Σ), stats [raw_y, lse, 0],
// value + w_n·(lse + d_y) for ID rows
template <typename acc_t>
void finish_rows(const LossParams<acc_t>& p, const int64_t* Y, int64_t sy, int64_t B, acc_t* values, Tensor& stats) {
  if (p.kind == CENTER) return;
  const Tensor logs = p.kind == CAC ? at::log1p(stats[1]) : at::log(stats[1]);
  const acc_t* L = logs.const_data_ptr<acc_t>();
  acc_t* S = stats.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Label l = classify(Y[i * sy], p.K);
      if (p.kind == CAC) {
        if (l.is_id) values[i] = p.p0 * target_distance(S[i], l, p) + L[i];
      } else {
        const acc_t lse = S[2 * B + i] + L[i];
        S[B + i] = lse;
        S[2 * B + i] = 0;
        if (l.is_id) values[i] = values[i] + p.w_n * (lse + target_distance(S[i], l, p));
      }
    }
  });
}

// backward of one row: G_i· = γ·∂ℓ/∂d (clamp-masked), written into `out` (K values, ACC): γ·(column term) for
// every column, γ·(column term + target term) for the target column
template <typename acc_t>
inline void backward_row(
    const acc_t* raw,
    acc_t gamma,
    acc_t raw_y,
    acc_t stat_1,
    acc_t t_cac,
    const Label& l,
    const LossParams<acc_t>& p,
    acc_t* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t K = p.K;
  const acc_t d_y = target_distance(raw_y, l, p);
  const bool pass_y = l.has_target && (!p.features || raw_y >= acc_t(0));
  const Vec zero(acc_t(0)), vgamma(gamma);
  // the target column's own column term, unscaled (its chunk records it)
  acc_t term_y = 0;
  auto store = [&](int64_t c, int64_t n, const Vec& term) {
    if (l.y_safe >= c && l.y_safe < c + V) {
      acc_t lanes[V];
      term.store(lanes);
      term_y = lanes[l.y_safe - c];
    }
    (vgamma * term).store(out + c, n);
  };
  acc_t target = 0;
  if (p.kind == CAC) {
    const acc_t one_plus_s = acc_t(1) + stat_1;
    const Vec vdy(d_y), cap(static_cast<acc_t>(CAC_EXPONENT_MAX));
    for_each_chunk<acc_t, false>(K, [&](int64_t c, int64_t n, const Vec& valid) {
      const Vec r = Vec::loadu(raw + c, n);
      const Vec d = p.features ? at::vec::maximum(r, zero) : r;
      const Vec gap = vdy - d;
      Vec mask = lanes_other_than<acc_t>(l.y_safe, c, valid) & (gap <= cap);
      if (p.features) mask = mask & (r >= zero);
      // −e/(1 + S) as a division, rounded as the Triton epilogue rounds it
      const Vec e = vec_exp<acc_t>(at::vec::minimum(gap, cap));
      const Vec term = l.is_id ? (zero - e) / Vec(one_plus_s) : zero;
      store(c, n, term & mask);
    });
    target = l.is_id ? p.p0 + t_cac / one_plus_s : acc_t(0);
  } else if (p.kind == CENTER) {
    for_each_chunk<acc_t, false>(K, [&](int64_t c, int64_t n, const Vec& valid) { store(c, n, zero); });
    target = (l.is_id && center_term(d_y, p.p0, l.has_target, K).second) ? acc_t(1) : acc_t(0);
  } else {
    const Vec vlse(stat_1), msq(p.m_sq), wn(p.w_n), wo2(acc_t(2) * p.w_o);
    for_each_chunk<acc_t, false>(K, [&](int64_t c, int64_t n, const Vec& valid) {
      const Vec r = Vec::loadu(raw + c, n);
      const Vec d = p.features ? at::vec::maximum(r, zero) : r;
      Vec term = zero;
      if (l.is_id) {
        term = zero - wn * vec_exp<acc_t>(zero - d - vlse);
      } else if (l.is_ood) {
        // w_o·(−2d)·1[m² − d² > 0]
        term = (zero - wo2 * d) & ((msq - d * d) > zero);
      }
      if (p.features) term = term & (r >= zero);
      store(c, n, term);
    });
    const bool passes = center_term(d_y, p.p0, l.has_target, K).second;
    target = l.is_id ? p.w_n + p.w_c * (passes ? acc_t(1) : acc_t(0)) / static_cast<acc_t>(K) : acc_t(0);
  }
  if (pass_y) out[l.y_safe] = gamma * (term_y + target);
}

void check_kind(int64_t kind, const char* op) {
  TORCH_CHECK(
      kind == CAC || kind == CENTER || kind == MCHAD,
      "oodkernels::",
      op,
      ": center kind ",
      kind,
      " is not implemented by the C++ backend (it knows 0 CAC, 1 Center, 2 MCHAD)");
}

struct LossInputs {
  bool features;
  int64_t B, K;
  at::ScalarType acc;
  Tensor y;  // int64 labels
};

LossInputs loss_inputs(
    const Tensor& x,
    const std::optional<Tensor>& centers,
    const Tensor& targets,
    const std::optional<Tensor>& margin,
    int64_t kind,
    const char* op) {
  check_kind(kind, op);
  LossInputs in;
  in.features = centers.has_value();
  if (in.features) {
    check_features(x, *centers, op);
  } else {
    TORCH_CHECK(
        x.device().is_cpu() && x.dim() == 2 && at::isFloatingType(x.scalar_type()),
        "oodkernels::",
        op,
        ": expected a floating-point CPU distance matrix (B, K), got ",
        x.sizes(),
        " ",
        x.scalar_type());
  }
  in.B = x.size(0);
  in.K = in.features ? centers->size(0) : x.size(1);
  in.acc = acc_of(x, centers);
  TORCH_CHECK(
      targets.dim() == 1 && targets.size(0) == in.B && !at::isFloatingType(targets.scalar_type()),
      "oodkernels::",
      op,
      ": expected integer targets of shape (",
      in.B,
      "), got ",
      targets.sizes(),
      " ",
      targets.scalar_type());
  TORCH_CHECK(
      kind != MCHAD || (margin.has_value() && margin->numel() >= 1),
      "oodkernels::",
      op,
      ": MCHAD needs a one-element margin tensor");
  in.y = targets.scalar_type() == at::kLong ? targets : targets.to(at::kLong);
  return in;
}

template <typename acc_t>
LossParams<acc_t> loss_params(
    const LossInputs& in, int64_t kind, double p0, double p1, double p2, double p3, const std::optional<Tensor>& margin) {
  LossParams<acc_t> p;
  p.kind = kind;
  // scalars rounded once to ACC at entry, as the Triton kernels do
  p.p0 = static_cast<acc_t>(p0);
  p.w_c = static_cast<acc_t>(p1);
  p.w_n = static_cast<acc_t>(p2);
  p.w_o = static_cast<acc_t>(p3);
  p.m_sq = 0;
  if (kind == MCHAD) {
    const acc_t m = margin->reshape({-1}).to(in.acc).const_data_ptr<acc_t>()[0];  // a CPU read, no device sync
    p.m_sq = m * m;
  }
  p.K = in.K;
  p.features = in.features;
  return p;
}

// Visit every row's raw distances: fn(i, raw_row) in at::parallel_for, rows chunked so that the GEMM scratch
// stays bounded. CENTER reads only the target column: `full_rows = false` skips the GEMM and hands fn a null row.
template <typename acc_t, typename Fn>
void for_each_raw_row(
    const Tensor& x,
    const std::optional<Tensor>& centers,
    const LossInputs& in,
    int64_t block_b,
    bool full_rows,
    Fn fn) {
  const int64_t B = in.B, K = in.K;
  if (in.features) {
    const Geometry<acc_t> g(x, *centers, in.acc);
    if (!full_rows) {
      at::parallel_for(0, B, grain(0, g.D), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) fn(i, static_cast<const acc_t*>(nullptr), &g);
      });
      return;
    }
    const int64_t rows = chunk_rows(block_b, K);
    for (int64_t r0 = 0; r0 < B; r0 += rows) {
      const int64_t n = std::min(rows, B - r0);
      Tensor cross = g.cross(r0, n);
      acc_t* C = cross.mutable_data_ptr<acc_t>();
      at::parallel_for(0, n, grain(K), [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          acc_t* row = C + j * K;
          g.raw_row(r0 + j, row);
          fn(r0 + j, static_cast<const acc_t*>(row), &g);
        }
      });
    }
  } else {
    // a distance matrix of any dtype and strides: contiguous ACC rows are read in place, others through one ACC
    // row buffer per thread
    const Tensor xd = in_dtype(x, in.acc);
    const acc_t* X = xd.const_data_ptr<acc_t>();
    const int64_t s0 = xd.stride(0), s1 = xd.stride(1);
    at::parallel_for(0, B, grain(K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(s1 == 1 ? 0 : std::max<int64_t>(K, 1));
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* row = X + i * s0;
        if (s1 != 1) {
          for (int64_t c = 0; c < K; ++c) buf[c] = X[i * s0 + c * s1];
          row = buf.data();
        }
        fn(i, row, static_cast<const Geometry<acc_t>*>(nullptr));
      }
    });
  }
}

// raw_iy of one row: from its raw row, else (CENTER) one dot product ‖x_i‖² + ‖m_y‖² − 2·x_i·m_y;
// a row without a target column keeps ‖x_i‖² (features) or 0 (distances), as the Triton prologue does
template <typename acc_t>
acc_t raw_target(int64_t i, const acc_t* raw, const Geometry<acc_t>* g, const Label& l) {
  if (raw != nullptr) {
    if (l.has_target) return raw[l.y_safe];
    return g != nullptr ? g->XN[i] : acc_t(0);
  }
  const acc_t xn = g->XN[i];
  if (!l.has_target) return xn;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t D = g->D;
  const acc_t* XA = g->XA;
  const acc_t* MA = g->MA;
  const int64_t sx0 = g->xa.stride(0), sx1 = g->xa.stride(1), sm0 = g->ma.stride(0), sm1 = g->ma.stride(1);
  acc_t dot = 0;
  if (sx1 == 1 && sm1 == 1 && D > 0) {
    dot = at::vec::map2_reduce_all<acc_t>(
        [](Vec a, Vec b) { return a * b; },
        [](Vec a, Vec b) { return a + b; },
        XA + i * sx0,
        MA + l.y_safe * sm0,
        D);
  } else {
    for (int64_t d = 0; d < D; ++d) dot += XA[i * sx0 + d * sx1] * MA[l.y_safe * sm0 + d * sm1];
  }
  return (xn + g->MN[l.y_safe]) - acc_t(2) * dot;
}

std::tuple<Tensor, Tensor> cpu_center_loss_fwd(
    const Tensor& x,
    const std::optional<Tensor>& centers,
    const Tensor& targets,
    const std::optional<Tensor>& margin,
    int64_t kind,
    double p0,
    double p1,
    double p2,
    double p3,
    bool tf32,
    int64_t block_b,
    int64_t block_k,
    int64_t block_d) {
  const LossInputs in = loss_inputs(x, centers, targets, margin, kind, "cpu_center_loss_fwd");
  Tensor values = at::empty({in.B}, x.options().dtype(in.acc));
  Tensor stats = at::empty({N_STATS, in.B}, x.options().dtype(in.acc));
  if (in.B == 0) return {values, stats};
  AT_DISPATCH_FLOATING_TYPES(in.acc, "cpu_center_loss_fwd", [&] {
    using acc_t = scalar_t;
    const LossParams<acc_t> p = loss_params<acc_t>(in, kind, p0, p1, p2, p3, margin);
    const int64_t* Y = in.y.const_data_ptr<int64_t>();
    const int64_t sy = in.y.stride(0), B = in.B;
    acc_t* Vl = values.mutable_data_ptr<acc_t>();
    acc_t* S = stats.mutable_data_ptr<acc_t>();
    for_each_raw_row<acc_t>(x, centers, in, block_b, kind != CENTER, [&](int64_t i, const acc_t* raw, auto g) {
      const Label l = classify(Y[i * sy], in.K);
      const acc_t raw_y = raw_target<acc_t>(i, raw, g, l);
      acc_t value, s1, s2;
      forward_row<acc_t>(raw, raw_y, l, p, &value, &s1, &s2);
      Vl[i] = value;
      S[i] = raw_y;
      S[B + i] = s1;
      S[2 * B + i] = s2;
    });
    finish_rows<acc_t>(p, Y, sy, B, Vl, stats);
  });
  return {values, stats};
}

Tensor cpu_center_loss_bwd(
    const Tensor& grad_values,
    const Tensor& x,
    const std::optional<Tensor>& centers,
    const Tensor& targets,
    const std::optional<Tensor>& margin,
    const Tensor& stats,
    int64_t kind,
    double p0,
    double p1,
    double p2,
    double p3,
    bool tf32,
    int64_t block_b,
    int64_t block_k,
    int64_t block_d) {
  const LossInputs in = loss_inputs(x, centers, targets, margin, kind, "cpu_center_loss_bwd");
  TORCH_CHECK(
      stats.dim() == 2 && stats.size(0) == N_STATS && stats.size(1) == in.B,
      "oodkernels::cpu_center_loss_bwd: stats have shape ",
      stats.sizes(),
      ", expected (3, ",
      in.B,
      ")");
  TORCH_CHECK(
      grad_values.numel() == in.B,
      "oodkernels::cpu_center_loss_bwd: grad_values has ",
      grad_values.numel(),
      " elements, expected ",
      in.B);
  const int64_t B = in.B, K = in.K;
  Tensor grad = at::empty({B, K}, x.options().dtype(in.acc));
  if (B == 0 || K == 0) return in.features ? grad : in_dtype(grad, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(in.acc, "cpu_center_loss_bwd", [&] {
    using acc_t = scalar_t;
    const LossParams<acc_t> p = loss_params<acc_t>(in, kind, p0, p1, p2, p3, margin);
    const int64_t* Y = in.y.const_data_ptr<int64_t>();
    const int64_t sy = in.y.stride(0);
    const Tensor st = in_dtype(stats, in.acc).contiguous();
    const acc_t* S = st.const_data_ptr<acc_t>();
    const Tensor gv = in_dtype(grad_values, in.acc);
    const acc_t* GV = gv.const_data_ptr<acc_t>();
    const int64_t sg = gv.dim() ? gv.stride(0) : 0;
    acc_t* G = grad.mutable_data_ptr<acc_t>();
    // CENTER's G lives in the target column alone: no distance row is needed (and no GEMM)
    for_each_raw_row<acc_t>(x, centers, in, block_b, kind != CENTER, [&](int64_t i, const acc_t* raw, auto g) {
      const Label l = classify(Y[i * sy], K);
      backward_row<acc_t>(raw, GV[i * sg], S[i], S[B + i], S[2 * B + i], l, p, G + i * K);
    });
  });
  return in.features ? grad : in_dtype(grad, x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// eager steps: each op with its backward as one C++ autograd function
// ---------------------------------------------------------------------------------------------
//
// Eager calls on CPU tensors (ops/center_ops.py: run_sq_distances, run_loss_values, run_assigned_sq_distances)
// take these instead of the custom ops: the same C++ operators, one dispatcher call per direction and no Python
// autograd layer. At (4096, 100) the custom op's Python dispatch and generated autograd wrapper cost about as
// much as the loss kernel itself. The custom ops stay what torch.compile, opcheck and fake tensors see.
//
// Under create_graph the backward calls the custom backward op through the dispatcher instead, whose own
// backward raises the fused kernels' double-backward error, as every other fused center call does.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::IValue optional_ivalue(const Tensor& t) {
  return t.defined() ? c10::IValue(t) : c10::IValue();
}

std::optional<Tensor> optional_tensor(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

std::vector<c10::IValue> call_boxed(const char* name, std::vector<c10::IValue> stack) {
  const auto& op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&stack);
  return stack;
}

// a (0,) placeholder of the ops means "no gradient": undefined for autograd
Tensor defined_if(bool needed, const Tensor& t) {
  return needed ? t : Tensor();
}

class SqDistancesStep : public torch::autograd::Function<SqDistancesStep> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& x,
      const Tensor& centers,
      at::ScalarType out_dtype,
      bool tf32,
      int64_t block_b,
      int64_t block_k,
      int64_t block_d) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = cpu_center_sq_distances(x, centers, out_dtype, tf32, block_b, block_k, block_d);
    // the output tells the backward where the clamp was active
    ctx->save_for_backward({x, centers, out});
    ctx->saved_data["tf32"] = tf32;
    ctx->saved_data["blocks"] = std::vector<int64_t>{block_b, block_k, block_d};
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    const bool need_x = ctx->needs_input_grad(0), need_m = ctx->needs_input_grad(1);
    if (!grads[0].defined() || !(need_x || need_m)) return out;
    const auto saved = ctx->get_saved_variables();
    const bool tf32 = ctx->saved_data["tf32"].toBool();
    const auto blocks = ctx->saved_data["blocks"].toIntVector();
    Tensor grad_x, grad_m;
    if (at::GradMode::is_enabled()) {
      auto stack = call_boxed(
          "oodkernels::center_sq_distances_grads",
          {grads[0], saved[2], saved[0], saved[1], need_x, need_m, tf32, blocks[0], blocks[1], blocks[2]});
      grad_x = stack[0].toTensor();
      grad_m = stack[1].toTensor();
    } else {
      std::tie(grad_x, grad_m) = cpu_center_sq_distances_grads(
          grads[0], saved[2], saved[0], saved[1], need_x, need_m, tf32, blocks[0], blocks[1], blocks[2]);
    }
    out[0] = defined_if(need_x, grad_x);
    out[1] = defined_if(need_m, grad_m);
    return out;
  }
};

Tensor cpu_center_sq_distances_step(
    const Tensor& x,
    const Tensor& centers,
    at::ScalarType out_dtype,
    bool tf32,
    int64_t block_b,
    int64_t block_k,
    int64_t block_d) {
  return SqDistancesStep::apply(x, centers, out_dtype, tf32, block_b, block_k, block_d)[0];
}

// The loss step's backward from the per-row gradient γ = ∂L/∂values (B,): the loss op's G = γ·∂ℓ/∂d, then the
// products dX, dM (features and centers), or G itself (a distance matrix). `saved` holds x, centers, targets,
// margin, stats (undefined: absent); slots 0 and 1 of the returned list get the gradients.
variable_list loss_step_grads(
    AutogradContext* ctx,
    const variable_list& saved,
    const Tensor& gamma,
    int64_t n_outputs) {
  variable_list out(n_outputs);
  const Tensor &x = saved[0], &centers = saved[1], &targets = saved[2], &margin = saved[3], &stats = saved[4];
  const bool need_x = ctx->needs_input_grad(0), need_m = centers.defined() && ctx->needs_input_grad(1);
  if (!gamma.defined() || !(need_x || need_m)) return out;
  const int64_t kind = ctx->saved_data["kind"].toInt();
  const auto p = ctx->saved_data["params"].toDoubleVector();
  const bool tf32 = ctx->saved_data["tf32"].toBool();
  const auto blocks = ctx->saved_data["blocks"].toIntVector();
  if (at::GradMode::is_enabled()) {
    // create_graph: G from the custom op, then the products from the distance op's backward op with nothing
    // clamped (all-positive distances): both custom ops raise the double-backward error in their own backward
    const Tensor g = call_boxed(
                         "oodkernels::center_loss_bwd",
                         {gamma, x, optional_ivalue(centers), targets, optional_ivalue(margin), stats, kind, p[0],
                          p[1], p[2], p[3], tf32, blocks[0], blocks[1], blocks[2]})[0]
                         .toTensor();
    if (!centers.defined()) {
      out[0] = g;
      return out;
    }
    auto stack = call_boxed(
        "oodkernels::center_sq_distances_grads",
        {g, at::ones_like(g), x, centers, need_x, need_m, tf32, blocks[0], blocks[1], blocks[2]});
    out[0] = defined_if(need_x, stack[0].toTensor());
    out[1] = defined_if(need_m, stack[1].toTensor());
    return out;
  }
  const Tensor g = cpu_center_loss_bwd(
      gamma, x, optional_tensor(centers), targets, optional_tensor(margin), stats, kind, p[0], p[1], p[2], p[3], tf32,
      blocks[0], blocks[1], blocks[2]);
  if (!centers.defined()) {
    out[0] = g;
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cpu_center_loss_step", [&] {
    auto [grad_x, grad_m] = gradient_products<scalar_t>(g, summarize<scalar_t>(g), x, centers, need_x, need_m);
    out[0] = defined_if(need_x, grad_x);
    out[1] = defined_if(need_m, grad_m);
  });
  return out;
}

void save_loss_step(
    AutogradContext* ctx,
    const Tensor& x,
    const std::optional<Tensor>& centers,
    const Tensor& targets,
    const std::optional<Tensor>& margin,
    const Tensor& stats,
    int64_t kind,
    std::vector<double> params,
    bool tf32,
    std::vector<int64_t> blocks) {
  ctx->save_for_backward({x, centers.value_or(Tensor()), targets, margin.value_or(Tensor()), stats});
  ctx->saved_data["kind"] = kind;
  ctx->saved_data["params"] = std::move(params);
  ctx->saved_data["tf32"] = tf32;
  ctx->saved_data["blocks"] = std::move(blocks);
}

class CenterLossStep : public torch::autograd::Function<CenterLossStep> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& x,
      const std::optional<Tensor>& centers,
      const Tensor& targets,
      const std::optional<Tensor>& margin,
      int64_t kind,
      double p0,
      double p1,
      double p2,
      double p3,
      bool tf32,
      int64_t block_b,
      int64_t block_k,
      int64_t block_d) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [values, stats] =
        cpu_center_loss_fwd(x, centers, targets, margin, kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d);
    save_loss_step(ctx, x, centers, targets, margin, stats, kind, {p0, p1, p2, p3}, tf32, {block_b, block_k, block_d});
    return {values};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return loss_step_grads(ctx, ctx->get_saved_variables(), grads[0], 13);
  }
};

Tensor cpu_center_loss_step(
    const Tensor& x,
    const std::optional<Tensor>& centers,
    const Tensor& targets,
    const std::optional<Tensor>& margin,
    int64_t kind,
    double p0,
    double p1,
    double p2,
    double p3,
    bool tf32,
    int64_t block_b,
    int64_t block_k,
    int64_t block_d) {
  return CenterLossStep::apply(x, centers, targets, margin, kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d)[0];
}

// The criteria's reduction of the per-row values v_i (LOSS_CONTRACT.md §3; ops/centers.py for a process group):
//
//     CAC      L = Σ_ID v / max(N_ID, 1)
//     CENTER   L = Σ_ID v / max(N_ID, 1) / max(K, 1)
//     MCHAD    L = Σ_ID v / max(N_ID, 1) + Σ_OOD v
//
// with ID the rows labelled >= 0. The sums run in fp64 over the ACC values. Each row's weight in L is its γ in the
// backward. totals (codes.TOTAL_*, fp64): Σ_ID v, Σ_OOD v, N_ID, N_OOD and the largest label >= 0 (-1 if none),
// what the data checks read.
struct RowWeights {
  double id, ood;
};

RowWeights row_weights(int64_t kind, double n_id, int64_t K) {
  const double id = 1.0 / std::max(n_id, 1.0) / (kind == CENTER ? double(std::max<int64_t>(K, 1)) : 1.0);
  return {id, kind == MCHAD ? 1.0 : 0.0};
}

constexpr int64_t N_TOTALS = 5;

class CenterLossReducedStep : public torch::autograd::Function<CenterLossReducedStep> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& x,
      const std::optional<Tensor>& centers,
      const Tensor& targets,
      const std::optional<Tensor>& margin,
      int64_t kind,
      double p0,
      double p1,
      double p2,
      double p3,
      at::ScalarType out_dtype,
      bool tf32,
      int64_t block_b,
      int64_t block_k,
      int64_t block_d) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [values, stats] =
        cpu_center_loss_fwd(x, centers, targets, margin, kind, p0, p1, p2, p3, tf32, block_b, block_k, block_d);
    const Tensor y = in_dtype(targets, at::kLong);
    const int64_t B = values.size(0), K = centers ? centers->size(0) : x.size(1), sy = y.stride(0);
    const int64_t* Y = y.const_data_ptr<int64_t>();
    std::array<double, N_TOTALS> t{0.0, 0.0, 0.0, 0.0, -1.0};
    AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "cpu_center_loss_reduced_step", [&] {
      const scalar_t* V = values.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < B; ++i) {
        const int64_t label = Y[i * sy];
        const bool id = label >= 0;
        t[id ? 0 : 1] += double(V[i]);
        t[id ? 2 : 3] += 1.0;
        if (id) t[4] = std::max(t[4], double(label));
      }
    });
    const RowWeights w = row_weights(kind, t[2], K);
    // an OOD row's value enters MCHAD only: CAC and Center drop it even when it is not finite
    const double loss = t[0] * w.id + (w.ood != 0.0 ? t[1] * w.ood : 0.0);
    Tensor totals = at::empty({N_TOTALS}, at::TensorOptions().dtype(at::kDouble));
    std::copy(t.begin(), t.end(), totals.mutable_data_ptr<double>());
    save_loss_step(ctx, x, centers, targets, margin, stats, kind, {p0, p1, p2, p3}, tf32, {block_b, block_k, block_d});
    ctx->saved_data["weights"] = std::vector<double>{w.id, w.ood};
    ctx->mark_non_differentiable({totals});
    // through ACC, as the reference rounds its mean, then the output dtype
    Tensor out = at::scalar_tensor(loss, values.options().dtype(at::kDouble)).to(values.scalar_type()).to(out_dtype);
    return {out, totals};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(15);
    const auto w = ctx->saved_data["weights"].toDoubleVector();
    const Tensor& targets = saved[2];
    const Tensor& stats = saved[4];
    const Tensor y = in_dtype(targets, at::kLong);
    const int64_t B = targets.size(0), sy = y.stride(0);
    const int64_t* Y = y.const_data_ptr<int64_t>();
    const double g = grads[0].item<double>();
    Tensor gamma = at::empty({B}, stats.options());
    AT_DISPATCH_FLOATING_TYPES(gamma.scalar_type(), "cpu_center_loss_reduced_step", [&] {
      const scalar_t id = scalar_t(g * w[0]), ood = scalar_t(g * w[1]);
      scalar_t* G = gamma.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < B; ++i) G[i] = Y[i * sy] >= 0 ? id : ood;
    });
    return loss_step_grads(ctx, saved, gamma, 15);
  }
};

std::tuple<Tensor, Tensor> cpu_center_loss_reduced_step(
    const Tensor& x,
    const std::optional<Tensor>& centers,
    const Tensor& targets,
    const std::optional<Tensor>& margin,
    int64_t kind,
    double p0,
    double p1,
    double p2,
    double p3,
    at::ScalarType out_dtype,
    bool tf32,
    int64_t block_b,
    int64_t block_k,
    int64_t block_d) {
  auto out = CenterLossReducedStep::apply(
      x, centers, targets, margin, kind, p0, p1, p2, p3, out_dtype, tf32, block_b, block_k, block_d);
  return {out[0], out[1]};
}

class AssignedSqDistancesStep : public torch::autograd::Function<AssignedSqDistancesStep> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& centers, const Tensor& index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, centers, index});
    return {cpu_assigned_sq_distances(x, centers, index)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(3);
    const bool need_x = ctx->needs_input_grad(0), need_m = ctx->needs_input_grad(1);
    if (!grads[0].defined() || !(need_x || need_m)) return out;
    const auto saved = ctx->get_saved_variables();
    Tensor grad_x, grad_m;
    if (at::GradMode::is_enabled()) {
      auto stack = call_boxed(
          "oodkernels::assigned_sq_distances_grads", {grads[0], saved[0], saved[1], saved[2], need_x, need_m});
      grad_x = stack[0].toTensor();
      grad_m = stack[1].toTensor();
    } else {
      std::tie(grad_x, grad_m) = cpu_assigned_sq_distances_grads(grads[0], saved[0], saved[1], saved[2], need_x, need_m);
    }
    out[0] = defined_if(need_x, grad_x);
    out[1] = defined_if(need_m, grad_m);
    return out;
  }
};

Tensor cpu_assigned_sq_distances_step(const Tensor& x, const Tensor& centers, const Tensor& index) {
  return AssignedSqDistancesStep::apply(x, centers, index)[0];
}

}  // namespace

// The public schemas are the Python custom ops (oodkernels/ops/center_ops.py), which dispatch here for CPU
// tensors; these implementation ops take the same arguments (tf32 and block_k/block_d are accepted and
// unused on the CPU; block_b > 0 sets the rows per GEMM chunk of the loss ops).
TORCH_LIBRARY_FRAGMENT(oodkernels, m) {
  m.def(
      "cpu_center_sq_distances(Tensor x, Tensor centers, ScalarType out_dtype, bool tf32, int block_b, "
      "int block_k, int block_d) -> Tensor");
  m.def(
      "cpu_center_sq_distances_grads(Tensor grad, Tensor dist, Tensor x, Tensor centers, bool need_x, bool need_m, "
      "bool tf32, int block_b, int block_k, int block_d) -> (Tensor, Tensor)");
  m.def(
      "cpu_center_loss_fwd(Tensor x, Tensor? centers, Tensor targets, Tensor? margin, int kind, float p0, "
      "float p1, float p2, float p3, bool tf32, int block_b, int block_k, int block_d) -> (Tensor, Tensor)");
  m.def(
      "cpu_center_loss_bwd(Tensor grad_values, Tensor x, Tensor? centers, Tensor targets, Tensor? margin, "
      "Tensor stats, int kind, float p0, float p1, float p2, float p3, bool tf32, int block_b, int block_k, "
      "int block_d) -> Tensor");
  m.def("cpu_assigned_sq_distances(Tensor x, Tensor centers, Tensor index) -> Tensor");
  m.def(
      "cpu_assigned_sq_distances_grads(Tensor grad, Tensor x, Tensor centers, Tensor index, bool need_x, "
      "bool need_m) -> (Tensor, Tensor)");
  m.def(
      "cpu_center_sq_distances_step(Tensor x, Tensor centers, ScalarType out_dtype, bool tf32, int block_b, "
      "int block_k, int block_d) -> Tensor");
  m.def(
      "cpu_center_loss_step(Tensor x, Tensor? centers, Tensor targets, Tensor? margin, int kind, float p0, "
      "float p1, float p2, float p3, bool tf32, int block_b, int block_k, int block_d) -> Tensor");
  m.def(
      "cpu_center_loss_reduced_step(Tensor x, Tensor? centers, Tensor targets, Tensor? margin, int kind, float p0, "
      "float p1, float p2, float p3, ScalarType out_dtype, bool tf32, int block_b, int block_k, int block_d) -> "
      "(Tensor, Tensor)");
  m.def("cpu_assigned_sq_distances_step(Tensor x, Tensor centers, Tensor index) -> Tensor");
}

TORCH_LIBRARY_IMPL(oodkernels, CPU, m) {
  m.impl("cpu_center_sq_distances", &cpu_center_sq_distances);
  m.impl("cpu_center_sq_distances_grads", &cpu_center_sq_distances_grads);
  m.impl("cpu_center_loss_fwd", &cpu_center_loss_fwd);
  m.impl("cpu_center_loss_bwd", &cpu_center_loss_bwd);
  m.impl("cpu_assigned_sq_distances", &cpu_assigned_sq_distances);
  m.impl("cpu_assigned_sq_distances_grads", &cpu_assigned_sq_distances_grads);
}

TORCH_LIBRARY_IMPL(oodkernels, Autograd, m) {
  m.impl("cpu_center_sq_distances_step", &cpu_center_sq_distances_step);
  m.impl("cpu_center_loss_step", &cpu_center_loss_step);
  m.impl("cpu_center_loss_reduced_step", &cpu_center_loss_reduced_step);
  m.impl("cpu_assigned_sq_distances_step", &cpu_assigned_sq_distances_step);
}
