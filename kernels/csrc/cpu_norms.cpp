// CPU RMSNorm and LayerNorm over rows: x (and a residual) read once, y (and h = x + residual)
// written once, fp32 math, rows spread over torch's own intra-op threads.
//
// Why this exists: on a CPU, torch's bf16 rms_norm (a composite of pow, mean, rsqrt, mul and casts)
// makes five passes over the data and was 9x slower than F.layer_norm's fused kernel, so a norm
// swap measured torch's kernels and not the norm. These are the two norms written the same way,
// so they compare like for like (kernels/cpu.py builds this file on first use).
//
// Numerics are those of kernels/rms_norm.py's and layer_norm.py's torch code (transformers'
// formula) bit for bit: the same fp32 steps in the same order, torch's own summation order included
// (torch_sum below), tested in tests/test_cpu_norms.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <bit>
#include <immintrin.h>
#include <type_traits>

namespace {

// The loops see raw element types: bf16 as its uint16_t bits, fp16 as its bits converted by the
// F16C instructions (every build here is AVX2 or AVX-512, which have them). Both round to nearest
// even, as torch does. One element at a time (the sums' scalar tails); blocks below.
using bf16_bits = uint16_t;
struct half_bits {
  uint16_t v;
};
constexpr int HALF_ROUND = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

inline float load_f(float v) { return v; }
inline float load_f(bf16_bits v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }
inline float load_f(half_bits h) { return _cvtsh_ss(h.v); }

// torch's element type -> the raw type the loops use.
template <typename T> struct Raw { using type = T; };
template <> struct Raw<c10::BFloat16> { using type = bf16_bits; };
template <> struct Raw<c10::Half> { using type = half_bits; };
template <typename T> using raw_t = typename Raw<T>::type;

template <typename T> inline const raw_t<T>* raw(const at::Tensor& t) {
  return reinterpret_cast<const raw_t<T>*>(t.const_data_ptr<T>());
}
template <typename T> inline raw_t<T>* raw_mut(at::Tensor& t) {
  return reinterpret_cast<raw_t<T>*>(t.mutable_data_ptr<T>());
}

// The loops work on blocks of floats held as vectors (gcc/clang vector extensions: the arithmetic
// is vector arithmetic whatever the auto-vectoriser decides), converted from and to the raw
// element type a block at a time with the instructions for it (F16C for fp16, integer ops for
// bf16). The sums replay torch's 8 lanes (f8); the other passes take 16 at a time (one AVX-512
// register) where the build has AVX-512, 8 otherwise.
typedef float f8 __attribute__((vector_size(32)));
typedef float f16 __attribute__((vector_size(64)));
#if defined(__AVX512F__)
using fB = f16;
#else
using fB = f8;
#endif
constexpr int lanes_of(f8) { return 8; }
constexpr int lanes_of(f16) { return 16; }

// Cvt<T>: 8 (and on AVX-512, 16) raw elements <-> fp32 lanes, rounding to nearest even.
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static f8 load8(const float* s) { f8 v; std::memcpy(&v, s, sizeof v); return v; }
  static void store8(f8 v, float* d) { std::memcpy(d, &v, sizeof v); }
  static f16 load16(const float* s) { f16 v; std::memcpy(&v, s, sizeof v); return v; }
  static void store16(f16 v, float* d) { std::memcpy(d, &v, sizeof v); }
};
// bf16 is the upper half of an fp32's bits; stored rounded to nearest even, a NaN kept a NaN.
template <> struct Cvt<bf16_bits> {
  static f8 load8(const bf16_bits* s) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
    return reinterpret_cast<f8>(_mm256_slli_epi32(wide, 16));
  }
  static void store8(f8 v, bf16_bits* d) {
    const __m256i bits = reinterpret_cast<__m256i>(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));
    const __m256i out = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    // the low 16 bits of each value (all < 2^16) from both 128-bit halves, in order
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d),
                     _mm_packus_epi32(_mm256_castsi256_si128(out), _mm256_extracti128_si256(out, 1)));
  }
