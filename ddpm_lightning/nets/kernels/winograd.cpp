// The tile transforms of Winograd's minimal filtering algorithm F(4x4, 3x3) (Lavin & Gray 2016, Eq. 8:
// Y = A^T [(G g G^T) * (B^T d B)] A), for a 3x3, stride-1, padding-1 convolution of a channels-last fp32 image x,
// [N, H, W, C] in memory. The image is cut into 4x4 output tiles (TH x TW per sample, P = N TH TW in all), each
// read from the 6x6 input patch around it. The four functions here are the input transform V = B^T d B, the output
// transform Y = A^T M A (plus the bias), and their adjoints; the 36 matrix products M = V U between them, and the
// weight transform U = G g G^T, are torch's. V and M are [36, P, C] and [36, P, O]: one matrix per tile position.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>

namespace {

constexpr int64_t L = 16;  // channels per block: one AVX-512 register of fp32

// B^T applied to six rows of L channels (d + k sd, k = 0..5), written to r + k sr.
inline void input_1d(const float* d, int64_t sd, float* r, int64_t sr) {
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

// B (the adjoint of input_1d): six rows in, six rows out.
inline void input_adjoint_1d(const float* v, int64_t sv, float* r, int64_t sr) {
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

// A^T: six rows in, four out.
inline void output_1d(const float* m, int64_t sm, float* r, int64_t sr) {
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

// A (the adjoint of output_1d): four rows in, six out.
inline void output_adjoint_1d(const float* s, int64_t ss, float* r, int64_t sr) {
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

struct Tiles {
  int64_t N, H, W, C, TH, TW, P;
  Tiles(int64_t N, int64_t H, int64_t W, int64_t C) : N(N), H(H), W(W), C(C), TH((H + 3) / 4), TW((W + 3) / 4), P(N * TH * TW) {
    TORCH_CHECK(C % L == 0, "Winograd transforms take a multiple of ", L, " channels, not ", C);
  }
  // Tile p's sample, tile row and tile column.
  void locate(int64_t p, int64_t& s, int64_t& th, int64_t& tw) const { s = p / (TH * TW), th = p / TW % TH, tw = p % TW; }
};

// Tile p's 36 values at channels c0 .. c0 + L of a [36, P, C] tensor (V or M), to and from a block b[36][L].
inline void load_tile(const float* src, const Tiles& t, int64_t p, int64_t c0, float* b) {
  for (int64_t k = 0; k < 36; ++k) std::memcpy(b + k * L, src + (k * t.P + p) * t.C + c0, L * sizeof(float));
}
inline void store_tile(const float* b, const Tiles& t, int64_t p, int64_t c0, float* dst) {
  for (int64_t k = 0; k < 36; ++k) std::memcpy(dst + (k * t.P + p) * t.C + c0, b + k * L, L * sizeof(float));
}

// Tile p's 6x6 x L patch of x (rows 4 th - 1 .. 4 th + 4, zero outside the image) at channels c0 .. c0 + L into d.
inline void gather(const float* x, const Tiles& t, int64_t p, int64_t c0, float* d) {
  int64_t s, th, tw;
  t.locate(p, s, th, tw);
  for (int64_t i = 0; i < 6; ++i) {
    const int64_t h = 4 * th - 1 + i;
    for (int64_t j = 0; j < 6; ++j) {
      const int64_t w = 4 * tw - 1 + j;
      float* dst = d + (i * 6 + j) * L;
      if (h < 0 || h >= t.H || w < 0 || w >= t.W)
        std::memset(dst, 0, L * sizeof(float));
      else
        std::memcpy(dst, x + ((s * t.H + h) * t.W + w) * t.C + c0, L * sizeof(float));
    }
  }
}

// V = B^T d B for every tile: [N, H, W, C] -> [36, P, C].
at::Tensor input_transform(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), "x: fp32 channels-last [N, C, H, W]");
  const Tiles t(x.size(0), x.size(2), x.size(3), x.size(1));
  auto V = at::empty({36, t.P, t.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* xp = x.const_data_ptr<float>();
  float* vp = V.data_ptr<float>();
  at::parallel_for(0, t.P, 8, [&](int64_t p0, int64_t p1) {
    alignas(64) float d[36 * L], r[36 * L];
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c0 = 0; c0 < t.C; c0 += L) {
        gather(xp, t, p, c0, d);
        for (int64_t j = 0; j < 6; ++j) input_1d(d + j * L, 6 * L, r + j * L, 6 * L);  // columns: B^T d
        for (int64_t i = 0; i < 6; ++i) input_1d(r + i * 6 * L, L, d + i * 6 * L, L);  // rows: (B^T d) B
        store_tile(d, t, p, c0, vp);
      }
  });
  return V;
}

// The adjoint of input_transform: dx = the sum over tiles of B dV B^T, each added onto its 6x6 patch. Neighbouring
// patches overlap, so one thread takes a whole row of tiles, and the even rows go before the odd ones.
at::Tensor input_adjoint(const at::Tensor& dV, int64_t N, int64_t H, int64_t W) {
  TORCH_CHECK(dV.scalar_type() == at::kFloat && dV.dim() == 3 && dV.size(0) == 36, "dV: fp32 [36, P, C]");
  const auto V = dV.contiguous();
  const Tiles t(N, H, W, V.size(2));
  TORCH_CHECK(V.size(1) == t.P, "dV has ", V.size(1), " tiles, not ", t.P);
  auto dx = at::empty({N, t.C, H, W}, V.options().memory_format(at::MemoryFormat::ChannelsLast)).zero_();
  const float* vp = V.const_data_ptr<float>();
  float* xp = dx.data_ptr<float>();
  for (int64_t parity = 0; parity < 2; ++parity) {
    const int64_t per = (t.TH - parity + 1) / 2;  // tile rows th = parity, parity + 2, ... of each sample
    at::parallel_for(0, N * per, 1, [&](int64_t r0, int64_t r1) {
      alignas(64) float v[36 * L], r[36 * L];
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t s = row / per, th = parity + 2 * (row % per);
        for (int64_t tw = 0; tw < t.TW; ++tw) {
          const int64_t p = (s * t.TH + th) * t.TW + tw;
          for (int64_t c0 = 0; c0 < t.C; c0 += L) {
            load_tile(vp, t, p, c0, v);
            for (int64_t j = 0; j < 6; ++j) input_adjoint_1d(v + j * L, 6 * L, r + j * L, 6 * L);
            for (int64_t i = 0; i < 6; ++i) input_adjoint_1d(r + i * 6 * L, L, v + i * 6 * L, L);
            for (int64_t i = 0; i < 6; ++i) {
              const int64_t h = 4 * th - 1 + i;
              if (h < 0 || h >= H) continue;
              for (int64_t j = 0; j < 6; ++j) {
                const int64_t w = 4 * tw - 1 + j;
                if (w < 0 || w >= W) continue;
                float* dst = xp + ((s * H + h) * W + w) * t.C + c0;
                const float* src = v + (i * 6 + j) * L;
#pragma omp simd
                for (int64_t l = 0; l < L; ++l) dst[l] += src[l];
              }
            }
          }
        }
      }
    });
  }
  return dx;
}

// y = A^T M A + bias for every tile, cropped to the image: [36, P, O] -> [N, O, H, W] channels-last.
at::Tensor output_transform(const at::Tensor& M, const at::Tensor& bias, int64_t N, int64_t H, int64_t W) {
  TORCH_CHECK(M.scalar_type() == at::kFloat && M.dim() == 3 && M.size(0) == 36 && M.is_contiguous(), "M: fp32 contiguous [36, P, O]");
  const Tiles t(N, H, W, M.size(2));
  TORCH_CHECK(M.size(1) == t.P, "M has ", M.size(1), " tiles, not ", t.P);
  const bool has_bias = bias.defined() && bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == t.C && bias.is_contiguous()), "bias: fp32 [O]");
  auto y = at::empty({N, t.C, H, W}, M.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* mp = M.const_data_ptr<float>();
  const float* bp = has_bias ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, t.P, 8, [&](int64_t p0, int64_t p1) {
    alignas(64) float m[36 * L], r[24 * L], o[16 * L];
    for (int64_t p = p0; p < p1; ++p) {
      int64_t s, th, tw;
      t.locate(p, s, th, tw);
      for (int64_t c0 = 0; c0 < t.C; c0 += L) {
        load_tile(mp, t, p, c0, m);
        for (int64_t j = 0; j < 6; ++j) output_1d(m + j * L, 6 * L, r + j * L, 6 * L);  // A^T m: [4, 6]
        for (int64_t i = 0; i < 4; ++i) output_1d(r + i * 6 * L, L, o + i * 4 * L, L);  // (A^T m) A: [4, 4]
        for (int64_t i = 0; i < 4 && 4 * th + i < H; ++i)
          for (int64_t j = 0; j < 4 && 4 * tw + j < W; ++j) {
            float* dst = yp + ((s * H + 4 * th + i) * W + 4 * tw + j) * t.C + c0;
            const float* src = o + (i * 4 + j) * L;
            if (bp) {
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) dst[l] = src[l] + bp[c0 + l];
            } else {
              std::memcpy(dst, src, L * sizeof(float));
            }
          }
      }
    }
  });
  return y;
}

