// GroupNorm (Wu & He 2018, Eq. 1-2) with an optional SiLU and inverted dropout after it (Srivastava et al. 2014),
// forward and backward, for channels-last CPU tensors: x is [N, L, C] in memory (L = H * W), fp32 or bf16, with fp32
// statistics and affine parameters. Its input is x + t with t a per-(sample, channel) shift (the ResBlock's time
// embedding), which only enters per-channel coefficients, so x + t is never written out. The dropout mask is a
// hash of (seed, element index), so the backward pass regenerates it instead of storing it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) {
  uint32_t u = uint32_t(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(at::BFloat16* p, int64_t i, float v) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = v != v ? uint16_t(0x7FC0) : uint16_t(r);
}

// exp for the sigmoid, in a form the compiler vectorises: 2^k * exp(r), |r| <= ln2 / 2, with Cephes' expf polynomial.
inline float exp_approx(float x) {
  x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;
  const int32_t ki = int32_t(x * 1.44269504f + (x < 0.f ? -0.5f : 0.5f));  // nearest integer to x / ln2
  const float k = float(ki);
  float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t e = (ki + 127) << 23;
  float s;
  std::memcpy(&s, &e, 4);
  return p * s;
}
inline float sigmoid(float z) { return 1.f / (1.f + exp_approx(-z)); }

// Dropout: element i is kept when the top 24 bits of a hash of (i, seed) are at least p 2^24. The hash is two
// rounds of the "lowbias32" integer mixer (C. Wellons, 2018), keyed by the two halves of the seed.
struct Drop {
  uint32_t s0 = 0, s1 = 0, threshold = 0;
  float scale = 1.f;
  Drop(double p, int64_t seed) : s0(uint32_t(seed)), s1(uint32_t(uint64_t(seed) >> 32)), threshold(uint32_t(std::llround(p * 16777216.0))), scale(float(1 / (1 - p))) {}
};
inline uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  return x ^ (x >> 16);
}
// The factor for element i: 0 if dropped, else 1 / (1 - p); 1 without dropout. Row loops take Drop by value, so
// that its fields stay in registers (a reference could alias the output and stop the loop from vectorising).
template <bool drop>
inline float keep(const Drop& d, uint32_t i) {
  if constexpr (!drop) return 1.f;
  return (mix(mix(i ^ d.s0) ^ d.s1) >> 8) >= d.threshold ? d.scale : 0.f;
}

// Gradient through the SiLU at z = a x + b (dy itself without it).
template <bool silu>
inline float dz(float a, float b, float xv, float g) {
  if constexpr (!silu) return g;
  const float z = xv * a + b, s = sigmoid(z);
  return g * s * (1.f + z * (1.f - s));
}

// The per-row loops over contiguous channels, with restrict pointers so that they vectorise.
template <typename T>
inline void moments_row(const T* __restrict__ x, const T* __restrict__ sh, float* __restrict__ s1, float* __restrict__ s2, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float d = load(x, c) - load(sh, c);
    s1[c] += d;
    s2[c] += d * d;
  }
}

template <typename T, bool silu, bool drop>
inline void normalize_row(const T* __restrict__ x, const float* __restrict__ a, const float* __restrict__ b, T* __restrict__ y, int64_t C,
                          const Drop d, uint32_t i0) {
  for (int64_t c = 0; c < C; ++c) {
    float z = load(x, c) * a[c] + b[c];
    if constexpr (silu) z *= sigmoid(z);
    store(y, c, z * keep<drop>(d, i0 + uint32_t(c)));
  }
}

template <typename T, bool silu, bool drop>
inline void grad_moments_row(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ a, const float* __restrict__ b,
                             const float* __restrict__ m, float* __restrict__ s1, float* __restrict__ s2, int64_t C, const Drop dr, uint32_t i0) {
  for (int64_t c = 0; c < C; ++c) {
    const float xv = load(x, c), d = dz<silu>(a[c], b[c], xv, load(dy, c) * keep<drop>(dr, i0 + uint32_t(c)));
    s1[c] += d;
    s2[c] += d * (xv - m[c]);
  }
}

template <typename T, bool silu, bool drop>
inline void grad_input_row(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ a, const float* __restrict__ b,
                           const float* __restrict__ m, const float* __restrict__ e, const float* __restrict__ f, T* __restrict__ dx, int64_t C,
                           const Drop dr, uint32_t i0) {
  for (int64_t c = 0; c < C; ++c) {
    const float xv = load(x, c), d = dz<silu>(a[c], b[c], xv, load(dy, c) * keep<drop>(dr, i0 + uint32_t(c)));
    store(dx, c, a[c] * d + e[c] * (xv - m[c]) + f[c]);
  }
}

