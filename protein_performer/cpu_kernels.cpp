// Fused CPU kernels for the bf16 path, built by cpu_kernels.py on first use. Each replaces several passes of torch's
// operators over a large bf16 tensor by one; cpu_kernels.py holds the reference each is tested against.
//
// Plain C++ over GCC / Clang vector extensions, compiled for the building machine (-march=native): a vector of 16
// floats is one AVX-512 register or two AVX2 ones. bf16 values are read as the top halves of floats, computed in
// float32 and rounded back to nearest-even.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;
constexpr int64_t kGrain = 2048;  // vectors per task of at::parallel_for (32 K elements)

inline vf load(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

inline void store(uint16_t* p, vf x) {  // round to nearest even (the kernels produce no NaN from finite input)
  vu u = (vu)x;
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  vh h = __builtin_convertvector(u, vh);
  std::memcpy(p, &h, sizeof h);
}

inline vf splat(float x) { return (vf){} + x; }

// 2^x for x < 128 (the kernels' x are at most 0, up to rounding), relative error 2.3e-7; 0 below -126 (no
// subnormals); NaN stays NaN. x = n + f with n = round(x), f in [-0.5, 0.5]: a degree-5 fit of 2^f (least
// relative error) times 2^n built in the exponent bits.
inline vf exp2_below_128(vf x) {
  x = x < -127.f ? splat(-127.f) : x;
  const float round = 12582912.f;  // 1.5 * 2^23: x + round holds round(x) in its low mantissa bits
  vf t = x + round;
  vf f = x - (t - round);
  vf p = f * 1.327646431e-03f + 9.675541893e-03f;
  p = p * f + 5.550713465e-02f;
  p = p * f + 2.402212024e-01f;
  p = p * f + 6.931469440e-01f;
  p = p * f + 1.000000119e+00f;
  return p * (vf)(((vi)t + (127 - 0x4B400000)) << 23);  // 2^n: n = -127 gives 0
}

// gelu(h) = h Phi(h) and gelu'(h) = Phi(h) + h phi(h), sharing exp(-h^2 / 2). Phi from erfc by Abramowitz and
// Stegun 7.1.26 (absolute error 1.5e-7, the approximation torch's own vectorised erf uses), taken as
// Phi(-|h|) = erfc(|h| / sqrt 2) / 2 directly, so that negative h lose no digits to 1 - erf.
inline void gelu_and_derivative(vf h, vf* gelu, vf* derivative) {
  const float log2e = 1.4426950408889634f, inv_sqrt2 = 0.70710678118654752f, inv_sqrt_2pi = 0.3989422804014327f;
  vf x = (h < 0.f ? -h : h) * inv_sqrt2;
  vf t = 1.f / (x * 0.3275911f + 1.f);
  vf poly = ((((t * 1.061405429f - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  vf e = exp2_below_128(h * h * (-0.5f * log2e));  // exp(-h^2 / 2)
  vf lower = 0.5f * poly * e;                         // Phi(-|h|)
  vf cdf = h < 0.f ? lower : 1.f - lower;             // Phi(h)
  *gelu = h * cdf;
  *derivative = cdf + h * e * inv_sqrt_2pi;
}

uint16_t* bits(at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), name,
              " must be a contiguous bf16 CPU tensor");
  TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " elements, expected ", numel);
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

// Calls f(p) on each 16 values of a row of m; the last m mod 16 go through a copy padded with `pad`.
template <class F>
inline void for_each_vector(uint16_t* row, int64_t m, uint16_t pad, F f) {
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) f(row + j);
  if (j < m) {
    uint16_t tail[kLanes];
    std::fill(tail, tail + kLanes, pad);
    std::memcpy(tail, row + j, (m - j) * sizeof(uint16_t));
    f(tail);
    std::memcpy(row + j, tail, (m - j) * sizeof(uint16_t));
  }
}

constexpr uint16_t kMinusInf = 0xFF80;  // bf16 -inf: pads a row's maximum

inline float row_max(uint16_t* row, int64_t m) {
  vf best = splat(-INFINITY);
  for_each_vector(row, m, kMinusInf, [&](uint16_t* p) {
    vf v = load(p);
    best = v > best ? v : best;
  });
  float top = best[0];
  for (int i = 1; i < kLanes; ++i) top = std::max(top, best[i]);
  return top;
}

// The rows of a (..., m) bf16 tensor, each with a float32 per-row value in `per_row` (G, C): G C rows, unit stride
// along C (a (B, H, C) slice of a (B, H, L) array qualifies, viewed as (B H, C)). Calls f(row, value).
template <class F>
void for_each_row(at::Tensor& logits, at::Tensor& per_row, F f) {
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, "logits must have a last dimension");
  const int64_t m = logits.size(-1), rows = logits.numel() / m;
  uint16_t* L = bits(logits, "logits", logits.numel());
  TORCH_CHECK(per_row.device().is_cpu() && per_row.scalar_type() == at::kFloat && per_row.dim() == 2 &&
                  per_row.stride(1) == 1 && per_row.size(0) * per_row.size(1) == rows,
              "the per-row values must be float32 (G, C) with unit stride along C and one per row of logits (",
              rows, ")");
  const int64_t cols = per_row.size(1), stride = per_row.stride(0);
  float* V = per_row.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain * kLanes / m), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(L + r * m, m, V + (r / cols) * stride + r % cols);
  });
}