#if defined(__AVX512F__)
  static f16 load16(const bf16_bits* s) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    return reinterpret_cast<f16>(_mm512_slli_epi32(wide, 16));
  }
  static void store16(f16 v, bf16_bits* d) {
    const __m512i bits = reinterpret_cast<__m512i>(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    const __m512i out = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtepi32_epi16(out));
  }
#endif
};
template <> struct Cvt<half_bits> {
  static f8 load8(const half_bits* s) {
    return reinterpret_cast<f8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))));
  }
  static void store8(f8 v, half_bits* d) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm256_cvtps_ph(reinterpret_cast<__m256>(v), HALF_ROUND));
  }
#if defined(__AVX512F__)
  static f16 load16(const half_bits* s) {
    return reinterpret_cast<f16>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s))));
  }
  static void store16(f16 v, half_bits* d) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtps_ph(reinterpret_cast<__m512>(v), HALF_ROUND));
  }
#endif
};

template <typename Vec, typename T> inline Vec load(const T* s) {
  if constexpr (lanes_of(Vec{}) == 8) return Cvt<T>::load8(s); else return Cvt<T>::load16(s);
}
template <typename Vec, typename T> inline void store(Vec v, T* d) {
  if constexpr (lanes_of(Vec{}) == 8) Cvt<T>::store8(v, d); else Cvt<T>::store16(v, d);
}

// v rounded to T's precision and back (Llama rounds the normalised value to the model's dtype
// before the gain multiplies it).
template <typename T, typename Vec>
inline Vec round_to(Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T tmp[lanes_of(Vec{})];
    store<Vec>(v, tmp);
    return load<Vec>(tmp);
  }
}

// A block of the last k elements of a row (fewer than a block), zero-padded, so the tail runs
// the same vector code.
template <typename T>
inline fB load_tail(const T* src, int64_t k) {
  T tmp[lanes_of(fB{})] = {};
  std::memcpy(tmp, src, k * sizeof(T));
  return load<fB>(tmp);
}
template <typename T>
inline void store_tail(fB v, T* dst, int64_t k) {
  T tmp[lanes_of(fB{})];
  store<fB>(v, tmp);
  std::memcpy(dst, tmp, k * sizeof(T));
}

constexpr int V = 8;  // torch's lanes

// torch's fp32 sum of a row (its cascade sum, aten/src/ATen/native/cpu/SumKernel.cpp), replayed
// add for add, so mean(h^2) -- and with it every output -- is torch's to the last bit. The row is
// read as vectors of 8 lanes (an AVX2 Vectorized<float>) in order, four at a time into four
// interleaved partial sums, each summed in levels of 2^p vectors so that only partial sums of
// similar size meet; then the vectors left over, the partial sums in order, the scalar tail, and
// the lanes in order. Rows shorter than 8 are summed the same way one element at a time (torch's
// scalar inner sum).
//
// Lanes of 8 on AVX-512 machines too: torch registers its sum kernel with REGISTER_DISPATCH, which
// gives the AVX-512 dispatch level no kernel of its own, so those machines run the AVX2 one
// (measured: a replay in lanes of 16 differs from torch.sum in the last bit on ~25% of rows).
inline int64_t ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(x - 1)); }

