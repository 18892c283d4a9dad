// The tile transforms of Winograd's minimal filtering algorithms F(m x m, 3x3), m = 4 and m = 2 (Lavin & Gray 2016,
// Eq. 8: Y = A^T [(G g G^T) * (B^T d B)] A), for a 3x3, stride-1, padding-1 convolution of a channels-last fp32 or
// bf16 image x, [N, H, W, C] in memory. The image is cut into m x m output tiles (TH x TW per sample, P = N TH TW
// in all), each read from the a x a input patch around it (a = m + 2). The four functions here are the input
// transform V = B^T d B, the output transform Y = A^T M A (plus the bias), and their adjoints, computed in fp32 and
// stored in the dtype they were given; the a^2 matrix products M = V U between them, and the weight transform
// U = G g G^T, are torch's. V and M are [a^2, P, C] and [a^2, P, O]: one matrix per tile position.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t L = 16;  // channels per block: one AVX-512 register of fp32

// F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2, inf. Each 1-d transform maps rows of L channels (s + k ss) to
// rows (r + k sr): input B^T (6 -> 6), its adjoint B, output A^T (6 -> 4), its adjoint A (4 -> 6).
struct F4 {
  static constexpr int64_t m = 4, a = 6;
  static void input(const float* d, int64_t sd, float* r, int64_t sr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const float d0 = d[l], d1 = d[sd + l], d2 = d[2 * sd + l], d3 = d[3 * sd + l], d4 = d[4 * sd + l], d5 = d[5 * sd + l];
      r[l] = 4.f * d0 - 5.f * d2 + d4;
      r[sr + l] = -4.f * (d1 + d2) + d3 + d4;
      r[2 * sr + l] = 4.f * (d1 - d2) - d3 + d4;
      r[3 * sr + l] = 2.f * (d3 - d1) - d2 + d4;
      r[4 * sr + l] = 2.f * (d1 - d3) - d2 + d4;
      r[5 * sr + l] = 4.f * d1 - 5.f * d3 + d5;
    }
  }
  static void input_adjoint(const float* v, int64_t sv, float* r, int64_t sr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const float v0 = v[l], v1 = v[sv + l], v2 = v[2 * sv + l], v3 = v[3 * sv + l], v4 = v[4 * sv + l], v5 = v[5 * sv + l];
      r[l] = 4.f * v0;
      r[sr + l] = 4.f * (v2 - v1 + v5) + 2.f * (v4 - v3);
      r[2 * sr + l] = -5.f * v0 - 4.f * (v1 + v2) - v3 - v4;
      r[3 * sr + l] = v1 - v2 + 2.f * (v3 - v4) - 5.f * v5;
      r[4 * sr + l] = v0 + v1 + v2 + v3 + v4;
      r[5 * sr + l] = v5;
    }
  }
  static void output(const float* m, int64_t sm, float* r, int64_t sr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const float m0 = m[l], m1 = m[sm + l], m2 = m[2 * sm + l], m3 = m[3 * sm + l], m4 = m[4 * sm + l], m5 = m[5 * sm + l];
      const float a = m1 + m2, b = m1 - m2, c = m3 + m4, d = m3 - m4;
      r[l] = m0 + a + c;
      r[sr + l] = b + 2.f * d;
      r[2 * sr + l] = a + 4.f * c;
      r[3 * sr + l] = b + 8.f * d + m5;
    }
  }
  static void output_adjoint(const float* s, int64_t ss, float* r, int64_t sr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const float s0 = s[l], s1 = s[ss + l], s2 = s[2 * ss + l], s3 = s[3 * ss + l];
      const float e = s0 + s2, o = s1 + s3, e4 = s0 + 4.f * s2, o8 = 2.f * s1 + 8.f * s3;
      r[l] = s0;
      r[sr + l] = e + o;
      r[2 * sr + l] = e - o;
      r[3 * sr + l] = e4 + o8;
      r[4 * sr + l] = e4 - o8;
      r[5 * sr + l] = s3;
    }
  }
};