// Per (sample, channel): the normalisation and affine map of x + t as z = a x + b, a = rstd w, b = bias + (t - mean) rstd w.
void affine(const float* w, const float* b, const float* t, const float* mean, const float* rstd, int64_t N, int64_t C, int64_t G,
            std::vector<float>& a, std::vector<float>& bb) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const float r = rstd[n * G + c / (C / G)], m = mean[n * G + c / (C / G)];
      a[n * C + c] = r * w[c], bb[n * C + c] = b[c] + (t[n * C + c] - m) * r * w[c];
    }
}

// Split each sample's L rows into K chunks so that N * K tasks keep every thread busy.
int64_t chunks(int64_t N, int64_t L) {
  int64_t t = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(L, (2 * t + N - 1) / N));
}

template <typename T, bool silu, bool drop>
std::vector<at::Tensor> forward(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_, const at::Tensor& t_, int64_t G, double eps,
                                const Drop& d) {
  const int64_t N = x_.size(0), C = x_.size(1), L = x_.numel() / (N * C), Cg = C / G, K = chunks(N, L);
  const T* x = x_.data_ptr<T>();
  const float *w = w_.data_ptr<float>(), *b = b_.data_ptr<float>(), *t = t_.data_ptr<float>();
  at::Tensor y_ = at::empty_like(x_), mean_ = at::empty({N, G}, x_.options().dtype(at::kFloat)), rstd_ = at::empty_like(mean_);
  at::Tensor sum_ = at::empty({N, C}, mean_.options());  // per (sample, channel): the sum of x + t over the pixels
  T* y = y_.data_ptr<T>();
  float *mean = mean_.data_ptr<float>(), *rstd = rstd_.data_ptr<float>(), *xsum = sum_.data_ptr<float>();
  // per (sample, chunk, channel): sums of x - shift and (x - shift)^2, shift = the sample's first row (shifted-data variance)
  std::vector<float> part(N * K * 2 * C);
  at::parallel_for(0, N * K, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / K, k = i % K, l0 = L * k / K, l1 = L * (k + 1) / K;
      float *s1 = &part[i * 2 * C], *s2 = s1 + C;
      const T* sh = x + n * L * C;
      for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0.f;
      for (int64_t l = l0; l < l1; ++l) moments_row(x + (n * L + l) * C, sh, s1, s2, C);
    }
  });
  std::vector<float> a(N * C), bb(N * C);
  for (int64_t n = 0; n < N; ++n) {
    const T* sh = x + n * L * C;
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0, sq = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        double s1 = 0, s2 = 0, h = load(sh, c) + t[n * C + c];  // sums of x + t - h and their squares
        for (int64_t k = 0; k < K; ++k) s1 += part[(n * K + k) * 2 * C + c], s2 += part[(n * K + k) * 2 * C + C + c];
        xsum[n * C + c] = float(s1 + L * h);
        sum += s1 + L * h;
        sq += s2 + 2 * h * s1 + L * h * h;
      }
      const double m = sum / (L * Cg), var = std::max(sq / (L * Cg) - m * m, 0.0);
      mean[n * G + g] = float(m), rstd[n * G + g] = float(1 / std::sqrt(var + eps));
    }
  }
  affine(w, b, t, mean, rstd, N, C, G, a, bb);
  at::parallel_for(0, N * L, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      normalize_row<T, silu, drop>(x + row * C, &a[(row / L) * C], &bb[(row / L) * C], y + row * C, C, d, uint32_t(row * C));
    }
  });
  return {y_, mean_, rstd_, sum_};
}