// The sum, lane by lane, of get(0) .. get(size - 1): Vec is f8 (8 lanes) or float (one).
template <typename Vec, typename Get>
Vec cascade(Get&& get, int64_t size) {
  constexpr int levels = 4;
  const int64_t quarter = size / 4;
  const int64_t power = std::max<int64_t>(4, ceil_log2(quarter) / levels);
  const int64_t step = int64_t(1) << power, mask = step - 1;
  Vec acc[levels][4] = {};
  auto add_four = [&](int64_t i) {  // vectors 4i .. 4i+3, one into each partial sum
    for (int k = 0; k < 4; ++k) acc[0][k] += get(4 * i + k);
  };
  int64_t i = 0;
  while (i + step <= quarter) {
    for (int64_t j = 0; j < step; ++j, ++i) add_four(i);
    for (int j = 1; j < levels; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] += acc[j - 1][k];
        acc[j - 1][k] = Vec{};
      }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < quarter; ++i) add_four(i);
  for (int j = 1; j < levels; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] += acc[j][k];
  for (int64_t r = quarter * 4; r < size; ++r) acc[0][0] += get(r);  // the vectors left over
  for (int k = 1; k < 4; ++k) acc[0][0] += acc[0][k];
  return acc[0][0];
}

// torch.sum of f(h[0..n)) in fp32, h of raw type T: f maps fp32 values (a block or one) to the
// summands (identity, square, squared distance from the mean) as the row is read: no fp32 copy.
template <typename T, typename F>
float torch_sum(const T* __restrict h, int64_t n, F f) {
  if (n < V)  // too short for a vector: torch's scalar inner sum
    return cascade<float>([&](int64_t i) { return f(load_f(h[i])); }, n);
  const int64_t whole = n / V;
  const f8 lanes = cascade<f8>([&](int64_t i) { return f(load<f8>(h + i * V)); }, whole);
  float total = 0.f;
  for (int64_t k = whole * V; k < n; ++k) total += f(load_f(h[k]));
  for (int l = 0; l < V; ++l) total += lanes[l];
  return total;
}

// h = x + residual, rounded to T as an unfused `x + residual` rounds it, stored into h.
template <typename T>
inline void add_rows(const T* __restrict x, const T* __restrict r, T* __restrict h, int64_t n) {
  constexpr int B = lanes_of(fB{});
  int64_t j = 0;
  for (; j + B <= n; j += B) store<fB>(load<fB>(x + j) + load<fB>(r + j), h + j);
  if (j < n) store_tail<T>(load_tail<T>(x + j, n - j) + load_tail<T>(r + j, n - j), h + j, n - j);
}

// y = f(h, gain, bias) over a row, block by block, the gain and bias as fp32 rows (formed once
// per call), so no buffer sits between the input and the output rows.
template <typename T, typename Y, typename F>
inline void map_row(const T* __restrict h, const float* __restrict g, const float* __restrict bias, Y* __restrict y,
                    int64_t n, F f) {
  constexpr int B = lanes_of(fB{});
  int64_t j = 0;
  for (; j + B <= n; j += B) store<fB>(f(load<fB>(h + j), load<fB>(g + j), bias ? load<fB>(bias + j) : fB{}), y + j);
  if (j < n) {
    const int64_t k = n - j;
    store_tail<Y>(f(load_tail<T>(h + j, k), load_tail<float>(g + j, k), bias ? load_tail<float>(bias + j, k) : fB{}),
                  y + j, k);
  }
}

// A weight (or bias) row as fp32, `offset` added when `add` (Gemma's 1 + w, formed in fp32 as the
// torch code forms it): the tensor's own data when it already is that, else a converted copy, on
// the caller's stack when it fits (a decode step's one-row call then allocates nothing for it).
constexpr int64_t STACK_ROW = 4096;
struct Fp32Row {
  alignas(64) float local[STACK_ROW];
  at::Tensor keep;  // wider rows
};
template <typename W>
const float* fp32_row(const at::Tensor& w, bool add, float offset, Fp32Row& out) {
  const W* src = reinterpret_cast<const W*>(w.const_data_ptr());
  if constexpr (std::is_same_v<W, float>)
    if (!add) return src;
  float* g = out.local;
  if (w.numel() > STACK_ROW) {
    out.keep = at::empty({w.numel()}, w.options().dtype(at::kFloat));
    g = out.keep.mutable_data_ptr<float>();
  }
  for (int64_t j = 0; j < w.numel(); ++j) g[j] = add ? load_f(src[j]) + offset : load_f(src[j]);
  return g;
}

