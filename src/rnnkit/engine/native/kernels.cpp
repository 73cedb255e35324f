// rnnkit native CPU kernels: the whole time loop of one layer direction, forward and backward.
//
// Python (functions.py, the rnnkit::native_* operators' implementations) computes the input
// projection of all steps in one product before the forward, and every weight gradient as one
// product over all steps after the backward (ops.py); what is left, and what lives here, is the
// part that must go step by step: per step one matrix product with the recurrent weights (ATen's
// BLAS) and one pass of gate math over the batch, vectorised with ATen's `Vectorized` and
// parallel over rows of the batch. The LSTM's loops instead run on resident weights where they
// fit the cores' caches (one parallel region per call, the product and gate math fused per
// register tile; "the LSTM's loop on resident weights" below).
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
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif
#if defined(__SSE2__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <utility>
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
  // Lengths in [1, steps], as the layers check them: a length past T or below 1 reads no
  // memory out of bounds here, but it is no sequence the operators' contract describes.
  void lengths(const std::optional<Tensor>& t, int64_t batch, int64_t steps) const {
    if (!t.has_value()) return;
    check("lengths", *t, {batch}, at::kLong);
    const int64_t* values = t->data_ptr<int64_t>();
    for (int64_t n = 0; n < batch; ++n) {
      TORCH_CHECK(values[n] >= 1 && values[n] <= steps, kernel_, ": lengths must lie in [1, ",
                  steps, "] (the input's time steps), got ", values[n], " at index ", n);
    }
  }
  // Zoneout's d: a 0-dim probability p (evaluation) or a (steps, batch, width) 0/1 mask.
  void zoneout(const char* name, const std::optional<Tensor>& t, int64_t steps, int64_t batch,
               int64_t width) const {
    if (!t.has_value()) return;
    common(name, *t);
    TORCH_CHECK(t->scalar_type() == dtype_, kernel_, ": ", name, " must be ", dtype_, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 0 || t->sizes().equals({steps, batch, width}), kernel_, ": ", name,
                " must be a 0-dim probability or have shape [", steps, ", ", batch, ", ", width,
                "], got ", t->sizes());
  }
  // Two optional arguments that come together or not at all.
  void together(const char* first, const std::optional<Tensor>& a, const char* second,
                const std::optional<Tensor>& b) const {
    TORCH_CHECK(a.has_value() == b.has_value(), kernel_, ": ", first, " and ", second,
                " must be given together, got ", a.has_value() ? first : second, " alone");
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

// Subnormal floats (below 1.2e-38 in float32, 2.2e-308 in float64) cost x86 cores a microcode
// assist per operation that reads or writes one, some hundred cycles instead of one. Gradients
// decaying back through many steps pass through that range on their way to zero: an sLSTM
// training step at T = 200 from initialisation had 17% of its gate gradients subnormal and ran
// 5x slower than with them flushed (docs/benchmarks.md, "sLSTM training from initialisation:
// subnormal floats"). So every kernel computes with flush-to-zero (FTZ: a result below the
// normal range is 0) and denormals-are-zero (DAZ: such an input reads as 0), and restores the
// caller's mode on the way out: a Python op after the call sees the mode it set, subnormals
// and all. The mode is per thread (the MXCSR register), so it is set by the calling thread at
// the kernel's entry (`KernelScope`) and by every worker thread around its share of a parallel
// region (`parallel_for`, `on_team`). ATen's BLAS called from a kernel runs on the calling
// thread when it runs on one thread; its own worker threads keep their mode, but what the
// kernels hand it (gate gradients, states) was computed flushed and holds no subnormal.
// A value the flush changes is below 1.2e-38 in size: far inside every tolerance. Elsewhere
// than x86 this is a no-op (not measured there). `set_flush_subnormals(false)` turns it off,
// for benchmarks and tests.
bool flush_subnormals = true;

void set_flush_subnormals(bool value) { flush_subnormals = value; }

constexpr unsigned kFlushBits = 0x8040;  // MXCSR bit 15 FTZ | bit 6 DAZ

class FlushSubnormals {
 public:
#if defined(__SSE2__) || defined(_M_X64)
  FlushSubnormals() : saved_(_mm_getcsr()) {
    if (flush_subnormals) _mm_setcsr(saved_ | kFlushBits);
  }
  ~FlushSubnormals() { _mm_setcsr(saved_); }
#else
  FlushSubnormals() = default;
#endif
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;

#if defined(__SSE2__) || defined(_M_X64)
 private:
  unsigned saved_;  // the caller's MXCSR, written back bit for bit
#endif
};

// at::parallel_for with subnormals flushed in every thread that runs a share (the calling
// thread's own mode is restored after its share, as the workers' are after theirs).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
  at::parallel_for(begin, end, grain, [&](int64_t first, int64_t last) {
    const FlushSubnormals flush;
    body(first, last);
  });
}

// Every thread of the calling thread's OpenMP team (ATen's intra-op threads, on which its BLAS
// runs too: one libgomp pool per calling thread) but the calling thread itself, flushed for as
// long as this lives, each given back the mode it had. A team of the same size reuses the same
// pool threads in the same order, so the second parallel region reaches every thread the first
// one set; each keeps its own saved mode (thread_local) and restores only that.
class FlushTeam {
 public:
  FlushTeam() : threads_(at::get_num_threads()), applied_(false) {
#if defined(_OPENMP) && (defined(__SSE2__) || defined(_M_X64))
    applied_ = threads_ > 1 && flush_subnormals && !omp_in_parallel();
    if (applied_) each_worker(true);
#endif
  }
  ~FlushTeam() {
    if (applied_) each_worker(false);
  }
  FlushTeam(const FlushTeam&) = delete;
  FlushTeam& operator=(const FlushTeam&) = delete;

 private:
  void each_worker(bool flush) const {
#if defined(_OPENMP) && (defined(__SSE2__) || defined(_M_X64))
#pragma omp parallel num_threads(threads_)
    {
      if (omp_get_thread_num() != 0) {
        if (flush) {
          saved_mode_ = _mm_getcsr();
          saved_ = true;
          _mm_setcsr(saved_mode_ | kFlushBits);
        } else if (saved_) {
          _mm_setcsr(saved_mode_);
          saved_ = false;
        }
      }
    }
#else
    (void)flush;
#endif
  }

  int threads_;
  bool applied_;
  static thread_local unsigned saved_mode_;
  static thread_local bool saved_;
};

thread_local unsigned FlushTeam::saved_mode_ = 0;
thread_local bool FlushTeam::saved_ = false;

// compute() with subnormals flushed on the calling thread and on its intra-op threads, each
// thread's mode restored after (on an exception too): for the products over all steps that the
// operators take in Python from a kernel's gradients (functions.py, `with_subnormals_flushed`).
// The kernels hand back gradients holding no subnormal, but a product of such a gradient's
// smallest normal values with states below 1 writes subnormal partial products: the sLSTM's
// d_W_hh product at T = 200 from initialisation took 0.12 s instead of 0.016 s. On two threads
// the calling thread's flush alone halved that (the worker's share of the product unflushed).
pybind11::object call_flushed(const pybind11::function& compute) {
  const FlushSubnormals flush;
  const FlushTeam team;
  return compute();
}

// What every kernel holds from its entry (after the argument checks) to its return:
// - below autograd: the kernels run inside the rnnkit::native_* operators, so nothing they do
//   is recorded, and their ATen calls skip the autograd and view-tracking layers of the
//   dispatcher (a third of a step's time at batch 1 otherwise);
// - subnormals flushed on the calling thread (`FlushSubnormals`), the caller's mode restored.
struct KernelScope {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  FlushSubnormals flush;
};

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
  parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
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

// 1 / d. A float32 division costs as much as the rest of a gate's math together (vdivps is not
// pipelined); the hardware's reciprocal estimate refined by one Newton step, r (2 - d r), is a
// few cycles and within about an ulp of the division (14-bit estimate under AVX-512; the 12-bit
// one of AVX2 takes two steps, below). Float64 keeps the division: one step would leave 28 bits
// of its 53.
template <typename T>
inline Vec<T> reciprocal(const Vec<T>& d) {
  return Vec<T>(T(1)) / d;
}

//
// The callers' d is 1 + e^v, in [1, inf]. Where it is inf (or so large that 1/d is below the
// smallest normal), the estimate is 0 and the Newton step would be 0 * (2 - inf * 0) = NaN: the
// estimate's 0 is kept there, as the division gives (σ = 0 exactly at -inf, so a zero gate
// gradient times an infinite input is NaN on every engine alike).
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vec<float> reciprocal(const Vec<float>& d) {
  const Vec<float> r(_mm512_rcp14_ps(d));
  const Vec<float> refined = r * at::vec::fnmadd(d, r, Vec<float>(2.0f));
  return Vec<float>::blendv(refined, r, r == Vec<float>(0.0f));
}
#elif defined(CPU_CAPABILITY_AVX2)
// The 12-bit estimate needs a second step: after one, 1/1 was 1 - 2^-24, so σ and tanh of a
// large input stopped one ulp short of 1, and a saturated gate passed a gradient of 1e-7 that
// the division gives as 0 (found on the AMD EPYC VM, an AVX2 build: at an infinite input the
// weight's gradient was inf where every other engine has 0 x inf = NaN). The second step is
// r + r (1 - d r) with its residual from one FMA: 1/1 is then 1 exactly.
template <>
inline Vec<float> reciprocal(const Vec<float>& d) {
  const Vec<float> one(1.0f);
  const Vec<float> r(_mm256_rcp_ps(d));
  const Vec<float> once = r * at::vec::fnmadd(d, r, Vec<float>(2.0f));
  const Vec<float> twice = at::vec::fmadd(once, at::vec::fnmadd(d, once, one), once);
  return Vec<float>::blendv(twice, r, r == Vec<float>(0.0f));
}
#endif

// exp for the gates: ATen's exp_u20 (float32: a degree-5 polynomial after range reduction,
// within 20 ulp, about half the cost of Sleef's 1-ulp exp, which was the largest part of the
// gate math; float64: the exact exp). A gate's value is then within about 1e-6 relative of the
// exact one, far inside the engines' agreement with the reference (tests: 1e-5).
template <typename T>
inline Vec<T> gate_exp(const Vec<T>& x) {
  return x.exp_u20();
}

template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return reciprocal(one + gate_exp(x.neg()));
}

// tanh from one exp: tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|), sign restored. A few
// times faster than Sleef's tanh (which dominated the forward step); the absolute error stays
// within a few units of the last place of 1 (cancellation near 0 costs relative, not absolute,
// accuracy), well inside the engines' agreement with torch.nn.
template <typename T>
inline Vec<T> fast_tanh(const Vec<T>& x) {
  const Vec<T> one(T(1));
  const Vec<T> e = gate_exp(x.abs() * Vec<T>(T(-2)));
  const Vec<T> magnitude = (one - e) * reciprocal(one + e);
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

// ---- the machine: whose CPU, and its cache ---------------------------------------------------
//
// Which loop is fastest depends on the CPU as well as the sizes, and the two kinds of VM this
// project runs on disagree in two places (docs/benchmarks.md, issue 19's ninth part; 2 threads,
// against torch.nn, the ratios of a whole call):
// - ATen's BLAS in torch's x86 builds is MKL, and MKL's products of a few rows run far below
//   the machine's speed on AMD's CPUs: on the AMD EPYC VM the LSTM's sequence loop, whose step
//   products of 1 to 8 rows go to mm from 1 M multiply-adds, took 1.3-3.2x torch.nn's time
//   (N = 1-8, H = 512-1024), against 0.55-1.5x on the kernels' own tiles; from 16 rows the two
//   were level, and from 32 MKL was ahead. On the Intel Xeon VM MKL is level with the tiles or
//   faster at every size measured, so the rules there stay as they were.
// - The resident LSTM loops beyond the cache: on the EPYC (512 KiB of L2 a core, 32 MiB of
//   L3) a training step with both loops resident beat the sequence loops at every size
//   measured from 4 rows (N = 4-64, H = 512-1024: 0.87-1.10x torch.nn, against 1.01-1.57x with
//   the sequence loops on either product; at 1-2 rows they were level), and the forward of 1
//   to 3 rows won up to 8 MiB a thread (H = 512-1024: 0.36-1.08x torch.nn, against 0.50-1.25x
//   on the tiles); at 32 MiB a thread (H = 2048) the tiles won (0.85-0.92 against 1.08).
// So the rules have a profile: "intel" (GenuineIntel) and "other" (every other x86 maker, and
// any other architecture; measured on the AMD EPYC). `set_cpu_profile` switches it for tests
// and benchmarks; the rules below read `cpu_rules`.
struct CpuRules {
  int64_t blas_min_rows;                // step products of fewer rows never go to mm
  int64_t streamed_share_factor;        // a resident forward of 1-3 rows: up to this many shares
  int64_t backward_max_streamed_rows;   // a resident backward beyond the cache: up to these rows
};

enum class CpuProfile { kIntel, kOther };

CpuRules cpu_profile_rules(CpuProfile profile) {
  if (profile == CpuProfile::kIntel) return {0, 2, 8};
  return {9, 8, std::numeric_limits<int64_t>::max()};
}

CpuProfile detected_cpu_profile() {
#if defined(__GNUC__) && defined(__x86_64__)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx)) {
    char vendor[13];
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    vendor[12] = '\0';
    if (std::strcmp(vendor, "GenuineIntel") == 0) return CpuProfile::kIntel;
  }
#endif
  return CpuProfile::kOther;
}

CpuProfile cpu_profile = detected_cpu_profile();
CpuRules cpu_rules = cpu_profile_rules(cpu_profile);

// The profile by name ("intel" or "other"); its rules replace the current ones, `blas_min_rows`
// included.
void set_cpu_profile(const std::string& name);

std::string cpu_profile_name() { return cpu_profile == CpuProfile::kIntel ? "intel" : "other"; }

// A core's L2 in bytes as the C library reports it (1 MiB where it does not: the middle of the
// VMs' 0.5-2 MiB).
int64_t l2_cache_bytes() {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (bytes > 0) return bytes;
#endif
  return int64_t(1) << 20;
}

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

// Threads share a step's product only when each gets at least this many multiply-adds: below
// that, waking them costs more than they save (settable for benchmarks and tests).
int64_t thread_min_multiply_adds = 65536;

void set_thread_min_multiply_adds(int64_t value) {
  TORCH_CHECK(value >= 1, "thread_min_multiply_adds must be >= 1, got ", value);
  thread_min_multiply_adds = value;
}

template <typename T, int Rows, int Cols>
void product_with_tiles(Block<const T> x, Block<const T> b, Block<T> out, bool accumulate) {
  constexpr int64_t strip = Cols * Vec<T>::size();
  const int64_t strips = (b.cols + strip - 1) / strip;
  const int64_t grain = std::max<int64_t>(
      1, thread_min_multiply_adds / std::max<int64_t>(1, x.rows * x.cols * strip));
  parallel_for(0, strips, grain, [&](int64_t first, int64_t end) {
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

// ...and only from this many rows: on CPUs other than Intel's, MKL's products of a few rows
// are slow (`CpuProfile` below), and the tiles take them whatever their size.
int64_t blas_min_rows = cpu_rules.blas_min_rows;

void set_blas_min_rows(int64_t value) {
  TORCH_CHECK(value >= 0, "blas_min_rows must be >= 0, got ", value);
  blas_min_rows = value;
}

void set_cpu_profile(const std::string& name) {
  TORCH_CHECK(name == "intel" || name == "other",
              "cpu_profile must be 'intel' or 'other', got '", name, "'");
  cpu_profile = name == "intel" ? CpuProfile::kIntel : CpuProfile::kOther;
  cpu_rules = cpu_profile_rules(cpu_profile);
  blas_min_rows = cpu_rules.blas_min_rows;
}

inline bool worth_blas(int64_t rows, int64_t inner, int64_t cols) {
  return rows >= blas_min_rows && rows * inner * cols >= blas_min_multiply_adds;
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
      // Shuffles within the register (ATen's reduction), not a store and `lanes` scalar adds:
      // at batch 1 the reductions were a third of a streamed step's arithmetic.
      const T sum = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc[r][c]);
      T& o = out[r * ldo + c];
      o = accumulate ? o + sum : sum;
    }
  }
}

template <typename T, int Rows, int Cols>
void dot_with_tiles(Block<const T> x, Block<const T> w, Block<T> out, bool accumulate) {
  const int64_t blocks = (w.rows + Cols - 1) / Cols;
  const int64_t grain = std::max<int64_t>(
      1, thread_min_multiply_adds / std::max<int64_t>(1, x.rows * x.cols * Cols));
  parallel_for(0, blocks, grain, [&](int64_t first, int64_t end) {
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

// A weight W (G, K) that every step of a forward multiplies as x · W^T for N rows. Over many
// steps one transposed copy (K, G) pays for itself where the broadcast kernel (step_product)
// is the faster one: for a batch, or for a weight that stays in a core's cache from step to
// step. For a step or two (streaming) the copy would cost more than the steps, so they use the
// dot-product kernel on W as it is. So do up to 3 rows of a weight larger than the cache: the
// dot kernel's one tile of rows reads W once a step, as the broadcast kernel does, and either
// streams it from memory. Measured on the Xeon VM (2 threads, inference, ms, old -> new):
// without the copy GRU (T, N, H) = (100, 1, 512) 7.7-8.0 -> 4.9, (100, 3, 512) 16 -> 8.5-9.9,
// (200, 3, 384) 9.7-10.9 -> 8.0-8.9, LSTM (100, 1, 512) 15-16 -> 11, (100, 3, 384) 10.1 ->
// 7.6; but with a cached weight the copy wins, GRU (200, 1, 128) 0.75 -> 0.99 and (200, 3, 64)
// 0.56 -> 0.90 without it, and from 4 rows, where the dot kernel passes over W twice a step
// (GRU (100, 16, 256) 8.6-9.8 with it, 12-14 without). (Products large enough for mm ignore
// the layout: there the copy is one pass over W per call, small against the steps.)
constexpr int64_t kStepsWorthATranspose = 3;
constexpr int64_t kRowsWorthATranspose = 4;
constexpr int64_t kCachedWeightBytes = int64_t(1) << 20;  // a core's L2 share (the VMs': 0.5-2 MiB)

inline bool worth_a_transpose(const Tensor& w, int64_t steps, int64_t rows) {
  return steps >= kStepsWorthATranspose &&
         (rows >= kRowsWorthATranspose || w.numel() * w.element_size() <= kCachedWeightBytes);
}

class ForwardWeight {
 public:
  ForwardWeight(const Tensor& w, int64_t steps, int64_t rows)
      : w_(w), transposed_(worth_a_transpose(w, steps, rows) ? w.t().contiguous() : Tensor()) {}

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
  const KernelScope scope;
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

// A states buffer holding `initial` (N, H) where the first step run reads it.
Tensor started_states(const Steps& steps, const Tensor& initial) {
  Tensor states = states_buffer(steps.count, initial);
  start_states(states, steps.first_in(), initial);
  return states;
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
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor states = started_states(steps, h0);
  Tensor output = output_buffer(states, steps, lengths);
  const ForwardWeight w_hh_forward(w_hh, T, N);
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
  check.lengths(lengths, N, T);
  const KernelScope scope;
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

// ---- the LSTM's loop on resident weights ------------------------------------------------------
//
// The sequence loop above runs each step as two parallel regions: the recurrent product (ATen's
// mm, or the tiles) and then the gate math, each a fork and join of the threads, and the product
// re-reads all of W_hh every step. Here the threads are started once per call and split the
// hidden units between them: thread p owns units [u0, u1) and all four gate rows of W_hh for
// them, packed once per call so that its share (4 (u1 - u0) K values) stays in its own L2 for
// the whole sequence. Each step a thread computes, for every row n of the batch and each block
// of U units (one vector) it owns, the 4 x U pre-activations of those units in registers (a
// tile of up to `kResidentRows` rows x 4 vectors: i, f, g, o of the same units), adds the input
// projection, and finishes the gate math of the tile right there: nothing of the product goes
// to memory. The step's new h is then complete once every thread has written its units, which
// one barrier per step waits for (a spin on an atomic, not a fork and join).

// Rows of the batch per register tile: 6 x 4 accumulators with 32 vector registers (AVX-512),
// 2 x 4 with 16 (AVX2 and narrower).
template <typename T>
constexpr int kResidentRows = Vec<T>::size() * sizeof(T) >= 64 ? 6 : 2;

// Bytes of packed W_hh a thread may hold for the loop to run here: its share should stay in its
// core's L2 (2 MiB per core on the Xeons and 512 KiB-1 MiB on the EPYCs these VMs run on; the
// rest of the step's data shares it). Larger weights go to the sequence loop above, where
// ATen's mm blocks them for every cache level, except where a resident loop streaming them was
// measured faster (`lstm_forward_on_resident`, `lstm_backward_on_resident`). Settable for
// benchmarks and tests, up to 2^48 (so that products with it stay within int64).
int64_t resident_max_bytes_per_thread = int64_t(1) << 20;

void set_resident_max_bytes_per_thread(int64_t value) {
  TORCH_CHECK(value >= 0 && value <= (int64_t(1) << 48),
              "resident_max_bytes_per_thread must be in [0, 2^48], got ", value);
  resident_max_bytes_per_thread = value;
}

// A weight (4H, K) packed by blocks of U units: block b holds, for k = 0..K-1, the four gate
// rows' values for units [bU, bU + U) as 4 x U contiguous values (i | f | g | o), zero past H.
// `packed` is (blocks, K, 4, U), left empty by `gate_blocks_buffer`; this fills blocks
// [first, end), so that each thread of a resident loop packs the blocks it multiplies by,
// which then lie in its own cache. The writes run in order; the reads take 4U rows at once,
// each cache line of them used for as many consecutive k as it holds (one value a row at a
// time, the old order, wrote at a stride of 4U values and took 0.8 ms for W_hh at H = 256,
// most of a 20-step call at batch 1).
template <typename T>
void pack_gate_blocks(const Tensor& weight, const Tensor& packed, int64_t H, int64_t first,
                      int64_t end) {
  const int64_t K = weight.size(1), U = packed.size(3);
  const T* w = weight.data_ptr<T>();
  T* p = packed.data_ptr<T>();
  for (int64_t b = first; b < end; ++b) {
    const int64_t units = std::min(U, H - b * U);
    T* out = p + b * K * 4 * U;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t q = 0; q < 4; ++q, out += U) {
        const T* column = w + (q * H + b * U) * K + k;
        for (int64_t u = 0; u < units; ++u) out[u] = column[u * K];
        for (int64_t u = units; u < U; ++u) out[u] = T(0);
      }
    }
  }
}

Tensor gate_blocks_buffer(const Tensor& weight, int64_t H, int64_t U) {
  return at::empty({(H + U - 1) / U, weight.size(1), 4, U}, weight.options());
}

// acc[r][q] = h[r] · (column block q of `panel`) for Rows rows of h (ld `ldh`), K inner; plus,
// with an `input` (its rows ld `ld_input`, K_input inner, its own packed panel `input_panel`),
// input[r] · (column block q of `input_panel`): the input projection of the same units in the
// same registers (the loop that projects its input, `lstm_forward_input`).
// The 4 * Rows sums are named variables, not an array: GCC keeps an array of Vectorized in
// memory and stores every element back each k, which halves the FMA rate.
#define RNNKIT_ROW_SUMS(r) V s##r##0(T(0)), s##r##1(T(0)), s##r##2(T(0)), s##r##3(T(0));
#define RNNKIT_ROW_FMA(r)                                          \
  if constexpr (Rows > r) {                                        \
    const V x(a[r * lda + k]);                                     \
    s##r##0 = at::vec::fmadd(x, b0, s##r##0);                      \
    s##r##1 = at::vec::fmadd(x, b1, s##r##1);                      \
    s##r##2 = at::vec::fmadd(x, b2, s##r##2);                      \
    s##r##3 = at::vec::fmadd(x, b3, s##r##3);                      \
  }
#define RNNKIT_PANEL_ROW(p)                                                            \
  const T* b = (p) + k * 4 * U;                                                        \
  const V b0 = V::loadu(b), b1 = V::loadu(b + U), b2 = V::loadu(b + 2 * U),            \
          b3 = V::loadu(b + 3 * U);
#define RNNKIT_ROW_OUT(r)                                          \
  if constexpr (Rows > r) {                                        \
    acc[r][0] = s##r##0, acc[r][1] = s##r##1;                      \
    acc[r][2] = s##r##2, acc[r][3] = s##r##3;                      \
  }
// The cache lines a tile's gate math will read and write are fetched while its product runs
// (`ahead(k)` at each k issues at most one: a few in flight at a time). The step's rows lie 4H
// values apart, a page apart at H = 256: a stride the hardware prefetchers do not follow, so
// without this the gate math waits on a miss for each row's pre-activations and outputs.
// (Inline assembly: GCC 12.2 at -O2 and -O3 dropped `_mm_prefetch` and `__builtin_prefetch`
// from this loop, with no prefetch left in the object code.)
inline void fetch_line(const void* line) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(line)));
#endif
}