// F(2x2, 3x3), interpolation points 0, 1, -1, inf: transforms of 0 and +-1 only, so bf16 operands lose little.
struct F2 {
  static constexpr int64_t m = 2, a = 4;
  static void input(const float* d, int64_t sd, float* r, int64_t sr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const float d0 = d[l], d1 = d[sd + l], d2 = d[2 * sd + l], d3 = d[3 * sd + l];
      r[l] = d0 - d2;
      r[sr + l] = d1 + d2;
      r[2 * sr + l] = d2 - d1;
      r[3 * sr + l] = d1 - d3;
    }
  }
  static void input_adjoint(const float* v, int64_t sv, float* r, int64_t sr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const float v0 = v[l], v1 = v[sv + l], v2 = v[2 * sv + l], v3 = v[3 * sv + l];
      r[l] = v0;
      r[sr + l] = v1 - v2 + v3;
      r[2 * sr + l] = v1 + v2 - v0;
      r[3 * sr + l] = -v3;
    }
  }
  static void output(const float* m, int64_t sm, float* r, int64_t sr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const float m0 = m[l], m1 = m[sm + l], m2 = m[2 * sm + l], m3 = m[3 * sm + l];
      r[l] = m0 + m1 + m2;
      r[sr + l] = m1 - m2 - m3;
    }
  }
  static void output_adjoint(const float* s, int64_t ss, float* r, int64_t sr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const float s0 = s[l], s1 = s[ss + l];
      r[l] = s0;
      r[sr + l] = s0 + s1;
      r[2 * sr + l] = s0 - s1;
      r[3 * sr + l] = -s1;
    }
  }
};

// L channels between a tensor of T and an fp32 block (bf16 rounded to nearest even, NaN kept, as torch does).
template <typename T>
inline void load(const T* src, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, L * sizeof(float));
  } else {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) dst[l] = static_cast<float>(src[l]);
  }
}
template <typename T>
inline void store(const float* src, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, L * sizeof(float));
  } else {  // c10::BFloat16's own rounding, written so that it vectorises: 16 lanes in a few integer instructions
    uint32_t u[L];
    uint16_t r[L];
    std::memcpy(u, src, sizeof(u));
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) r[l] = src[l] != src[l] ? uint16_t(0x7FC0) : uint16_t((u[l] + 0x7FFFu + ((u[l] >> 16) & 1u)) >> 16);
    std::memcpy(dst, r, sizeof(r));
  }
}

template <typename F>
struct Tiles {
  static constexpr int64_t m = F::m, a = F::a, K = F::a * F::a;
  int64_t N, H, W, C, TH, TW, P;
  Tiles(int64_t N, int64_t H, int64_t W, int64_t C) : N(N), H(H), W(W), C(C), TH((H + m - 1) / m), TW((W + m - 1) / m), P(N * TH * TW) {
    TORCH_CHECK(C % L == 0, "Winograd transforms take a multiple of ", L, " channels, not ", C);
  }
  // Tile p's sample, tile row and tile column.
  void locate(int64_t p, int64_t& s, int64_t& th, int64_t& tw) const { s = p / (TH * TW), th = p / TW % TH, tw = p % TW; }
};

// Tile p's K values at channels c0 .. c0 + L of a [K, P, C] tensor (V or M), to and from a block b[K][L].
template <typename F, typename T>
inline void load_tile(const T* src, const Tiles<F>& t, int64_t p, int64_t c0, float* b) {
  for (int64_t k = 0; k < t.K; ++k) load(src + (k * t.P + p) * t.C + c0, b + k * L);
}
template <typename F, typename T>
inline void store_tile(const float* b, const Tiles<F>& t, int64_t p, int64_t c0, T* dst) {
  for (int64_t k = 0; k < t.K; ++k) store(b + k * L, dst + (k * t.P + p) * t.C + c0);
}