struct Rows {
  int64_t rows, n, sx, sr;  // row count, width, row strides of x and residual
};

// Rows per task: enough work (~32K elements) that a thread hand-off pays; one row runs inline.
inline int64_t grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// The row a norm reads: x's, or h = x + residual written to h first (it is an output anyway).
template <typename T>
inline const T* source_row(const T* x, const T* r, T* h, Rows d, int64_t i) {
  if (r == nullptr) return x + i * d.sx;
  add_rows<T>(x + i * d.sx, r + i * d.sr, h + i * d.n, d.n);
  return h + i * d.n;
}

// T: x, residual and h; W: the weight; the output is W's dtype (promote(T, W) for the pairs taken).
template <typename T, typename W, bool Fp32Gain>
void rms_rows(const T* x, const T* r, T* h, const float* gain, W* y, Rows d, float eps) {
  at::parallel_for(0, d.rows, grain(d.n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* hi = source_row<T>(x, r, h, d, i);
      // torch: rsqrt(mean(h^2) + eps), mean = sum(h * h) / n, all fp32
      const float ss = torch_sum<T>(hi, d.n, [](auto v) { return v * v; });
      const float rstd = 1.f / std::sqrt(ss / static_cast<float>(d.n) + eps);
      map_row<T, W>(hi, gain, nullptr, y + i * d.n, d.n, [&](fB v, fB g, fB) {
        v *= rstd;
        if constexpr (!Fp32Gain) v = round_to<T>(v);  // Llama: rounded to h's dtype before the gain
        return v * g;
      });
    }
  });
}

template <typename T>
void layer_rows(const T* x, const T* r, T* h, const float* gain, const float* bias, T* y, Rows d, float eps) {
  at::parallel_for(0, d.rows, grain(d.n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* hi = source_row<T>(x, r, h, d, i);
      // the mean, then the variance around it (no E[h^2] - E[h]^2 cancellation), both torch's sums
      const float mean = torch_sum<T>(hi, d.n, [](auto v) { return v; }) / static_cast<float>(d.n);
      const float var = torch_sum<T>(hi, d.n, [mean](auto v) { return (v - mean) * (v - mean); });
      const float rstd = 1.f / std::sqrt(var / static_cast<float>(d.n) + eps);
      map_row<T, T>(hi, gain, bias, y + i * d.n, d.n, [&](fB v, fB g, fB be) {
        v = (v - mean) * rstd * g;
        return bias ? v + be : v;  // no `+ 0`: a -0.0 stays -0.0, as in the torch code without a bias
      });
    }
  });
}

// x as [rows, n] with unit column stride: a view when it can be, a copy otherwise.
at::Tensor as_rows(const at::Tensor& t) {
  if (t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1)) return t;  // already rows: no new view
  at::Tensor t2 = t.reshape({-1, t.size(-1)});
  return t2.stride(1) == 1 || t2.size(1) <= 1 ? t2 : t2.contiguous();
}

Rows check(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& r2) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x2.size(1), "cpu_norms: weight does not match the row width");
  if (r2) {
    TORCH_CHECK(r2->sizes() == x2.sizes(), "cpu_norms: residual must be shaped as x");
    TORCH_CHECK(r2->scalar_type() == x2.scalar_type(), "cpu_norms: residual dtype must be x's");
  }
  return Rows{x2.size(0), x2.size(1), x2.stride(0), r2 ? r2->stride(0) : 0};
}