template <typename T, int Rows, typename Ahead>
inline void gate_block_product(const T* h, int64_t ldh, const T* panel, int64_t K,
                               Vec<T> (&acc)[Rows][4], const Ahead& ahead,
                               const T* input = nullptr, int64_t ld_input = 0,
                               const T* input_panel = nullptr, int64_t K_input = 0) {
  static_assert(Rows >= 1 && Rows <= 6, "gate_block_product: 1 to 6 rows");
  using V = Vec<T>;
  constexpr int64_t U = V::size();
  RNNKIT_ROW_SUMS(0) RNNKIT_ROW_SUMS(1) RNNKIT_ROW_SUMS(2)
  RNNKIT_ROW_SUMS(3) RNNKIT_ROW_SUMS(4) RNNKIT_ROW_SUMS(5)
  {
    const T* a = input;
    const int64_t lda = ld_input;
    for (int64_t k = 0; k < K_input; ++k) {
      RNNKIT_PANEL_ROW(input_panel)
      RNNKIT_ROW_FMA(0) RNNKIT_ROW_FMA(1) RNNKIT_ROW_FMA(2)
      RNNKIT_ROW_FMA(3) RNNKIT_ROW_FMA(4) RNNKIT_ROW_FMA(5)
    }
  }
  const T* a = h;
  const int64_t lda = ldh;
  for (int64_t k = 0; k < K; ++k) {
    ahead(k);
    RNNKIT_PANEL_ROW(panel)
    RNNKIT_ROW_FMA(0) RNNKIT_ROW_FMA(1) RNNKIT_ROW_FMA(2)
    RNNKIT_ROW_FMA(3) RNNKIT_ROW_FMA(4) RNNKIT_ROW_FMA(5)
  }
  RNNKIT_ROW_OUT(0) RNNKIT_ROW_OUT(1) RNNKIT_ROW_OUT(2)
  RNNKIT_ROW_OUT(3) RNNKIT_ROW_OUT(4) RNNKIT_ROW_OUT(5)
}
#undef RNNKIT_ROW_SUMS
#undef RNNKIT_ROW_FMA
#undef RNNKIT_PANEL_ROW
#undef RNNKIT_ROW_OUT

// What one step of the resident loop reads and writes (pointers at step t; rows N, units H).
template <typename T>
struct LstmStepBuffers {
  T* gates;        // (N, 4H) in: the input projection (unless `input`); out: i, f, g, o
                   // activated if keep_gates (null: nothing kept, with an `input`)
  const T* h;      // (N, H) entering state
  const T* c;      // (N, H)
  T* h_new;        // (N, H) leaving state (held past a sequence's end)
  T* c_held;       // (N, H) the step's new cell (held past the end); the backward's c_new
  T* out;          // (N, H) output: h_new, or zero past the end
  const T* peep;   // (3H,) or nullptr
  const T* bias;   // (4H,) added to the projection, or nullptr
  bool keep_gates; // write i, f, g, o over the projection (for the backward)
  const T* input = nullptr;  // (N, I) x_t: the tiles project it themselves (gates not read)
  int64_t input_size = 0;    // I
};

// Rows [n, n + Rows) x units [j, j + count) of one step: product, then gate math in registers.
template <typename T, int Rows>
inline void resident_tile(const LstmStepBuffers<T>& s, const T* panel, const T* input_panel,
                          int64_t H, int64_t n, int64_t j, int64_t count, int64_t t,
                          const Validity& valid) {
  using V = Vec<T>;
  V acc[Rows][4];
  // Per row: its four gates' pre-activations, then four state lines; one every other k.
  const T* const state_lines[4] = {s.c, s.c_held, s.h_new, s.out};
  const auto ahead = [&](int64_t k) {
    if (k % 2 != 0 || k >= 2 * 8 * Rows) return;
    const int64_t r = k / 16, which = k / 2 % 8;
    if (which >= 4) {
      fetch_line(state_lines[which - 4] + (n + r) * H + j);
    } else if (s.gates != nullptr) {
      fetch_line(s.gates + (n + r) * 4 * H + which * H + j);
    }
  };
  const int64_t I = s.input != nullptr ? s.input_size : 0;
  gate_block_product<T, Rows>(s.h + n * H, H, panel, H, acc, ahead,
                              s.input != nullptr ? s.input + n * I : nullptr, I, input_panel, I);
  for (int r = 0; r < Rows; ++r) {
    const int64_t row = (n + r) * H + j;
    if (!valid(t, n + r)) {
      copy_row(s.c_held + row, s.c + row, count);
      copy_row(s.h_new + row, s.h + row, count);
      zero_row(s.out + row, count);
      continue;
    }
    T* g_row = s.gates != nullptr ? s.gates + (n + r) * 4 * H + j : nullptr;
    const V c = V::loadu(s.c + row, count);
    V i_pre = acc[r][0], f_pre = acc[r][1], g_pre = acc[r][2], o_pre = acc[r][3];
    if (s.input == nullptr) {  // the projection computed before the loop
      i_pre = i_pre + V::loadu(g_row, count);
      f_pre = f_pre + V::loadu(g_row + H, count);
      g_pre = g_pre + V::loadu(g_row + 2 * H, count);
      o_pre = o_pre + V::loadu(g_row + 3 * H, count);
    }
    if (s.bias != nullptr) {
      i_pre = i_pre + V::loadu(s.bias + j, count);
      f_pre = f_pre + V::loadu(s.bias + H + j, count);
      g_pre = g_pre + V::loadu(s.bias + 2 * H + j, count);
      o_pre = o_pre + V::loadu(s.bias + 3 * H + j, count);
    }
    if (s.peep != nullptr) {
      i_pre = i_pre + V::loadu(s.peep + j, count) * c;
      f_pre = f_pre + V::loadu(s.peep + H + j, count) * c;
    }
    const V i = sigmoid(i_pre), f = sigmoid(f_pre), g = fast_tanh(g_pre);
    const V c_next = f * c + i * g;
    if (s.peep != nullptr) o_pre = o_pre + V::loadu(s.peep + 2 * H + j, count) * c_next;
    const V o = sigmoid(o_pre);
    const V h_next = o * fast_tanh(c_next);
    if (s.keep_gates) {
      i.store(g_row, count);
      f.store(g_row + H, count);
      g.store(g_row + 2 * H, count);
      o.store(g_row + 3 * H, count);
    }
    c_next.store(s.c_held + row, count);
    h_next.store(s.h_new + row, count);
    if (s.out != s.h_new) h_next.store(s.out + row, count);
  }
}

// body.template operator()<R>() for a tile of R = rows (1 to 6) rows, R a compile-time constant.
template <typename F>
inline void with_tile_rows(int64_t rows, const F& body) {
  switch (rows) {
    case 1: return body.template operator()<1>();
    case 2: return body.template operator()<2>();
    case 3: return body.template operator()<3>();
    case 4: return body.template operator()<4>();
    case 5: return body.template operator()<5>();
    default: return body.template operator()<6>();
  }
}

// tile.template operator()<R>(n) over a step's N rows, in the fewest tiles of at most Rows rows,
// their heights differing by at most one. A tile streams its W_hh panel from L2 whatever its
// height, so a short last tile (32 = 5 x 6 + 2) costs nearly as much as a full one; even
// heights (6, 6, 5, 5, 5, 5) make every tile pay for itself.
template <int Rows, typename F>
inline void for_row_tiles(int64_t N, const F& tile) {
  const int64_t tiles = (N + Rows - 1) / Rows;
  int64_t n = 0;
  for (int64_t left = tiles; left > 0; --left) {
    const int64_t rows = (N - n + left - 1) / left;
    with_tile_rows(rows, [&]<int R>() { tile.template operator()<R>(n); });
    n += rows;
  }
}

inline void spin_pause() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

// The threads' one synchronisation per step: the last to arrive opens the next generation.
class SpinBarrier {
 public:
  void wait(int team) {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == team - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < 4096) {
        spin_pause();
      } else {
        std::this_thread::yield();  // the other thread was descheduled: let it run
      }
    }
  }

 private:
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// Threads for a resident loop over `blocks` unit blocks, `multiply_adds` per step.
int resident_threads(int64_t blocks, int64_t multiply_adds) {
  const int64_t by_work = std::max<int64_t>(1, multiply_adds / thread_min_multiply_adds);
  return static_cast<int>(std::min<int64_t>({at::get_num_threads(), blocks, by_work}));
}

// run(thread, team) on a team of `threads` OpenMP threads, all running at once (their spin
// barriers need that; OpenMP may grant fewer, and `team` says how many), or inline as (0, 1).
template <typename F>
void on_team(int threads, const F& run) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const FlushSubnormals flush;
      run(omp_get_thread_num(), omp_get_num_threads());
    }
    return;
  }
#endif
  run(0, 1);
}

// Threads of a resident LSTM forward whose tiles read K values a row (H; I + H when they
// project the input too). The forward shares from half of `thread_min_multiply_adds` a thread:
// a step at batch 1 streams each thread's share of W_hh from its L2, and the one barrier per
// step costs less than the time the second core's L2 saves. Measured on the Xeon VM (200
// steps, the loop alone, µs a step, one thread -> two): (N, H) = (1, 128) 2.37 -> 1.94,
// (1, 160) 3.50 -> 2.68, (4, 64) 1.82 -> 1.66; at (1, 64) two threads were slower (0.59 ->
// 0.75), and that size stays on one. The backward, whose product reads dG rows of 4H values,
// gained nothing from two threads at (1, 128) and keeps the full threshold.
int lstm_resident_threads(int64_t N, int64_t K, int64_t H) {
  const int64_t blocks = (H + Vec<float>::size() - 1) / Vec<float>::size();
  return resident_threads(blocks, 2 * N * K * 4 * H);
}

// Whether the packed weights of a resident forward, (4H, K), fit the threads' shares.
bool lstm_resident_fits(int64_t N, int64_t K, int64_t H, int64_t element_size) {
  return 4 * H * K * element_size <=
         resident_max_bytes_per_thread * lstm_resident_threads(N, K, H);
}

// Beyond its cache (`lstm_resident_fits`), a resident loop streams each thread's packed share of
// W_hh from L3 or memory every step, where the sequence loop streams W_hh too and forks and joins
// twice a step; the packing is one more pass over W_hh per call. Measured on the Xeon VM (2 MiB
// of L2 a core, 2 threads; resident over the sequence loop, docs/benchmarks.md, issue 19's
// eighth part), this is where it pays:
// - the forward, from `kRowsWorthATranspose` rows and `kStepsWorthATranspose` steps, where the
//   sequence loop makes a transposed copy of W_hh as well: 0.5-0.9x at every size measured
//   (H = 512 to 2048, N = 4 to 256, T = 3 to 100; 0.8x on one thread); at T = 2, where the
//   sequence loop makes no copy, 1.1-2.2x;
// - the forward, 1 to 3 rows: the sequence loop reads W_hh as stored, with no copy at all, so
//   the packing has to be paid back over many steps: at H = 512, N = 1 (a 2 MiB share) 0.8-0.9x
//   from T = 50, level at T = 24-48, 1.1-1.8x below; at H = 640-768 level or slower at T = 8-200,
//   and at 8 MiB and above 1.05-1.2x. So: up to `streamed_share_factor` cached shares (2), from
//   `kStreamedMinSteps` steps;
// - the backward, 4 to `backward_max_streamed_rows` rows (8) from `kStepsWorthATranspose`
//   steps: 0.7-0.95x (N = 4-8, H = 512-2048, T = 3-50); at 2 rows 1.1-1.4x at T = 3-8 (0.8x at
//   T = 50), level at 16 rows, 1.1-1.4x at 64-256 (T = 10).
// On the AMD EPYC VM (the "other" profile, `CpuRules`; the sequence loop's products of up to 8
// rows on the tiles) the resident loops won more widely: the forward of 1 to 3 rows up to 8
// shares, the backward from 4 rows at every batch measured (up to 32).
// `resident_max_bytes_per_thread` = 0 sends every loop to the sequence loop (tests).
constexpr int64_t kStreamedMinSteps = 48;

// Whether lstm_backward runs on resident weights: no projection, at least two steps, and each
// thread's share of W_hh within `resident_max_bytes_per_thread`, or streamed (above).
bool lstm_backward_on_resident(int64_t T, int64_t N, int64_t H, bool projected,
                               int64_t element_size) {
  if (projected || T < 2 || N == 0 || at::in_parallel_region()) return false;
  if (resident_max_bytes_per_thread == 0) return false;
  return lstm_resident_fits(N, H, H, element_size) ||
         (T >= kStepsWorthATranspose && N >= kRowsWorthATranspose &&
          N <= cpu_rules.backward_max_streamed_rows);
}

// Whether lstm_forward runs on resident weights: as the backward where the shares fit the
// cache, and streamed (above).
bool lstm_forward_on_resident(int64_t T, int64_t N, int64_t H, bool projected,
                              int64_t element_size) {
  if (projected || T < 2 || N == 0 || at::in_parallel_region()) return false;
  if (resident_max_bytes_per_thread == 0) return false;
  if (lstm_resident_fits(N, H, H, element_size)) return true;
  if (N >= kRowsWorthATranspose) return T >= kStepsWorthATranspose;
  return T >= kStreamedMinSteps &&
         4 * H * H * element_size <= cpu_rules.streamed_share_factor *
                                         resident_max_bytes_per_thread *
                                         lstm_resident_threads(N, H, H);
}

// A resident forward also projects its input (`lstm_forward_input`) when the input is narrower
// than the state (I < H) and the batch has at least `lstm_input_min_batch` rows: the tiles read
// x_t beside h_{t-1} against W_ih's rows for their units, packed and resident like W_hh's, and
// no (T, N, 4H) projection is written before the loop and read back in it. Measured on the
// Xeon VM (2 threads, docs/benchmarks.md, issue 19 fifth part): the forward took 0.83-0.97x
// the time of ATen's mm and the loop at I < H, N = 4-64 (a product over all steps with an
// inner size of 16-128 runs far below the FMA peak), but 1.0-1.05x at I = H (ATen's mm is as
// fast there, and the loop's L2 holds twice the weights) and 1.03x at batch 1 (each step then
// streams W_ih's panel from L2 as well as W_hh's, where the mm reads W_ih once).
// Settable for benchmarks and tests.
int64_t lstm_input_min_batch = 4;

void set_lstm_input_min_batch(int64_t value) {
  TORCH_CHECK(value >= 1, "lstm_input_min_batch must be >= 1, got ", value);
  lstm_input_min_batch = value;
}

// Whether lstm_forward_input projects x inside the resident loop: a resident loop, I < H, a
// batch of at least `lstm_input_min_batch`, and W_ih's and W_hh's packed rows together within
// the threads' shares.
bool lstm_projects_input(int64_t T, int64_t N, int64_t I, int64_t H, bool projected,
                         int64_t element_size) {
  return I < H && N >= lstm_input_min_batch &&
         lstm_forward_on_resident(T, N, H, projected, element_size) &&
         lstm_resident_fits(N, I + H, H, element_size);
}

// With an `input` x (T, N, I) and its `w_ih` (4H, I), the tiles project x_t themselves, and
// `gates` (T, N, 4H) is written only if `for_backward` (else it may be empty); without, `gates`
// holds the projection.
template <typename T>
void lstm_forward_resident(const Tensor& gates, const Tensor& h_states, const Tensor& c_states,
                           const Tensor& output, const Tensor& w_hh,
                           const T* peep, const T* bias, const Steps& steps,
                           const Validity& valid, bool for_backward,
                           const Tensor& input = Tensor(), const Tensor& w_ih = Tensor()) {
  constexpr int64_t U = Vec<T>::size();
  constexpr int Rows = kResidentRows<T>;
  const int64_t T_ = steps.count, N = h_states.size(1), H = w_hh.size(1);
  const int64_t I = input.defined() ? input.size(2) : 0;
  const int64_t blocks = (H + U - 1) / U;
  const Tensor packed = gate_blocks_buffer(w_hh, H, U);
  const T* panels = packed.data_ptr<T>();
  const Tensor packed_input = input.defined() ? gate_blocks_buffer(w_ih, H, U) : Tensor();
  const T* input_panels = input.defined() ? packed_input.data_ptr<T>() : nullptr;
  const T* input_p = input.defined() ? input.data_ptr<T>() : nullptr;
  const int team_wanted = lstm_resident_threads(N, I + H, H);
  SpinBarrier barrier;
  // Raw pointers taken here: nothing inside the threads' region may throw.
  T* gates_p = gates.numel() > 0 ? gates.data_ptr<T>() : nullptr;
  T* h_p = h_states.data_ptr<T>();
  T* c_p = c_states.data_ptr<T>();
  T* out_p = output.data_ptr<T>();
  const int64_t state = N * H;
  auto run = [&](int thread, int team) {
    const int64_t first = blocks * thread / team, end = blocks * (thread + 1) / team;
    // Each thread packs the blocks of its own units, the only ones it reads.
    pack_gate_blocks<T>(w_hh, packed, H, first, end);
    if (input_panels != nullptr) pack_gate_blocks<T>(w_ih, packed_input, H, first, end);
    for (int64_t s = 0; s < T_; ++s) {
      const int64_t t = steps.time(s);
      const LstmStepBuffers<T> buffers{
          gates_p != nullptr ? gates_p + t * 4 * state : nullptr, h_p + steps.in(t) * state,
          c_p + steps.in(t) * state, h_p + steps.out(t) * state, c_p + steps.out(t) * state,
          out_p + t * state, peep, bias, for_backward && gates_p != nullptr,
          input_p != nullptr ? input_p + t * N * I : nullptr, I};
      for (int64_t b = first; b < end; ++b) {
        const int64_t j = b * U, count = std::min(U, H - j);
        const T* panel = panels + b * H * 4 * U;
        const T* input_panel = input_panels != nullptr ? input_panels + b * I * 4 * U : nullptr;
        for_row_tiles<Rows>(N, [&]<int R>(int64_t n) {
          resident_tile<T, R>(buffers, panel, input_panel, H, n, j, count, t, valid);
        });
      }
      if (team > 1) barrier.wait(team);
    }
  };
  on_team(team_wanted, run);
}

// The backward on resident weights. Thread p owns strips of 4U units of dh; each step, for every
// tile of rows x 4 vectors of its units, it computes dh_t = dh_held + dG_{t+1} W_hh[:, units]
// (K = 4H: the previous step's gate gradients of every unit, which the barrier has completed)
// and finishes the units' gate gradients and dc in registers. W_hh's columns for its strips,
// (4H x 4U) each, are packed once per call and stay in its L2.

// W_hh (4H, H) by strips of 4U columns: strip b is (4H, 4U), zero past H.
template <typename T>
Tensor pack_column_strips(const Tensor& w_hh, int64_t H, int64_t width) {
  const int64_t K = w_hh.size(0), strips = (H + width - 1) / width;
  Tensor packed = at::zeros({strips, K, width}, w_hh.options());
  const T* w = w_hh.data_ptr<T>();
  T* p = packed.data_ptr<T>();
  for (int64_t b = 0; b < strips; ++b) {
    const int64_t units = std::min(width, H - b * width);
    for (int64_t k = 0; k < K; ++k) {
      std::memcpy(p + (b * K + k) * width, w + k * H + b * width, sizeof(T) * units);
    }
  }
  return packed;
}

// What one step of the resident backward reads and writes (pointers at step t; rows N).
template <typename T>
struct LstmBackwardBuffers {
  const T* d_gates_before;  // (N, 4H) the previous step's (t + 1 forward) gate gradients, or null
  T* d_gates;               // (N, 4H) out: this step's, before the nonlinearities
  T* d_h;                   // (N, H) dh held past a sequence's end; zero once it went through
  T* d_c;                   // (N, H) in: dc leaving the step; out: dc entering it
  const T* d_out;           // (N, H)
  const T* gates;           // (N, 4H) i, f, g, o activated
  const T* c;               // (N, H) entering cell
  const T* c_new;           // (N, H)
  const T* peep;            // (3H,) or null
  T* d_bias;                // (4H,) Σ over steps and rows of the gate gradients, accumulated
};

// Rows [n, n + Rows) x the strip's units [j, j + 4U) of one backward step. With `step` false,
// only dh += dG_before W_hh (the gradient of h_0 after the last step).
template <typename T, int Rows>
inline void resident_backward_tile(const LstmBackwardBuffers<T>& s, const T* panel, int64_t H,
                                   int64_t n, int64_t j, int64_t t, const Validity& valid,
                                   bool step) {
  using V = Vec<T>;
  constexpr int64_t U = V::size();
  V acc[Rows][4];
  if (s.d_gates_before != nullptr) {
    // No lines fetched ahead: the product's K (4H) is four times the forward's, which hides
    // more of the misses, and fetching the tile's 28 lines a row evicted the rows of dG that
    // the product reads (measured 3 % slower).
    const auto nothing_ahead = [](int64_t) {};
    gate_block_product<T, Rows>(s.d_gates_before + n * 4 * H, 4 * H, panel, 4 * H, acc,
                                nothing_ahead);
  } else {
    for (int r = 0; r < Rows; ++r) {
      for (int q = 0; q < 4; ++q) acc[r][q] = V(T(0));
    }
  }
  for (int r = 0; r < Rows; ++r) {
    const bool live = step && valid(t, n + r);
    for (int q = 0; q < 4; ++q) {
      const int64_t u = j + q * U, count = std::min<int64_t>(U, H - u);
      if (count <= 0) break;
      const int64_t row = (n + r) * H + u;
      const V d_h_now = V::loadu(s.d_h + row, count) + acc[r][q];
      T* d_b = s.d_bias + u;
      if (!live) {  // past the end (or the last product alone): dh carries on, dG is zero
        d_h_now.store(s.d_h + row, count);
        if (step) {
          T* d_row = s.d_gates + (n + r) * 4 * H + u;
          for (int64_t gate = 0; gate < 4; ++gate) zero_row(d_row + gate * H, count);
        }
        continue;
      }
      const T* g_row = s.gates + (n + r) * 4 * H + u;
      T* d_row = s.d_gates + (n + r) * 4 * H + u;
      const V d_h_out = d_h_now + V::loadu(s.d_out + row, count);
      V(T(0)).store(s.d_h + row, count);  // refilled by the next step's product
      const V i = V::loadu(g_row, count), f = V::loadu(g_row + H, count);
      const V g = V::loadu(g_row + 2 * H, count), o = V::loadu(g_row + 3 * H, count);
      const V tanh_c = fast_tanh(V::loadu(s.c_new + row, count));
      const V d_o = d_h_out * tanh_c * sigmoid_grad(o);
      V d_c_next = V::loadu(s.d_c + row, count) + d_h_out * o * tanh_grad(tanh_c);
      if (s.peep != nullptr) d_c_next = d_c_next + d_o * V::loadu(s.peep + 2 * H + u, count);
      const V d_i = d_c_next * g * sigmoid_grad(i);
      const V d_f = d_c_next * V::loadu(s.c + row, count) * sigmoid_grad(f);
      const V d_g = d_c_next * i * tanh_grad(g);
      V d_c_prev = d_c_next * f;
      if (s.peep != nullptr) {
        d_c_prev = d_c_prev + d_i * V::loadu(s.peep + u, count) +
                   d_f * V::loadu(s.peep + H + u, count);
      }
      d_i.store(d_row, count);
      d_f.store(d_row + H, count);
      d_g.store(d_row + 2 * H, count);
      d_o.store(d_row + 3 * H, count);
      d_c_prev.store(s.d_c + row, count);
      // The bias gradient while the gate gradients are in registers: these units are this
      // thread's alone, so the sums need no reduction (and no second pass over dG).
      (V::loadu(d_b, count) + d_i).store(d_b, count);
      (V::loadu(d_b + H, count) + d_f).store(d_b + H, count);
      (V::loadu(d_b + 2 * H, count) + d_g).store(d_b + 2 * H, count);
      (V::loadu(d_b + 3 * H, count) + d_o).store(d_b + 3 * H, count);
    }
  }
}