// FAVOR's softmax features of a block of rows, in place over the bf16 logits of its product with the projection
// (base 2): phi = exp2(logit - shift) per row. find_max: shift <- the row's maximum first (queries); else the
// given shift (the keys' offsets; backward's recomputation from saved maxima). Replaces a conversion to float32, a
// maximum, a subtraction, exp2 and a conversion back: five passes over the block.
void exp2_rows(at::Tensor logits, at::Tensor shift, bool find_max) {
  for_each_row(logits, shift, [&](uint16_t* row, int64_t m, float* s) {
    if (find_max) *s = row_max(row, m);
    const float by = *s;
    for_each_vector(row, m, 0, [&](uint16_t* p) { store(p, exp2_below_128(load(p) - by)); });
  });
}

// out <- each row's maximum (the keys' log-scales before their norms), float32.
void max_rows(at::Tensor logits, at::Tensor out) {
  for_each_row(logits, out, [&](uint16_t* row, int64_t m, float* s) { *s = row_max(row, m); });
}

// FAVOR's ReLU features in place: relu(logit) + eps.
void relu_eps(at::Tensor logits, double eps) {
  const int64_t n = logits.numel();
  uint16_t* L = bits(logits, "logits", n);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, (n + kLanes - 1) / kLanes, kGrain, [&](int64_t v0, int64_t v1) {
    const int64_t start = v0 * kLanes, end = std::min(n, v1 * kLanes);
    for_each_vector(L + start, end - start, 0, [&](uint16_t* p) {
      vf x = load(p);
      store(p, (x > 0.f ? x : splat(0.f)) + e);
    });
  });
}

// out <- gelu(h); grad <- grad * gelu'(h), in place. One pass where torch takes two (gelu, gelu_backward), each
// computing erf: backward's recomputation of gelu(h) for the second product's weight gradient comes free.
void gelu_and_grad(at::Tensor h, at::Tensor out, at::Tensor grad) {
  const int64_t n = h.numel();
  const uint16_t* H = bits(h, "h", n);
  uint16_t* A = bits(out, "out", n);
  uint16_t* G = bits(grad, "grad", n);
  auto block = [](const uint16_t* h, uint16_t* a, uint16_t* g) {
    vf gelu, derivative;
    gelu_and_derivative(load(h), &gelu, &derivative);
    store(a, gelu);
    store(g, load(g) * derivative);
  };
  at::parallel_for(0, n / kLanes, kGrain, [&](int64_t v0, int64_t v1) {
    for (int64_t i = v0 * kLanes; i < v1 * kLanes; i += kLanes) block(H + i, A + i, G + i);
  });
  const int64_t done = n - n % kLanes, rest = n % kLanes;
  if (rest) {  // the last n mod 16 elements, through zero-padded vectors
    uint16_t h_tail[kLanes] = {}, a_tail[kLanes], g_tail[kLanes] = {};
    std::memcpy(h_tail, H + done, rest * sizeof(uint16_t));
    std::memcpy(g_tail, G + done, rest * sizeof(uint16_t));
    block(h_tail, a_tail, g_tail);
    std::memcpy(A + done, a_tail, rest * sizeof(uint16_t));
    std::memcpy(G + done, g_tail, rest * sizeof(uint16_t));
  }
}

}  // namespace

// Registered as torch operators (torch.ops.protein_performer.*), so that the profiler sees and counts them.
TORCH_LIBRARY(protein_performer, m) {
  m.def("gelu_and_grad(Tensor h, Tensor(a!) out, Tensor(b!) grad) -> ()");
  m.def("exp2_rows(Tensor(a!) logits, Tensor(b!) shift, bool find_max) -> ()");
  m.def("max_rows(Tensor logits, Tensor(a!) out) -> ()");
  m.def("relu_eps(Tensor(a!) logits, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(protein_performer, CPU, m) {
  m.impl("gelu_and_grad", &gelu_and_grad);
  m.impl("exp2_rows", &exp2_rows);
  m.impl("max_rows", &max_rows);
  m.impl("relu_eps", &relu_eps);
}