// Tile p's a x a x L patch of x (rows m th - 1 .. m th + m, zero outside the image) at channels c0 .. c0 + L into d.
template <typename F, typename T>
inline void gather(const T* x, const Tiles<F>& t, int64_t p, int64_t c0, float* d) {
  int64_t s, th, tw;
  t.locate(p, s, th, tw);
  for (int64_t i = 0; i < F::a; ++i) {
    const int64_t h = F::m * th - 1 + i;
    for (int64_t j = 0; j < F::a; ++j) {
      const int64_t w = F::m * tw - 1 + j;
      float* dst = d + (i * F::a + j) * L;
      if (h < 0 || h >= t.H || w < 0 || w >= t.W)
        std::memset(dst, 0, L * sizeof(float));
      else
        load(x + ((s * t.H + h) * t.W + w) * t.C + c0, dst);
    }
  }
}

// V = B^T d B for every tile: [N, H, W, C] -> [K, P, C].
template <typename F, typename T>
at::Tensor input_transform(const at::Tensor& x) {
  const Tiles<F> t(x.size(0), x.size(2), x.size(3), x.size(1));
  at::Tensor V = at::empty({t.K, t.P, t.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const T* xp = x.const_data_ptr<T>();
  T* vp = V.data_ptr<T>();
  constexpr int64_t a = F::a;
  at::parallel_for(0, t.P, 8, [&](int64_t p0, int64_t p1) {
    alignas(64) float d[a * a * L], r[a * a * L];
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c0 = 0; c0 < t.C; c0 += L) {
        gather(xp, t, p, c0, d);
        for (int64_t j = 0; j < a; ++j) F::input(d + j * L, a * L, r + j * L, a * L);  // columns: B^T d
        for (int64_t i = 0; i < a; ++i) F::input(r + i * a * L, L, d + i * a * L, L);  // rows: (B^T d) B
        store_tile(d, t, p, c0, vp);
      }
  });
  return V;
}

// An empty channels-last [N, C, H, W] image in the dtype of `tiles`, the [K, P, C] values it is made from (checked).
template <typename F>
at::Tensor image_of(const at::Tensor& tiles, const Tiles<F>& t, const char* name) {
  TORCH_CHECK(tiles.size(0) == t.K && tiles.size(1) == t.P, name, ": [", t.K, ", ", t.P, ", C] for this image, not ", tiles.sizes());
  return at::empty({t.N, t.C, t.H, t.W}, tiles.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// The adjoint of input_transform: dx = the sum over tiles of B dV B^T, each added onto its a x a patch. Patches
// overlap their neighbours by two rows and columns, so one task takes a sample's channel block and goes down its
// rows of tiles, adding them into fp32 rows that it stores (in dV's dtype) once no later row of tiles reaches them.
template <typename F, typename T>
at::Tensor input_adjoint(const at::Tensor& V, int64_t N, int64_t H, int64_t W) {
  const Tiles<F> t(N, H, W, V.size(2));
  at::Tensor dx = image_of(V, t, "dV");
  const T* vp = V.const_data_ptr<T>();
  T* xp = dx.data_ptr<T>();
  constexpr int64_t a = F::a, m = F::m;
  const int64_t CB = t.C % 64 == 0 ? 64 : t.C % 32 == 0 ? 32 : L;  // channels per task
  const int64_t row = (m * t.TW + 2) * CB;  // one row of the sums: image columns -1 .. m TW
  at::parallel_for(0, N * (t.C / CB), 1, [&](int64_t q0, int64_t q1) {
    std::vector<float> acc(a * row);  // acc row i is image row m th - 1 + i while tile row th is added
    alignas(64) float v[a * a * L], r[a * a * L];
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t s = q / (t.C / CB), cb = q % (t.C / CB) * CB;
      auto flush = [&](int64_t h0, int64_t rows) {  // acc rows 0 .. rows - 1, as image rows h0 ..
        for (int64_t i = 0; i < rows; ++i)
          if (h0 + i >= 0 && h0 + i < H)
            for (int64_t w = 0; w < W; ++w)
              for (int64_t c = 0; c < CB; c += L) store(acc.data() + i * row + (w + 1) * CB + c, xp + ((s * H + h0 + i) * W + w) * t.C + cb + c);
      };
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t th = 0; th < t.TH; ++th) {
        for (int64_t tw = 0; tw < t.TW; ++tw)
          for (int64_t c = 0; c < CB; c += L) {
            load_tile(vp, t, (s * t.TH + th) * t.TW + tw, cb + c, v);
            for (int64_t j = 0; j < a; ++j) F::input_adjoint(v + j * L, a * L, r + j * L, a * L);
            for (int64_t i = 0; i < a; ++i) F::input_adjoint(r + i * a * L, L, v + i * a * L, L);
            for (int64_t i = 0; i < a; ++i)
              for (int64_t j = 0; j < a; ++j) {
                float* dst = acc.data() + i * row + (m * tw + j) * CB + c;
                const float* src = v + (i * a + j) * L;
#pragma omp simd
                for (int64_t l = 0; l < L; ++l) dst[l] += src[l];
              }
          }
        flush(m * th - 1, m);  // no later tile row reaches these
        std::memmove(acc.data(), acc.data() + m * row, 2 * row * sizeof(float));  // rows m, m + 1 go on with th + 1
        std::fill(acc.begin() + 2 * row, acc.end(), 0.f);
      }
      flush(m * t.TH - 1, 2);
    }
  });
  return dx;
}

// y = A^T M A + bias for every tile, cropped to the image: [K, P, O] -> [N, O, H, W] channels-last, in M's dtype.
template <typename F, typename T>
at::Tensor output_transform(const at::Tensor& M, const float* bp, int64_t N, int64_t H, int64_t W) {
  const Tiles<F> t(N, H, W, M.size(2));
  at::Tensor y = image_of(M, t, "M");
  const T* mp = M.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  constexpr int64_t a = F::a, m = F::m;
  at::parallel_for(0, t.P, 8, [&](int64_t p0, int64_t p1) {
    alignas(64) float mm[a * a * L], r[m * a * L], o[m * m * L];
    for (int64_t p = p0; p < p1; ++p) {
      int64_t s, th, tw;
      t.locate(p, s, th, tw);
      for (int64_t c0 = 0; c0 < t.C; c0 += L) {
        load_tile(mp, t, p, c0, mm);
        for (int64_t j = 0; j < a; ++j) F::output(mm + j * L, a * L, r + j * L, a * L);  // A^T M: [m, a]
        for (int64_t i = 0; i < m; ++i) F::output(r + i * a * L, L, o + i * m * L, L);  // (A^T M) A: [m, m]
        if (bp)
          for (int64_t k = 0; k < m * m; ++k)
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) o[k * L + l] += bp[c0 + l];
        for (int64_t i = 0; i < m && m * th + i < H; ++i)
          for (int64_t j = 0; j < m && m * tw + j < W; ++j) store(o + (i * m + j) * L, yp + ((s * H + m * th + i) * W + m * tw + j) * t.C + c0);
      }
    }
  });
  return y;
}