template <typename T>
void lstm_backward_resident(const Tensor& d_output, const Tensor& gates, const Tensor& c_states,
                            const Tensor& c_new, const Tensor& w_hh, const T* peep,
                            const Steps& steps, const Validity& valid, const Tensor& d_gates,
                            const Tensor& d_h, const Tensor& d_c, const Tensor& d_bias) {
  constexpr int64_t U = Vec<T>::size();
  constexpr int Rows = kResidentRows<T>;
  const int64_t T_ = steps.count, N = gates.size(1), H = gates.size(2) / 4;
  const int64_t strips = (H + 4 * U - 1) / (4 * U);
  const Tensor packed = pack_column_strips<T>(w_hh, H, 4 * U);
  const T* panels = packed.data_ptr<T>();
  const int team_wanted = resident_threads(strips, N * H * 4 * H);
  SpinBarrier barrier;
  const T* d_out_p = d_output.data_ptr<T>();
  const T* gates_p = gates.data_ptr<T>();
  const T* c_p = c_states.data_ptr<T>();
  const T* c_new_p = c_new.data_ptr<T>();
  T* d_gates_p = d_gates.data_ptr<T>();
  T* d_h_p = d_h.data_ptr<T>();
  T* d_c_p = d_c.data_ptr<T>();
  T* d_bias_p = d_bias.data_ptr<T>();  // zeroed by the caller
  const int64_t state = N * H;
  auto run = [&](int thread, int team) {
    const int64_t first = strips * thread / team, end = strips * (thread + 1) / team;
    for (int64_t s = 0; s <= T_; ++s) {  // s = T_: the last product alone (dh_0)
      const bool step = s < T_;
      const int64_t t = step ? steps.time(T_ - 1 - s) : 0;
      const int64_t t_before = s > 0 ? steps.time(T_ - s) : 0;
      const LstmBackwardBuffers<T> buffers{
          s > 0 ? d_gates_p + t_before * 4 * state : nullptr, d_gates_p + t * 4 * state, d_h_p,
          d_c_p, d_out_p + t * state, gates_p + t * 4 * state, c_p + steps.in(t) * state,
          c_new_p + t * state, peep, d_bias_p};
      for (int64_t b = first; b < end; ++b) {
        const T* panel = panels + b * 4 * H * 4 * U;
        for_row_tiles<Rows>(N, [&]<int R>(int64_t n) {
          resident_backward_tile<T, R>(buffers, panel, H, n, b * 4 * U, t, valid, step);
        });
      }
      if (team > 1 && step) barrier.wait(team);
    }
  };
  on_team(team_wanted, run);
}

// ---- LSTM -----------------------------------------------------------------------------------

// gates (T, N, 4H): x W_ih^T, plus b_ih + b_hh unless `bias` (4H,) brings them (added here:
// a broadcast bias inside the projection's addmm costs a pass over the whole (T, N, 4H)),
// overwritten with the activated i, f, g, o if `for_backward`.
// Optional projection w_hr (P, H) and peephole w_ch (3H,) in the order i, f, o.
// Returns {output (T, N, P), h_states (T + 1, N, P), c_states (T + 1, N, H)}. Each step's new
// cell, which the backward reads as c_new (for invalid rows: the held one), is the cell state
// the step leaves, c_states[steps.out(t)]: it is not written twice.
std::vector<Tensor> lstm_forward(Tensor gates, const std::optional<Tensor>& bias,
                                 const Tensor& h0, const Tensor& c0,
                                 const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                                 const std::optional<Tensor>& w_ch,
                                 const std::optional<Tensor>& lengths, bool reverse,
                                 bool for_backward) {
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
  check("bias", bias, {4 * H});
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  const bool projected = w_hr.has_value();
  Tensor h_states = started_states(steps, h0);
  Tensor c_states = started_states(steps, c0);
  Tensor output = output_buffer(h_states, steps, lengths);
  const bool resident = lstm_forward_on_resident(T, N, H, projected, gates.element_size());
  const ForwardWeight w_hh_forward(w_hh, resident ? 0 : T, N);  // resident: packed there instead
  const std::optional<ForwardWeight> w_hr_forward =
      projected ? std::make_optional<ForwardWeight>(*w_hr, T, N) : std::nullopt;
  // With a projection the kernel writes m = o ⊙ tanh(c') here, and h' = m W_hr^T follows.
  Tensor m = projected ? at::zeros({N, H}, gates.options()) : Tensor();
  Tensor h_raw = projected ? at::empty({N, P}, gates.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_forward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* peep = w_ch.has_value() ? w_ch->data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    if (resident) {
      return lstm_forward_resident<scalar_t>(gates, h_states, c_states, output, w_hh,
                                             peep, b, steps, valid, for_backward);
    }
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = steps.time(s);
      w_hh_forward.multiply<scalar_t>(step_block<scalar_t>(h_states, steps.in(t)),
                                      step_block<scalar_t>(gates, t), true);
      scalar_t* a_p = at_step<scalar_t>(gates, t);
      const scalar_t* h_p = at_step<scalar_t>(h_states, steps.in(t));
      const scalar_t* c_p = at_step<scalar_t>(c_states, steps.in(t));
      scalar_t* h_new_p = at_step<scalar_t>(h_states, steps.out(t));
      scalar_t* c_held_p = at_step<scalar_t>(c_states, steps.out(t));
      scalar_t* out_p = at_step<scalar_t>(output, t);
      scalar_t* m_p = projected ? m.data_ptr<scalar_t>() : out_p;
      for_rows(N, 4 * H, [&](int64_t n) {
        scalar_t* g_row = a_p + n * 4 * H;
        const int64_t row = n * H;
        if (!valid(t, n)) {
          copy_row(c_held_p + row, c_p + row, H);
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
          V g_pre = V::loadu(g_row + 2 * H + j, k);
          V o_pre = V::loadu(g_row + 3 * H + j, k);
          if (b != nullptr) {
            i_pre = i_pre + V::loadu(b + j, k);
            f_pre = f_pre + V::loadu(b + H + j, k);
            g_pre = g_pre + V::loadu(b + 2 * H + j, k);
            o_pre = o_pre + V::loadu(b + 3 * H + j, k);
          }
          if (peep != nullptr) {
            i_pre = i_pre + V::loadu(peep + j, k) * c;
            f_pre = f_pre + V::loadu(peep + H + j, k) * c;
          }
          const V i = sigmoid(i_pre), f = sigmoid(f_pre);
          const V g = fast_tanh(g_pre);
          const V c_next = f * c + i * g;
          if (peep != nullptr) o_pre = o_pre + V::loadu(peep + 2 * H + j, k) * c_next;
          const V o = sigmoid(o_pre);
          const V h_next = o * fast_tanh(c_next);
          if (for_backward) {
            i.store(g_row + j, k);
            f.store(g_row + H + j, k);
            g.store(g_row + 2 * H + j, k);
            o.store(g_row + 3 * H + j, k);
          }
          c_next.store(c_held_p + row + j, k);
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
  return {output, h_states, c_states};
}

// The LSTM (no projection) from its input: x (T, N, I), w_ih (4H, I), `bias` b_ih + b_hh (4H,)
// or none; the rest as lstm_forward. Where `lstm_projects_input` holds, the resident loop's
// tiles project x_t themselves, so no (T, N, 4H) projection is written before the loop and read
// back in it; elsewhere the projection is one product over all steps, then lstm_forward.
// Returns {output (T, N, H), h_states (T + 1, N, H), c_states (T + 1, N, H), gates (T, N, 4H)
// activated if `for_backward`, else empty or the projection}.
std::vector<Tensor> lstm_forward_input(const Tensor& x, const Tensor& w_ih,
                                       const std::optional<Tensor>& bias, const Tensor& h0,
                                       const Tensor& c0, const Tensor& w_hh,
                                       const std::optional<Tensor>& w_ch,
                                       const std::optional<Tensor>& lengths, bool reverse,
                                       bool for_backward) {
  const Arguments check("lstm_forward_input", "x", x, 3);
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2), H = w_hh.size(1);
  check("w_ih", w_ih, {4 * H, I});
  check("h0", h0, {N, H});
  check("c0", c0, {N, H});
  check("w_hh", w_hh, {4 * H, H});
  check("w_ch", w_ch, {3 * H});
  check("bias", bias, {4 * H});
  check.lengths(lengths, N, T);
  if (!lstm_projects_input(T, N, I, H, false, x.element_size())) {
    const KernelScope scope;
    Tensor gates = at::mm(x.reshape({T * N, I}), w_ih.t()).view({T, N, 4 * H});
    std::vector<Tensor> result =
        lstm_forward(gates, bias, h0, c0, w_hh, std::nullopt, w_ch, lengths, reverse,
                     for_backward);
    result.push_back(gates);
    return result;
  }
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor h_states = started_states(steps, h0);
  Tensor c_states = started_states(steps, c0);
  Tensor output = output_buffer(h_states, steps, lengths);
  Tensor gates = at::empty({for_backward ? T : 0, N, 4 * H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_forward_input", [&] {
    const scalar_t* peep = w_ch.has_value() ? w_ch->data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    lstm_forward_resident<scalar_t>(gates, h_states, c_states, output, w_hh, peep, b, steps,
                                    valid, for_backward, x, w_ih);
  });
  return {output, h_states, c_states, gates};
}

// Returns {d_gates (T, N, 4H) before the nonlinearities, d_h0 (N, P), d_c0 (N, H), d_w_hr,
// d_bias (4H,) = Σ_{t,n} d_gates[t, n]} where d_w_hr (P, H) is defined only with a projection.
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
  check.lengths(lengths, N, T);
  const KernelScope scope;
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
  const bool resident = lstm_backward_on_resident(T, N, H, projected, gates.element_size());
  Tensor d_bias = at::zeros({4 * H}, gates.options());
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_backward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* peep = w_ch.has_value() ? w_ch->data_ptr<scalar_t>() : nullptr;
    if (resident) {
      return lstm_backward_resident<scalar_t>(d_output, gates, c_states, c_new, w_hh, peep,
                                              steps, valid, d_gates, d_h, d_c, d_bias);
    }
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
  if (!resident) d_bias = d_gates.sum({0, 1});
  return {d_gates, d_h, d_c, d_w_hr, d_bias};
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
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor states = started_states(steps, h0);
  Tensor output = output_buffer(states, steps, lengths);
  Tensor n_input = at::empty({T, N, H}, gates.options());
  const ForwardWeight w_hh_forward(w_hh, reset_after ? T : 0, N);
  const ForwardWeight w_rz_forward(w_hh.narrow(0, 0, 2 * H), reset_after ? 0 : T, N);
  const ForwardWeight w_n_forward(w_hh.narrow(0, 2 * H, H), reset_after ? 0 : T, N);
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
  check.lengths(lengths, N, T);
  const KernelScope scope;
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

// ---- sLSTM ----------------------------------------------------------------------------------
//
// xLSTM's sLSTM (Beck et al. 2024): the equations, and the fused loops these kernels mirror
// value for value, are in engine/slstm.py. K heads of d units, H = K d, gate order (i, f, z, o).
//
// Layouts. The pre-activation and gate buffers are (T, N, 4H) with each row head-major: head k's
// (ĩ|f̃|z̃|õ) of its d units at columns [4dk, 4d(k + 1)) (`slstm.heads_first` of the public,
// gate-major rows: the input projection's weight rows are reordered once per call, so the
// projection writes this layout directly). States are (T + 1, N, H) in the public layout, head k's
// units at [dk, d(k + 1)). Head k's recurrent product then reads and writes strided blocks of a
// step's buffers, h (N, d) at stride H into pre (N, 4d) at stride 4H: no transposes in the loop,
// the initial and final states as the layer holds them, and the output without lengths a view
// of the h states buffer, as for the other families.
//
// Per step: K products (N, d) x (d, 4d) (`ForwardWeight`: a transposed copy of each R_k per call
// over many steps), the heads shared between threads when each head's product is worth a thread
// (`slstm_head_grain`), else one after another with each product and its gate math threaded
// inside; then the stabilised gate math of each (row, head), vectorised over the head's units.

// 1 / (1 + e^{-x}) with a true division: 0 where e^{-x} overflows (x < -88 in float32), where
// `sigmoid`'s refined reciprocal estimate gives NaN (its Newton step computes inf * 0), and
// never above 1. The sLSTM's gates see the pre-activations of inputs x1e3 (its stabiliser is
// there for them), so its σ must hold at every finite input.
template <typename T>
inline Vec<T> exact_sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}

// log σ(x) = min(x, 0) - log1p(e^{-|x|}), torch's formula for logsigmoid: finite at every
// finite x (log(σ(x)) underflows to -inf below about -104 in float32).
template <typename T>
inline Vec<T> log_sigmoid(const Vec<T>& x) {
  return at::vec::minimum(x, Vec<T>(T(0))) - x.abs().neg().exp().log1p();
}

// log f from the forget pre-activation: f̃ itself (exp forget gate) or log σ(f̃) (sigmoid).
template <typename T>
inline Vec<T> log_forget(const Vec<T>& f_pre, bool exp_forget) {
  return exp_forget ? f_pre : log_sigmoid(f_pre);
}

// Threads share the heads of a step only when each head's product (N d 4d multiply-adds) is
// worth a thread (`thread_min_multiply_adds`); else the heads run in turn on the calling thread
// and each head's product and gate math may use the threads themselves (nested at::parallel_for
// runs inline, so the two never both split).
inline int64_t slstm_head_grain(int64_t heads, int64_t batch, int64_t width) {
  return batch * width * 4 * width >= thread_min_multiply_adds ? 1 : std::max<int64_t>(1, heads);
}

// w_hh must be (K, 4d, d); returns {K, d}. Checked before the shapes that depend on it.
std::pair<int64_t, int64_t> slstm_heads(const char* kernel, const Tensor& w_hh) {
  TORCH_CHECK(w_hh.dim() == 3, kernel, ": w_hh must have 3 dimensions [heads, 4 * head_size, ",
              "head_size], got shape ", w_hh.sizes());
  return {w_hh.size(0), w_hh.size(2)};
}

// pre (T, N, 4H): x W_ih^T + b_ih with head-major rows, overwritten with the full
// pre-activations W x + b + R h of each step, and with `for_backward` then (ĩ|f̃|z|o): the
// backward reads ĩ and f̃ and the activated z and o, and recomputes i' = exp(ĩ - m_t) and
// f' = exp(log f + m_{t-1} - m_t) from them and the m states, the very bits computed here. No
// separate (T, N, 4H) buffer of gate values is kept: a training step's peak memory is 4 T N H
// values smaller. h0, c0, n0, m0 (N, H): the initial state (m0 already -inf where n0 = 0).
// w_hh: [K, 4d, d]. Returns {output (T, N, H) (a view of h_states without lengths), h_states,
// c_states, n_states, m_states (T + 1, N, H)}. Every row's gate math runs at every step (so the
// buffers hold the same values with and without lengths); past a sequence's end the four
// states are then held.
std::vector<Tensor> slstm_forward(Tensor pre, const Tensor& h0, const Tensor& c0,
                                  const Tensor& n0, const Tensor& m0, const Tensor& w_hh,
                                  const std::optional<Tensor>& lengths, bool reverse,
                                  bool exp_forget, bool for_backward) {
  const Arguments check("slstm_forward", "pre", pre, 3);
  const auto [K, d] = slstm_heads("slstm_forward", w_hh);
  const int64_t T = pre.size(0), N = pre.size(1), H = K * d, G = 4 * d;
  check("pre", pre, {T, N, 4 * H});
  check("w_hh", w_hh, {K, G, d});
  check("h0", h0, {N, H});
  check("c0", c0, {N, H});
  check("n0", n0, {N, H});
  check("m0", m0, {N, H});
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor h_states = started_states(steps, h0), c_states = started_states(steps, c0),
         n_states = started_states(steps, n0), m_states = started_states(steps, m0);
  Tensor output = output_buffer(h_states, steps, lengths);
  std::vector<ForwardWeight> r_forward;  // R_k (4d, d), multiplied as h_k R_k^T
  r_forward.reserve(K);
  for (int64_t k = 0; k < K; ++k) r_forward.emplace_back(w_hh.select(0, k), T, N);
  const int64_t grain = slstm_head_grain(K, N, d);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "slstm_forward", [&] {
    using V = Vec<scalar_t>;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = steps.time(s), in = steps.in(t), out = steps.out(t);
      scalar_t* a_p = at_step<scalar_t>(pre, t);
      const scalar_t *h_p = at_step<scalar_t>(h_states, in), *c_p = at_step<scalar_t>(c_states, in),
                     *n_p = at_step<scalar_t>(n_states, in), *m_p = at_step<scalar_t>(m_states, in);
      scalar_t *h_new_p = at_step<scalar_t>(h_states, out), *c_new_p = at_step<scalar_t>(c_states, out),
               *n_new_p = at_step<scalar_t>(n_states, out), *m_new_p = at_step<scalar_t>(m_states, out);
      scalar_t* out_p = lengths.has_value() ? at_step<scalar_t>(output, t) : nullptr;
      parallel_for(0, K, grain, [&](int64_t first, int64_t end) {
        for (int64_t k = first; k < end; ++k) {
          // a_k (N, 4d) at stride 4H += h_k (N, d) at stride H · R_k^T
          r_forward[k].multiply<scalar_t>(Block<const scalar_t>{h_p + k * d, N, d, H},
                                          Block<scalar_t>{a_p + k * G, N, G, 4 * H}, true);
          for_rows(N, G, [&](int64_t n) {
            scalar_t* a = a_p + n * 4 * H + k * G;  // (ĩ|f̃|z̃|õ) of head k, row n
            const int64_t base = n * H + k * d;  // head k's units of row n in a state
            for_units<scalar_t>(d, [&](int64_t j, int64_t count) {
              const V i_pre = V::loadu(a + j, count), f_pre = V::loadu(a + d + j, count);
              const V u = log_forget(f_pre, exp_forget) + V::loadu(m_p + base + j, count);
              // max(log f + m, ĩ), the first branch on a tie (and where either is NaN, ĩ), as
              // the fused path's where().
              const V m_new = V::blendv(i_pre, u, u >= i_pre);
              const V i = (i_pre - m_new).exp(), f = (u - m_new).exp();
              const V z = fast_tanh(V::loadu(a + 2 * d + j, count));
              const V o = exact_sigmoid(V::loadu(a + 3 * d + j, count));
              const V c_new = f * V::loadu(c_p + base + j, count) + i * z;
              const V n_new = f * V::loadu(n_p + base + j, count) + i;
              // A true division: |c| <= n keeps |h| <= 1 exactly, and the backward recomputes
              // these very bits.
              const V h_new = o * (c_new / n_new);
              h_new.store(h_new_p + base + j, count);
              c_new.store(c_new_p + base + j, count);
              n_new.store(n_new_p + base + j, count);
              m_new.store(m_new_p + base + j, count);
              if (out_p) h_new.store(out_p + base + j, count);
              if (for_backward) {  // z̃ and õ were read above: (ĩ|f̃|z|o)
                z.store(a + 2 * d + j, count);
                o.store(a + 3 * d + j, count);
              }
            });
            if (!valid(t, n)) {  // past the end: all four parts held, the output zero
              copy_row(h_new_p + base, h_p + base, d);
              copy_row(c_new_p + base, c_p + base, d);
              copy_row(n_new_p + base, n_p + base, d);
              copy_row(m_new_p + base, m_p + base, d);
              zero_row(out_p + base, d);
            }
          });
        }
      });
    }
  });
  return {output, h_states, c_states, n_states, m_states};
}

