// rnnkit native CPU kernels: the whole time loop of one layer direction, forward and backward.
//
// Python (functions.py, the rnnkit::native_* operators' implementations) computes the input
// projection of all steps in one product before the forward, and every weight gradient as one
// product over all steps after the backward (ops.py); what is left, and what lives here, is the
// part that must go step by step: per step one matrix product with the recurrent weights (ATen's
// BLAS) and one pass of gate math over the batch, vectorised with ATen's `Vectorized` and
// parallel over rows of the batch.
//
// Conventions shared by every kernel:
// - time-major buffers (T, N, ...), contiguous;
// - states live in one buffer (T + 1, N, H) in *time* order: the state entering step t is at
//   index t going forward and t + 1 going backward (`Steps::in`), the one leaving it at t + 1
//   and t (`Steps::out`); so the states entering every step form one (T, N, H) slice, which
//   the weight-gradient products read directly;
// - with lengths, step t is valid for row n iff t < lengths[n]; an invalid step holds the
//   state, outputs zero and receives zero gate gradient (the state gradient goes around it).
// The math is the spec's (shared/spec/cells.md); the derivatives are those of fused.py.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// ---- argument checks ------------------------------------------------------------------------
//
// The kernels read raw pointers at the shapes their comments give, so each entry point checks
// every tensor argument once, before any work (never inside the step loop): on the CPU, of the
// first argument's floating dtype (lengths: int64), contiguous, and of its exact shape.
// functions.py makes every tensor contiguous before the call; these checks are what stops any
// other caller (or a future slip there) from computing garbage or reading out of bounds.
class Arguments {
 public:
  // `first` fixes the dtype of the others: float32 or float64, with `dims` dimensions.
  Arguments(const char* kernel, const char* name, const Tensor& first, int64_t dims)
      : kernel_(kernel) {
    common(name, first);
    dtype_ = first.scalar_type();
    TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kDouble, kernel_, ": ", name,
                " must be float32 or float64, got ", dtype_);
    TORCH_CHECK(first.dim() == dims, kernel_, ": ", name, " must have ", dims,
                " dimensions, got shape ", first.sizes());
  }

  void operator()(const char* name, const Tensor& t, at::IntArrayRef shape) const {
    check(name, t, shape, dtype_);
  }
  void operator()(const char* name, const std::optional<Tensor>& t, at::IntArrayRef shape) const {
    if (t.has_value()) check(name, *t, shape, dtype_);
  }
  void lengths(const std::optional<Tensor>& t, int64_t batch) const {
    if (t.has_value()) check("lengths", *t, {batch}, at::kLong);
  }

 private:
  void common(const char* name, const Tensor& t) const {
    TORCH_CHECK(t.defined(), kernel_, ": ", name, " must be a tensor, got an undefined one");
    TORCH_CHECK(t.device().is_cpu(), kernel_, ": ", name, " must be on the CPU, got ",
                t.device());
    TORCH_CHECK(t.is_contiguous(), kernel_, ": ", name, " must be contiguous, got shape ",
                t.sizes(), " with strides ", t.strides());
  }
  void check(const char* name, const Tensor& t, at::IntArrayRef shape,
             at::ScalarType dtype) const {
    common(name, t);
    TORCH_CHECK(t.scalar_type() == dtype, kernel_, ": ", name, " must be ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes().equals(shape), kernel_, ": ", name, " must have shape ", shape,
                ", got ", t.sizes());
  }

  const char* kernel_;
  at::ScalarType dtype_;
};

// ---- pieces every family shares -------------------------------------------------------------

struct Steps {
  int64_t count;
  bool reverse;
  int64_t time(int64_t s) const { return reverse ? count - 1 - s : s; }
  int64_t in(int64_t t) const { return reverse ? t + 1 : t; }
  int64_t out(int64_t t) const { return reverse ? t : t + 1; }
  int64_t first_in() const { return reverse ? count : 0; }
  int64_t last_out() const { return reverse ? 0 : count; }
};

struct Validity {
  const int64_t* lengths;  // nullptr: every step of every row is valid
  bool operator()(int64_t t, int64_t n) const { return lengths == nullptr || t < lengths[n]; }
};

Validity validity_of(const std::optional<Tensor>& lengths) {
  return Validity{lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr};
}

// Rows of the batch in parallel, in chunks big enough that a thread has real work (~16k gate
// values); small batches run inline on the calling thread.
template <typename F>
void for_rows(int64_t rows, int64_t values_per_row, const F& body) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, values_per_row));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) body(n);
  });
}

// Units j of one row, a vector at a time; the tail is a partial vector (`count` lanes).
template <typename scalar_t, typename F>
inline void for_units(int64_t units, const F& body) {
  constexpr int64_t width = Vec<scalar_t>::size();
  int64_t j = 0;
  for (; j + width <= units; j += width) body(j, width);
  if (j < units) body(j, units - j);
}

template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}

// tanh from one exp: tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|), sign restored. A few
// times faster than Sleef's tanh (which dominated the forward step); the absolute error stays
// within a few units of the last place of 1 (cancellation near 0 costs relative, not absolute,
// accuracy), well inside the engines' agreement with torch.nn.
template <typename T>
inline Vec<T> fast_tanh(const Vec<T>& x) {
  const Vec<T> one(T(1));
  const Vec<T> e = (x.abs() * Vec<T>(T(-2))).exp();
  const Vec<T> magnitude = (one - e) / (one + e);
  return Vec<T>::blendv(magnitude, magnitude.neg(), x < Vec<T>(T(0)));
}

template <typename T>
inline Vec<T> sigmoid_grad(const Vec<T>& s) {  // σ' from σ
  return s * (Vec<T>(T(1)) - s);
}

template <typename T>
inline Vec<T> tanh_grad(const Vec<T>& y) {  // tanh' from tanh
  return Vec<T>(T(1)) - y * y;
}

template <typename T>
inline void copy_row(T* dst, const T* src, int64_t units) {
  std::memcpy(dst, src, sizeof(T) * units);
}

template <typename T>
inline void zero_row(T* dst, int64_t units) {
  std::fill(dst, dst + units, T(0));
}

