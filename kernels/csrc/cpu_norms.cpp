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
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <bit>
#if defined(__F16C__)
#include <immintrin.h>
#endif
#include <vector>

namespace {

// The loops see raw element types, converted with plain integer/float arithmetic so that gcc and
// clang vectorise them (c10's scalar BFloat16/Half conversions do not): bf16 as its uint16_t bits,
// fp16 through the F16C instructions. Both round to nearest even, as torch does.
using bf16_bits = uint16_t;
struct half_bits {  // fp16 bits, converted by the F16C instructions where the build has them
  uint16_t v;
};

inline float load_f(float v) { return v; }
inline float load_f(bf16_bits v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }
#if defined(__F16C__)
inline float load_f(half_bits h) { return _cvtsh_ss(h.v); }
#else
inline float load_f(half_bits h) { return static_cast<float>(c10::Half(h.v, c10::Half::from_bits())); }
#endif

template <typename T> inline T store_f(float v);
template <> inline float store_f<float>(float v) { return v; }
template <> inline bf16_bits store_f<bf16_bits>(float v) {
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<bf16_bits>((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);  // NaN stays NaN
}
#if defined(__F16C__)
template <> inline half_bits store_f<half_bits>(float v) {
  return {static_cast<uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))};
}
#else
template <> inline half_bits store_f<half_bits>(float v) { return {c10::Half(v).x}; }
#endif

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

// torch's fp32 sum of a contiguous row (its cascade sum, aten/src/ATen/native/cpu/SumKernel.cpp),
// replayed add for add, so mean(h^2) -- and with it every output -- is torch's to the last bit.
// Its shape: the row as elements of L = 8 lanes (an AVX2 Vectorized<float>), in
// four interleaved partial sums, each summed in levels of 2^p elements so that only partial sums
// of similar size meet; then the scalar tail, then the lanes in order.
inline int64_t ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(x - 1)); }

template <int L>
void four_sums(const float* in, int64_t row_stride, int64_t col_stride, int64_t size, float out[4][L]) {
  constexpr int levels = 4;
  const int64_t power = std::max<int64_t>(4, ceil_log2(size) / levels);
  const int64_t step = int64_t(1) << power, mask = step - 1;
  float acc[levels][4][L] = {};
  auto add_row = [&](int64_t i) {
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < L; ++l) acc[0][k][l] += in[i * row_stride + k * col_stride + l];
  };
  int64_t i = 0;
  while (i + step <= size) {
    for (int64_t j = 0; j < step; ++j, ++i) add_row(i);
    for (int j = 1; j < levels; ++j) {
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < L; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < size; ++i) add_row(i);
  for (int j = 1; j < levels; ++j)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < L; ++l) acc[0][k][l] += acc[j][k][l];
  for (int k = 0; k < 4; ++k)
    for (int l = 0; l < L; ++l) out[k][l] = acc[0][k][l];
}

template <int L>  // `size` elements of L lanes, `stride` floats apart, summed lane by lane
void row_sum(const float* in, int64_t stride, int64_t size, float out[L]) {
  const int64_t quarter = size / 4;
  float part[4][L];
  four_sums<L>(in, 4 * stride, stride, quarter, part);
  for (int64_t i = quarter * 4; i < size; ++i)
    for (int l = 0; l < L; ++l) part[0][l] += in[i * stride + l];
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < L; ++l) part[0][l] += part[k][l];
  for (int l = 0; l < L; ++l) out[l] = part[0][l];
}

template <int L>
float torch_sum_lanes(const float* v, int64_t n) {
  if (n < L) {  // too short for a vector: torch's scalar inner sum
    float s[1];
    row_sum<1>(v, 1, n, s);
    return s[0];
  }
  const int64_t whole = n / L;
  float lanes[L];
  row_sum<L>(v, L, whole, lanes);
  float total = 0.f;
  for (int64_t k = whole * L; k < n; ++k) total += v[k];
  for (int l = 0; l < L; ++l) total += lanes[l];
  return total;
}

// Lanes of 8 on AVX-512 machines too: torch registers its sum kernel with REGISTER_DISPATCH, which
// gives the AVX-512 dispatch level no kernel of its own, so those machines run the AVX2 one
// (measured: a replay in lanes of 16 differs from torch.sum in the last bit on ~25% of rows).
inline float torch_sum(const float* v, int64_t n) { return torch_sum_lanes<8>(v, n); }

// Row conversions between the raw element type and fp32: plain loops the compiler vectorises, and
// for fp16 eight at a time with F16C (one scalar conversion per element is 4x slower).
template <typename T>
inline void to_float(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = load_f(src[j]);
}
template <typename T>
inline void from_float(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = store_f<T>(src[j]);
}
#if defined(__F16C__)
template <>
inline void to_float<half_bits>(const half_bits* __restrict src, float* __restrict dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < n; ++j) dst[j] = load_f(src[j]);
}
template <>
inline void from_float<half_bits>(const float* __restrict src, half_bits* __restrict dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; j < n; ++j) dst[j] = store_f<half_bits>(src[j]);
}
#endif

// buf rounded to T's precision and back, in place (Llama rounds the normalised value to the
// model's dtype before the gain multiplies it).
template <typename T>
inline void round_to(float* buf, T* scratch, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    from_float<T>(buf, scratch, n);
    to_float<T>(scratch, buf, n);
  }
}