// The exact derivative of slstm_forward, the path through m included (engine/slstm.py,
// `fused_backward`, has the formulas line by line). d_output (T, N, H); d_h_n, d_c_n, d_n_n,
// d_m_n (N, H); pre (T, N, 4H) as slstm_forward left it for a backward, (ĩ|f̃|z|o);
// c_states, n_states, m_states (T + 1, N, H); w_hh: [K, 4d, d]. Returns {d_pre (T, N, 4H) the
// gradients of (ĩ|f̃|z̃|õ) head-major, zero past each sequence's end, d_h0, d_c0, d_n0, d_m0
// (N, H)}. A valid step's c_t, n_t and m_t are read from the states it left (equal there to
// the unheld values); i', f' and h̃ = c_t / n_t are recomputed with the forward's own
// operations on the same values, so they are the forward's bits.
std::vector<Tensor> slstm_backward(const Tensor& d_output, const Tensor& d_h_n,
                                   const Tensor& d_c_n, const Tensor& d_n_n, const Tensor& d_m_n,
                                   const Tensor& pre, const Tensor& c_states, const Tensor& n_states,
                                   const Tensor& m_states, const Tensor& w_hh,
                                   const std::optional<Tensor>& lengths, bool reverse,
                                   bool exp_forget) {
  const Arguments check("slstm_backward", "pre", pre, 3);
  const auto [K, d] = slstm_heads("slstm_backward", w_hh);
  const int64_t T = pre.size(0), N = pre.size(1), H = K * d, G = 4 * d;
  check("pre", pre, {T, N, 4 * H});
  check("w_hh", w_hh, {K, G, d});
  check("d_output", d_output, {T, N, H});
  check("d_h_n", d_h_n, {N, H});
  check("d_c_n", d_c_n, {N, H});
  check("d_n_n", d_n_n, {N, H});
  check("d_m_n", d_m_n, {N, H});
  check("c_states", c_states, {T + 1, N, H});
  check("n_states", n_states, {T + 1, N, H});
  check("m_states", m_states, {T + 1, N, H});
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor d_pre = at::empty_like(pre);
  // The gradients flowing into the state leaving the current step, then entering it.
  Tensor d_h = d_h_n.clone(at::MemoryFormat::Contiguous), d_c = d_c_n.clone(at::MemoryFormat::Contiguous),
         d_n = d_n_n.clone(at::MemoryFormat::Contiguous), d_m = d_m_n.clone(at::MemoryFormat::Contiguous);
  const int64_t grain = slstm_head_grain(K, N, d);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "slstm_backward", [&] {
    using V = Vec<scalar_t>;
    const V one(scalar_t(1)), zero(scalar_t(0));
    scalar_t *d_h_p = d_h.data_ptr<scalar_t>(), *d_c_p = d_c.data_ptr<scalar_t>(),
             *d_n_p = d_n.data_ptr<scalar_t>(), *d_m_p = d_m.data_ptr<scalar_t>();
    const scalar_t* w_p = w_hh.data_ptr<scalar_t>();
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = steps.time(s), in = steps.in(t), out = steps.out(t);
      const scalar_t *a_p = at_step<scalar_t>(pre, t), *d_out_p = at_step<scalar_t>(d_output, t);
      const scalar_t *c_old_p = at_step<scalar_t>(c_states, in), *n_old_p = at_step<scalar_t>(n_states, in),
                     *m_old_p = at_step<scalar_t>(m_states, in);
      const scalar_t *c_new_p = at_step<scalar_t>(c_states, out), *n_new_p = at_step<scalar_t>(n_states, out),
                     *m_new_p = at_step<scalar_t>(m_states, out);
      scalar_t* d_pre_p = at_step<scalar_t>(d_pre, t);
      parallel_for(0, K, grain, [&](int64_t first, int64_t end) {
        for (int64_t k = first; k < end; ++k) {
          for_rows(N, G, [&](int64_t n) {
            const scalar_t* a = a_p + n * 4 * H + k * G;  // (ĩ|f̃|z|o)
            scalar_t* dp = d_pre_p + n * 4 * H + k * G;
            const int64_t base = n * H + k * d;
            if (!valid(t, n)) {  // no gate gradient; the held state passes its own around
              zero_row(dp, G);
              return;
            }
            for_units<scalar_t>(d, [&](int64_t j, int64_t count) {
              const V i_pre = V::loadu(a + j, count), f_pre = V::loadu(a + d + j, count);
              const V z = V::loadu(a + 2 * d + j, count), o = V::loadu(a + 3 * d + j, count);
              // The forward's i' and f', recomputed: u = log f + m_{t-1}, m_t as it left it.
              const V u = log_forget(f_pre, exp_forget) + V::loadu(m_old_p + base + j, count);
              const V m_t = V::loadu(m_new_p + base + j, count);
              const V i = (i_pre - m_t).exp(), f = (u - m_t).exp();
              const V n_t = V::loadu(n_new_p + base + j, count);
              const V h_tilde = V::loadu(c_new_p + base + j, count) / n_t;
              const V d_h_t = V::loadu(d_h_p + base + j, count) + V::loadu(d_out_p + base + j, count);
              const V d_o = (d_h_t * h_tilde) * (o * (one - o));
              const V d_h_tilde = d_h_t * o;
              const V d_c_t = V::loadu(d_c_p + base + j, count) + d_h_tilde / n_t;
              const V d_n_t = V::loadu(d_n_p + base + j, count) - d_h_tilde * h_tilde / n_t;
              const V d_f_prime = d_c_t * V::loadu(c_old_p + base + j, count) +
                                  d_n_t * V::loadu(n_old_p + base + j, count);
              const V d_i_prime = d_c_t * z + d_n_t;
              const V d_z = (d_c_t * i) * (one - z * z);
              const V through_f = d_f_prime * f;  // ∂/∂(u - m_t)
              const V through_i = d_i_prime * i;  // ∂/∂(ĩ - m_t)
              const V d_m_total = V::loadu(d_m_p + base + j, count) - through_f - through_i;
              const V past = u >= i_pre;  // m_t = u (else ĩ)
              const V d_u = through_f + V::blendv(zero, d_m_total, past);
              const V d_i = through_i + V::blendv(d_m_total, zero, past);
              // d logσ(f̃) / df̃ = σ(-f̃)
              const V d_f = exp_forget ? d_u : d_u * exact_sigmoid(f_pre.neg());
              d_i.store(dp + j, count);
              d_f.store(dp + d + j, count);
              d_z.store(dp + 2 * d + j, count);
              d_o.store(dp + 3 * d + j, count);
              (d_c_t * f).store(d_c_p + base + j, count);
              (d_n_t * f).store(d_n_p + base + j, count);
              d_u.store(d_m_p + base + j, count);
              zero.store(d_h_p + base + j, count);  // refilled by the product below
            });
          });
          // d_h_k (N, d) at stride H += d_pre_k (N, 4d) at stride 4H · R_k (4d, d): a row
          // past its end adds zero to its held gradient.
          step_product<scalar_t>(Block<const scalar_t>{d_pre_p + k * G, N, G, 4 * H},
                                 Block<const scalar_t>{w_p + k * G * d, G, d, d},
                                 Block<scalar_t>{d_h_p + k * d, N, d, H}, true);
        }
      });
    }
  });
  return {d_pre, d_h, d_c, d_n, d_m};
}

// ---- sLSTM: one streamed step (inference) ---------------------------------------------------
//
// The sLSTM's counterpart of the other families' step kernels ("one streamed step" below): a
// token at a time, batch 1 to a few, nothing saved for a backward (the engine calls it only when
// nothing is differentiated). The sequence kernel above would run such a step as an input
// projection with head-major weight rows (a reordered copy of W_ih per call), then its loop; here
// each block of units inside one head takes every gate row of both products for those units --
// W_ih's rows in the public gate-major layout, R_k's as weight_hh (K, 4d, d) stores them -- into
// a block of pre-activations on the stack, and finishes the units' stabilised gate math (the
// sequence kernel's, value for value) while they are in cache. No buffer beyond the four new
// states. Blocks are split between threads by at::parallel_for's static split (each core the
// same share of the weights every call), with only as many threads as get
// `thread_min_multiply_adds` each (one: inline on the calling thread).

// Defined with the other step kernels' pieces ("one streamed step"); declared here so that this
// section sits with the sLSTM's other kernels.
template <typename T>
void dot_rows(Block<const T> x, const T* w, int64_t ldw, int64_t cols, T* out, int64_t ldo,
              bool accumulate);

// Rows of the batch whose pre-activations a block holds at once: two of dot_rows' 3-row tiles.
constexpr int64_t slstm_step_rows = 6;

// One sLSTM step: x (N, I); h, c, n, m (N, H); w_ih (4H, I) gate-major (W_i|W_f|W_z|W_o);
// w_hh [K, 4d, d], head k's (R_i|R_f|R_z|R_o); b_ih (4H,) or none. Returns {h', c', n', m'}
// (N, H). Where n = 0, m is taken as -inf (the layers' rule for a state without normaliser mass,
// `slstm.empty_where_no_mass`, applied to the state entering every step: a no-op from a cell's
// own states, whose n >= 1).
std::vector<Tensor> slstm_step(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& n,
                               const Tensor& m, const Tensor& w_ih, const Tensor& w_hh,
                               const std::optional<Tensor>& b_ih, bool exp_forget) {
  const Arguments check("slstm_step", "x", x, 2);
  const auto [K, d] = slstm_heads("slstm_step", w_hh);
  const int64_t N = x.size(0), I = x.size(1), H = K * d, G = 4 * d;
  check("h", h, {N, H});
  check("c", c, {N, H});
  check("n", n, {N, H});
  check("m", m, {N, H});
  check("w_ih", w_ih, {4 * H, I});
  check("w_hh", w_hh, {K, G, d});
  check("b_ih", b_ih, {4 * H});
  const KernelScope scope;
  Tensor h_new = at::empty({N, H}, x.options()), c_new = at::empty({N, H}, x.options()),
         n_new = at::empty({N, H}, x.options()), m_new = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "slstm_step", [&] {
    using V = Vec<scalar_t>;
    constexpr int64_t B = V::size();  // units per block: one vector
    const int64_t blocks_per_head = (d + B - 1) / B;
    const int64_t grain = std::max<int64_t>(
        1, thread_min_multiply_adds / std::max<int64_t>(1, B * N * 4 * (I + d)));
    const scalar_t *x_p = x.data_ptr<scalar_t>(), *h_p = h.data_ptr<scalar_t>(),
                   *c_p = c.data_ptr<scalar_t>(), *n_p = n.data_ptr<scalar_t>(),
                   *m_p = m.data_ptr<scalar_t>(), *w_ih_p = w_ih.data_ptr<scalar_t>(),
                   *w_hh_p = w_hh.data_ptr<scalar_t>();
    const scalar_t* b_p = b_ih.has_value() ? b_ih->data_ptr<scalar_t>() : nullptr;
    scalar_t *h_new_p = h_new.data_ptr<scalar_t>(), *c_new_p = c_new.data_ptr<scalar_t>(),
             *n_new_p = n_new.data_ptr<scalar_t>(), *m_new_p = m_new.data_ptr<scalar_t>();
    const V no_mass(-std::numeric_limits<scalar_t>::infinity()), zero(scalar_t(0));
    parallel_for(0, K * blocks_per_head, grain, [&](int64_t first, int64_t end) {
      scalar_t pre[4][slstm_step_rows][B];  // (ĩ|f̃|z̃|õ) of the block's units, a chunk of rows
      for (int64_t b = first; b < end; ++b) {
        const int64_t k = b / blocks_per_head, j = (b % blocks_per_head) * B;
        const int64_t u = std::min(B, d - j), unit = k * d + j;  // unit: in a state row
        for (int64_t n0 = 0; n0 < N; n0 += slstm_step_rows) {
          const int64_t rows = std::min(slstm_step_rows, N - n0);
          const Block<const scalar_t> xs{x_p + n0 * I, rows, I, I};
          const Block<const scalar_t> hs{h_p + n0 * H + k * d, rows, d, H};  // head k's h
          for (int64_t g = 0; g < 4; ++g) {
            const int64_t row = g * H + unit;  // the gate's first row of W_ih and b_ih
            for (int64_t r = 0; r < rows; ++r) {
              for (int64_t v = 0; v < u; ++v) pre[g][r][v] = b_p ? b_p[row + v] : scalar_t(0);
            }
            dot_rows<scalar_t>(xs, w_ih_p + row * I, I, u, &pre[g][0][0], B, true);
            dot_rows<scalar_t>(hs, w_hh_p + (k * G + g * d + j) * d, d, u, &pre[g][0][0], B,
                               true);
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t at = (n0 + r) * H + unit;
            const V i_pre = V::loadu(pre[0][r], u), f_pre = V::loadu(pre[1][r], u);
            const V n_old = V::loadu(n_p + at, u);
            const V m_old = V::blendv(V::loadu(m_p + at, u), no_mass, n_old == zero);
            const V log_f_plus_m = log_forget(f_pre, exp_forget) + m_old;
            // max(log f + m, ĩ), the first branch on a tie: slstm_forward's choice.
            const V m_next = V::blendv(i_pre, log_f_plus_m, log_f_plus_m >= i_pre);
            const V i = (i_pre - m_next).exp(), f = (log_f_plus_m - m_next).exp();
            const V z = fast_tanh(V::loadu(pre[2][r], u));
            const V o = exact_sigmoid(V::loadu(pre[3][r], u));
            const V c_next = f * V::loadu(c_p + at, u) + i * z;
            const V n_next = f * n_old + i;
            (o * (c_next / n_next)).store(h_new_p + at, u);  // a true division, as the forward
            c_next.store(c_new_p + at, u);
            n_next.store(n_new_p + at, u);
            m_next.store(m_new_p + at, u);
          }
        }
      }
    });
  });
  return {h_new, c_new, n_new, m_new};
}

// ---- the recurrence kernels: layer norm, recurrent dropout, zoneout --------------------------
//
// The `*_recurrence_*` kernels run only the recurrence: the input side pre_x (T, N, G*H) comes in
// computed (x W_ih^T, its layer norm and the biases outside any recurrent product, on autograd),
// and is never written. Per step: the entering state, masked by the recurrent dropout mask when
// one is given (into a small (N, P) buffer), times W_hh; with layer norm (gain_hh) that product
// goes to an (N, G*H) buffer and each row is normalised over its G*H columns (x̂ and rstd kept for
// the backward); the gate math; zoneout h_t = d ⊙ h_{t-1} + (1 - d) ⊙ h̃_t with d a per-step 0/1
// mask or a scalar probability. Every saved per-step buffer is zero in rows past a sequence's
// end. The backward returns per-step gradients only: every reduction over the batch (weights,
// gains, biases) is one product or sum over all steps in the caller (ops.py's formula).

constexpr double kLayerNormEps = 1e-5;

// Zoneout's d for one state: off, a scalar p (evaluation) or a (T, N, W) 0/1 mask (training).
template <typename T>
struct Zoneout {
  const T* mask;  // (T, N, W) or nullptr
  T p;
  bool on;
  int64_t batch, width;
  const T* row(int64_t t, int64_t n) const {
    return mask == nullptr ? nullptr : mask + (t * batch + n) * width;
  }
  // d for units [j, j + k) of a row given by `row` (nullptr: the scalar p).
  Vec<T> keep(const T* row_p, int64_t j, int64_t k) const {
    return row_p == nullptr ? Vec<T>(p) : Vec<T>::loadu(row_p + j, k);
  }
};

template <typename T>
Zoneout<T> zoneout_of(const std::optional<Tensor>& d, int64_t batch, int64_t width) {
  if (!d.has_value()) return {nullptr, T(0), false, batch, width};
  if (d->dim() == 0) return {nullptr, d->item<T>(), true, batch, width};
  return {d->data_ptr<T>(), T(0), true, batch, width};
}

// d ⊙ old + (1 - d) ⊙ updated, as the spec writes it (exact for d = 0 and d = 1).
template <typename T>
inline Vec<T> zoned(const Vec<T>& d, const Vec<T>& old, const Vec<T>& updated) {
  return d * old + (Vec<T>(T(1)) - d) * updated;
}

template <typename T>
T* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Σ_j term(j) over a row of `units`, a vector at a time; the lanes past a partial vector's
// `count` are dropped whatever `term` gives there.
template <typename T, typename F>
inline T row_sum(int64_t units, const F& term) {
  using V = Vec<T>;
  V acc(T(0));
  for_units<T>(units, [&](int64_t j, int64_t k) {
    const V x = term(j, k);
    acc = acc + (k == V::size() ? x : V::set(V(T(0)), x, k));
  });
  alignas(64) T lanes[V::size()];
  acc.store(lanes);
  T sum = T(0);
  for (int64_t l = 0; l < V::size(); ++l) sum += lanes[l];
  return sum;
}

// (Σ_j a(j), Σ_j b(j)) in one pass, where terms(j, k) gives the pair (a, b) of its units.
template <typename T, typename F>
inline std::pair<T, T> row_sums(int64_t units, const F& terms) {
  using V = Vec<T>;
  V acc_a(T(0)), acc_b(T(0));
  for_units<T>(units, [&](int64_t j, int64_t k) {
    const std::pair<V, V> x = terms(j, k);
    if (k == V::size()) {
      acc_a = acc_a + x.first;
      acc_b = acc_b + x.second;
    } else {
      acc_a = acc_a + V::set(V(T(0)), x.first, k);
      acc_b = acc_b + V::set(V(T(0)), x.second, k);
    }
  });
  alignas(64) T lanes_a[V::size()];
  alignas(64) T lanes_b[V::size()];
  acc_a.store(lanes_a);
  acc_b.store(lanes_b);
  T a = T(0), b = T(0);
  for (int64_t l = 0; l < V::size(); ++l) {
    a += lanes_a[l];
    b += lanes_b[l];
  }
  return {a, b};
}

// Mean and 1 / sqrt(biased variance + eps) of a row (two passes: the row is in L1).
template <typename T>
struct Moments {
  T mean, rstd;
};

template <typename T>
inline Moments<T> moments(const T* v, int64_t units) {
  using V = Vec<T>;
  const T mean = row_sum<T>(units, [&](int64_t j, int64_t k) { return V::loadu(v + j, k); }) /
                 T(units);
  const T variance = row_sum<T>(units, [&](int64_t j, int64_t k) {
                       const V centred = V::loadu(v + j, k) - V(mean);
                       return centred * centred;
                     }) / T(units);
  return {mean, T(1) / std::sqrt(variance + T(kLayerNormEps))};
}

// The layer norm backward of one row, y = γ ⊙ x̂ with dy given: with g = dy ⊙ γ,
// dv = rstd (g - mean(g) - x̂ mean(g ⊙ x̂)), where x_hat(j, k) gives x̂ at [j, j + k). dv may be
// dy itself (each unit is read before it is written).
template <typename T, typename XHat>
inline void layer_norm_backward_row_of(const T* dy, const T* gain, T rstd, T* dv, int64_t units,
                                       const XHat& x_hat) {
  using V = Vec<T>;
  const auto [sum_g, sum_gx] = row_sums<T>(units, [&](int64_t j, int64_t k) {
    const V g = V::loadu(dy + j, k) * V::loadu(gain + j, k);
    return std::make_pair(g, g * x_hat(j, k));
  });
  const T mean_g = sum_g / T(units), mean_gx = sum_gx / T(units);
  for_units<T>(units, [&](int64_t j, int64_t k) {
    const V g = V::loadu(dy + j, k) * V::loadu(gain + j, k);
    (V(rstd) * (g - V(mean_g) - x_hat(j, k) * V(mean_gx))).store(dv + j, k);
  });
}

// The same with x̂ stored.
template <typename T>
inline void layer_norm_backward_row(const T* dy, const T* gain, const T* x_hat, T rstd, T* dv,
                                    int64_t units) {
  layer_norm_backward_row_of(dy, gain, rstd, dv, units, [&](int64_t j, int64_t k) {
    return Vec<T>::loadu(x_hat + j, k);
  });
}

// The same from the un-normalised row v and its moments (x̂ = (v - mean) rstd recomputed, not
// stored).
template <typename T>
inline void layer_norm_backward_row_from(const T* dy, const T* gain, const T* v, Moments<T> mo,
                                         T* dv, int64_t units) {
  using V = Vec<T>;
  layer_norm_backward_row_of(dy, gain, mo.rstd, dv, units, [&](int64_t j, int64_t k) {
    return (V::loadu(v + j, k) - V(mo.mean)) * V(mo.rstd);
  });
}

// acc += a (⊙ b) over a row: a row's share of a gain's or bias's gradient Σ_{t,n}.
template <typename T, typename F>
inline void accumulate_row(T* acc, int64_t units, const F& term) {
  using V = Vec<T>;
  for_units<T>(units, [&](int64_t j, int64_t k) {
    (V::loadu(acc + j, k) + term(j, k)).store(acc + j, k);
  });
}

// out = mask ⊙ h over a whole (N, W) step (the state entering the recurrent product).
template <typename T>
inline void masked_state(T* out, const T* h, const T* mask, int64_t count) {
  using V = Vec<T>;
  for_units<T>(count, [&](int64_t j, int64_t k) {
    (V::loadu(h + j, k) * V::loadu(mask + j, k)).store(out + j, k);
  });
}

// d_h += mask ⊙ product in the valid rows (the masked state's gradient reaching the state).
template <typename T>
inline void add_masked(T* d_h, const T* mask, const T* product, int64_t rows, int64_t width,
                       int64_t t, const Validity& valid) {
  using V = Vec<T>;
  for_rows(rows, width, [&](int64_t n) {
    if (!valid(t, n)) return;
    const int64_t row = n * width;
    for_units<T>(width, [&](int64_t j, int64_t k) {
      (V::loadu(d_h + row + j, k) + V::loadu(mask + row + j, k) * V::loadu(product + row + j, k))
          .store(d_h + row + j, k);
    });
  });
}

// One step's entering state for the recurrent product: the state itself, or masked into `scratch`.
template <typename T>
Block<const T> entering_state(const Tensor& states, int64_t index, const T* mask, T* scratch) {
  const Block<T> h = step_block<T>(states, index);
  if (mask == nullptr) return h;
  masked_state(scratch, h.data, mask, h.rows * h.cols);
  return Block<const T>{scratch, h.rows, h.cols, h.cols};
}

Tensor per_step_or_undefined(bool wanted, at::IntArrayRef shape, const Tensor& like) {
  return wanted ? at::empty(shape, like.options()) : Tensor();
}

// ---- Elman RNN recurrence ---------------------------------------------------------------------

// Returns {output (T, N, H), states (T + 1, N, H), raw (T, N, H) = h̃ = act(pre_x + u),
// normalised_hh (T, N, H) or undefined, rstd_hh (T, N) or undefined}.
std::vector<Tensor> rnn_recurrence_forward(
    const Tensor& pre_x, const Tensor& h0, const Tensor& w_hh,
    const std::optional<Tensor>& gain_hh, const std::optional<Tensor>& recurrent_mask,
    const std::optional<Tensor>& zoneout_h, const std::optional<Tensor>& lengths, bool reverse,
    bool relu) {
  const Arguments check("rnn_recurrence_forward", "pre_x", pre_x, 3);
  const int64_t T = pre_x.size(0), N = pre_x.size(1), H = pre_x.size(2);
  check("h0", h0, {N, H});
  check("w_hh", w_hh, {H, H});
  check("gain_hh", gain_hh, {H});
  check("recurrent_mask", recurrent_mask, {N, H});
  check.zoneout("zoneout_h", zoneout_h, T, N, H);
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  const bool normed = gain_hh.has_value();
  Tensor states = started_states(steps, h0);
  Tensor output = at::empty({T, N, H}, pre_x.options());
  Tensor raw = at::empty({T, N, H}, pre_x.options());
  Tensor normalised = per_step_or_undefined(normed, {T, N, H}, pre_x);
  Tensor rstd = per_step_or_undefined(normed, {T, N}, pre_x);
  Tensor product = per_step_or_undefined(normed, {N, H}, pre_x);
  Tensor masked = per_step_or_undefined(recurrent_mask.has_value(), {N, H}, pre_x);
  const ForwardWeight w_hh_forward(w_hh, T, N);
  AT_DISPATCH_FLOATING_TYPES(pre_x.scalar_type(), "rnn_recurrence_forward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* mask_p = data_or_null<scalar_t>(recurrent_mask);
    scalar_t* masked_p = data_or_null<scalar_t>(masked);
    const scalar_t* gain_p = data_or_null<scalar_t>(gain_hh);
    scalar_t* product_p = data_or_null<scalar_t>(product);
    const Zoneout<scalar_t> zone = zoneout_of<scalar_t>(zoneout_h, N, H);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = steps.time(s);
      scalar_t* raw_p = at_step<scalar_t>(raw, t);
      // u without layer norm lands in raw's step, and the row pass adds pre_x.
      w_hh_forward.multiply<scalar_t>(
          entering_state<scalar_t>(states, steps.in(t), mask_p, masked_p),
          normed ? matrix<scalar_t>(product) : step_block<scalar_t>(raw, t), false);
      const scalar_t* pre_p = at_step<scalar_t>(pre_x, t);
      const scalar_t* h_p = at_step<scalar_t>(states, steps.in(t));
      scalar_t* h_new_p = at_step<scalar_t>(states, steps.out(t));
      scalar_t* out_p = at_step<scalar_t>(output, t);
      scalar_t* x_hat_p = normed ? at_step<scalar_t>(normalised, t) : nullptr;
      scalar_t* rstd_p = normed ? rstd.data_ptr<scalar_t>() + t * N : nullptr;
      for_rows(N, H, [&](int64_t n) {
        const int64_t row = n * H;
        if (!valid(t, n)) {
          copy_row(h_new_p + row, h_p + row, H);
          zero_row(out_p + row, H);
          zero_row(raw_p + row, H);
          if (normed) {
            zero_row(x_hat_p + row, H);
            rstd_p[n] = scalar_t(0);
          }
          return;
        }
        Moments<scalar_t> m{scalar_t(0), scalar_t(0)};
        if (normed) {
          m = moments(product_p + row, H);
          rstd_p[n] = m.rstd;
        }
        const scalar_t* zone_row = zone.row(t, n);
        for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
          V a = V::loadu(pre_p + row + j, k);
          if (normed) {
            const V x_hat = (V::loadu(product_p + row + j, k) - V(m.mean)) * V(m.rstd);
            x_hat.store(x_hat_p + row + j, k);
            a = a + V::loadu(gain_p + j, k) * x_hat;
          } else {
            a = a + V::loadu(raw_p + row + j, k);
          }
          const V h_tilde = relu ? at::vec::clamp_min(a, V(scalar_t(0))) : fast_tanh(a);
          h_tilde.store(raw_p + row + j, k);
          const V h_next = zone.on
              ? zoned(zone.keep(zone_row, j, k), V::loadu(h_p + row + j, k), h_tilde)
              : h_tilde;
          h_next.store(h_new_p + row + j, k);
          h_next.store(out_p + row + j, k);
        });
      });
    }
  });
  return {output, states, raw, normalised, rstd};
}