// The kernels run inside the rnnkit::native_* operators (below autograd): nothing they do is
// recorded, so their ATen calls skip the autograd and view-tracking layers of the dispatcher
// (a third of a step's time at batch 1 otherwise).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// ---- the per-step matrix product ------------------------------------------------------------
//
// Every step multiplies a small block of states (N rows) by a fixed weight matrix: out (N, G)
// (+)= x (N, K) · B (K, G). ATen's mm costs microseconds per call before any arithmetic, more
// than a whole small product; so small steps use this register-blocked kernel, and large ones
// ATen's mm (`worth_blas` below). B is row-major (K, G): for h W^T it is W^T, made contiguous
// once per call; for dG W it is W itself.
//
// A tile is `Rows` rows of out by `Cols` vectors of columns, Rows * Cols = 8 to 12 accumulators
// that stay in registers while k runs over K: enough independent FMA chains to hide the FMA's
// latency, even at batch 1 (1 x 8). Column strips are the outer loop, so a strip of B stays in
// L1 while every row block passes over it and B is read from memory once per step; strips are
// split between threads when there is enough work.

// Rows of `cols` values, `ld` apart: a matrix, a step of a (T, N, W) buffer, or columns of one.
template <typename T>
struct Block {
  T* data;
  int64_t rows, cols, ld;
  Block columns(int64_t first, int64_t count) const { return {data + first, rows, count, ld}; }
  operator Block<const T>() const { return {data, rows, cols, ld}; }
};

template <typename T>
Block<T> matrix(const Tensor& m) {  // a contiguous 2-D tensor
  return {m.data_ptr<T>(), m.size(0), m.size(1), m.size(1)};
}

template <typename T>
Block<T> step_block(const Tensor& buffer, int64_t t) {  // step t of a contiguous (T, N, W)
  const int64_t width = buffer.size(2);
  return {buffer.data_ptr<T>() + t * buffer.size(1) * width, buffer.size(1), width, width};
}

template <typename T>
T* at_step(const Tensor& buffer, int64_t t) {
  return buffer.data_ptr<T>() + t * buffer.stride(0);
}