// The adjoint of output_transform: dM = A dY A^T for every tile, dY the tile's 4x4 of dy (zero beyond the image).
at::Tensor output_adjoint(const at::Tensor& dy) {
  TORCH_CHECK(dy.scalar_type() == at::kFloat && dy.dim() == 4 && dy.is_contiguous(at::MemoryFormat::ChannelsLast), "dy: fp32 channels-last [N, O, H, W]");
  const Tiles t(dy.size(0), dy.size(2), dy.size(3), dy.size(1));
  auto dM = at::empty({36, t.P, t.C}, dy.options().memory_format(at::MemoryFormat::Contiguous));
  const float* yp = dy.const_data_ptr<float>();
  float* mp = dM.data_ptr<float>();
  at::parallel_for(0, t.P, 8, [&](int64_t p0, int64_t p1) {
    alignas(64) float g[16 * L], r[24 * L], m[36 * L];
    for (int64_t p = p0; p < p1; ++p) {
      int64_t s, th, tw;
      t.locate(p, s, th, tw);
      for (int64_t c0 = 0; c0 < t.C; c0 += L) {
        for (int64_t i = 0; i < 4; ++i)
          for (int64_t j = 0; j < 4; ++j) {
            float* dst = g + (i * 4 + j) * L;
            if (4 * th + i < t.H && 4 * tw + j < t.W)
              std::memcpy(dst, yp + ((s * t.H + 4 * th + i) * t.W + 4 * tw + j) * t.C + c0, L * sizeof(float));
            else
              std::memset(dst, 0, L * sizeof(float));
          }
        for (int64_t j = 0; j < 4; ++j) output_adjoint_1d(g + j * L, 4 * L, r + j * L, 4 * L);  // A g: [6, 4]
        for (int64_t i = 0; i < 6; ++i) output_adjoint_1d(r + i * 4 * L, L, m + i * 6 * L, L);  // (A g) A^T: [6, 6]
        store_tile(m, t, p, c0, mp);
      }
    }
  });
  return dM;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("input_transform", &input_transform);
  m.def("input_adjoint", &input_adjoint);
  m.def("output_transform", &output_transform);
  m.def("output_adjoint", &output_adjoint);
}