// Returns {d_pre_x (T, N, H), d_product (T, N, H) or undefined (without gain_hh), d_h0 (N, H)}.
std::vector<Tensor> rnn_recurrence_backward(
    const Tensor& d_output, const Tensor& d_h_n, const Tensor& states, const Tensor& raw,
    const std::optional<Tensor>& normalised_hh, const std::optional<Tensor>& rstd_hh,
    const Tensor& w_hh, const std::optional<Tensor>& gain_hh,
    const std::optional<Tensor>& recurrent_mask, const std::optional<Tensor>& zoneout_h,
    const std::optional<Tensor>& lengths, bool reverse, bool relu) {
  const Arguments check("rnn_recurrence_backward", "raw", raw, 3);
  const int64_t T = raw.size(0), N = raw.size(1), H = raw.size(2);
  check("d_output", d_output, {T, N, H});
  check("d_h_n", d_h_n, {N, H});
  check("states", states, {T + 1, N, H});
  check("w_hh", w_hh, {H, H});
  check("gain_hh", gain_hh, {H});
  check.together("gain_hh", gain_hh, "normalised_hh", normalised_hh);
  check.together("gain_hh", gain_hh, "rstd_hh", rstd_hh);
  check("normalised_hh", normalised_hh, {T, N, H});
  check("rstd_hh", rstd_hh, {T, N});
  check("recurrent_mask", recurrent_mask, {N, H});
  check.zoneout("zoneout_h", zoneout_h, T, N, H);
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  const bool normed = gain_hh.has_value();
  const bool masked = recurrent_mask.has_value();
  Tensor d_pre = at::empty_like(raw);
  Tensor d_product = per_step_or_undefined(normed, {T, N, H}, raw);
  Tensor d_h = d_h_n.clone(at::MemoryFormat::Contiguous);
  Tensor d_masked = per_step_or_undefined(masked, {N, H}, raw);
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "rnn_recurrence_backward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* mask_p = data_or_null<scalar_t>(recurrent_mask);
    const scalar_t* gain_p = data_or_null<scalar_t>(gain_hh);
    scalar_t* d_h_p = d_h.data_ptr<scalar_t>();
    const Zoneout<scalar_t> zone = zoneout_of<scalar_t>(zoneout_h, N, H);
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = steps.time(s);
      const scalar_t* raw_p = at_step<scalar_t>(raw, t);
      const scalar_t* d_out_p = at_step<scalar_t>(d_output, t);
      scalar_t* d_pre_p = at_step<scalar_t>(d_pre, t);
      scalar_t* d_prod_p = normed ? at_step<scalar_t>(d_product, t) : nullptr;
      const scalar_t* x_hat_p = normed ? at_step<scalar_t>(*normalised_hh, t) : nullptr;
      const scalar_t* rstd_p = normed ? rstd_hh->data_ptr<scalar_t>() + t * N : nullptr;
      for_rows(N, H, [&](int64_t n) {
        const int64_t row = n * H;
        if (!valid(t, n)) {  // the state gradient skips the step
          zero_row(d_pre_p + row, H);
          if (normed) zero_row(d_prod_p + row, H);
          return;
        }
        const scalar_t* zone_row = zone.row(t, n);
        for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
          const V d = V::loadu(d_h_p + row + j, k) + V::loadu(d_out_p + row + j, k);
          V d_tilde = d;
          if (zone.on) {
            const V keep = zone.keep(zone_row, j, k);
            d_tilde = (V(scalar_t(1)) - keep) * d;
            (keep * d).store(d_h_p + row + j, k);  // the product below adds to it
          } else {
            V(scalar_t(0)).store(d_h_p + row + j, k);
          }
          const V y = V::loadu(raw_p + row + j, k);
          // relu's as torch's threshold_backward (rnn_backward): a select, never d * mask.
          const V d_pre_v = relu ? V::blendv(d_tilde, V(scalar_t(0)), y <= V(scalar_t(0)))
                                 : d_tilde * tanh_grad(y);
          d_pre_v.store(d_pre_p + row + j, k);
        });
        if (normed) {
          layer_norm_backward_row(d_pre_p + row, gain_p, x_hat_p + row, rstd_p[n],
                                  d_prod_p + row, H);
        }
      });
      const Block<scalar_t> dv = step_block<scalar_t>(normed ? d_product : d_pre, t);
      if (masked) {
        step_product<scalar_t>(dv, matrix<scalar_t>(w_hh), matrix<scalar_t>(d_masked), false);
        add_masked(d_h_p, mask_p, d_masked.data_ptr<scalar_t>(), N, H, t, valid);
      } else {
        step_product<scalar_t>(dv, matrix<scalar_t>(w_hh), matrix<scalar_t>(d_h), true);
      }
    }
  });
  return {d_pre, d_product, d_h};
}

// ---- GRU recurrence ---------------------------------------------------------------------------

// reset_after: u = LN(hm W_hh^T) (or the product itself) + b_hh; r = σ(a_r + u_r),
// z = σ(a_z + u_z), n = tanh(a_n + r ⊙ u_n), n_input = u_n. reset_before (no gain_hh, no b_hh):
// r, z = σ(a_rz + hm W_rz^T), n_input = r ⊙ hm, n = tanh(a_n + n_input W_n^T). Then
// h̃ = (1 - z) ⊙ n + z ⊙ h and zoneout. Returns {output (T, N, H), states (T + 1, N, H),
// gates (T, N, 3H) activated r, z, n, n_input (T, N, H), normalised_hh (T, N, 3H) or undefined,
// rstd_hh (T, N) or undefined}.
std::vector<Tensor> gru_recurrence_forward(
    const Tensor& pre_x, const Tensor& h0, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& gain_hh, const std::optional<Tensor>& recurrent_mask,
    const std::optional<Tensor>& zoneout_h, const std::optional<Tensor>& lengths, bool reverse,
    bool reset_after) {
  const Arguments check("gru_recurrence_forward", "pre_x", pre_x, 3);
  const int64_t T = pre_x.size(0), N = pre_x.size(1), H = pre_x.size(2) / 3;
  TORCH_CHECK(pre_x.size(2) == 3 * H,
              "gru_recurrence_forward: pre_x must have 3 * hidden columns, got ", pre_x.sizes());
  check("h0", h0, {N, H});
  check("w_hh", w_hh, {3 * H, H});
  check("b_hh", b_hh, {3 * H});
  check("gain_hh", gain_hh, {3 * H});
  TORCH_CHECK(reset_after || (!b_hh.has_value() && !gain_hh.has_value()),
              "gru_recurrence_forward: with reset_after=False, b_hh and gain_hh must be None "
              "(pre_x holds both biases; layer norm needs reset_after=True)");
  check("recurrent_mask", recurrent_mask, {N, H});
  check.zoneout("zoneout_h", zoneout_h, T, N, H);
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  const bool normed = gain_hh.has_value();
  Tensor states = started_states(steps, h0);
  Tensor output = at::empty({T, N, H}, pre_x.options());
  Tensor gates = at::empty({T, N, 3 * H}, pre_x.options());
  Tensor n_input = at::empty({T, N, H}, pre_x.options());
  Tensor normalised = per_step_or_undefined(normed, {T, N, 3 * H}, pre_x);
  Tensor rstd = per_step_or_undefined(normed, {T, N}, pre_x);
  Tensor product = per_step_or_undefined(reset_after, {N, 3 * H}, pre_x);
  Tensor masked = per_step_or_undefined(recurrent_mask.has_value(), {N, H}, pre_x);
  const ForwardWeight w_hh_forward(w_hh, reset_after ? T : 0, N);
  const ForwardWeight w_rz_forward(w_hh.narrow(0, 0, 2 * H), reset_after ? 0 : T, N);
  const ForwardWeight w_n_forward(w_hh.narrow(0, 2 * H, H), reset_after ? 0 : T, N);
  AT_DISPATCH_FLOATING_TYPES(pre_x.scalar_type(), "gru_recurrence_forward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* mask_p = data_or_null<scalar_t>(recurrent_mask);
    scalar_t* masked_p = data_or_null<scalar_t>(masked);
    const scalar_t* gain_p = data_or_null<scalar_t>(gain_hh);
    const scalar_t* b_hh_p = data_or_null<scalar_t>(b_hh);
    scalar_t* product_p = data_or_null<scalar_t>(product);
    const Zoneout<scalar_t> zone = zoneout_of<scalar_t>(zoneout_h, N, H);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = steps.time(s);
      const Block<const scalar_t> entering =
          entering_state<scalar_t>(states, steps.in(t), mask_p, masked_p);
      const Block<scalar_t> a = step_block<scalar_t>(gates, t);
      scalar_t* g_p = a.data;
      const scalar_t* pre_p = at_step<scalar_t>(pre_x, t);
      const scalar_t* h_p = at_step<scalar_t>(states, steps.in(t));
      scalar_t* h_new_p = at_step<scalar_t>(states, steps.out(t));
      scalar_t* out_p = at_step<scalar_t>(output, t);
      scalar_t* n_in_p = at_step<scalar_t>(n_input, t);
      scalar_t* x_hat_p = normed ? at_step<scalar_t>(normalised, t) : nullptr;
      scalar_t* rstd_p = normed ? rstd.data_ptr<scalar_t>() + t * N : nullptr;
      // Both forms end with n = tanh(n_pre), h̃ = n + z (h - n), zoneout: n, h_t and output.
      auto finish = [&](int64_t n, int64_t j, int64_t k, const V& z, const V& n_pre) {
        const int64_t row = n * H;
        const V n_gate = fast_tanh(n_pre);
        n_gate.store(g_p + n * 3 * H + 2 * H + j, k);
        const V h = V::loadu(h_p + row + j, k);
        V h_next = n_gate + z * (h - n_gate);
        if (zone.on) h_next = zoned(zone.keep(zone.row(t, n), j, k), h, h_next);
        h_next.store(h_new_p + row + j, k);
        h_next.store(out_p + row + j, k);
      };
      auto hold = [&](int64_t n) {
        copy_row(h_new_p + n * H, h_p + n * H, H);
        zero_row(out_p + n * H, H);
        zero_row(g_p + n * 3 * H, 3 * H);
        zero_row(n_in_p + n * H, H);
        if (normed) {
          zero_row(x_hat_p + n * 3 * H, 3 * H);
          rstd_p[n] = scalar_t(0);
        }
      };
      if (reset_after) {
        w_hh_forward.multiply<scalar_t>(entering, matrix<scalar_t>(product), false);
        for_rows(N, 3 * H, [&](int64_t n) {
          if (!valid(t, n)) return hold(n);
          const scalar_t* v_row = product_p + n * 3 * H;
          const scalar_t* pre_row = pre_p + n * 3 * H;
          scalar_t* g_row = g_p + n * 3 * H;
          scalar_t* x_hat_row = normed ? x_hat_p + n * 3 * H : nullptr;
          Moments<scalar_t> m{scalar_t(0), scalar_t(0)};
          if (normed) {
            m = moments(v_row, 3 * H);
            rstd_p[n] = m.rstd;
          }
          // u of the columns [offset + j, offset + j + k): LN(v) (x̂ kept) or v, plus b_hh.
          auto u_of = [&](int64_t offset, int64_t j, int64_t k) {
            V u = V::loadu(v_row + offset + j, k);
            if (normed) {
              const V x_hat = (u - V(m.mean)) * V(m.rstd);
              x_hat.store(x_hat_row + offset + j, k);
              u = V::loadu(gain_p + offset + j, k) * x_hat;
            }
            if (b_hh_p != nullptr) u = u + V::loadu(b_hh_p + offset + j, k);
            return u;
          };
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            const V r = sigmoid(V::loadu(pre_row + j, k) + u_of(0, j, k));
            const V z = sigmoid(V::loadu(pre_row + H + j, k) + u_of(H, j, k));
            const V u_n = u_of(2 * H, j, k);
            r.store(g_row + j, k);
            z.store(g_row + H + j, k);
            u_n.store(n_in_p + n * H + j, k);
            finish(n, j, k, z, V::loadu(pre_row + 2 * H + j, k) + r * u_n);
          });
        });
      } else {
        w_rz_forward.multiply<scalar_t>(entering, a.columns(0, 2 * H), false);
        for_rows(N, 2 * H, [&](int64_t n) {
          if (!valid(t, n)) return hold(n);
          const scalar_t* pre_row = pre_p + n * 3 * H;
          scalar_t* g_row = g_p + n * 3 * H;
          const scalar_t* hm_row = entering.data + n * H;
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            const V r = sigmoid(V::loadu(pre_row + j, k) + V::loadu(g_row + j, k));
            const V z = sigmoid(V::loadu(pre_row + H + j, k) + V::loadu(g_row + H + j, k));
            r.store(g_row + j, k);
            z.store(g_row + H + j, k);
            (r * V::loadu(hm_row + j, k)).store(n_in_p + n * H + j, k);
          });
        });
        w_n_forward.multiply<scalar_t>(step_block<scalar_t>(n_input, t), a.columns(2 * H, H),
                                       false);
        for_rows(N, H, [&](int64_t n) {
          scalar_t* g_row = g_p + n * 3 * H;
          if (!valid(t, n)) return zero_row(g_row + 2 * H, H);
          const scalar_t* pre_row = pre_p + n * 3 * H;
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            finish(n, j, k, V::loadu(g_row + H + j, k),
                   V::loadu(pre_row + 2 * H + j, k) + V::loadu(g_row + 2 * H + j, k));
          });
        });
      }
    }
  });
  return {output, states, gates, n_input, normalised, rstd};
}

// Returns {d_pre_x (T, N, 3H) = (d_r, d_z, d_n) pre-activation gradients, d_hidden (T, N, 3H) =
// du = (d_r, d_z, d_n ⊙ r) (reset_after; else undefined), d_product (T, N, 3H) = LN_back(du)
// (with gain_hh; else undefined), d_h0 (N, H)}.
std::vector<Tensor> gru_recurrence_backward(
    const Tensor& d_output, const Tensor& d_h_n, const Tensor& states, const Tensor& gates,
    const Tensor& n_input, const std::optional<Tensor>& normalised_hh,
    const std::optional<Tensor>& rstd_hh, const Tensor& w_hh,
    const std::optional<Tensor>& gain_hh, const std::optional<Tensor>& recurrent_mask,
    const std::optional<Tensor>& zoneout_h, const std::optional<Tensor>& lengths, bool reverse,
    bool reset_after) {
  const Arguments check("gru_recurrence_backward", "gates", gates, 3);
  const int64_t T = gates.size(0), N = gates.size(1), H = gates.size(2) / 3;
  TORCH_CHECK(gates.size(2) == 3 * H,
              "gru_recurrence_backward: gates must have 3 * hidden columns, got ", gates.sizes());
  check("d_output", d_output, {T, N, H});
  check("d_h_n", d_h_n, {N, H});
  check("states", states, {T + 1, N, H});
  check("n_input", n_input, {T, N, H});
  check("w_hh", w_hh, {3 * H, H});
  check("gain_hh", gain_hh, {3 * H});
  TORCH_CHECK(reset_after || !gain_hh.has_value(),
              "gru_recurrence_backward: with reset_after=False, gain_hh must be None");
  check.together("gain_hh", gain_hh, "normalised_hh", normalised_hh);
  check.together("gain_hh", gain_hh, "rstd_hh", rstd_hh);
  check("normalised_hh", normalised_hh, {T, N, 3 * H});
  check("rstd_hh", rstd_hh, {T, N});
  check("recurrent_mask", recurrent_mask, {N, H});
  check.zoneout("zoneout_h", zoneout_h, T, N, H);
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  const bool normed = gain_hh.has_value();
  const bool masked = recurrent_mask.has_value();
  Tensor d_pre = at::empty_like(gates);
  Tensor d_hidden = per_step_or_undefined(reset_after, {T, N, 3 * H}, gates);
  Tensor d_product = per_step_or_undefined(normed, {T, N, 3 * H}, gates);
  Tensor d_h = d_h_n.clone(at::MemoryFormat::Contiguous);
  // The gradient reaching the masked state (mask given), and d_rh = d_n W_n (reset before).
  Tensor d_masked = per_step_or_undefined(masked, {N, H}, gates);
  Tensor d_rh = per_step_or_undefined(!reset_after, {N, H}, gates);
  const Tensor w_rz = w_hh.narrow(0, 0, 2 * H), w_n = w_hh.narrow(0, 2 * H, H);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "gru_recurrence_backward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* mask_p = data_or_null<scalar_t>(recurrent_mask);
    scalar_t* d_masked_p = data_or_null<scalar_t>(d_masked);
    const scalar_t* gain_p = data_or_null<scalar_t>(gain_hh);
    scalar_t* d_h_p = d_h.data_ptr<scalar_t>();
    const Zoneout<scalar_t> zone = zoneout_of<scalar_t>(zoneout_h, N, H);
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = steps.time(s);
      const scalar_t* d_out_p = at_step<scalar_t>(d_output, t);
      const scalar_t* g_p = at_step<scalar_t>(gates, t);
      const scalar_t* h_p = at_step<scalar_t>(states, steps.in(t));
      const scalar_t* n_in_p = at_step<scalar_t>(n_input, t);
      const Block<scalar_t> d_pre_t = step_block<scalar_t>(d_pre, t);
      scalar_t* d_pre_p = d_pre_t.data;
      // Shared: zoneout, then z's and n's pre-activation gradients from h̃ = n + z (h - n);
      // d_h becomes the direct part d ⊙ dh + z ⊙ dh̃ (the products below add the rest).
      auto through_update = [&](int64_t n, int64_t j, int64_t k, V* d_n_out) {
        const int64_t row = n * H;
        const scalar_t* g_row = g_p + n * 3 * H;
        const V dh = V::loadu(d_h_p + row + j, k) + V::loadu(d_out_p + row + j, k);
        V d_tilde = dh, direct = V(scalar_t(0));
        if (zone.on) {
          const V keep = zone.keep(zone.row(t, n), j, k);
          d_tilde = (V(scalar_t(1)) - keep) * dh;
          direct = keep * dh;
        }
        const V z = V::loadu(g_row + H + j, k), n_gate = V::loadu(g_row + 2 * H + j, k);
        const V d_z = d_tilde * (V::loadu(h_p + row + j, k) - n_gate) * sigmoid_grad(z);
        const V d_n = d_tilde * (V(scalar_t(1)) - z) * tanh_grad(n_gate);
        d_z.store(d_pre_p + n * 3 * H + H + j, k);
        d_n.store(d_pre_p + n * 3 * H + 2 * H + j, k);
        (direct + z * d_tilde).store(d_h_p + row + j, k);
        *d_n_out = d_n;
      };
      if (reset_after) {
        scalar_t* d_hid_p = at_step<scalar_t>(d_hidden, t);
        scalar_t* d_prod_p = normed ? at_step<scalar_t>(d_product, t) : nullptr;
        const scalar_t* x_hat_p = normed ? at_step<scalar_t>(*normalised_hh, t) : nullptr;
        const scalar_t* rstd_p = normed ? rstd_hh->data_ptr<scalar_t>() + t * N : nullptr;
        for_rows(N, 3 * H, [&](int64_t n) {
          scalar_t* d_hid_row = d_hid_p + n * 3 * H;
          if (!valid(t, n)) {
            zero_row(d_pre_p + n * 3 * H, 3 * H);
            zero_row(d_hid_row, 3 * H);
            if (normed) zero_row(d_prod_p + n * 3 * H, 3 * H);
            return;
          }
          const scalar_t* g_row = g_p + n * 3 * H;
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            V d_n;
            through_update(n, j, k, &d_n);
            const V r = V::loadu(g_row + j, k);
            const V d_r = d_n * V::loadu(n_in_p + n * H + j, k) * sigmoid_grad(r);
            d_r.store(d_pre_p + n * 3 * H + j, k);
            d_r.store(d_hid_row + j, k);
            V::loadu(d_pre_p + n * 3 * H + H + j, k).store(d_hid_row + H + j, k);
            (d_n * r).store(d_hid_row + 2 * H + j, k);
          });
          if (normed) {
            layer_norm_backward_row(d_hid_row, gain_p, x_hat_p + n * 3 * H, rstd_p[n],
                                    d_prod_p + n * 3 * H, 3 * H);
          }
        });
        const Block<scalar_t> dv = step_block<scalar_t>(normed ? d_product : d_hidden, t);
        if (masked) {
          step_product<scalar_t>(dv, matrix<scalar_t>(w_hh), matrix<scalar_t>(d_masked), false);
          add_masked(d_h_p, mask_p, d_masked_p, N, H, t, valid);
        } else {
          step_product<scalar_t>(dv, matrix<scalar_t>(w_hh), matrix<scalar_t>(d_h), true);
        }
      } else {
        for_rows(N, 2 * H, [&](int64_t n) {
          if (!valid(t, n)) return zero_row(d_pre_p + n * 3 * H, 3 * H);
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            V d_n;
            through_update(n, j, k, &d_n);
          });
        });
        step_product<scalar_t>(d_pre_t.columns(2 * H, H), matrix<scalar_t>(w_n),
                               matrix<scalar_t>(d_rh), false);  // gradient of n_input = r ⊙ hm
        const scalar_t* d_rh_p = d_rh.data_ptr<scalar_t>();
        // The masked state's gradient: d_rh ⊙ r + (d_r, d_z) W_rz, into d_masked when a mask
        // multiplies it afterwards, else straight into d_h.
        scalar_t* d_hm_p = masked ? d_masked_p : d_h_p;
        for_rows(N, H, [&](int64_t n) {
          const int64_t row = n * H;
          if (!valid(t, n)) {
            if (masked) zero_row(d_hm_p + row, H);
            return;
          }
          const scalar_t* g_row = g_p + n * 3 * H;
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            const V r = V::loadu(g_row + j, k), d_rh_v = V::loadu(d_rh_p + row + j, k);
            V hm = V::loadu(h_p + row + j, k);
            if (masked) hm = hm * V::loadu(mask_p + row + j, k);
            (d_rh_v * hm * sigmoid_grad(r)).store(d_pre_p + n * 3 * H + j, k);
            const V d_hm = d_rh_v * r;
            (masked ? d_hm : V::loadu(d_h_p + row + j, k) + d_hm).store(d_hm_p + row + j, k);
          });
        });
        step_product<scalar_t>(d_pre_t.columns(0, 2 * H), matrix<scalar_t>(w_rz),
                               matrix<scalar_t>(masked ? d_masked : d_h), true);
        if (masked) add_masked(d_h_p, mask_p, d_masked_p, N, H, t, valid);
      }
    }
  });
  return {d_pre, d_hidden, d_product, d_h};
}

// ---- LSTM recurrence --------------------------------------------------------------------------