template <typename T, int Rows, int Cols>
inline void product_tile(const T* x, int64_t ldx, const T* b, int64_t ldb, T* out,
                         int64_t ldo, int64_t K, int64_t width, bool accumulate) {
  using V = Vec<T>;
  constexpr int64_t lanes = V::size();
  int64_t count[Cols];  // lanes of each column vector inside the matrix (the last strip is short)
  for (int c = 0; c < Cols; ++c) count[c] = std::clamp<int64_t>(width - c * lanes, 0, lanes);
  V acc[Rows][Cols];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) acc[r][c] = V(T(0));
  if (width == Cols * lanes) {
    for (int64_t k = 0; k < K; ++k) {
      V bk[Cols];
      for (int c = 0; c < Cols; ++c) bk[c] = V::loadu(b + k * ldb + c * lanes);
      for (int r = 0; r < Rows; ++r) {
        const V xr(x[r * ldx + k]);
        for (int c = 0; c < Cols; ++c) acc[r][c] = at::vec::fmadd(xr, bk[c], acc[r][c]);
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      V bk[Cols];
      for (int c = 0; c < Cols; ++c) {
        bk[c] = count[c] > 0 ? V::loadu(b + k * ldb + c * lanes, count[c]) : V(T(0));
      }
      for (int r = 0; r < Rows; ++r) {
        const V xr(x[r * ldx + k]);
        for (int c = 0; c < Cols; ++c) acc[r][c] = at::vec::fmadd(xr, bk[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int c = 0; c < Cols; ++c) {
      if (count[c] == 0) continue;
      T* o = out + r * ldo + c * lanes;
      if (accumulate) acc[r][c] = acc[r][c] + V::loadu(o, count[c]);
      acc[r][c].store(o, count[c]);
    }
  }
}

// All row blocks of out (Rows rows at a time, the last one shorter) for columns [j, j + width).
template <typename T, int Rows, int Cols>
inline void product_strip(Block<const T> x, Block<const T> b, Block<T> out, int64_t j,
                          int64_t width, bool accumulate) {
  int64_t n = 0;
  for (; n + Rows <= x.rows; n += Rows) {
    product_tile<T, Rows, Cols>(x.data + n * x.ld, x.ld, b.data + j, b.ld,
                                out.data + n * out.ld + j, out.ld, x.cols, width, accumulate);
  }
  const T* xs = x.data + n * x.ld;
  T* os = out.data + n * out.ld + j;
  switch (x.rows - n) {  // leftover rows, each still Cols vectors wide
    case 5: product_tile<T, 5, Cols>(xs, x.ld, b.data + j, b.ld, os, out.ld, x.cols, width, accumulate); break;
    case 4: product_tile<T, 4, Cols>(xs, x.ld, b.data + j, b.ld, os, out.ld, x.cols, width, accumulate); break;
    case 3: product_tile<T, 3, Cols>(xs, x.ld, b.data + j, b.ld, os, out.ld, x.cols, width, accumulate); break;
    case 2: product_tile<T, 2, Cols>(xs, x.ld, b.data + j, b.ld, os, out.ld, x.cols, width, accumulate); break;
    case 1: product_tile<T, 1, Cols>(xs, x.ld, b.data + j, b.ld, os, out.ld, x.cols, width, accumulate); break;
    default: break;
  }
}

template <typename T, int Rows, int Cols>
void product_with_tiles(Block<const T> x, Block<const T> b, Block<T> out, bool accumulate) {
  constexpr int64_t strip = Cols * Vec<T>::size();
  const int64_t strips = (b.cols + strip - 1) / strip;
  // Threads only when each gets at least ~64k multiply-adds: below that, waking them costs more.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, x.rows * x.cols * strip));
  at::parallel_for(0, strips, grain, [&](int64_t first, int64_t end) {
    for (int64_t s = first; s < end; ++s) {
      const int64_t j = s * strip;
      product_strip<T, Rows, Cols>(x, b, out, j, std::min(strip, b.cols - j), accumulate);
    }
  });
}

// Large step products go to ATen's mm (MKL on this build): past about a million multiply-adds
// per step its call overhead (a few microseconds) no longer matters, and its kernels, blocked for
// every cache level, beat the tiles here, which stream all of B from memory every step.
// Measured on this project's 2-core Intel Xeon VM (2026-11-25, benchmarks/step_products.py): at
// (T, N, H) = (50, 64, 512) an LSTM training step took 176 ms with mm against 335 ms on the tiles;
// below the threshold the two are level within noise, and far below it (batch 1, H = 128) the
// tiles win clearly. On an AMD EPYC earlier, mm was no better and no worse from 8 M
// multiply-adds on (docs/benchmarks.md). Tests move the threshold to run every product both ways.
int64_t blas_min_multiply_adds = int64_t(1) << 20;

void set_blas_min_multiply_adds(int64_t value) {
  TORCH_CHECK(value >= 0, "blas_min_multiply_adds must be >= 0, got ", value);
  blas_min_multiply_adds = value;
}

inline bool worth_blas(int64_t rows, int64_t inner, int64_t cols) {
  return rows * inner * cols >= blas_min_multiply_adds;
}

// out (+)= x · op(b) through ATen's mm on views of the buffers (no copy): b is (K, G) as stored,
// or the transpose of a stored (G, K) when `b_transposed`.
template <typename T>
Tensor view_of(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return torch::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                          torch::dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
void blas_product(Block<const T> x, const T* b, int64_t ldb, bool b_transposed, Block<T> out,
                  bool accumulate) {
  const Tensor xs = view_of<T>(x.data, x.rows, x.cols, x.ld);
  const Tensor bs = b_transposed ? view_of<T>(b, out.cols, x.cols, ldb).t()
                                 : view_of<T>(b, x.cols, out.cols, ldb);
  Tensor os = view_of<T>(out.data, out.rows, out.cols, out.ld);
  if (accumulate) {
    os.addmm_(xs, bs);
  } else {
    at::mm_out(os, xs, bs);
  }
}

// out (+)= x · b, with x (N, K), b (K, G), out (N, G).
template <typename T>
void step_product(Block<const T> x, Block<const T> b, Block<T> out, bool accumulate) {
  TORCH_CHECK(x.cols == b.rows && x.rows == out.rows && b.cols == out.cols,
              "step_product: shapes do not match");
  if (worth_blas(x.rows, x.cols, out.cols)) {
    return blas_product<T>(x, b.data, b.ld, /*b_transposed=*/false, out, accumulate);
  }
  switch (std::min<int64_t>(x.rows, 6)) {  // the tile with the most rows the batch fills
    case 1: return product_with_tiles<T, 1, 8>(x, b, out, accumulate);
    case 2: return product_with_tiles<T, 2, 6>(x, b, out, accumulate);
    case 3: return product_with_tiles<T, 3, 4>(x, b, out, accumulate);
    case 4: return product_with_tiles<T, 4, 3>(x, b, out, accumulate);
    default: return product_with_tiles<T, 6, 2>(x, b, out, accumulate);
  }
}

// out (+)= x · W^T with W row-major (G, K), as the forward needs it (h W_hh^T, m W_hr^T, the
// input projection): each output is a dot product of two contiguous rows, so no weight is ever
// transposed (a transposed copy of W_hh per call cost more than a whole step at batch 1).
// A tile holds Rows x Cols vector accumulators over k, summed across lanes at the end.
template <typename T, int Rows, int Cols>
inline void dot_tile(const T* x, int64_t ldx, const T* w, int64_t ldw, T* out, int64_t ldo,
                     int64_t K, int64_t cols, bool accumulate) {
  using V = Vec<T>;
  constexpr int64_t lanes = V::size();
  V acc[Rows][Cols];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) acc[r][c] = V(T(0));
  for (int64_t k = 0; k < K; k += lanes) {
    const int64_t count = std::min(lanes, K - k);
    V wk[Cols];
    for (int c = 0; c < Cols; ++c) wk[c] = c < cols ? V::loadu(w + c * ldw + k, count) : V(T(0));
    for (int r = 0; r < Rows; ++r) {
      const V xr = V::loadu(x + r * ldx + k, count);
      for (int c = 0; c < Cols; ++c) acc[r][c] = at::vec::fmadd(xr, wk[c], acc[r][c]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      alignas(64) T lane[lanes];
      acc[r][c].store(lane);
      T sum = T(0);
      for (int64_t l = 0; l < lanes; ++l) sum += lane[l];
      T& o = out[r * ldo + c];
      o = accumulate ? o + sum : sum;
    }
  }
}

template <typename T, int Rows, int Cols>
void dot_with_tiles(Block<const T> x, Block<const T> w, Block<T> out, bool accumulate) {
  const int64_t blocks = (w.rows + Cols - 1) / Cols;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, x.rows * x.cols * Cols));
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t end) {
    for (int64_t b = first; b < end; ++b) {
      const int64_t j = b * Cols, cols = std::min<int64_t>(Cols, w.rows - j);
      const T* wj = w.data + j * w.ld;
      int64_t n = 0;
      for (; n + Rows <= x.rows; n += Rows) {
        dot_tile<T, Rows, Cols>(x.data + n * x.ld, x.ld, wj, w.ld, out.data + n * out.ld + j,
                                out.ld, x.cols, cols, accumulate);
      }
      for (; n < x.rows; ++n) {  // leftover rows one at a time
        dot_tile<T, 1, Cols>(x.data + n * x.ld, x.ld, wj, w.ld, out.data + n * out.ld + j,
                             out.ld, x.cols, cols, accumulate);
      }
    }
  });
}

// out (+)= x · w^T, with x (N, K), w (G, K), out (N, G).
template <typename T>
void step_product_transposed(Block<const T> x, Block<const T> w, Block<T> out, bool accumulate) {
  TORCH_CHECK(x.cols == w.cols && x.rows == out.rows && w.rows == out.cols,
              "step_product_transposed: shapes do not match");
  if (worth_blas(x.rows, x.cols, out.cols)) {  // mm takes w^T as a view: no copy
    return blas_product<T>(x, w.data, w.ld, /*b_transposed=*/true, out, accumulate);
  }
  switch (std::min<int64_t>(x.rows, 3)) {
    case 1: return dot_with_tiles<T, 1, 8>(x, w, out, accumulate);
    case 2: return dot_with_tiles<T, 2, 6>(x, w, out, accumulate);
    default: return dot_with_tiles<T, 3, 4>(x, w, out, accumulate);
  }
}

// A weight W (G, K) that every step of a forward multiplies as x · W^T. Over many steps one
// transposed copy (K, G) pays for itself, since the broadcast kernel (step_product) is the
// faster one; for a step or two (streaming) the copy would cost more than the steps, so they
// use the dot-product kernel on W as it is. (Products large enough for mm ignore the layout:
// there the copy is one pass over W per call, small against the steps.)
constexpr int64_t kStepsWorthATranspose = 3;

class ForwardWeight {
 public:
  ForwardWeight(const Tensor& w, int64_t steps)
      : w_(w), transposed_(steps >= kStepsWorthATranspose ? w.t().contiguous() : Tensor()) {}