// The adjoint of output_transform: dM = A dY A^T for every tile, dY the tile's m x m of dy (zero beyond the image).
template <typename F, typename T>
at::Tensor output_adjoint(const at::Tensor& dy) {
  const Tiles<F> t(dy.size(0), dy.size(2), dy.size(3), dy.size(1));
  at::Tensor dM = at::empty({t.K, t.P, t.C}, dy.options().memory_format(at::MemoryFormat::Contiguous));
  const T* yp = dy.const_data_ptr<T>();
  T* mp = dM.data_ptr<T>();
  constexpr int64_t a = F::a, m = F::m;
  at::parallel_for(0, t.P, 8, [&](int64_t p0, int64_t p1) {
    alignas(64) float g[m * m * L], r[a * m * L], mm[a * a * L];
    for (int64_t p = p0; p < p1; ++p) {
      int64_t s, th, tw;
      t.locate(p, s, th, tw);
      for (int64_t c0 = 0; c0 < t.C; c0 += L) {
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < m; ++j) {
            float* dst = g + (i * m + j) * L;
            if (m * th + i < t.H && m * tw + j < t.W)
              load(yp + ((s * t.H + m * th + i) * t.W + m * tw + j) * t.C + c0, dst);
            else
              std::memset(dst, 0, L * sizeof(float));
          }
        for (int64_t j = 0; j < m; ++j) F::output_adjoint(g + j * L, m * L, r + j * L, m * L);  // A g: [a, m]
        for (int64_t i = 0; i < a; ++i) F::output_adjoint(r + i * m * L, L, mm + i * a * L, L);  // (A g) A^T: [a, a]
        store_tile(mm, t, p, c0, mp);
      }
    }
  });
  return dM;
}