// a = pre_x + u (u = LN(hm W_hh^T; gain_hh) or the product), i = σ(a_i + p_i ⊙ c),
// f = σ(a_f + p_f ⊙ c), g = tanh(a_g), c̃ = f ⊙ c + i ⊙ g, o = σ(a_o + p_o ⊙ c̃),
// ℓ = LN(c̃; gain_c, shift_c) or c̃, h̃ = (o ⊙ tanh ℓ) W_hr^T or o ⊙ tanh ℓ, then zoneout of h
// and c. Returns {output (T, N, P), h_states (T + 1, N, P), c_states (T + 1, N, H), gates
// (T, N, 4H) activated i, f, g, o, c_new (T, N, H) = c̃, normalised_hh (T, N, 4H), rstd_hh
// (T, N), normalised_c (T, N, H), rstd_c (T, N), mean_ih (T, N), rstd_ih (T, N)}, the last six
// undefined without their gain.
//
// The input side's layer norm folded in (gain_ih given, which needs gain_hh): pre_x is then the
// raw input product W_ih x, and each row of it is normalised here, a = γ_ih ⊙ LN(pre_x) (+ bias_ih)
// + u, its moments kept (mean_ih, rstd_ih) for the backward, which recomputes x̂_ih from them.
// bias_ih (4H,) is added to every row when given (with or without gain_ih).
std::vector<Tensor> lstm_recurrence_forward(
    const Tensor& pre_x, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const std::optional<Tensor>& gain_hh, const std::optional<Tensor>& gain_c,
    const std::optional<Tensor>& shift_c, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& w_ch, const std::optional<Tensor>& recurrent_mask,
    const std::optional<Tensor>& zoneout_h, const std::optional<Tensor>& zoneout_c,
    const std::optional<Tensor>& lengths, bool reverse, const std::optional<Tensor>& gain_ih,
    const std::optional<Tensor>& bias_ih) {
  const Arguments check("lstm_recurrence_forward", "pre_x", pre_x, 3);
  const int64_t T = pre_x.size(0), N = pre_x.size(1), H = pre_x.size(2) / 4;
  TORCH_CHECK(pre_x.size(2) == 4 * H,
              "lstm_recurrence_forward: pre_x must have 4 * hidden columns, got ", pre_x.sizes());
  const int64_t P = w_hr.has_value() && w_hr->dim() == 2 ? w_hr->size(0) : H;
  check("h0", h0, {N, P});
  check("c0", c0, {N, H});
  check("w_hh", w_hh, {4 * H, P});
  check("gain_hh", gain_hh, {4 * H});
  check("gain_c", gain_c, {H});
  check("shift_c", shift_c, {H});
  check.together("gain_c", gain_c, "shift_c", shift_c);
  check("w_hr", w_hr, {P, H});
  check("w_ch", w_ch, {3 * H});
  check("recurrent_mask", recurrent_mask, {N, P});
  check.zoneout("zoneout_h", zoneout_h, T, N, P);
  check.zoneout("zoneout_c", zoneout_c, T, N, H);
  check.lengths(lengths, N, T);
  check("gain_ih", gain_ih, {4 * H});
  check("bias_ih", bias_ih, {4 * H});
  TORCH_CHECK(!gain_ih.has_value() || gain_hh.has_value(),
              "lstm_recurrence_forward: gain_ih (the input side's layer norm) needs gain_hh");
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  const bool projected = w_hr.has_value(), normed = gain_hh.has_value();
  const bool cell_normed = gain_c.has_value(), input_normed = gain_ih.has_value();
  Tensor h_states = started_states(steps, h0);
  Tensor c_states = started_states(steps, c0);
  Tensor output = at::empty({T, N, P}, pre_x.options());
  Tensor gates = at::empty({T, N, 4 * H}, pre_x.options());
  Tensor c_new = at::empty({T, N, H}, pre_x.options());
  Tensor normalised = per_step_or_undefined(normed, {T, N, 4 * H}, pre_x);
  Tensor rstd = per_step_or_undefined(normed, {T, N}, pre_x);
  Tensor normalised_c = per_step_or_undefined(cell_normed, {T, N, H}, pre_x);
  Tensor rstd_c = per_step_or_undefined(cell_normed, {T, N}, pre_x);
  Tensor mean_ih = per_step_or_undefined(input_normed, {T, N}, pre_x);
  Tensor rstd_ih = per_step_or_undefined(input_normed, {T, N}, pre_x);
  // Per-call scratch: the product to normalise, the masked state, and with a projection
  // m = o ⊙ tanh ℓ (zero in held rows) and its product h̃ = m W_hr^T.
  Tensor product = per_step_or_undefined(normed, {N, 4 * H}, pre_x);
  Tensor masked = per_step_or_undefined(recurrent_mask.has_value(), {N, P}, pre_x);
  Tensor m = projected ? at::zeros({N, H}, pre_x.options()) : Tensor();
  Tensor h_raw = per_step_or_undefined(projected, {N, P}, pre_x);
  const ForwardWeight w_hh_forward(w_hh, T, N);
  const std::optional<ForwardWeight> w_hr_forward =
      projected ? std::make_optional<ForwardWeight>(*w_hr, T, N) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(pre_x.scalar_type(), "lstm_recurrence_forward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* peep = data_or_null<scalar_t>(w_ch);
    const scalar_t* mask_p = data_or_null<scalar_t>(recurrent_mask);
    scalar_t* masked_p = data_or_null<scalar_t>(masked);
    const scalar_t* gain_p = data_or_null<scalar_t>(gain_hh);
    const scalar_t* gain_c_p = data_or_null<scalar_t>(gain_c);
    const scalar_t* shift_c_p = data_or_null<scalar_t>(shift_c);
    const scalar_t* gain_ih_p = data_or_null<scalar_t>(gain_ih);
    const scalar_t* bias_ih_p = data_or_null<scalar_t>(bias_ih);
    scalar_t* product_p = data_or_null<scalar_t>(product);
    const Zoneout<scalar_t> zone_h = zoneout_of<scalar_t>(zoneout_h, N, P);
    const Zoneout<scalar_t> zone_c = zoneout_of<scalar_t>(zoneout_c, N, H);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = steps.time(s);
      // u without layer norm lands in the gates' step, and the row pass adds pre_x.
      w_hh_forward.multiply<scalar_t>(
          entering_state<scalar_t>(h_states, steps.in(t), mask_p, masked_p),
          normed ? matrix<scalar_t>(product) : step_block<scalar_t>(gates, t), false);
      scalar_t* g_p = at_step<scalar_t>(gates, t);
      const scalar_t* pre_p = at_step<scalar_t>(pre_x, t);
      const scalar_t* h_p = at_step<scalar_t>(h_states, steps.in(t));
      const scalar_t* c_p = at_step<scalar_t>(c_states, steps.in(t));
      scalar_t* h_new_p = at_step<scalar_t>(h_states, steps.out(t));
      scalar_t* c_out_p = at_step<scalar_t>(c_states, steps.out(t));
      scalar_t* c_new_p = at_step<scalar_t>(c_new, t);
      scalar_t* out_p = at_step<scalar_t>(output, t);
      scalar_t* m_p = projected ? m.data_ptr<scalar_t>() : nullptr;
      scalar_t* x_hat_p = normed ? at_step<scalar_t>(normalised, t) : nullptr;
      scalar_t* rstd_p = normed ? rstd.data_ptr<scalar_t>() + t * N : nullptr;
      scalar_t* c_hat_p = cell_normed ? at_step<scalar_t>(normalised_c, t) : nullptr;
      scalar_t* rstd_c_p = cell_normed ? rstd_c.data_ptr<scalar_t>() + t * N : nullptr;
      scalar_t* mean_ih_p = input_normed ? mean_ih.data_ptr<scalar_t>() + t * N : nullptr;
      scalar_t* rstd_ih_p = input_normed ? rstd_ih.data_ptr<scalar_t>() + t * N : nullptr;
      for_rows(N, 4 * H, [&](int64_t n) {
        const int64_t row = n * H, row4 = n * 4 * H;
        scalar_t* g_row = g_p + row4;
        if (!valid(t, n)) {
          if (input_normed) mean_ih_p[n] = rstd_ih_p[n] = scalar_t(0);
          copy_row(c_out_p + row, c_p + row, H);
          zero_row(c_new_p + row, H);
          zero_row(g_row, 4 * H);
          if (normed) {
            zero_row(x_hat_p + row4, 4 * H);
            rstd_p[n] = scalar_t(0);
          }
          if (cell_normed) {
            zero_row(c_hat_p + row, H);
            rstd_c_p[n] = scalar_t(0);
          }
          if (projected) {
            zero_row(m_p + row, H);
          } else {
            copy_row(h_new_p + row, h_p + row, H);
            zero_row(out_p + row, H);
          }
          return;
        }
        const scalar_t* pre_row = pre_p + row4;
        const scalar_t* v_row = normed ? product_p + row4 : g_row;
        Moments<scalar_t> mo{scalar_t(0), scalar_t(0)};
        if (normed) {
          mo = moments(v_row, 4 * H);
          rstd_p[n] = mo.rstd;
        }
        Moments<scalar_t> mi{scalar_t(0), scalar_t(0)};
        if (input_normed) {  // the input side's row, read once more while it is in cache
          mi = moments(pre_row, 4 * H);
          mean_ih_p[n] = mi.mean;
          rstd_ih_p[n] = mi.rstd;
        }
        // a = pre_x + u at the columns [offset + j, offset + j + k) (x̂ kept with layer norm),
        // pre_x being γ_ih ⊙ LN(W_ih x) + b from the raw product with the input norm folded in.
        auto a_of = [&](int64_t offset, int64_t j, int64_t k) {
          const V v = V::loadu(v_row + offset + j, k);
          V pre = V::loadu(pre_row + offset + j, k);
          if (input_normed) {
            pre = V::loadu(gain_ih_p + offset + j, k) * ((pre - V(mi.mean)) * V(mi.rstd));
          }
          if (bias_ih_p != nullptr) pre = pre + V::loadu(bias_ih_p + offset + j, k);
          if (!normed) return pre + v;
          const V x_hat = (v - V(mo.mean)) * V(mo.rstd);
          x_hat.store(x_hat_p + row4 + offset + j, k);
          return pre + V::loadu(gain_p + offset + j, k) * x_hat;
        };
        const scalar_t* zone_h_row = zone_h.row(t, n);
        const scalar_t* zone_c_row = zone_c.row(t, n);
        // From c̃, ℓ and a_o: o, m = o ⊙ tanh ℓ, and h_t (without a projection; else m).
        auto finish = [&](int64_t j, int64_t k, const V& c_next, const V& ell, V o_pre) {
          if (peep != nullptr) o_pre = o_pre + V::loadu(peep + 2 * H + j, k) * c_next;
          const V o = sigmoid(o_pre);
          o.store(g_row + 3 * H + j, k);
          const V h_tilde = o * fast_tanh(ell);
          if (projected) {
            h_tilde.store(m_p + row + j, k);
            return;
          }
          const V h_next = zone_h.on
              ? zoned(zone_h.keep(zone_h_row, j, k), V::loadu(h_p + row + j, k), h_tilde)
              : h_tilde;
          h_next.store(h_new_p + row + j, k);
          h_next.store(out_p + row + j, k);
        };
        for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
          const V c = V::loadu(c_p + row + j, k);
          V i_pre = a_of(0, j, k), f_pre = a_of(H, j, k);
          if (peep != nullptr) {
            i_pre = i_pre + V::loadu(peep + j, k) * c;
            f_pre = f_pre + V::loadu(peep + H + j, k) * c;
          }
          const V i = sigmoid(i_pre), f = sigmoid(f_pre);
          const V g = fast_tanh(a_of(2 * H, j, k));
          const V c_next = f * c + i * g;
          i.store(g_row + j, k);
          f.store(g_row + H + j, k);
          g.store(g_row + 2 * H + j, k);
          c_next.store(c_new_p + row + j, k);
          (zone_c.on ? zoned(zone_c.keep(zone_c_row, j, k), c, c_next) : c_next)
              .store(c_out_p + row + j, k);
          const V o_pre = a_of(3 * H, j, k);
          if (cell_normed) {
            o_pre.store(g_row + 3 * H + j, k);  // o waits for LN(c̃)'s row moments
          } else {
            finish(j, k, c_next, c_next, o_pre);
          }
        });
        if (cell_normed) {
          const Moments<scalar_t> mc = moments(c_new_p + row, H);
          rstd_c_p[n] = mc.rstd;
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            const V c_next = V::loadu(c_new_p + row + j, k);
            const V c_hat = (c_next - V(mc.mean)) * V(mc.rstd);
            c_hat.store(c_hat_p + row + j, k);
            const V ell = V::loadu(gain_c_p + j, k) * c_hat + V::loadu(shift_c_p + j, k);
            finish(j, k, c_next, ell, V::loadu(g_row + 3 * H + j, k));
          });
        }
      });
      if (projected) {
        w_hr_forward->multiply<scalar_t>(matrix<scalar_t>(m), matrix<scalar_t>(h_raw), false);
        const scalar_t* h_raw_p = h_raw.data_ptr<scalar_t>();
        for_rows(N, P, [&](int64_t n) {
          const int64_t row = n * P;
          if (!valid(t, n)) {
            copy_row(h_new_p + row, h_p + row, P);
            zero_row(out_p + row, P);
            return;
          }
          if (!zone_h.on) {
            copy_row(h_new_p + row, h_raw_p + row, P);
            copy_row(out_p + row, h_raw_p + row, P);
            return;
          }
          const scalar_t* zone_row = zone_h.row(t, n);
          for_units<scalar_t>(P, [&](int64_t j, int64_t k) {
            const V h_next = zoned(zone_h.keep(zone_row, j, k), V::loadu(h_p + row + j, k),
                                   V::loadu(h_raw_p + row + j, k));
            h_next.store(h_new_p + row + j, k);
            h_next.store(out_p + row + j, k);
          });
        });
      }
    }
  });
  return {output, h_states, c_states, gates, c_new, normalised, rstd, normalised_c, rstd_c,
          mean_ih, rstd_ih};
}

// Returns {d_pre_x (T, N, 4H) = dA (gate pre-activation gradients), d_product (T, N, 4H) = dv =
// LN_back(dA) (with gain_hh; else undefined), d_h0 (N, P), d_c0 (N, H), d_w_hr (P, H) (with a
// projection; else undefined), d_cell_norm (T, N, H) = dℓ (with gain_c; else undefined),
// then, with the input side's layer norm folded in (gain_ih, pre_x, mean_ih, rstd_ih given),
// the sums over steps and rows that the forward's folded norm needs, each undefined otherwise:
// d_gain_ih = Σ dA ⊙ x̂_ih, d_bias_ih = Σ dA, d_gain_hh = Σ dA ⊙ x̂_hh, d_gain_c = Σ dℓ ⊙ ĉ,
// d_shift_c = Σ dℓ (with gain_c), d_w_ch = Σ (d_i ⊙ c, d_f ⊙ c, d_o ⊙ c̃) (with w_ch)}. Folded,
// the first result is the raw product's gradient LN_back(dA; γ_ih) instead of dA. The sums are
// kept per row (N, ·), one thread per row within a step, and summed over N at the end.
std::vector<Tensor> lstm_recurrence_backward(
    const Tensor& d_output, const Tensor& d_h_n, const Tensor& d_c_n, const Tensor& h_states,
    const Tensor& c_states, const Tensor& gates, const Tensor& c_new,
    const std::optional<Tensor>& normalised_hh, const std::optional<Tensor>& rstd_hh,
    const std::optional<Tensor>& normalised_c, const std::optional<Tensor>& rstd_c,
    const Tensor& w_hh, const std::optional<Tensor>& gain_hh, const std::optional<Tensor>& gain_c,
    const std::optional<Tensor>& shift_c, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& w_ch, const std::optional<Tensor>& recurrent_mask,
    const std::optional<Tensor>& zoneout_h, const std::optional<Tensor>& zoneout_c,
    const std::optional<Tensor>& lengths, bool reverse, const std::optional<Tensor>& pre_x,
    const std::optional<Tensor>& mean_ih, const std::optional<Tensor>& rstd_ih,
    const std::optional<Tensor>& gain_ih) {
  const Arguments check("lstm_recurrence_backward", "gates", gates, 3);
  const int64_t T = gates.size(0), N = gates.size(1), H = gates.size(2) / 4;
  TORCH_CHECK(gates.size(2) == 4 * H,
              "lstm_recurrence_backward: gates must have 4 * hidden columns, got ", gates.sizes());
  const int64_t P = w_hr.has_value() && w_hr->dim() == 2 ? w_hr->size(0) : H;
  check("d_output", d_output, {T, N, P});
  check("d_h_n", d_h_n, {N, P});
  check("d_c_n", d_c_n, {N, H});
  check("h_states", h_states, {T + 1, N, P});
  check("c_states", c_states, {T + 1, N, H});
  check("c_new", c_new, {T, N, H});
  check("w_hh", w_hh, {4 * H, P});
  check("gain_hh", gain_hh, {4 * H});
  check.together("gain_hh", gain_hh, "normalised_hh", normalised_hh);
  check.together("gain_hh", gain_hh, "rstd_hh", rstd_hh);
  check("normalised_hh", normalised_hh, {T, N, 4 * H});
  check("rstd_hh", rstd_hh, {T, N});
  check("gain_c", gain_c, {H});
  check("shift_c", shift_c, {H});
  check.together("gain_c", gain_c, "shift_c", shift_c);
  check.together("gain_c", gain_c, "normalised_c", normalised_c);
  check.together("gain_c", gain_c, "rstd_c", rstd_c);
  check("normalised_c", normalised_c, {T, N, H});
  check("rstd_c", rstd_c, {T, N});
  check("w_hr", w_hr, {P, H});
  check("w_ch", w_ch, {3 * H});
  check("recurrent_mask", recurrent_mask, {N, P});
  check.zoneout("zoneout_h", zoneout_h, T, N, P);
  check.zoneout("zoneout_c", zoneout_c, T, N, H);
  check.lengths(lengths, N, T);
  check("gain_ih", gain_ih, {4 * H});
  check.together("gain_ih", gain_ih, "pre_x", pre_x);
  check.together("gain_ih", gain_ih, "mean_ih", mean_ih);
  check.together("gain_ih", gain_ih, "rstd_ih", rstd_ih);
  check("pre_x", pre_x, {T, N, 4 * H});
  check("mean_ih", mean_ih, {T, N});
  check("rstd_ih", rstd_ih, {T, N});
  TORCH_CHECK(!gain_ih.has_value() || gain_hh.has_value(),
              "lstm_recurrence_backward: gain_ih (the input side's layer norm) needs gain_hh");
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  const bool projected = w_hr.has_value(), normed = gain_hh.has_value();
  const bool cell_normed = gain_c.has_value(), masked = recurrent_mask.has_value();
  const bool folded = gain_ih.has_value(), peeped = w_ch.has_value();
  Tensor d_pre = at::empty_like(gates);
  // The folded sums' per-row accumulators (zero: held rows add nothing).
  auto per_row = [&](bool wanted, int64_t width) {
    return wanted ? at::zeros({N, width}, gates.options()) : Tensor();
  };
  Tensor acc_gain_ih = per_row(folded, 4 * H), acc_bias_ih = per_row(folded, 4 * H);
  Tensor acc_gain_hh = per_row(folded, 4 * H);
  Tensor acc_gain_c = per_row(folded && cell_normed, H);
  Tensor acc_shift_c = per_row(folded && cell_normed, H);
  Tensor acc_w_ch = per_row(folded && peeped, 3 * H);
  Tensor d_product = per_step_or_undefined(normed, {T, N, 4 * H}, gates);
  Tensor d_cell_norm = per_step_or_undefined(cell_normed, {T, N, H}, gates);
  Tensor d_h = d_h_n.clone(at::MemoryFormat::Contiguous);
  Tensor d_c = d_c_n.clone(at::MemoryFormat::Contiguous);
  Tensor d_masked = per_step_or_undefined(masked, {N, P}, gates);
  // With a projection: dh̃ of every step, m = o ⊙ tanh ℓ of every step (recomputed), and the
  // gradient of m; d_w_hr is then one product over all steps.
  Tensor d_h_raw_all = per_step_or_undefined(projected, {T, N, P}, gates);
  Tensor m_all = per_step_or_undefined(projected, {T, N, H}, gates);
  Tensor d_m = per_step_or_undefined(projected, {N, H}, gates);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_recurrence_backward", [&] {
    using V = Vec<scalar_t>;
    const V one(scalar_t(1)), zero(scalar_t(0));
    const scalar_t* peep = data_or_null<scalar_t>(w_ch);
    const scalar_t* mask_p = data_or_null<scalar_t>(recurrent_mask);
    scalar_t* d_masked_p = data_or_null<scalar_t>(d_masked);
    const scalar_t* gain_p = data_or_null<scalar_t>(gain_hh);
    const scalar_t* gain_c_p = data_or_null<scalar_t>(gain_c);
    const scalar_t* shift_c_p = data_or_null<scalar_t>(shift_c);
    const scalar_t* d_m_p = data_or_null<scalar_t>(d_m);
    const scalar_t* gain_ih_p = data_or_null<scalar_t>(gain_ih);
    scalar_t* acc_gain_ih_p = data_or_null<scalar_t>(acc_gain_ih);
    scalar_t* acc_bias_ih_p = data_or_null<scalar_t>(acc_bias_ih);
    scalar_t* acc_gain_hh_p = data_or_null<scalar_t>(acc_gain_hh);
    scalar_t* acc_gain_c_p = data_or_null<scalar_t>(acc_gain_c);
    scalar_t* acc_shift_c_p = data_or_null<scalar_t>(acc_shift_c);
    scalar_t* acc_w_ch_p = data_or_null<scalar_t>(acc_w_ch);
    scalar_t* d_h_p = d_h.data_ptr<scalar_t>();
    scalar_t* d_c_p = d_c.data_ptr<scalar_t>();
    const Zoneout<scalar_t> zone_h = zoneout_of<scalar_t>(zoneout_h, N, P);
    const Zoneout<scalar_t> zone_c = zoneout_of<scalar_t>(zoneout_c, N, H);
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = steps.time(s);
      const scalar_t* d_out_p = at_step<scalar_t>(d_output, t);
      if (projected) {  // dh̃ = (1 - d) dh into its step, d_h = d ⊙ dh; then dm = dh̃ W_hr
        scalar_t* d_raw_p = at_step<scalar_t>(d_h_raw_all, t);
        for_rows(N, P, [&](int64_t n) {
          const int64_t row = n * P;
          if (!valid(t, n)) return zero_row(d_raw_p + row, P);
          const scalar_t* zone_row = zone_h.row(t, n);
          for_units<scalar_t>(P, [&](int64_t j, int64_t k) {
            const V dh = V::loadu(d_h_p + row + j, k) + V::loadu(d_out_p + row + j, k);
            if (zone_h.on) {
              const V keep = zone_h.keep(zone_row, j, k);
              ((one - keep) * dh).store(d_raw_p + row + j, k);
              (keep * dh).store(d_h_p + row + j, k);
            } else {
              dh.store(d_raw_p + row + j, k);
              zero.store(d_h_p + row + j, k);
            }
          });
        });
        step_product<scalar_t>(step_block<scalar_t>(d_h_raw_all, t), matrix<scalar_t>(*w_hr),
                               matrix<scalar_t>(d_m), false);
      }
      const scalar_t* g_p = at_step<scalar_t>(gates, t);
      const scalar_t* c_p = at_step<scalar_t>(c_states, steps.in(t));
      const scalar_t* c_new_p = at_step<scalar_t>(c_new, t);
      scalar_t* d_pre_p = at_step<scalar_t>(d_pre, t);
      scalar_t* d_prod_p = normed ? at_step<scalar_t>(d_product, t) : nullptr;
      scalar_t* d_ell_p = cell_normed ? at_step<scalar_t>(d_cell_norm, t) : nullptr;
      scalar_t* m_p = projected ? at_step<scalar_t>(m_all, t) : nullptr;
      const scalar_t* x_hat_p = normed ? at_step<scalar_t>(*normalised_hh, t) : nullptr;
      const scalar_t* rstd_p = normed ? rstd_hh->data_ptr<scalar_t>() + t * N : nullptr;
      const scalar_t* c_hat_p = cell_normed ? at_step<scalar_t>(*normalised_c, t) : nullptr;
      const scalar_t* rstd_c_p = cell_normed ? rstd_c->data_ptr<scalar_t>() + t * N : nullptr;
      const scalar_t* u_p = folded ? at_step<scalar_t>(*pre_x, t) : nullptr;
      const scalar_t* mean_ih_p = folded ? mean_ih->data_ptr<scalar_t>() + t * N : nullptr;
      const scalar_t* rstd_ih_p = folded ? rstd_ih->data_ptr<scalar_t>() + t * N : nullptr;
      for_rows(N, 4 * H, [&](int64_t n) {
        const int64_t row = n * H, row4 = n * 4 * H;
        scalar_t* d_row = d_pre_p + row4;
        if (!valid(t, n)) {  // d_h and d_c skip the step
          zero_row(d_row, 4 * H);
          if (normed) zero_row(d_prod_p + row4, 4 * H);
          if (cell_normed) zero_row(d_ell_p + row, H);
          if (projected) zero_row(m_p + row, H);
          return;
        }
        const scalar_t* g_row = g_p + row4;
        const scalar_t* zone_c_row = zone_c.row(t, n);
        // From dℓ's share of dc̃ and d_o: the rest of dc̃, d_i, d_f, d_g and dc_{t-1}.
        auto finish = [&](int64_t j, int64_t k, const V& d_from_ell, const V& d_o) {
          const V dc = V::loadu(d_c_p + row + j, k);
          V d_c_tilde = dc, d_c_prev = zero;
          if (zone_c.on) {
            const V keep = zone_c.keep(zone_c_row, j, k);
            d_c_tilde = (one - keep) * dc;
            d_c_prev = keep * dc;
          }
          d_c_tilde = d_c_tilde + d_from_ell;
          if (peep != nullptr) d_c_tilde = d_c_tilde + d_o * V::loadu(peep + 2 * H + j, k);
          const V i = V::loadu(g_row + j, k), f = V::loadu(g_row + H + j, k);
          const V g = V::loadu(g_row + 2 * H + j, k);
          const V d_i = d_c_tilde * g * sigmoid_grad(i);
          const V d_f = d_c_tilde * V::loadu(c_p + row + j, k) * sigmoid_grad(f);
          const V d_g = d_c_tilde * i * tanh_grad(g);
          d_c_prev = d_c_prev + d_c_tilde * f;
          if (peep != nullptr) {
            d_c_prev = d_c_prev + d_i * V::loadu(peep + j, k) + d_f * V::loadu(peep + H + j, k);
          }
          if (folded && peep != nullptr) {
            scalar_t* acc = acc_w_ch_p + n * 3 * H + j;
            const V c = V::loadu(c_p + row + j, k);
            (V::loadu(acc, k) + d_i * c).store(acc, k);
            (V::loadu(acc + H, k) + d_f * c).store(acc + H, k);
            (V::loadu(acc + 2 * H, k) + d_o * V::loadu(c_new_p + row + j, k)).store(acc + 2 * H, k);
          }
          d_i.store(d_row + j, k);
          d_f.store(d_row + H + j, k);
          d_g.store(d_row + 2 * H + j, k);
          d_o.store(d_row + 3 * H + j, k);
          d_c_prev.store(d_c_p + row + j, k);
        };
        const scalar_t* zone_h_row = zone_h.row(t, n);
        for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
          V dm;
          if (projected) {
            dm = V::loadu(d_m_p + row + j, k);
          } else {
            const V dh = V::loadu(d_h_p + row + j, k) + V::loadu(d_out_p + row + j, k);
            if (zone_h.on) {
              const V keep = zone_h.keep(zone_h_row, j, k);
              dm = (one - keep) * dh;
              (keep * dh).store(d_h_p + row + j, k);  // the product below adds to it
            } else {
              dm = dh;
              zero.store(d_h_p + row + j, k);
            }
          }
          const V o = V::loadu(g_row + 3 * H + j, k);
          const V ell = cell_normed ? V::loadu(gain_c_p + j, k) * V::loadu(c_hat_p + row + j, k) +
                                          V::loadu(shift_c_p + j, k)
                                    : V::loadu(c_new_p + row + j, k);
          const V tanh_ell = fast_tanh(ell);
          if (projected) (o * tanh_ell).store(m_p + row + j, k);
          const V d_o = dm * tanh_ell * sigmoid_grad(o);
          const V d_ell = dm * o * tanh_grad(tanh_ell);
          if (cell_normed) {  // LN(c̃)'s backward needs the row's sums first
            d_ell.store(d_ell_p + row + j, k);
            d_o.store(d_row + 3 * H + j, k);
          } else {
            finish(j, k, d_ell, d_o);
          }
        });
        if (cell_normed) {
          const scalar_t* d_ell_row = d_ell_p + row;
          const scalar_t* c_hat_row = c_hat_p + row;
          const scalar_t rc = rstd_c_p[n];
          const auto [sum_g, sum_gx] = row_sums<scalar_t>(H, [&](int64_t j, int64_t k) {
            const V gv = V::loadu(d_ell_row + j, k) * V::loadu(gain_c_p + j, k);
            return std::make_pair(gv, gv * V::loadu(c_hat_row + j, k));
          });
          const scalar_t mean_g = sum_g / scalar_t(H), mean_gx = sum_gx / scalar_t(H);
          if (folded) {
            accumulate_row<scalar_t>(acc_gain_c_p + row, H, [&](int64_t j, int64_t k) {
              return V::loadu(d_ell_row + j, k) * V::loadu(c_hat_row + j, k);
            });
            accumulate_row<scalar_t>(acc_shift_c_p + row, H, [&](int64_t j, int64_t k) {
              return V::loadu(d_ell_row + j, k);
            });
          }
          for_units<scalar_t>(H, [&](int64_t j, int64_t k) {
            const V gv = V::loadu(d_ell_row + j, k) * V::loadu(gain_c_p + j, k);
            const V d_from_ell =
                V(rc) * (gv - V(mean_g) - V::loadu(c_hat_row + j, k) * V(mean_gx));
            finish(j, k, d_from_ell, V::loadu(d_row + 3 * H + j, k));
          });
        }
        if (folded) {  // dA's sums, then dA -> the raw input product's gradient, in place
          const scalar_t* u_row = u_p + row4;
          const scalar_t* x_hat_row = x_hat_p + row4;
          const Moments<scalar_t> mi{mean_ih_p[n], rstd_ih_p[n]};
          for_units<scalar_t>(4 * H, [&](int64_t j, int64_t k) {
            const V d_a = V::loadu(d_row + j, k);
            const V x_hat_ih = (V::loadu(u_row + j, k) - V(mi.mean)) * V(mi.rstd);
            scalar_t* g_ih = acc_gain_ih_p + row4 + j;
            scalar_t* b_ih = acc_bias_ih_p + row4 + j;
            scalar_t* g_hh = acc_gain_hh_p + row4 + j;
            (V::loadu(g_ih, k) + d_a * x_hat_ih).store(g_ih, k);
            (V::loadu(b_ih, k) + d_a).store(b_ih, k);
            (V::loadu(g_hh, k) + d_a * V::loadu(x_hat_row + j, k)).store(g_hh, k);
          });
        }
        if (normed) {
          layer_norm_backward_row(d_row, gain_p, x_hat_p + row4, rstd_p[n], d_prod_p + row4,
                                  4 * H);
        }
        if (folded) {
          layer_norm_backward_row_from(d_row, gain_ih_p, u_p + row4,
                                       Moments<scalar_t>{mean_ih_p[n], rstd_ih_p[n]}, d_row, 4 * H);
        }
      });
      const Block<scalar_t> dv = step_block<scalar_t>(normed ? d_product : d_pre, t);
      if (masked) {
        step_product<scalar_t>(dv, matrix<scalar_t>(w_hh), matrix<scalar_t>(d_masked), false);
        add_masked(d_h_p, mask_p, d_masked_p, N, P, t, valid);
      } else {
        step_product<scalar_t>(dv, matrix<scalar_t>(w_hh), matrix<scalar_t>(d_h), true);
      }
    }
  });
  Tensor d_w_hr;
  if (projected) d_w_hr = d_h_raw_all.view({T * N, P}).t().mm(m_all.view({T * N, H}));
  auto summed = [](const Tensor& acc) { return acc.defined() ? acc.sum(0) : Tensor(); };
  return {d_pre, d_product, d_h, d_c, d_w_hr, d_cell_norm, summed(acc_gain_ih),
          summed(acc_bias_ih), summed(acc_gain_hh), summed(acc_gain_c), summed(acc_shift_c),
          summed(acc_w_ch)};
}