  template <typename T>
  void multiply(Block<const T> x, Block<T> out, bool accumulate) const {
    if (transposed_.defined()) {
      step_product<T>(x, matrix<T>(transposed_), out, accumulate);
    } else {
      step_product_transposed<T>(x, matrix<T>(w_), out, accumulate);
    }
  }

 private:
  Tensor w_, transposed_;
};

// The input projection when it is small (a streamed step): x · w^T + bias (+ second_bias), with
// x (T, N, K), w (G, K), bias and second_bias (G,), the second only with the first.
Tensor linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
              const std::optional<Tensor>& second_bias) {
  const Arguments check("linear", "x", x, 3);
  const int64_t T = x.size(0), N = x.size(1), K = x.size(2);
  TORCH_CHECK(w.dim() == 2, "linear: w must have 2 dimensions, got shape ", w.sizes());
  const int64_t G = w.size(0);
  check("w", w, {G, K});
  check("bias", bias, {G});
  check("second_bias", second_bias, {G});
  TORCH_CHECK(bias.has_value() || !second_bias.has_value(),
              "linear: second_bias needs bias, got second_bias without bias");
  const BelowAutograd below_autograd;
  const Tensor x2 = x.view({T * N, K});
  Tensor out = at::empty({T * N, G}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear", [&] {
    if (bias.has_value()) {
      const scalar_t* b = bias->data_ptr<scalar_t>();
      const scalar_t* b2 = second_bias.has_value() ? second_bias->data_ptr<scalar_t>() : nullptr;
      for (int64_t n = 0; n < out.size(0); ++n) {
        scalar_t* row = at_step<scalar_t>(out, n);
        for (int64_t j = 0; j < out.size(1); ++j) row[j] = b2 ? b[j] + b2[j] : b[j];
      }
    }
    step_product_transposed<scalar_t>(matrix<scalar_t>(x2), matrix<scalar_t>(w),
                                      matrix<scalar_t>(out), bias.has_value());
  });
  return out.view({T, N, G});
}

// The initial state into its place in a states buffer (a memcpy: no dispatch, no view).
void start_states(const Tensor& states, int64_t index, const Tensor& initial) {
  TORCH_CHECK(initial.is_contiguous(), "initial state must be contiguous");
  if (initial.numel() == 0) return;  // an empty batch: memcpy may not be given a null pointer
  std::memcpy(static_cast<char*>(states.data_ptr()) + index * states.stride(0) * states.element_size(),
              initial.data_ptr(), initial.numel() * initial.element_size());
}

Tensor states_buffer(int64_t steps, const Tensor& like_state) {
  return at::empty({steps + 1, like_state.size(0), like_state.size(1)}, like_state.options());
}

// Without lengths the output of step t is the state leaving it: the output is then a view of
// the states buffer (the kernels' two stores hit the same memory), which saves one (T, N, H)
// buffer of a training step's peak memory. With lengths it differs (zero past each end).
Tensor output_buffer(const Tensor& states, const Steps& steps,
                     const std::optional<Tensor>& lengths) {
  if (lengths.has_value()) {
    return at::empty({steps.count, states.size(1), states.size(2)}, states.options());
  }
  return states.narrow(0, steps.reverse ? 0 : 1, steps.count);
}

// ---- Elman RNN ------------------------------------------------------------------------------

// pre (T, N, H): x W_ih^T + b, overwritten with act(pre + h W_hh^T) of each step.
// Returns {output (T, N, H), states (T + 1, N, H)}.
std::vector<Tensor> rnn_forward(Tensor pre, const Tensor& h0, const Tensor& w_hh,
                                const std::optional<Tensor>& lengths, bool reverse, bool relu) {
  const Arguments check("rnn_forward", "pre", pre, 3);
  const int64_t T = pre.size(0), N = pre.size(1), H = pre.size(2);
  check("h0", h0, {N, H});
  check("w_hh", w_hh, {H, H});
  check.lengths(lengths, N);
  const BelowAutograd below_autograd;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor states = states_buffer(T, h0);
  start_states(states, steps.first_in(), h0);
  Tensor output = output_buffer(states, steps, lengths);
  const ForwardWeight w_hh_forward(w_hh, T);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "rnn_forward", [&] {
    using V = Vec<scalar_t>;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = steps.time(s);
      w_hh_forward.multiply<scalar_t>(step_block<scalar_t>(states, steps.in(t)),
                                      step_block<scalar_t>(pre, t), true);
      scalar_t* a_p = at_step<scalar_t>(pre, t);
      const scalar_t* h_p = at_step<scalar_t>(states, steps.in(t));
      scalar_t* h_new_p = at_step<scalar_t>(states, steps.out(t));
      scalar_t* out_p = at_step<scalar_t>(output, t);
      for_rows(N, H, [&](int64_t n) {
        scalar_t* a_n = a_p + n * H;
        if (!valid(t, n)) {
          copy_row(h_new_p + n * H, h_p + n * H, H);
          zero_row(out_p + n * H, H);
          return;
        }
        for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
          V v = V::loadu(a_n + j, k);
          v = relu ? at::vec::clamp_min(v, V(scalar_t(0))) : fast_tanh(v);
          v.store(a_n + j, k);
          v.store(h_new_p + n * H + j, k);
          v.store(out_p + n * H + j, k);
        });
      });
    }
  });
  return {output, states};
}

// raw (T, N, H): the activated values of rnn_forward. Returns {d_pre (T, N, H), d_h0 (N, H)}.
std::vector<Tensor> rnn_backward(const Tensor& d_output, const Tensor& d_h_n, const Tensor& raw,
                                 const Tensor& w_hh, const std::optional<Tensor>& lengths,
                                 bool reverse, bool relu) {
  const Arguments check("rnn_backward", "raw", raw, 3);
  const int64_t T = raw.size(0), N = raw.size(1), H = raw.size(2);
  check("d_output", d_output, {T, N, H});
  check("d_h_n", d_h_n, {N, H});
  check("w_hh", w_hh, {H, H});
  check.lengths(lengths, N);
  const BelowAutograd below_autograd;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor d_pre = at::empty_like(raw);
  Tensor d_h = d_h_n.clone(at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "rnn_backward", [&] {
    using V = Vec<scalar_t>;
    scalar_t* d_h_p = d_h.data_ptr<scalar_t>();
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = steps.time(s);
      const scalar_t* raw_p = at_step<scalar_t>(raw, t);
      const scalar_t* d_out_p = at_step<scalar_t>(d_output, t);
      scalar_t* d_pre_p = at_step<scalar_t>(d_pre, t);
      for_rows(N, H, [&](int64_t n) {
        const int64_t row = n * H;
        if (!valid(t, n)) {  // the state gradient skips the step
          zero_row(d_pre_p + row, H);
          return;
        }
        for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
          const V d = V::loadu(d_h_p + row + j, k) + V::loadu(d_out_p + row + j, k);
          const V y = V::loadu(raw_p + row + j, k);
          // relu's as torch's threshold_backward: the gradient passes unless y <= 0. So a NaN
          // y passes it on (y > 0 would stop it: native gave dx = 0 where torch.nn gives
          // values), and a NaN gradient where y <= 0 is zeroed: a select, never d * mask.
          const V d_pre_v = relu ? V::blendv(d, V(scalar_t(0)), y <= V(scalar_t(0)))
                                 : d * tanh_grad(y);
          d_pre_v.store(d_pre_p + row + j, k);
          V(scalar_t(0)).store(d_h_p + row + j, k);  // refilled by the product below
        });
      });
      step_product<scalar_t>(step_block<scalar_t>(d_pre, t), matrix<scalar_t>(w_hh),
                             matrix<scalar_t>(d_h), true);
    }
  });
  return {d_pre, d_h};
}