// Calls f(T{}, W{}) (torch element types) for the (activation, weight) dtype pair: the weight in
// the activation's dtype, or fp32 (a low-precision activation with an fp32 weight: fp32 output).
template <typename F>
void dispatch(at::ScalarType in, at::ScalarType weight, F&& f) {
  using BF = c10::BFloat16;
  using H = c10::Half;
  if (in == at::kFloat && weight == at::kFloat) return f(float{}, float{});
  if (in == at::kBFloat16 && weight == at::kBFloat16) return f(BF{}, BF{});
  if (in == at::kBFloat16 && weight == at::kFloat) return f(BF{}, float{});
  if (in == at::kHalf && weight == at::kHalf) return f(H{}, H{});
  if (in == at::kHalf && weight == at::kFloat) return f(H{}, float{});
  TORCH_CHECK(false, "cpu_norms: unsupported dtypes ", in, " with a ", weight, " weight");
}

// (y, h) shaped as x, normalised over its last dimension: h is x + residual, or None without a
// residual (an undefined tensor: nothing allocated).
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& residual, double eps,
                                            double offset, bool fp32_gain) {
  TORCH_CHECK(x.dim() >= 1, "cpu_norms: x needs a last dimension");
  const at::Tensor x2 = as_rows(x);
  const std::optional<at::Tensor> r2 = residual ? std::optional<at::Tensor>(as_rows(*residual)) : std::nullopt;
  const Rows d = check(x2, weight, r2);
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(w.scalar_type()));
  at::Tensor h = residual ? at::empty(x.sizes(), x.options()) : at::Tensor();  // None without one
  dispatch(x.scalar_type(), w.scalar_type(), [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    // the torch code adds the offset to an fp32 gain always, to the plain weight only when non-zero
    Fp32Row row;
    const float* gain = fp32_row<raw_t<W>>(w, fp32_gain || offset != 0, static_cast<float>(offset), row);
    auto run = [&](auto fp32) {
      rms_rows<raw_t<T>, raw_t<W>, decltype(fp32)::value>(raw<T>(x2), r2 ? raw<T>(*r2) : nullptr,
                                                          residual ? raw_mut<T>(h) : nullptr, gain, raw_mut<W>(y), d,
                                                          static_cast<float>(eps));
    };
    fp32_gain ? run(std::true_type{}) : run(std::false_type{});
  });
  return {y, h};
}

// (y, h) as rms_norm; y in h's dtype, as kernels/layer_norm.py rounds it.
std::tuple<at::Tensor, at::Tensor> layer_norm(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& residual, double eps) {
  TORCH_CHECK(x.dim() >= 1, "cpu_norms: x needs a last dimension");
  const at::Tensor x2 = as_rows(x);
  const std::optional<at::Tensor> r2 = residual ? std::optional<at::Tensor>(as_rows(*residual)) : std::nullopt;
  const Rows d = check(x2, weight, r2);
  TORCH_CHECK(!bias || (bias->sizes() == weight.sizes() && bias->scalar_type() == weight.scalar_type()),
              "cpu_norms: bias does not match the weight");
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor h = residual ? at::empty(x.sizes(), x.options()) : at::Tensor();  // None without one
  dispatch(x.scalar_type(), w.scalar_type(), [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    Fp32Row w_row, b_row;
    const float* gain = fp32_row<raw_t<W>>(w, false, 0.f, w_row);
    const float* beta = b.defined() ? fp32_row<raw_t<W>>(b, false, 0.f, b_row) : nullptr;
    layer_rows<raw_t<T>>(raw<T>(x2), r2 ? raw<T>(*r2) : nullptr, residual ? raw_mut<T>(h) : nullptr, gain, beta,
                         raw_mut<T>(y), d, static_cast<float>(eps));
  });
  return {y, h};
}

}  // namespace

// A plain Python module, not a torch.ops library: the kernels run only in eager inference (never
// under compile, export or autograd), where a pybind11 call costs ~1.5 us less than the
// dispatcher's, and a decode step makes dozens of one-row calls.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "(y, h or None) = rms_norm(x, weight, residual, eps, offset, fp32_gain)");
  m.def("layer_norm", &layer_norm, "(y, h or None) = layer_norm(x, weight, bias, residual, eps)");
}