// ---- one streamed step: inference, both products and the gate math in one pass ---------------
//
// A streamed step (a token at a time, batch 1 to a few) multiplies two small blocks of rows by
// whole weight matrices and then does a few vector operations per unit. The sequence kernels
// would run it as three calls (input projection, recurrent product, gate math), each waking the
// threads and each reading a whole weight matrix; these kernels take one block of units at a
// time, with every gate row of both matrices for those units, and finish the units' gate math
// while the block's pre-activations are in cache. The block ranges are split between threads
// the same way every call (at::parallel_for's static split), so each core re-reads only its own
// share of the weights, which then stays in that core's L2 from step to step.
// Nothing is saved for a backward: the engine calls these only when nothing is differentiated.

// Units per block: one vector of float32 (16 under AVX-512), whatever the build's width.
template <typename T>
constexpr int64_t step_block_units() { return Vec<T>::size(); }

// out[n, 0:cols] (+)= x[n] · w[0:cols]^T for every row n of x, w's rows `ldw` apart: dot tiles
// of up to 8 weight rows and 3 state rows.
template <typename T>
void dot_rows(Block<const T> x, const T* w, int64_t ldw, int64_t cols, T* out, int64_t ldo,
              bool accumulate) {
  for (int64_t c = 0; c < cols; c += 8) {
    const int64_t width = std::min<int64_t>(8, cols - c);
    int64_t n = 0;
    for (; n + 3 <= x.rows; n += 3) {
      dot_tile<T, 3, 8>(x.data + n * x.ld, x.ld, w + c * ldw, ldw, out + n * ldo + c, ldo,
                        x.cols, width, accumulate);
    }
    for (; n < x.rows; ++n) {
      dot_tile<T, 1, 8>(x.data + n * x.ld, x.ld, w + c * ldw, ldw, out + n * ldo + c, ldo,
                        x.cols, width, accumulate);
    }
  }
}

// Rows n of `out` (ld `ldo`), columns [first, first + count): b1 + b2, or b1, or zero.
template <typename T>
void fill_bias(T* out, int64_t rows, int64_t ldo, int64_t first, int64_t count, const T* b1,
               const T* b2) {
  for (int64_t n = 0; n < rows; ++n) {
    T* o = out + n * ldo + first;
    for (int64_t u = 0; u < count; ++u) {
      o[u] = b1 == nullptr ? T(0) : (b2 == nullptr ? b1[first + u] : b1[first + u] + b2[first + u]);
    }
  }
}

// Blocks of units in parallel, each thread a fixed contiguous share (see above), and only as
// many threads as get `thread_min_multiply_adds` each (one: inline on the calling thread).
template <typename F>
void for_unit_blocks(int64_t units, int64_t block, int64_t multiply_adds_per_unit, const F& body) {
  const int64_t blocks = (units + block - 1) / block;
  const int64_t grain = std::max<int64_t>(
      1, thread_min_multiply_adds / std::max<int64_t>(1, block * multiply_adds_per_unit));
  parallel_for(0, blocks, grain, [&](int64_t first, int64_t end) {
    for (int64_t b = first; b < end; ++b) {
      const int64_t j = b * block;
      body(j, std::min(block, units - j));
    }
  });
}

// pre[:, g*H + j : g*H + j + u] = b_ih + b_hh + x W_ih^T + h W_hh^T for gates g in [0, G) of
// the block's units; for gate `skip_hh` (-1: none) the hh product is left out, and b_hh too
// unless `skipped_keeps_bias` (the GRU's n: b_hn sits inside r's product, or outside it).
template <typename T>
void block_preactivations(Block<const T> x, Block<const T> h, const T* w_ih, const T* w_hh,
                          const T* b_ih, const T* b_hh, Block<T> pre, int64_t H, int64_t G,
                          int64_t j, int64_t u, int64_t skip_hh, bool skipped_keeps_bias) {
  for (int64_t g = 0; g < G; ++g) {
    const int64_t col = g * H + j;
    const bool hh_bias = g != skip_hh || skipped_keeps_bias;
    fill_bias<T>(pre.data, pre.rows, pre.ld, col, u, b_ih, hh_bias ? b_hh : nullptr);
    dot_rows<T>(x, w_ih + col * x.cols, x.cols, u, pre.data + col, pre.ld, true);
    if (g != skip_hh) dot_rows<T>(h, w_hh + col * h.cols, h.cols, u, pre.data + col, pre.ld, true);
  }
}

// The weights every step kernel takes: w_ih (G*H, I), w_hh (G*H, P), and b_ih and b_hh (G*H,)
// given together or not at all.
void check_step_weights(const Arguments& check, const Tensor& w_ih, const Tensor& w_hh,
                        const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                        int64_t gates, int64_t input, int64_t width) {
  check("w_ih", w_ih, {gates, input});
  check("w_hh", w_hh, {gates, width});
  check.together("b_ih", b_ih, "b_hh", b_hh);
  check("b_ih", b_ih, {gates});
  check("b_hh", b_hh, {gates});
}

// One LSTM step: x (N, I), h (N, P), c (N, H), w_ih (4H, I), w_hh (4H, P), b_ih and b_hh (4H,)
// together or neither, w_hr (P, H), w_ch (3H,). Returns {h' (N, P), c' (N, H)}.
std::vector<Tensor> lstm_step(const Tensor& x, const Tensor& h, const Tensor& c,
                              const Tensor& w_ih, const Tensor& w_hh,
                              const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                              const std::optional<Tensor>& w_hr, const std::optional<Tensor>& w_ch) {
  const Arguments check("lstm_step", "x", x, 2);
  const int64_t N = x.size(0), I = x.size(1), H = c.dim() == 2 ? c.size(1) : 0;
  const int64_t P = w_hr.has_value() && w_hr->dim() == 2 ? w_hr->size(0) : H;
  check("h", h, {N, P});
  check("c", c, {N, H});
  check_step_weights(check, w_ih, w_hh, b_ih, b_hh, 4 * H, I, P);
  check("w_hr", w_hr, {P, H});
  check("w_ch", w_ch, {3 * H});
  const KernelScope scope;
  const bool projected = w_hr.has_value();
  Tensor pre = at::empty({N, 4 * H}, x.options());
  Tensor c_new = at::empty({N, H}, x.options());
  Tensor h_new = at::empty({N, P}, x.options());
  Tensor m = projected ? at::empty({N, H}, x.options()) : h_new;  // o ⊙ tanh(c')
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_step", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* peep = data_or_null<scalar_t>(w_ch);
    const scalar_t* c_p = c.data_ptr<scalar_t>();
    scalar_t* pre_p = pre.data_ptr<scalar_t>();
    scalar_t* c_new_p = c_new.data_ptr<scalar_t>();
    scalar_t* m_p = m.data_ptr<scalar_t>();
    for_unit_blocks(H, step_block_units<scalar_t>(), N * 4 * (I + P), [&](int64_t j, int64_t u) {
      block_preactivations<scalar_t>(matrix<scalar_t>(x), matrix<scalar_t>(h),
                                     w_ih.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
                                     data_or_null<scalar_t>(b_ih), data_or_null<scalar_t>(b_hh),
                                     matrix<scalar_t>(pre), H, 4, j, u, -1, false);
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* a = pre_p + n * 4 * H + j;
        const V c_old = V::loadu(c_p + n * H + j, u);
        V i_pre = V::loadu(a, u), f_pre = V::loadu(a + H, u), o_pre = V::loadu(a + 3 * H, u);
        if (peep != nullptr) {
          i_pre = i_pre + V::loadu(peep + j, u) * c_old;
          f_pre = f_pre + V::loadu(peep + H + j, u) * c_old;
        }
        const V i = sigmoid(i_pre), f = sigmoid(f_pre), g = fast_tanh(V::loadu(a + 2 * H, u));
        const V c_next = f * c_old + i * g;
        if (peep != nullptr) o_pre = o_pre + V::loadu(peep + 2 * H + j, u) * c_next;
        c_next.store(c_new_p + n * H + j, u);
        (sigmoid(o_pre) * fast_tanh(c_next)).store(m_p + n * H + j, u);
      }
    });
    if (projected) {
      step_product_transposed<scalar_t>(matrix<scalar_t>(m), matrix<scalar_t>(*w_hr),
                                        matrix<scalar_t>(h_new), false);
    }
  });
  return {h_new, c_new};
}

// One GRU step: x (N, I), h (N, H), w_ih and w_hh (3H, ...) as (r | z | n), b_ih and b_hh
// (3H,) together or neither. Returns h' (N, H) = (1 - z) ⊙ n + z ⊙ h, with
// n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)) (reset after) or
// n = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn) (before: a second pass, once r is known).
Tensor gru_step(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                bool reset_after) {
  const Arguments check("gru_step", "x", x, 2);
  const int64_t N = x.size(0), I = x.size(1), H = h.dim() == 2 ? h.size(1) : 0;
  check("h", h, {N, H});
  check_step_weights(check, w_ih, w_hh, b_ih, b_hh, 3 * H, I, H);
  const KernelScope scope;
  Tensor pre = at::empty({N, 3 * H}, x.options());
  Tensor n_input = at::empty({N, H}, x.options());  // W_hn h + b_hn, or r ⊙ h
  Tensor h_new = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_step", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* h_p = h.data_ptr<scalar_t>();
    const scalar_t* w_hh_p = w_hh.data_ptr<scalar_t>();
    const scalar_t* b_hh_p = data_or_null<scalar_t>(b_hh);
    scalar_t* pre_p = pre.data_ptr<scalar_t>();
    scalar_t* n_in_p = n_input.data_ptr<scalar_t>();
    scalar_t* h_new_p = h_new.data_ptr<scalar_t>();
    const auto finish = [&](int64_t n, int64_t j, int64_t u, const V& n_sum) {
      const V z = V::loadu(pre_p + n * 3 * H + H + j, u);
      const V nv = fast_tanh(n_sum);
      (nv + z * (V::loadu(h_p + n * H + j, u) - nv)).store(h_new_p + n * H + j, u);
    };
    const int64_t block = step_block_units<scalar_t>();
    for_unit_blocks(H, block, N * 3 * (I + H), [&](int64_t j, int64_t u) {
      // r and z whole; n's input side, with b_hn too when it sits outside r's product.
      block_preactivations<scalar_t>(matrix<scalar_t>(x), matrix<scalar_t>(h),
                                     w_ih.data_ptr<scalar_t>(), w_hh_p,
                                     data_or_null<scalar_t>(b_ih), b_hh_p,
                                     matrix<scalar_t>(pre), H, 3, j, u, 2, !reset_after);
      if (reset_after) {
        fill_bias<scalar_t>(n_in_p, N, H, j, u, b_hh_p == nullptr ? nullptr : b_hh_p + 2 * H,
                            nullptr);
        dot_rows<scalar_t>(matrix<scalar_t>(h), w_hh_p + (2 * H + j) * H, H, u, n_in_p + j, H,
                           true);
      }
      for (int64_t n = 0; n < N; ++n) {
        scalar_t* a = pre_p + n * 3 * H + j;
        const V r = sigmoid(V::loadu(a, u));
        sigmoid(V::loadu(a + H, u)).store(a + H, u);  // z, read by `finish`
        if (reset_after) {
          finish(n, j, u, V::loadu(a + 2 * H, u) + r * V::loadu(n_in_p + n * H + j, u));
        } else {
          (r * V::loadu(h_p + n * H + j, u)).store(n_in_p + n * H + j, u);
        }
      }
    });
    if (!reset_after) {  // W_hn (r ⊙ h) needs every unit's r
      for_unit_blocks(H, block, N * H, [&](int64_t j, int64_t u) {
        dot_rows<scalar_t>(matrix<scalar_t>(n_input), w_hh_p + (2 * H + j) * H, H, u,
                           pre_p + 2 * H + j, 3 * H, true);
        for (int64_t n = 0; n < N; ++n) finish(n, j, u, V::loadu(pre_p + n * 3 * H + 2 * H + j, u));
      });
    }
  });
  return h_new;
}

// One Elman step: h' = act(W_ih x + b_ih + W_hh h + b_hh), x (N, I), h (N, H).
Tensor rnn_step(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool relu) {
  const Arguments check("rnn_step", "x", x, 2);
  const int64_t N = x.size(0), I = x.size(1), H = h.dim() == 2 ? h.size(1) : 0;
  check("h", h, {N, H});
  check_step_weights(check, w_ih, w_hh, b_ih, b_hh, H, I, H);
  const KernelScope scope;
  Tensor h_new = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_step", [&] {
    using V = Vec<scalar_t>;
    scalar_t* h_new_p = h_new.data_ptr<scalar_t>();
    for_unit_blocks(H, step_block_units<scalar_t>(), N * (I + H), [&](int64_t j, int64_t u) {
      block_preactivations<scalar_t>(matrix<scalar_t>(x), matrix<scalar_t>(h),
                                     w_ih.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
                                     data_or_null<scalar_t>(b_ih), data_or_null<scalar_t>(b_hh),
                                     matrix<scalar_t>(h_new), H, 1, j, u, -1, false);
      for (int64_t n = 0; n < N; ++n) {
        scalar_t* a = h_new_p + n * H + j;
        const V v = V::loadu(a, u);
        (relu ? at::vec::clamp_min(v, V(scalar_t(0))) : fast_tanh(v)).store(a, u);
      }
    });
  });
  return h_new;
}

// ---- mask bits ------------------------------------------------------------------------------

// SplitMix64 (Steele, Lea and Flood 2014, the generator of Java's SplittableRandom): a state
// advancing by the golden gamma, and an output function that mixes it. Entry i's 64 bits are
// mix(seed + (i + 1) * gamma), so any range of them is computed on its own: in parallel, and
// vectorised (two 64-bit products per draw).
constexpr uint64_t kSplitMixGamma = 0x9E3779B97F4A7C15ULL;

inline uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// A 0/1 tensor of `shape` (float64 if `float64`, else float32), 1 with probability p: entry 2k
// is 1 when the low 32 bits of draw k are below round(p 2^32), entry 2k + 1 likewise with its
// high 32 bits. `seed` is a 0-dim int64 tensor (drawn from torch's generator by the caller).
Tensor bernoulli_mask(at::IntArrayRef shape, double p, const Tensor& seed, bool float64) {
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.is_cpu(),
              "bernoulli_mask: seed must be a 0-dim int64 CPU tensor, got ", seed.sizes(), " ",
              seed.scalar_type());
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "bernoulli_mask: p must be in [0, 1], got ", p);
  const at::ScalarType dtype = float64 ? at::kDouble : at::kFloat;
  Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  const int64_t count = out.numel();
  const uint64_t start = static_cast<uint64_t>(seed.item<int64_t>());
  const uint64_t threshold = static_cast<uint64_t>(std::llround(p * 4294967296.0));  // <= 2^32
  const int64_t pairs = count / 2;
  AT_DISPATCH_FLOATING_TYPES(dtype, "bernoulli_mask", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    parallel_for(0, pairs, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const uint64_t bits =
            splitmix64_mix(start + static_cast<uint64_t>(k + 1) * kSplitMixGamma);
        o[2 * k] = (bits & 0xFFFFFFFFULL) < threshold ? scalar_t(1) : scalar_t(0);
        o[2 * k + 1] = (bits >> 32) < threshold ? scalar_t(1) : scalar_t(0);
      }
    });
    if (count % 2 == 1) {
      const uint64_t bits =
          splitmix64_mix(start + static_cast<uint64_t>(pairs + 1) * kSplitMixGamma);
      o[count - 1] = (bits & 0xFFFFFFFFULL) < threshold ? scalar_t(1) : scalar_t(0);
    }
  });
  return out;
}