// ---- LSTM -----------------------------------------------------------------------------------

// gates (T, N, 4H): x W_ih^T + b_ih + b_hh, overwritten with the activated i, f, g, o.
// Optional projection w_hr (P, H) and peephole w_ch (3H,) in the order i, f, o.
// Returns {output (T, N, P), h_states (T + 1, N, P), c_states (T + 1, N, H), c_new (T, N, H)}
// where c_new is each step's new cell (for invalid rows: the held one).
std::vector<Tensor> lstm_forward(Tensor gates, const Tensor& h0, const Tensor& c0,
                                 const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                                 const std::optional<Tensor>& w_ch,
                                 const std::optional<Tensor>& lengths, bool reverse) {
  const Arguments check("lstm_forward", "gates", gates, 3);
  const int64_t T = gates.size(0), N = gates.size(1), H = gates.size(2) / 4;
  TORCH_CHECK(gates.size(2) == 4 * H, "lstm_forward: gates must have 4 * hidden columns, got ",
              gates.sizes());
  const int64_t P = w_hr.has_value() && w_hr->dim() == 2 ? w_hr->size(0) : H;
  check("h0", h0, {N, P});
  check("c0", c0, {N, H});
  check("w_hh", w_hh, {4 * H, P});
  check("w_hr", w_hr, {P, H});
  check("w_ch", w_ch, {3 * H});
  check.lengths(lengths, N);
  const BelowAutograd below_autograd;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  const bool projected = w_hr.has_value();
  Tensor h_states = states_buffer(T, h0);
  Tensor c_states = states_buffer(T, c0);
  Tensor output = output_buffer(h_states, steps, lengths);
  Tensor c_new = at::empty({T, N, H}, gates.options());
  start_states(h_states, steps.first_in(), h0);
  start_states(c_states, steps.first_in(), c0);
  const ForwardWeight w_hh_forward(w_hh, T);
  const std::optional<ForwardWeight> w_hr_forward =
      projected ? std::make_optional<ForwardWeight>(*w_hr, T) : std::nullopt;
  // With a projection the kernel writes m = o ⊙ tanh(c') here, and h' = m W_hr^T follows.
  Tensor m = projected ? at::zeros({N, H}, gates.options()) : Tensor();
  Tensor h_raw = projected ? at::empty({N, P}, gates.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_forward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* peep = w_ch.has_value() ? w_ch->data_ptr<scalar_t>() : nullptr;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = steps.time(s);
      w_hh_forward.multiply<scalar_t>(step_block<scalar_t>(h_states, steps.in(t)),
                                      step_block<scalar_t>(gates, t), true);
      scalar_t* a_p = at_step<scalar_t>(gates, t);
      const scalar_t* h_p = at_step<scalar_t>(h_states, steps.in(t));
      const scalar_t* c_p = at_step<scalar_t>(c_states, steps.in(t));
      scalar_t* h_new_p = at_step<scalar_t>(h_states, steps.out(t));
      scalar_t* c_held_p = at_step<scalar_t>(c_states, steps.out(t));
      scalar_t* c_new_p = at_step<scalar_t>(c_new, t);
      scalar_t* out_p = at_step<scalar_t>(output, t);
      scalar_t* m_p = projected ? m.data_ptr<scalar_t>() : out_p;
      for_rows(N, 4 * H, [&](int64_t n) {
        scalar_t* g_row = a_p + n * 4 * H;
        const int64_t row = n * H;
        if (!valid(t, n)) {
          copy_row(c_held_p + row, c_p + row, H);
          copy_row(c_new_p + row, c_p + row, H);
          if (projected) {
            zero_row(m_p + row, H);
          } else {
            copy_row(h_new_p + row, h_p + row, H);
            zero_row(out_p + row, H);
          }
          return;
        }
        for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
          const V c = V::loadu(c_p + row + j, k);
          V i_pre = V::loadu(g_row + j, k);
          V f_pre = V::loadu(g_row + H + j, k);
          V o_pre = V::loadu(g_row + 3 * H + j, k);
          if (peep != nullptr) {
            i_pre = i_pre + V::loadu(peep + j, k) * c;
            f_pre = f_pre + V::loadu(peep + H + j, k) * c;
          }
          const V i = sigmoid(i_pre), f = sigmoid(f_pre);
          const V g = fast_tanh(V::loadu(g_row + 2 * H + j, k));
          const V c_next = f * c + i * g;
          if (peep != nullptr) o_pre = o_pre + V::loadu(peep + 2 * H + j, k) * c_next;
          const V o = sigmoid(o_pre);
          const V h_next = o * fast_tanh(c_next);
          i.store(g_row + j, k);
          f.store(g_row + H + j, k);
          g.store(g_row + 2 * H + j, k);
          o.store(g_row + 3 * H + j, k);
          c_next.store(c_held_p + row + j, k);
          c_next.store(c_new_p + row + j, k);
          h_next.store(m_p + row + j, k);
          if (!projected) h_next.store(h_new_p + row + j, k);
        });
      });
      if (projected) {
        w_hr_forward->multiply<scalar_t>(matrix<scalar_t>(m), matrix<scalar_t>(h_raw), false);
        const scalar_t* h_raw_p = h_raw.data_ptr<scalar_t>();
        for (int64_t n = 0; n < N; ++n) {
          if (valid(t, n)) {
            copy_row(h_new_p + n * P, h_raw_p + n * P, P);
            copy_row(out_p + n * P, h_raw_p + n * P, P);
          } else {
            copy_row(h_new_p + n * P, h_p + n * P, P);
            zero_row(out_p + n * P, P);
          }
        }
      }
    }
  });
  return {output, h_states, c_states, c_new};
}