template <typename T, bool silu, bool drop>
std::vector<at::Tensor> backward(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_, const at::Tensor& t_,
                                 const at::Tensor& mean_, const at::Tensor& rstd_, const at::Tensor& sum_, int64_t G, const Drop& dr) {
  const int64_t N = x_.size(0), C = x_.size(1), L = x_.numel() / (N * C), Cg = C / G, K = chunks(N, L);
  const T *x = x_.data_ptr<T>(), *dy = dy_.data_ptr<T>();
  const float *w = w_.data_ptr<float>(), *b = b_.data_ptr<float>(), *t = t_.data_ptr<float>(), *mean = mean_.data_ptr<float>(),
              *rstd = rstd_.data_ptr<float>(), *xsum = sum_.data_ptr<float>();
  at::Tensor dx_ = at::empty_like(x_), dw_ = at::empty({C}, w_.options()), db_ = at::empty({C}, w_.options()), dt_ = at::empty_like(t_);
  T* dx = dx_.data_ptr<T>();
  std::vector<float> a(N * C), bb(N * C), mc(N * C);  // mc: mean - t, so that x - mc = (x + t) - mean
  affine(w, b, t, mean, rstd, N, C, G, a, bb);
  for (int64_t i = 0; i < N * C; ++i) mc[i] = mean[(i / C) * G + (i % C) / Cg] - t[i];
  // per (sample, chunk, channel): sums of dz and dz * (x - mean)
  std::vector<float> part(N * K * 2 * C);
  at::parallel_for(0, N * K, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / K, k = i % K, l0 = L * k / K, l1 = L * (k + 1) / K;
      float *s1 = &part[i * 2 * C], *s2 = s1 + C;
      const float *ar = &a[n * C], *br = &bb[n * C], *mr = &mc[n * C];
      for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0.f;
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t o = (n * L + l) * C;
        grad_moments_row<T, silu, drop>(x + o, dy + o, ar, br, mr, s1, s2, C, dr, uint32_t(o));
      }
    }
  });
  std::vector<double> S1(N * C), S2(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < K; ++k) S1[n * C + c] += part[(n * K + k) * 2 * C + c], S2[n * C + c] += part[(n * K + k) * 2 * C + C + c];
  // dx = r w dz + e (x - mean) + f, e = -r^3 sum(w dz (x - mean)) / k, f = -r sum(w dz) / k over the group's k = L * Cg elements
  std::vector<float> e(N * C), f(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double A = 0, B = 0, r = rstd[n * G + g];
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) A += w[c] * S1[n * C + c], B += w[c] * S2[n * C + c];
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) e[n * C + c] = float(-r * r * r * B / (L * Cg)), f[n * C + c] = float(-r * A / (L * Cg));
    }
  float *dw = dw_.data_ptr<float>(), *db = db_.data_ptr<float>(), *dt = dt_.data_ptr<float>();
  // dt: dx summed over the pixels, with the sum of (x + t - mean) from the forward pass
  for (int64_t i = 0; i < N * C; ++i) {
    const double centred = xsum[i] - double(L) * mean[(i / C) * G + (i % C) / Cg];
    dt[i] = float(a[i] * S1[i] + e[i] * centred + double(L) * f[i]);
  }
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0, sb = 0;
    for (int64_t n = 0; n < N; ++n) sw += rstd[n * G + c / Cg] * S2[n * C + c], sb += S1[n * C + c];
    dw[c] = float(sw), db[c] = float(sb);
  }
  at::parallel_for(0, N * L, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t o = (row / L) * C;
      grad_input_row<T, silu, drop>(x + row * C, dy + row * C, &a[o], &bb[o], &mc[o], &e[o], &f[o], dx + row * C, C, dr, uint32_t(row * C));
    }
  });
  return {dx_, dw_, db_, dt_};
}

// The template instance for a dtype and the silu / dropout switches.
template <template <typename, bool, bool> class F, typename... A>
std::vector<at::Tensor> dispatch(at::ScalarType t, bool silu, bool drop, A&&... a) {
  if (t == at::kBFloat16) {
    if (silu) return drop ? F<at::BFloat16, true, true>()(a...) : F<at::BFloat16, true, false>()(a...);
    return drop ? F<at::BFloat16, false, true>()(a...) : F<at::BFloat16, false, false>()(a...);
  }
  if (silu) return drop ? F<float, true, true>()(a...) : F<float, true, false>()(a...);
  return drop ? F<float, false, true>()(a...) : F<float, false, false>()(a...);
}
template <typename T, bool silu, bool drop>
struct Forward {
  template <typename... A>
  std::vector<at::Tensor> operator()(A&&... a) { return forward<T, silu, drop>(a...); }
};
template <typename T, bool silu, bool drop>
struct Backward {
  template <typename... A>
  std::vector<at::Tensor> operator()(A&&... a) { return backward<T, silu, drop>(a...); }
};

// t: the [N, C] fp32 shift; p: the dropout probability after the (SiLU of the) normalisation, 0 for none; seed: its
// mask's key. Forward returns y, mean, rstd and the per-channel sums of x + t that backward takes.
std::vector<at::Tensor> group_norm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& t, int64_t groups,
                                           double eps, bool silu, double p, int64_t seed) {
  return dispatch<Forward>(x.scalar_type(), silu, p > 0, x, w, b, t, groups, eps, Drop(p, seed));
}

// Returns dx, dw, db, dt.
std::vector<at::Tensor> group_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& t,
                                            const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& sum, int64_t groups, bool silu,
                                            double p, int64_t seed) {
  return dispatch<Backward>(x.scalar_type(), silu, p > 0, dy, x, w, b, t, mean, rstd, sum, groups, Drop(p, seed));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &group_norm_forward);
  m.def("backward", &group_norm_backward);
}