// ---- the machine's float32 peak ---------------------------------------------------------------

// The float32 FLOP/s of a loop of nothing but vector FMAs, on every thread at once: 12
// independent accumulators per thread (more than FMA latency x FMA units on current x86 cores),
// so the FMA units bound it, not the chains' latency. Returns {GFLOP/s, float32 lanes per vector,
// threads, a sum of the results (kept so the compiler keeps the loop)}.
std::vector<double> fma_peak(int64_t iterations) {
  using V = Vec<float>;
  constexpr int kChains = 12;
  TORCH_CHECK(iterations > 0, "fma_peak: iterations must be positive, got ", iterations);
  const int64_t threads = at::get_num_threads();
  std::vector<float> sinks(threads * V::size(), 0.0f);
  const auto start = std::chrono::steady_clock::now();
  parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t thread = begin; thread < end; ++thread) {
      V acc[kChains];
      for (int c = 0; c < kChains; ++c) acc[c] = V(1e-3f * static_cast<float>(c));
      const V a(0.999999f), b(1e-7f);
      for (int64_t i = 0; i < iterations; ++i) {
        for (int c = 0; c < kChains; ++c) acc[c] = at::vec::fmadd(acc[c], a, b);
      }
      V total = acc[0];
      for (int c = 1; c < kChains; ++c) total = total + acc[c];
      total.store(sinks.data() + thread * V::size());
    }
  });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double sink = 0.0;
  for (const float value : sinks) sink += value;
  const double flops = 2.0 * static_cast<double>(threads) * static_cast<double>(iterations) *
                       kChains * V::size();
  return {flops / seconds / 1e9, static_cast<double>(V::size()), static_cast<double>(threads),
          sink};
}

// ---- minGRU and minLSTM: the linear recurrence in one pass -----------------------------------
//
// Feng et al. 2024's minimal cells (the math, and the scans these kernels replace on the CPU, are
// in engine/scan.py): the gates read the input only, so a step is h_t = a_t ⊙ h_{t-1} + b_t with
// a_t, b_t functions of the projection p_t = W_ih x_t + b_ih alone, computed by one product over
// all steps before the call. Every unit of every row is then its own recurrence: the threads
// share the (row, block of units) pairs, each runs its blocks through all T steps (one parallel
// region per call, no barrier per step), and a step's gate math is a few vector operations on
// values read once from the projection.
//
// Layouts: projected (T, N, G H) as the layer's weight rows order it, minGRU (k_z|v) (G = 2),
// minLSTM (k_f|k_i|v) (G = 3); states (T + 1, N, H) in time order, as every family's.
// The coefficients, in stable forms (scan.coefficients has the same values):
//   minGRU   a = σ(-k_z)               b = σ(k_z) h̃
//   minLSTM  a = f' = f / (f + i)      b = i' h̃,  i' = i / (f + i)   (MinCoefficients' form)
//   h̃ = v, or g(v) = v + 0.5 (v >= 0), σ(v) (v < 0) in the log-space variant.
// The backward stores nothing more than the states: it recomputes the coefficients from the
// projection (a few exp per value; the pass reads the projection either way).

constexpr int64_t kMinBlock = 64;  // units per work item: whole vectors, a few cache lines

// Items (row, block of kMinBlock units) shared between threads when a thread gets at least
// ~64k step values (T x units); fewer items than that run inline.
inline int64_t min_item_grain(int64_t steps) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / (kMinBlock * std::max<int64_t>(1, steps)));
}

// σ(x) and σ(-x) from one exp and one division: e = exp(-|x|), σ(|x|) = 1 / (1 + e),
// σ(-|x|) = e / (1 + e); neither is ever 1 - (the other), so neither cancels.
template <typename T>
struct SigmoidPair {
  Vec<T> plus, minus;  // σ(x), σ(-x)
  explicit SigmoidPair(const Vec<T>& x) {
    const Vec<T> one(T(1));
    const Vec<T> e = x.abs().neg().exp();
    const Vec<T> large = one / (one + e), small = e * large;
    const Vec<T> positive = x >= Vec<T>(T(0));
    plus = Vec<T>::blendv(small, large, positive);
    minus = Vec<T>::blendv(large, small, positive);
  }
};

// σ(-x) from e = exp(-|x|): e / (1 + e) for x >= 0, 1 / (1 + e) below.
template <typename T>
inline Vec<T> sigmoid_of_minus_from(const Vec<T>& x, const Vec<T>& e) {
  const Vec<T> large = Vec<T>(T(1)) / (Vec<T>(T(1)) + e);
  return Vec<T>::blendv(large, e * large, x >= Vec<T>(T(0)));
}

// The coefficients of one step at units [j, j + count) of one row's projection p, and with
// `derivatives` what the backward needs.
template <typename T>
struct MinCoefficients {
  Vec<T> a, keep, h_tilde, d_h_tilde;  // a; b = keep h̃; d h̃ / d v
  Vec<T> d_first, d_second;           // minLSTM: ∂r/∂k_f = σ(-k_f), ∂r/∂k_i = -σ(-k_i)

  MinCoefficients(const T* p, int64_t H, int64_t j, int64_t count, bool minlstm,
                  bool log_space, bool derivatives) {
    const Vec<T> zero(T(0)), one(T(1));
    const Vec<T> v = Vec<T>::loadu(p + (minlstm ? 2 : 1) * H + j, count);
    if (minlstm) {
      // f' = f / (f + i) = 1 / (1 + i / f), with i / f = σ(k_i) / σ(k_f) = e^d ρ, where
      // 1 + e^-k = e^-min(k, 0) (1 + e^-|k|) gives d = min(k_i, 0) - min(k_f, 0) and
      // ρ = (1 + e_f) / (1 + e_i) in [1/2, 2], e_k = e^-|k|. With E = e^-|d|:
      //   d <= 0:  f' = 1 / (1 + E ρ)    i' = E ρ / (1 + E ρ)
      //   d > 0:   f' = E / (E + ρ)      i' = ρ / (E + ρ)
      // Every term is positive and each denominator is at least 1/2, so for finite k nothing
      // cancels, overflows or divides 0 by 0 (σ(k) itself underflows below k = -88 in float32;
      // k_f = k_i = -inf gives NaN, as the reference's -inf - (-inf) does). Three
      // exp and two divisions; the log σ form, r = log σ(k_f) - log σ(k_i), f' = σ(r), took two
      // log1p more.
      const Vec<T> k_f = Vec<T>::loadu(p + j, count), k_i = Vec<T>::loadu(p + H + j, count);
      const Vec<T> e_f = k_f.abs().neg().exp(), e_i = k_i.abs().neg().exp();
      const Vec<T> d = at::vec::minimum(k_i, zero) - at::vec::minimum(k_f, zero);
      const Vec<T> e_d = d.abs().neg().exp();
      const Vec<T> inverse_i = one / (one + e_i);
      const Vec<T> rho = (one + e_f) * inverse_i;
      const Vec<T> above = d > zero;
      const Vec<T> numerator_f = Vec<T>::blendv(one, e_d, above);
      const Vec<T> numerator_i = Vec<T>::blendv(e_d * rho, rho, above);
      const Vec<T> inverse = one / (numerator_f + numerator_i);
      a = numerator_f * inverse;     // f'
      keep = numerator_i * inverse;  // i' = 1 - f'
      if (derivatives) {  // ∂r/∂k_f = σ(-k_f), ∂r/∂k_i = -σ(-k_i)
        d_first = sigmoid_of_minus_from(k_f, e_f);
        d_second = Vec<T>::blendv(inverse_i, e_i * inverse_i, k_i >= zero).neg();
      }
    } else {
      const SigmoidPair<T> z(Vec<T>::loadu(p + j, count));
      a = z.minus;    // 1 - z = σ(-k_z)
      keep = z.plus;  // z
    }
    if (log_space) {
      const SigmoidPair<T> s(v);
      const Vec<T> positive = v >= zero;
      h_tilde = Vec<T>::blendv(s.plus, v + Vec<T>(T(0.5)), positive);
      if (derivatives) d_h_tilde = Vec<T>::blendv(s.plus * s.minus, one, positive);
    } else {
      h_tilde = v;
      d_h_tilde = one;
    }
  }
};

// projected (T, N, G H) against a state (N, H) named `state`, which gives H.
void check_min_projection(const Arguments& check, const Tensor& projected, const char* state,
                          const Tensor& h, bool minlstm) {
  TORCH_CHECK(h.dim() == 2, "min_scan: ", state, " must have 2 dimensions [batch, hidden], got ",
              "shape ", h.sizes());
  const int64_t T = projected.size(0), N = projected.size(1), H = h.size(1);
  check("projected", projected, {T, N, (minlstm ? 3 : 2) * H});
  check(state, h, {N, H});
}

// Every (row, block) of units in [first, end) of the items, as (row, first unit, units).
template <typename F>
inline void for_min_items(int64_t first, int64_t end, int64_t H, const F& body) {
  const int64_t blocks = (H + kMinBlock - 1) / kMinBlock;
  for (int64_t item = first; item < end; ++item) {
    const int64_t n = item / blocks, j = (item % blocks) * kMinBlock;
    body(n, j, std::min(kMinBlock, H - j));
  }
}

// projected (T, N, G H) as above, h0 (N, H), lengths (N,) or none. Returns {output (T, N, H)
// (a view of states without lengths; zero past each end with), states (T + 1, N, H)}: past a
// sequence's end the state is held (going backward, h0 until its last valid step).
std::vector<Tensor> min_scan_forward(const Tensor& projected, const Tensor& h0,
                                     const std::optional<Tensor>& lengths, bool reverse,
                                     bool minlstm, bool log_space) {
  const Arguments check("min_scan_forward", "projected", projected, 3);
  check_min_projection(check, projected, "h0", h0, minlstm);
  const int64_t T = projected.size(0), N = projected.size(1), H = h0.size(1);
  const int64_t row = (minlstm ? 3 : 2) * H;
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor states = started_states(steps, h0);
  Tensor output = output_buffer(states, steps, lengths);
  const int64_t items = N * ((H + kMinBlock - 1) / kMinBlock);
  AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "min_scan_forward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* p_p = projected.data_ptr<scalar_t>();
    scalar_t* s_p = states.data_ptr<scalar_t>();
    scalar_t* out_p = lengths.has_value() ? output.data_ptr<scalar_t>() : nullptr;
    parallel_for(0, items, min_item_grain(T), [&](int64_t first, int64_t end) {
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = steps.time(s);
        const scalar_t* h_in = s_p + steps.in(t) * N * H;
        scalar_t* h_out = s_p + steps.out(t) * N * H;
        for_min_items(first, end, H, [&](int64_t n, int64_t j0, int64_t units) {
          const int64_t base = n * H + j0;
          if (!valid(t, n)) {  // past the end: the state held, the output zero
            copy_row(h_out + base, h_in + base, units);
            zero_row(out_p + t * N * H + base, units);
            return;
          }
          const scalar_t* p = p_p + (t * N + n) * row + j0;
          for_units<scalar_t>(units, [&](int64_t j, int64_t count) {
            const MinCoefficients<scalar_t> c(p, H, j, count, minlstm, log_space, false);
            const V h = c.a * V::loadu(h_in + base + j, count) + c.keep * c.h_tilde;
            h.store(h_out + base + j, count);
            if (out_p) h.store(out_p + t * N * H + base + j, count);
          });
        });
      }
    });
  });
  return {output, states};
}

// The adjoint of min_scan_forward, backward in time: γ_t = ∂L/∂h_t (the output's gradient and
// what flows back from step t + 1), ∂L/∂a_t = γ_t h_{t-1}, ∂L/∂b_t = γ_t, and the state's
// gradient entering step t is a_t γ_t. Through the coefficients:
//   minGRU   ∂k_z = γ σ(k_z) σ(-k_z) (h̃ - h_{t-1})        ∂v = γ σ(k_z) h̃'(v)
//   minLSTM  ∂r = γ f' i' (h_{t-1} - h̃)   ∂k_f = ∂r σ(-k_f)   ∂k_i = -∂r σ(-k_i)   ∂v = γ i' h̃'(v)
// d_output (T, N, H), d_h_n (N, H); projected and states as the forward had and left them.
// Returns {d_projected (T, N, G H), zero past each sequence's end, d_h0 (N, H)}.
std::vector<Tensor> min_scan_backward(const Tensor& d_output, const Tensor& d_h_n,
                                      const Tensor& projected, const Tensor& states,
                                      const std::optional<Tensor>& lengths, bool reverse,
                                      bool minlstm, bool log_space) {
  const Arguments check("min_scan_backward", "projected", projected, 3);
  check_min_projection(check, projected, "d_h_n", d_h_n, minlstm);
  const int64_t T = projected.size(0), N = projected.size(1), H = d_h_n.size(1);
  const int64_t row = (minlstm ? 3 : 2) * H;
  check("d_output", d_output, {T, N, H});
  check("states", states, {T + 1, N, H});
  check.lengths(lengths, N, T);
  const KernelScope scope;
  const Steps steps{T, reverse};
  const Validity valid = validity_of(lengths);
  Tensor d_projected = at::empty_like(projected);
  Tensor d_h = d_h_n.clone(at::MemoryFormat::Contiguous);  // γ carried to the previous step
  const int64_t items = N * ((H + kMinBlock - 1) / kMinBlock);
  AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "min_scan_backward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t *p_p = projected.data_ptr<scalar_t>(), *s_p = states.data_ptr<scalar_t>(),
                   *d_out_p = d_output.data_ptr<scalar_t>();
    scalar_t *d_p_p = d_projected.data_ptr<scalar_t>(), *d_h_p = d_h.data_ptr<scalar_t>();
    parallel_for(0, items, min_item_grain(T), [&](int64_t first, int64_t end) {
      for (int64_t s = T - 1; s >= 0; --s) {
        const int64_t t = steps.time(s);
        const scalar_t* h_in = s_p + steps.in(t) * N * H;
        for_min_items(first, end, H, [&](int64_t n, int64_t j0, int64_t units) {
          const int64_t base = n * H + j0;
          const int64_t at = (t * N + n) * row + j0;
          scalar_t* dp = d_p_p + at;
          if (!valid(t, n)) {  // no gate gradient; the held state passes its own around
            zero_row(dp, units);
            zero_row(dp + H, units);
            if (minlstm) zero_row(dp + 2 * H, units);
            return;
          }
          const scalar_t* p = p_p + at;
          const scalar_t* d_out = d_out_p + t * N * H + base;
          for_units<scalar_t>(units, [&](int64_t j, int64_t count) {
            const MinCoefficients<scalar_t> c(p, H, j, count, minlstm, log_space, true);
            const V gamma = V::loadu(d_h_p + base + j, count) + V::loadu(d_out + j, count);
            const V h_previous = V::loadu(h_in + base + j, count);
            const V d_v = gamma * c.keep * c.d_h_tilde;
            if (minlstm) {
              const V d_r = gamma * c.a * c.keep * (h_previous - c.h_tilde);
              (d_r * c.d_first).store(dp + j, count);
              (d_r * c.d_second).store(dp + H + j, count);
              d_v.store(dp + 2 * H + j, count);
            } else {
              (gamma * c.keep * c.a * (c.h_tilde - h_previous)).store(dp + j, count);
              d_v.store(dp + H + j, count);
            }
            (c.a * gamma).store(d_h_p + base + j, count);
          });
        });
      }
    });
  });
  return {d_projected, d_h};
}

// ---- minGRU and minLSTM: one streamed step (inference) ---------------------------------------
//
// The minimal cells' counterpart of the other families' step kernels ("one streamed step"): a
// token at a time, batch 1 to a few, nothing saved for a backward (the engine calls it only when
// nothing is differentiated). The sequence path would run such a step as ATen's product for the
// projection, then min_scan_forward over one step with its (T + 1, N, H) states buffer; here each
// block of units takes its G gate rows of W_ih (the other step kernels' dot tiles) into
// pre-activations on the stack and finishes the units' coefficients and h' = a ⊙ h + b
// (MinCoefficients: min_scan_forward's values, value for value) while they are in cache. There is
// no recurrent product, so a step reads W_ih once and h once. Blocks are split between threads as
// the other step kernels split them (`for_unit_blocks`).

// Rows of the batch whose pre-activations a block holds at once: two of dot_rows' 3-row tiles.
constexpr int64_t min_step_rows = 6;

// One step: x (N, I); h (N, H); w_ih (G H, I) as (W_z|W_h) (minGRU, G = 2) or (W_f|W_i|W_h)
// (minLSTM, G = 3); b_ih (G H,) or none. Returns h' (N, H). With log_space, where h has a
// negative entry it computes nothing and returns an undefined tensor (None in Python): the
// variant's state is >= 0, and the caller's checked way refuses such a state naming its argument
// (a state the kernel itself returned never has one). The scan of h for that is one pass over
// N H values, negligible beside the product.
Tensor min_step(const Tensor& x, const Tensor& h, const Tensor& w_ih,
                const std::optional<Tensor>& b_ih, bool minlstm, bool log_space) {
  const Arguments check("min_step", "x", x, 2);
  TORCH_CHECK(h.dim() == 2, "min_step: h must have 2 dimensions [batch, hidden], got shape ",
              h.sizes());
  const int64_t N = x.size(0), I = x.size(1), H = h.size(1), G = minlstm ? 3 : 2;
  check("h", h, {N, H});
  check("w_ih", w_ih, {G * H, I});
  check("b_ih", b_ih, {G * H});
  const KernelScope scope;
  bool negative_state = false;
  Tensor h_new = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "min_step", [&] {
    using V = Vec<scalar_t>;
    constexpr int64_t B = V::size();  // units per block: one vector
    const scalar_t *x_p = x.data_ptr<scalar_t>(), *h_p = h.data_ptr<scalar_t>(),
                   *w_p = w_ih.data_ptr<scalar_t>();
    const scalar_t* b_p = data_or_null<scalar_t>(b_ih);
    scalar_t* h_new_p = h_new.data_ptr<scalar_t>();
    if (log_space) {
      negative_state = std::any_of(h_p, h_p + N * H, [](scalar_t v) { return v < scalar_t(0); });
      if (negative_state) return;
    }
    for_unit_blocks(H, B, N * G * I, [&](int64_t j, int64_t u) {
      scalar_t pre[min_step_rows][3 * B];  // per row (k|v) or (k_f|k_i|v) of the block's units
      for (int64_t n0 = 0; n0 < N; n0 += min_step_rows) {
        const int64_t rows = std::min(min_step_rows, N - n0);
        const Block<const scalar_t> xs{x_p + n0 * I, rows, I, I};
        for (int64_t g = 0; g < G; ++g) {
          const int64_t row = g * H + j;  // the gate's first row of W_ih and b_ih
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t v = 0; v < u; ++v) pre[r][g * B + v] = b_p ? b_p[row + v] : scalar_t(0);
          }
          dot_rows<scalar_t>(xs, w_p + row * I, I, u, &pre[0][g * B], 3 * B, true);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t at = (n0 + r) * H + j;
          // The block's row as a projection whose gates are B apart (MinCoefficients' H).
          const MinCoefficients<scalar_t> c(pre[r], B, 0, u, minlstm, log_space, false);
          (c.a * V::loadu(h_p + at, u) + c.keep * c.h_tilde).store(h_new_p + at, u);
        }
      }
    });
  });
  return negative_state ? Tensor() : h_new;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnnkit native CPU kernels: time loops of RNN, LSTM, GRU, sLSTM, minGRU and minLSTM, "
            "forward and backward (plain, and the recurrence with layer norm, recurrent dropout "
            "and zoneout)";
  m.def("linear", &linear);
  m.def("bernoulli_mask", &bernoulli_mask);
  m.def("fma_peak", &fma_peak);
  m.def("rnn_forward", &rnn_forward);
  m.def("rnn_backward", &rnn_backward);
  m.def("lstm_forward", &lstm_forward);
  m.def("lstm_backward", &lstm_backward);
  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
  m.def("slstm_forward", &slstm_forward);
  m.def("slstm_backward", &slstm_backward);
  m.def("slstm_step", &slstm_step);
  m.def("rnn_step", &rnn_step);
  m.def("lstm_step", &lstm_step);
  m.def("gru_step", &gru_step);
  m.def("rnn_recurrence_forward", &rnn_recurrence_forward);
  m.def("rnn_recurrence_backward", &rnn_recurrence_backward);
  m.def("lstm_recurrence_forward", &lstm_recurrence_forward);
  m.def("lstm_recurrence_backward", &lstm_recurrence_backward);
  m.def("gru_recurrence_forward", &gru_recurrence_forward);
  m.def("gru_recurrence_backward", &gru_recurrence_backward);
  m.def("set_blas_min_multiply_adds", &set_blas_min_multiply_adds,
        "step products of at least this many multiply-adds run on ATen's mm (BLAS)");
  m.def("blas_min_multiply_adds", [] { return blas_min_multiply_adds; });
  m.def("set_blas_min_rows", &set_blas_min_rows,
        "step products of fewer rows than this never run on ATen's mm");
  m.def("blas_min_rows", [] { return blas_min_rows; });
  m.def("set_cpu_profile", &set_cpu_profile,
        "the loop rules of 'intel' or 'other' CPUs (blas_min_rows and the LSTM's resident "
        "loops beyond the cache); detected from the CPU's maker at load");
  m.def("cpu_profile", &cpu_profile_name);
  m.def("l2_cache_bytes", &l2_cache_bytes, "a core's L2 cache in bytes (1 MiB if unknown)");
  m.def("set_thread_min_multiply_adds", &set_thread_min_multiply_adds,
        "threads share a step product only when each gets at least this many multiply-adds");
  m.def("thread_min_multiply_adds", [] { return thread_min_multiply_adds; });
  m.def("set_resident_max_bytes_per_thread", &set_resident_max_bytes_per_thread,
        "LSTM loops run on resident weights while each thread's share of W_hh is at most this");
  m.def("resident_max_bytes_per_thread", [] { return resident_max_bytes_per_thread; });
  m.def("lstm_forward_input", &lstm_forward_input);
  m.def("set_lstm_input_min_batch", &set_lstm_input_min_batch,
        "from this batch on, a resident LSTM forward projects its input inside the loop");
  m.def("lstm_input_min_batch", [] { return lstm_input_min_batch; });
  m.def("lstm_projects_input", &lstm_projects_input,
        "whether an LSTM forward of (steps, batch, input, hidden, projected, element size) "
        "projects its input inside the resident loop");
  m.def("lstm_forward_runs_resident", &lstm_forward_on_resident,
        "whether an LSTM forward of (steps, batch, hidden, projected, element size) runs on "
        "resident weights");
  m.def("lstm_backward_runs_resident", &lstm_backward_on_resident,
        "whether an LSTM backward of (steps, batch, hidden, projected, element size) runs on "
        "resident weights");
  m.def("min_scan_forward", &min_scan_forward);
  m.def("min_scan_backward", &min_scan_backward);
  m.def("min_step", &min_step);
  m.def("set_flush_subnormals", &set_flush_subnormals,
        "whether the kernels compute with subnormal floats flushed to zero (x86 FTZ and DAZ), "
        "restoring the caller's mode on return");
  m.def("flush_subnormals", [] { return flush_subnormals; });
  m.def("call_flushed", &call_flushed,
        "compute() with subnormal floats flushed to zero on the calling thread, its mode "
        "restored after");
}