// Returns {d_gates (T, N, 4H) before the nonlinearities, d_h0 (N, P), d_c0 (N, H), d_w_hr}
// where d_w_hr (P, H) is defined only with a projection.
std::vector<Tensor> lstm_backward(const Tensor& d_output, const Tensor& d_h_n,
                                  const Tensor& d_c_n, const Tensor& gates,
                                  const Tensor& c_states, const Tensor& c_new, const Tensor& w_hh,
                                  const std::optional<Tensor>& w_hr,
                                  const std::optional<Tensor>& w_ch,
                                  const std::optional<Tensor>& lengths, bool reverse) {
  const Arguments check("lstm_backward", "gates", gates, 3);
  const int64_t T = gates.size(0), N = gates.size(1), H = gates.size(2) / 4;
  TORCH_CHECK(gates.size(2) == 4 * H, "lstm_backward: gates must have 4 * hidden columns, got ",
              gates.sizes());
  const int64_t P = w_hr.has_value() && w_hr->dim() == 2 ? w_hr->size(0) : H;
  check("d_output", d_output, {T, N, P});
  check("d_h_n", d_h_n, {N, P});
  check("d_c_n", d_c_n, {N, H});
  check("c_states", c_states, {T + 1, N, H});
  check("c_new", c_new, {T, N, H});
  check("w_hh", w_hh, {4 * H, P});
  check("w_hr", w_hr, {P, H});
  check("w_ch", w_ch, {3 * H});
  check.lengths(lengths, N);
  const BelowAutograd below_autograd;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  const bool projected = w_hr.has_value();
  Tensor d_gates = at::empty_like(gates);
  Tensor d_h = d_h_n.clone(at::MemoryFormat::Contiguous);
  Tensor d_c = d_c_n.clone(at::MemoryFormat::Contiguous);
  // With a projection: the gradient reaching each step's h' = m W_hr^T, m itself (recomputed
  // from o and c'), and the gradient of m; dW_hr is then one product over all steps.
  Tensor d_h_raw_all = projected ? at::empty({T, N, P}, gates.options()) : Tensor();
  Tensor m_all = projected ? at::empty({T, N, H}, gates.options()) : Tensor();
  Tensor d_m = projected ? at::empty({N, H}, gates.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_backward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* peep = w_ch.has_value() ? w_ch->data_ptr<scalar_t>() : nullptr;
    scalar_t* d_h_p = d_h.data_ptr<scalar_t>();
    scalar_t* d_c_p = d_c.data_ptr<scalar_t>();
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = steps.time(s);
      const scalar_t* d_out_p = at_step<scalar_t>(d_output, t);
      if (projected) {
        scalar_t* d_raw_p = at_step<scalar_t>(d_h_raw_all, t);
        for (int64_t n = 0; n < N; ++n) {
          scalar_t* d_raw_row = d_raw_p + n * P;
          if (!valid(t, n)) {
            zero_row(d_raw_row, P);
            continue;
          }
          for (int64_t j = 0; j < P; ++j) d_raw_row[j] = d_h_p[n * P + j] + d_out_p[n * P + j];
          zero_row(d_h_p + n * P, P);  // refilled by the product below
        }
        step_product<scalar_t>(step_block<scalar_t>(d_h_raw_all, t), matrix<scalar_t>(*w_hr),
                               matrix<scalar_t>(d_m), false);
      }
      const scalar_t* d_m_p = projected ? d_m.data_ptr<scalar_t>() : nullptr;
      scalar_t* m_p = projected ? at_step<scalar_t>(m_all, t) : nullptr;
      const scalar_t* g_p = at_step<scalar_t>(gates, t);
      const scalar_t* c_p = at_step<scalar_t>(c_states, steps.in(t));
      const scalar_t* c_new_p = at_step<scalar_t>(c_new, t);
      scalar_t* d_g_p = at_step<scalar_t>(d_gates, t);
      for_rows(N, 4 * H, [&](int64_t n) {
        const int64_t row = n * H;
        const scalar_t* g_row = g_p + n * 4 * H;
        scalar_t* d_row = d_g_p + n * 4 * H;
        if (!valid(t, n)) {  // d_h and d_c skip the step
          zero_row(d_row, 4 * H);
          if (projected) zero_row(m_p + row, H);
          return;
        }
        for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
          V d_h_out;
          if (projected) {
            d_h_out = V::loadu(d_m_p + row + j, k);
          } else {
            d_h_out = V::loadu(d_h_p + row + j, k) + V::loadu(d_out_p + row + j, k);
            V(scalar_t(0)).store(d_h_p + row + j, k);  // refilled by the product below
          }
          const V i = V::loadu(g_row + j, k), f = V::loadu(g_row + H + j, k);
          const V g = V::loadu(g_row + 2 * H + j, k), o = V::loadu(g_row + 3 * H + j, k);
          const V tanh_c = fast_tanh(V::loadu(c_new_p + row + j, k));
          if (projected) (o * tanh_c).store(m_p + row + j, k);
          const V d_o = d_h_out * tanh_c * sigmoid_grad(o);
          V d_c_next = V::loadu(d_c_p + row + j, k) + d_h_out * o * tanh_grad(tanh_c);
          if (peep != nullptr) d_c_next = d_c_next + d_o * V::loadu(peep + 2 * H + j, k);
          const V d_i = d_c_next * g * sigmoid_grad(i);
          const V d_f = d_c_next * V::loadu(c_p + row + j, k) * sigmoid_grad(f);
          const V d_g = d_c_next * i * tanh_grad(g);
          V d_c_prev = d_c_next * f;
          if (peep != nullptr) {
            d_c_prev = d_c_prev + d_i * V::loadu(peep + j, k) + d_f * V::loadu(peep + H + j, k);
          }
          d_i.store(d_row + j, k);
          d_f.store(d_row + H + j, k);
          d_g.store(d_row + 2 * H + j, k);
          d_o.store(d_row + 3 * H + j, k);
          d_c_prev.store(d_c_p + row + j, k);
        });
      });
      step_product<scalar_t>(step_block<scalar_t>(d_gates, t), matrix<scalar_t>(w_hh),
                             matrix<scalar_t>(d_h), true);
    }
  });
  Tensor d_w_hr;
  if (projected) d_w_hr = d_h_raw_all.view({T * N, P}).t().mm(m_all.view({T * N, H}));
  return {d_gates, d_h, d_c, d_w_hr};
}