// h = x (+ residual) into buf as fp32, rounded to T first as an unfused `x + residual` rounds it;
// h is also stored when there is a residual.
template <typename T>
inline void load_row(const T* x, const T* r, T* h, float* __restrict buf, float* __restrict tmp, int64_t n) {
  to_float<T>(x, buf, n);
  if (r == nullptr) return;
  if constexpr (std::is_same_v<T, half_bits>) {  // conversions in their own loops
    to_float<T>(r, tmp, n);
    for (int64_t j = 0; j < n; ++j) buf[j] += tmp[j];
    from_float<T>(buf, h, n);
    round_to<T>(buf, h, n);
  } else {  // one loop: the conversions vectorise inline
    for (int64_t j = 0; j < n; ++j) {
      const T s = store_f<T>(buf[j] + load_f(r[j]));
      h[j] = s;
      buf[j] = load_f(s);
    }
  }
}

struct Rows {
  int64_t rows, n, sx, sr;  // row count, width, row strides of x and residual
};

// Rows per task: enough work (~32K elements) that a thread hand-off pays; one row runs inline.
inline int64_t grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// T: x, residual and h; W: the weight; the output is W's dtype (promote(T, W) for the pairs taken).
template <typename T, typename W>
void rms_rows(const T* x, const T* r, T* h, const W* w, W* y, Rows d, float eps, float offset, bool fp32_gain) {
  at::parallel_for(0, d.rows, grain(d.n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(d.n), tmp(d.n), gain(d.n);
    std::vector<T> scratch(d.n);
    to_float<W>(w, gain.data(), d.n);
    for (auto& g : gain) g += offset;  // Gemma's 1 + w, formed in fp32
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict b = buf.data();
      load_row<T>(x + i * d.sx, r ? r + i * d.sr : nullptr, h ? h + i * d.n : nullptr, b, tmp.data(), d.n);
      // torch: rsqrt(mean(h^2) + eps), mean = sum(h * h) / n, all fp32
      for (int64_t j = 0; j < d.n; ++j) tmp[j] = b[j] * b[j];
      const float rstd = 1.f / std::sqrt(torch_sum(tmp.data(), d.n) / static_cast<float>(d.n) + eps);
      const float* __restrict g = gain.data();
      W* __restrict yi = y + i * d.n;
      if constexpr (std::is_same_v<T, half_bits> || std::is_same_v<W, half_bits>) {  // in passes over b
        for (int64_t j = 0; j < d.n; ++j) b[j] *= rstd;
        if (!fp32_gain) round_to<T>(b, scratch.data(), d.n);
        for (int64_t j = 0; j < d.n; ++j) b[j] *= g[j];
        from_float<W>(b, yi, d.n);
      } else if (fp32_gain) {  // Gemma / OLMo 2: the fp32 value times the gain, one rounding
        for (int64_t j = 0; j < d.n; ++j) yi[j] = store_f<W>(b[j] * rstd * g[j]);
      } else {  // Llama: the normalised value rounded to h's dtype, then times the gain, rounded
        for (int64_t j = 0; j < d.n; ++j) yi[j] = store_f<W>(load_f(store_f<T>(b[j] * rstd)) * g[j]);
      }
    }
  });
}

template <typename T, typename W>
void layer_rows(const T* x, const T* r, T* h, const W* w, const W* bias, T* y, Rows d, float eps) {
  at::parallel_for(0, d.rows, grain(d.n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(d.n), tmp(d.n), gain(d.n), beta(d.n, 0.f);
    to_float<W>(w, gain.data(), d.n);
    if (bias) to_float<W>(bias, beta.data(), d.n);
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict b = buf.data();
      load_row<T>(x + i * d.sx, r ? r + i * d.sr : nullptr, h ? h + i * d.n : nullptr, b, tmp.data(), d.n);
      // two passes over the fp32 row (in cache): the mean, then the variance around it
      const float mean = torch_sum(b, d.n) / static_cast<float>(d.n);
      for (int64_t j = 0; j < d.n; ++j) {
        b[j] -= mean;
        tmp[j] = b[j] * b[j];
      }
      const float rstd = 1.f / std::sqrt(torch_sum(tmp.data(), d.n) / static_cast<float>(d.n) + eps);
      const float* __restrict g = gain.data();
      const float* __restrict be = beta.data();
      if constexpr (std::is_same_v<T, half_bits>) {
        for (int64_t j = 0; j < d.n; ++j) b[j] = b[j] * rstd * g[j] + be[j];
        from_float<T>(b, y + i * d.n, d.n);
      } else {
        T* __restrict yi = y + i * d.n;
        for (int64_t j = 0; j < d.n; ++j) yi[j] = store_f<T>(b[j] * rstd * g[j] + be[j]);
      }
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
    rms_rows<raw_t<T>, raw_t<W>>(raw<T>(x2), r2 ? raw<T>(*r2) : nullptr, residual ? raw_mut<T>(h) : nullptr,
                                 raw<W>(w), raw_mut<W>(y), d, static_cast<float>(eps), static_cast<float>(offset),
                                 fp32_gain);
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
    layer_rows<raw_t<T>, raw_t<W>>(raw<T>(x2), r2 ? raw<T>(*r2) : nullptr, residual ? raw_mut<T>(h) : nullptr,
                                   raw<W>(w), b.defined() ? raw<W>(b) : nullptr, raw_mut<T>(y), d,
                                   static_cast<float>(eps));
  });
  return {y, h};
}

}  // namespace

TORCH_LIBRARY(minillama_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, Tensor? residual, float eps, float offset, bool fp32_gain) -> (Tensor, Tensor)");
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minillama_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("layer_norm", &layer_norm);
}