// `return` the expression with F the tile (m = 4 or 2) and T the element type (fp32 or bf16), as AT_DISPATCH does.
#define WINOGRAD_TYPES(dtype, ...)          \
  if (dtype == at::kFloat) {                \
    using T = float;                        \
    return __VA_ARGS__;                     \
  } else {                                  \
    using T = c10::BFloat16;                \
    return __VA_ARGS__;                     \
  }
#define WINOGRAD_DISPATCH(m, dtype, ...)                                                                                 \
  TORCH_CHECK(m == 4 || m == 2, "Winograd tiles are 4x4 or 2x2, not ", m);                                              \
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "Winograd transforms take fp32 or bf16, not ", dtype);    \
  if (m == 4) {                                                                                                          \
    using F = F4;                                                                                                        \
    WINOGRAD_TYPES(dtype, __VA_ARGS__)                                                                                   \
  } else {                                                                                                               \
    using F = F2;                                                                                                        \
    WINOGRAD_TYPES(dtype, __VA_ARGS__)                                                                                   \
  }

void check_image(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), name, ": channels-last [N, C, H, W]");
}

at::Tensor input_transform_(const at::Tensor& x, int64_t m) {
  check_image(x, "x");
  WINOGRAD_DISPATCH(m, x.scalar_type(), input_transform<F, T>(x))
}

at::Tensor input_adjoint_(const at::Tensor& dV, int64_t N, int64_t H, int64_t W, int64_t m) {
  const auto V = dV.contiguous();
  TORCH_CHECK(V.dim() == 3, "dV: [K, P, C]");
  WINOGRAD_DISPATCH(m, V.scalar_type(), input_adjoint<F, T>(V, N, H, W))
}

at::Tensor output_transform_(const at::Tensor& M, const at::Tensor& bias, int64_t N, int64_t H, int64_t W, int64_t m) {
  TORCH_CHECK(M.dim() == 3 && M.is_contiguous(), "M: contiguous [K, P, O]");
  const bool has_bias = bias.defined() && bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == M.size(2) && bias.is_contiguous()), "bias: fp32 [O]");
  const float* bp = has_bias ? bias.const_data_ptr<float>() : nullptr;
  WINOGRAD_DISPATCH(m, M.scalar_type(), output_transform<F, T>(M, bp, N, H, W))
}

at::Tensor output_adjoint_(const at::Tensor& dy, int64_t m) {
  check_image(dy, "dy");
  WINOGRAD_DISPATCH(m, dy.scalar_type(), output_adjoint<F, T>(dy))
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("input_transform", &input_transform_);
  m.def("input_adjoint", &input_adjoint_);
  m.def("output_transform", &output_transform_);
  m.def("output_adjoint", &output_adjoint_);
}