// ---- GRU ------------------------------------------------------------------------------------

// gates (T, N, 3H): x W_ih^T + b_ih (reset after; b_hh is applied per step because b_hn is
// multiplied by r) or x W_ih^T + b_ih + b_hh (reset before), overwritten with r, z, n.
// Returns {output (T, N, H), states (T + 1, N, H), n_input (T, N, H)} where n_input is what r
// multiplies: W_hn h + b_hn (reset after) or h itself, as r ⊙ h (reset before).
std::vector<Tensor> gru_forward(Tensor gates, const Tensor& h0, const Tensor& w_hh,
                                const std::optional<Tensor>& b_hh,
                                const std::optional<Tensor>& lengths, bool reverse,
                                bool reset_after) {
  const Arguments check("gru_forward", "gates", gates, 3);
  const int64_t T = gates.size(0), N = gates.size(1), H = gates.size(2) / 3;
  TORCH_CHECK(gates.size(2) == 3 * H, "gru_forward: gates must have 3 * hidden columns, got ",
              gates.sizes());
  check("h0", h0, {N, H});
  check("w_hh", w_hh, {3 * H, H});
  check("b_hh", b_hh, {3 * H});
  check.lengths(lengths, N);
  const BelowAutograd below_autograd;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor states = states_buffer(T, h0);
  Tensor output = output_buffer(states, steps, lengths);
  Tensor n_input = at::empty({T, N, H}, gates.options());
  start_states(states, steps.first_in(), h0);
  const ForwardWeight w_hh_forward(w_hh, reset_after ? T : 0);
  const ForwardWeight w_rz_forward(w_hh.narrow(0, 0, 2 * H), reset_after ? 0 : T);
  const ForwardWeight w_n_forward(w_hh.narrow(0, 2 * H, H), reset_after ? 0 : T);
  Tensor h_gates = reset_after ? at::empty({N, 3 * H}, gates.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "gru_forward", [&] {
    using V = Vec<scalar_t>;
    scalar_t* hg_p = reset_after ? h_gates.data_ptr<scalar_t>() : nullptr;
    const scalar_t* b_hh_p = b_hh.has_value() ? b_hh->data_ptr<scalar_t>() : nullptr;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = steps.time(s);
      const Block<scalar_t> h = step_block<scalar_t>(states, steps.in(t));
      const Block<scalar_t> a = step_block<scalar_t>(gates, t);
      scalar_t* a_p = a.data;
      const scalar_t* h_p = h.data;
      scalar_t* h_new_p = at_step<scalar_t>(states, steps.out(t));
      scalar_t* out_p = at_step<scalar_t>(output, t);
      scalar_t* n_in_p = at_step<scalar_t>(n_input, t);
      // Both forms end with n = tanh(n_pre), h' = n + z (h - n): this writes n, h' and output.
      auto finish_row = [&](int64_t n, int64_t j, int64_t k, const V& z, const V& n_pre) {
        const int64_t row = n * H;
        const V n_gate = fast_tanh(n_pre);
        n_gate.store(a_p + n * 3 * H + 2 * H + j, k);
        const V h_next = n_gate + z * (V::loadu(h_p + row + j, k) - n_gate);
        h_next.store(h_new_p + row + j, k);
        h_next.store(out_p + row + j, k);
      };
      auto hold_row = [&](int64_t n) {
        copy_row(h_new_p + n * H, h_p + n * H, H);
        zero_row(out_p + n * H, H);
        zero_row(n_in_p + n * H, H);
      };
      if (reset_after) {
        if (b_hh.has_value()) {
          for (int64_t n = 0; n < N; ++n) copy_row(hg_p + n * 3 * H, b_hh_p, 3 * H);
        }
        w_hh_forward.multiply<scalar_t>(h, matrix<scalar_t>(h_gates),
                               b_hh.has_value());
        for_rows(N, 3 * H, [&](int64_t n) {
          if (!valid(t, n)) return hold_row(n);
          scalar_t* g_row = a_p + n * 3 * H;
          const scalar_t* hg_row = hg_p + n * 3 * H;
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            const V r = sigmoid(V::loadu(g_row + j, k) + V::loadu(hg_row + j, k));
            const V z = sigmoid(V::loadu(g_row + H + j, k) + V::loadu(hg_row + H + j, k));
            const V hn = V::loadu(hg_row + 2 * H + j, k);
            r.store(g_row + j, k);
            z.store(g_row + H + j, k);
            hn.store(n_in_p + n * H + j, k);
            finish_row(n, j, k, z, V::loadu(g_row + 2 * H + j, k) + r * hn);
          });
        });
      } else {
        w_rz_forward.multiply<scalar_t>(h, a.columns(0, 2 * H), true);
        for_rows(N, 2 * H, [&](int64_t n) {
          if (!valid(t, n)) return hold_row(n);
          scalar_t* g_row = a_p + n * 3 * H;
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            const V r = sigmoid(V::loadu(g_row + j, k));
            r.store(g_row + j, k);
            sigmoid(V::loadu(g_row + H + j, k)).store(g_row + H + j, k);
            (r * V::loadu(h_p + n * H + j, k)).store(n_in_p + n * H + j, k);
          });
        });
        w_n_forward.multiply<scalar_t>(step_block<scalar_t>(n_input, t), a.columns(2 * H, H),
                                       true);
        for_rows(N, H, [&](int64_t n) {
          if (!valid(t, n)) return;
          scalar_t* g_row = a_p + n * 3 * H;
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            finish_row(n, j, k, V::loadu(g_row + H + j, k), V::loadu(g_row + 2 * H + j, k));
          });
        });
      }
    }
  });
  return {output, states, n_input};
}

// Returns {d_x_gates (T, N, 3H): the gradient of the input-side sums (r, z, n pre-activation),
// d_hn (T, N, H): the gradient of W_hn h + b_hn, r ⊙ dn (reset after only; undefined
// otherwise), d_h0}. The gradient of h W_hh^T + b_hh is then (d_r, d_z, d_hn): its r and z
// parts are d_x_gates', so only the n part is kept over all steps (a third of 3H).
std::vector<Tensor> gru_backward(const Tensor& d_output, const Tensor& d_h_n, const Tensor& gates,
                                 const Tensor& states, const Tensor& n_input, const Tensor& w_hh,
                                 const std::optional<Tensor>& lengths, bool reverse,
                                 bool reset_after) {
  const Arguments check("gru_backward", "gates", gates, 3);
  const int64_t T = gates.size(0), N = gates.size(1), H = gates.size(2) / 3;
  TORCH_CHECK(gates.size(2) == 3 * H, "gru_backward: gates must have 3 * hidden columns, got ",
              gates.sizes());
  check("d_output", d_output, {T, N, H});
  check("d_h_n", d_h_n, {N, H});
  check("states", states, {T + 1, N, H});
  check("n_input", n_input, {T, N, H});
  check("w_hh", w_hh, {3 * H, H});
  check.lengths(lengths, N);
  const BelowAutograd below_autograd;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor d_x_gates = at::empty_like(gates);
  Tensor d_hn = reset_after ? at::empty({T, N, H}, gates.options()) : Tensor();
  // One step's (d_r, d_z, d_hn), for its product with W_hh.
  Tensor d_h_gates = reset_after ? at::empty({N, 3 * H}, gates.options()) : Tensor();
  Tensor d_h = d_h_n.clone(at::MemoryFormat::Contiguous);
  const Tensor w_rz = w_hh.narrow(0, 0, 2 * H), w_n = w_hh.narrow(0, 2 * H, H);
  Tensor d_rh = reset_after ? Tensor() : at::empty({N, H}, gates.options());
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "gru_backward", [&] {
    using V = Vec<scalar_t>;
    scalar_t* d_h_p = d_h.data_ptr<scalar_t>();
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = steps.time(s);
      const scalar_t* d_out_p = at_step<scalar_t>(d_output, t);
      const scalar_t* g_p = at_step<scalar_t>(gates, t);
      const scalar_t* h_p = at_step<scalar_t>(states, steps.in(t));
      const scalar_t* n_in_p = at_step<scalar_t>(n_input, t);
      const Block<scalar_t> d_x_t = step_block<scalar_t>(d_x_gates, t);
      scalar_t* d_x_p = d_x_t.data;
      // Shared by both forms: the gradients of z's and n's pre-activations from h' = n + z(h - n);
      // d_h becomes the direct part z ⊙ dh'.
      auto through_update = [&](int64_t n, int64_t j, int64_t k, V* z_out, V* d_n_out) {
        const int64_t row = n * H;
        const scalar_t* g_row = g_p + n * 3 * H;
        const V d = V::loadu(d_h_p + row + j, k) + V::loadu(d_out_p + row + j, k);
        const V z = V::loadu(g_row + H + j, k), n_gate = V::loadu(g_row + 2 * H + j, k);
        const V d_z = d * (V::loadu(h_p + row + j, k) - n_gate) * sigmoid_grad(z);
        const V d_n = d * (V(scalar_t(1)) - z) * tanh_grad(n_gate);
        d_z.store(d_x_p + n * 3 * H + H + j, k);
        d_n.store(d_x_p + n * 3 * H + 2 * H + j, k);
        (d * z).store(d_h_p + row + j, k);
        *z_out = z;
        *d_n_out = d_n;
      };
      if (reset_after) {
        scalar_t* d_hg_p = d_h_gates.data_ptr<scalar_t>();
        scalar_t* d_hn_p = at_step<scalar_t>(d_hn, t);
        for_rows(N, 3 * H, [&](int64_t n) {
          if (!valid(t, n)) {
            zero_row(d_x_p + n * 3 * H, 3 * H);
            zero_row(d_hg_p + n * 3 * H, 3 * H);
            zero_row(d_hn_p + n * H, H);
            return;
          }
          const scalar_t* g_row = g_p + n * 3 * H;
          scalar_t* d_hg_row = d_hg_p + n * 3 * H;
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            V z, d_n;
            through_update(n, j, k, &z, &d_n);
            const V r = V::loadu(g_row + j, k);
            const V d_r = d_n * V::loadu(n_in_p + n * H + j, k) * sigmoid_grad(r);
            d_r.store(d_x_p + n * 3 * H + j, k);
            d_r.store(d_hg_row + j, k);
            V::loadu(d_x_p + n * 3 * H + H + j, k).store(d_hg_row + H + j, k);
            const V d_hn_v = d_n * r;
            d_hn_v.store(d_hg_row + 2 * H + j, k);
            d_hn_v.store(d_hn_p + n * H + j, k);
          });
        });
        step_product<scalar_t>(matrix<scalar_t>(d_h_gates), matrix<scalar_t>(w_hh),
                               matrix<scalar_t>(d_h), true);
      } else {
        for_rows(N, 2 * H, [&](int64_t n) {
          if (!valid(t, n)) {
            zero_row(d_x_p + n * 3 * H, 3 * H);
            return;
          }
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            V z, d_n;
            through_update(n, j, k, &z, &d_n);
          });
        });
        step_product<scalar_t>(d_x_t.columns(2 * H, H), matrix<scalar_t>(w_n),
                               matrix<scalar_t>(d_rh), false);  // gradient of r ⊙ h
        const scalar_t* d_rh_p = d_rh.data_ptr<scalar_t>();
        for_rows(N, H, [&](int64_t n) {
          if (!valid(t, n)) return;
          const scalar_t* g_row = g_p + n * 3 * H;
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            const int64_t row = n * H;
            const V r = V::loadu(g_row + j, k), d_rh_v = V::loadu(d_rh_p + row + j, k);
            (d_rh_v * V::loadu(h_p + row + j, k) * sigmoid_grad(r)).store(d_x_p + n * 3 * H + j, k);
            (V::loadu(d_h_p + row + j, k) + d_rh_v * r).store(d_h_p + row + j, k);
          });
        });
        step_product<scalar_t>(d_x_t.columns(0, 2 * H), matrix<scalar_t>(w_rz),
                               matrix<scalar_t>(d_h), true);
      }
    }
  });
  return {d_x_gates, d_hn, d_h};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnnkit native CPU kernels: time loops of RNN, LSTM and GRU, forward and backward";
  m.def("linear", &linear);
  m.def("rnn_forward", &rnn_forward);
  m.def("rnn_backward", &rnn_backward);
  m.def("lstm_forward", &lstm_forward);
  m.def("lstm_backward", &lstm_backward);
  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
  m.def("set_blas_min_multiply_adds", &set_blas_min_multiply_adds,
        "step products of at least this many multiply-adds run on ATen's mm (BLAS)");
  m.def("blas_min_multiply_adds", [] { return blas_min_multiply_adds; });
}
