// Winograd's minimal filtering algorithms F(m x m, 3x3), m = 4 and m = 2 (Lavin & Gray 2016, Eq. 8:
// Y = A^T [(G g G^T) * (B^T d B)] A), for a 3x3, stride-1, padding-1 convolution of a channels-last fp32 or bf16 image
// x, [N, H, W, C] in memory. The image is cut into m x m output tiles (TH x TW per sample, P = N TH TW in all), each
// read from the a x a input patch around it (a = m + 2). Three entry points: kernels (U = G g G^T, of the kernels as
// given or turned by 180 degrees with in/out swapped), conv (the forward with U, and dL/dx as the same convolution of
// dy with the turned kernels' U) and weight_grad (dL/dg = G^T (sum over tiles of dM^T V) G). The last two run over
// chunks of tiles that fit in cache, one chunk per thread: the chunk's input transform V = B^T d B [a^2, n, C], its
// a^2 matrix products (torch's bmm), and its output transform Y = A^T M A (or the adjoint dM = A dY A^T), with
// transforms in fp32 and tiles stored in the dtype they were given.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t L = 16;  // channels per block: one AVX-512 register of fp32

// F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2, inf. Each 1-d transform maps rows of L channels (s + k ss) to
// rows (r + k sr): input B^T (6 -> 6), output A^T (6 -> 4) and its adjoint A (4 -> 6).
struct F4 {
  static constexpr int64_t m = 4, a = 6;
  static constexpr float G[a][3] = {{1.f / 4, 0, 0}, {-1.f / 6, -1.f / 6, -1.f / 6}, {-1.f / 6, 1.f / 6, -1.f / 6},
                                    {1.f / 24, 1.f / 12, 1.f / 6}, {1.f / 24, -1.f / 12, 1.f / 6}, {0, 0, 1}};  // kernel
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
  static constexpr float G[a][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
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

// V = B^T d B for tiles p0 .. p0 + n of x, into the [K, n, C] block V.
template <typename F, typename T>
void input_tiles(const T* x, const Tiles<F>& t, int64_t p0, int64_t n, T* V) {
  constexpr int64_t a = F::a;
  alignas(64) float d[a * a * L], r[a * a * L];
  for (int64_t p = p0; p < p0 + n; ++p)
    for (int64_t c0 = 0; c0 < t.C; c0 += L) {
      gather(x, t, p, c0, d);
      for (int64_t j = 0; j < a; ++j) F::input(d + j * L, a * L, r + j * L, a * L);  // columns: B^T d
      for (int64_t i = 0; i < a; ++i) F::input(r + i * a * L, L, d + i * a * L, L);  // rows: (B^T d) B
      for (int64_t k = 0; k < t.K; ++k) store(d + k * L, V + (k * n + p - p0) * t.C + c0);
    }
}

// y = A^T M A + bias for tiles p0 .. p0 + n from the [K, n, O] block M, cropped to the image y ([N, H, W, O]).
template <typename F, typename T>
void output_tiles(const T* M, const Tiles<F>& t, int64_t p0, int64_t n, const float* bp, T* y) {
  constexpr int64_t a = F::a, m = F::m;
  alignas(64) float mm[a * a * L], r[m * a * L], o[m * m * L];
  for (int64_t p = p0; p < p0 + n; ++p) {
    int64_t s, th, tw;
    t.locate(p, s, th, tw);
    for (int64_t c0 = 0; c0 < t.C; c0 += L) {
      for (int64_t k = 0; k < t.K; ++k) load(M + (k * n + p - p0) * t.C + c0, mm + k * L);
      for (int64_t j = 0; j < a; ++j) F::output(mm + j * L, a * L, r + j * L, a * L);  // A^T M: [m, a]
      for (int64_t i = 0; i < m; ++i) F::output(r + i * a * L, L, o + i * m * L, L);  // (A^T M) A: [m, m]
      if (bp)
        for (int64_t k = 0; k < m * m; ++k)
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) o[k * L + l] += bp[c0 + l];
      for (int64_t i = 0; i < m && m * th + i < t.H; ++i)
        for (int64_t j = 0; j < m && m * tw + j < t.W; ++j) store(o + (i * m + j) * L, y + ((s * t.H + m * th + i) * t.W + m * tw + j) * t.C + c0);
    }
  }
}

// dM = A dY A^T (the adjoint of output_tiles) for tiles p0 .. p0 + n, dY the tile's m x m of dy (zero beyond the
// image), into the [K, n, O] block dM.
template <typename F, typename T>
void output_adjoint_tiles(const T* dy, const Tiles<F>& t, int64_t p0, int64_t n, T* dM) {
  constexpr int64_t a = F::a, m = F::m;
  alignas(64) float g[m * m * L], r[a * m * L], mm[a * a * L];
  for (int64_t p = p0; p < p0 + n; ++p) {
    int64_t s, th, tw;
    t.locate(p, s, th, tw);
    for (int64_t c0 = 0; c0 < t.C; c0 += L) {
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < m; ++j) {
          float* dst = g + (i * m + j) * L;
          if (m * th + i < t.H && m * tw + j < t.W)
            load(dy + ((s * t.H + m * th + i) * t.W + m * tw + j) * t.C + c0, dst);
          else
            std::memset(dst, 0, L * sizeof(float));
        }
      for (int64_t j = 0; j < m; ++j) F::output_adjoint(g + j * L, m * L, r + j * L, m * L);  // A g: [a, m]
      for (int64_t i = 0; i < a; ++i) F::output_adjoint(r + i * m * L, L, mm + i * a * L, L);  // (A g) A^T: [a, a]
      for (int64_t k = 0; k < t.K; ++k) store(mm + k * L, dM + (k * n + p - p0) * t.C + c0);
    }
  }
}

// Splits the P tiles into chunks whose transforms (bytes_per_tile each) take about chunk_bytes, as many for each
// thread, and calls f(p0, n) for every chunk on the thread that owns it.
template <typename G>
void for_chunks(int64_t P, int64_t bytes_per_tile, int64_t chunk_bytes, const G& f) {
  const int64_t threads = at::get_num_threads(), target = std::max<int64_t>(16, chunk_bytes / bytes_per_tile);
  const int64_t chunks = threads * std::max<int64_t>(1, (P + threads * target - 1) / (threads * target));
  const int64_t n = (P + chunks - 1) / chunks;
  at::parallel_for(0, (P + n - 1) / n, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) f(q * n, std::min(n, P - q * n));
  });
}

// U = G g G^T (Lavin & Gray 2016, Eq. 8) for every channel pair of the fp32 kernels w ([O, I, 3, 3], channels-last:
// [O][3][3][I] in memory), computed as [K, O, I] in T and returned as conv takes it: [K, I, O] (a transposed view);
// `rotated`: of each kernel turned by 180 degrees with I and O swapped, [K, O, I] (dL/dx is dL/dy's convolution
// with those).
template <typename F, typename T>
at::Tensor weight_transform(const at::Tensor& w, bool rotated, const at::TensorOptions& options) {
  constexpr int64_t a = F::a;
  const int64_t O = w.size(0), I = w.size(1);
  TORCH_CHECK(I % L == 0, "Winograd transforms take a multiple of ", L, " channels, not ", I);
  at::Tensor U = at::empty({a * a, O, I}, options);
  const float* wp = w.const_data_ptr<float>();
  T* up = U.data_ptr<T>();
  at::parallel_for(0, O, 1, [&](int64_t o0, int64_t o1) {
    alignas(64) float g[9 * L], h[a * 3 * L], u[a * a * L];
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t i0 = 0; i0 < I; i0 += L) {
        for (int64_t t = 0; t < 9; ++t) std::memcpy(g + (rotated ? 8 - t : t) * L, wp + (o * 9 + t) * I + i0, L * sizeof(float));
        for (int64_t p = 0; p < a; ++p)  // h = G g: [a, 3]
          for (int64_t c = 0; c < 3; ++c)
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) h[(p * 3 + c) * L + l] = F::G[p][0] * g[c * L + l] + F::G[p][1] * g[(3 + c) * L + l] + F::G[p][2] * g[(6 + c) * L + l];
        for (int64_t p = 0; p < a; ++p)  // u = h G^T: [a, a]
          for (int64_t q = 0; q < a; ++q)
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) u[(p * a + q) * L + l] = h[p * 3 * L + l] * F::G[q][0] + h[(p * 3 + 1) * L + l] * F::G[q][1] + h[(p * 3 + 2) * L + l] * F::G[q][2];
        for (int64_t k = 0; k < a * a; ++k) store(u + k * L, up + (k * O + o) * I + i0);
      }
  });
  return rotated ? U : U.transpose(1, 2);
}

// dL/dg = G^T dU G (the adjoint of weight_transform) from the threads' fp32 sums of dU ([threads, K, O, I]), as
// channels-last fp32 [O, I, 3, 3].
template <typename F>
at::Tensor weight_adjoint(const at::Tensor& sums) {
  constexpr int64_t a = F::a;
  const int64_t threads = sums.size(0), O = sums.size(2), I = sums.size(3);
  at::Tensor dw = at::empty({O, I, 3, 3}, sums.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* sp = sums.const_data_ptr<float>();
  float* wp = dw.data_ptr<float>();
  at::parallel_for(0, O, 1, [&](int64_t o0, int64_t o1) {
    alignas(64) float u[a * a * L], h[a * 3 * L];
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t i0 = 0; i0 < I; i0 += L) {
        std::memset(u, 0, sizeof(u));
        for (int64_t t = 0; t < threads; ++t)
          for (int64_t k = 0; k < a * a; ++k)
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) u[k * L + l] += sp[((t * a * a + k) * O + o) * I + i0 + l];
        for (int64_t p = 0; p < a; ++p)  // h = dU G: [a, 3]
          for (int64_t c = 0; c < 3; ++c) {
            float* hc = h + (p * 3 + c) * L;
            std::memset(hc, 0, L * sizeof(float));
            for (int64_t q = 0; q < a; ++q)
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) hc[l] += u[(p * a + q) * L + l] * F::G[q][c];
          }
        for (int64_t r = 0; r < 3; ++r)  // dg = G^T h: [3, 3], stored at [o][r][c][i]
          for (int64_t c = 0; c < 3; ++c) {
            float* dst = wp + (o * 9 + r * 3 + c) * I + i0;
            std::memset(dst, 0, L * sizeof(float));
            for (int64_t p = 0; p < a; ++p)
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) dst[l] += F::G[p][r] * h[(p * 3 + c) * L + l];
          }
      }
  });
  return dw;
}

// y = conv3x3(x, w) + bias by Winograd's F(m x m, 3x3), x and y channels-last in T, given U = G g G^T as [K, C, O]
// in T (`kernels`): for each chunk of tiles V = B^T d B, M = V U (torch.bmm, on the chunk's thread) and
// Y = A^T M A, so that V and M stay in the cache.
template <typename F, typename T>
at::Tensor conv(const at::Tensor& x, const at::Tensor& U, const float* bp, int64_t chunk_bytes) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), O = U.size(2);
  const Tiles<F> tx(N, H, W, x.size(1)), ty(N, H, W, O);
  TORCH_CHECK(U.dim() == 3 && U.size(0) == tx.K && U.size(1) == tx.C && U.scalar_type() == x.scalar_type(),
              "U: [", tx.K, ", ", tx.C, ", O] in x's dtype, not ", U.sizes(), " ", U.scalar_type());
  at::Tensor y = at::empty({N, O, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  for_chunks(tx.P, tx.K * (tx.C + O) * int64_t(sizeof(T)), chunk_bytes, [&](int64_t p0, int64_t n) {
    at::Tensor V = at::empty({tx.K, n, tx.C}, x.options()), M = at::empty({tx.K, n, O}, x.options());
    input_tiles(xp, tx, p0, n, V.data_ptr<T>());
    at::bmm_out(M, V, U);
    output_tiles(M.const_data_ptr<T>(), ty, p0, n, bp, yp);
  });
  return y;
}

// dL/dw (channels-last fp32 [O, C, 3, 3]) = G^T dU G, dL/dU^T = the sum over tiles of dM^T V ([K, O, C]): V =
// B^T d B of x's tiles, dM = A dY A^T of dy's, chunk by chunk as in conv; each thread adds its chunks' products
// (in bf16, rounded first) into its own fp32 sums.
template <typename F, typename T>
at::Tensor weight_grad(const at::Tensor& x, const at::Tensor& dy, int64_t chunk_bytes) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), O = dy.size(1);
  const Tiles<F> tx(N, H, W, x.size(1)), ty(N, H, W, O);
  TORCH_CHECK(dy.size(0) == N && dy.size(2) == H && dy.size(3) == W, "dy: [", N, ", O, ", H, ", ", W, "], not ", dy.sizes());
  const int64_t threads = at::get_num_threads(), size = tx.K * O * tx.C;
  at::Tensor sums = at::empty({threads, tx.K, O, tx.C}, x.options().dtype(at::kFloat));
  std::vector<char> started(threads, 0);  // whether thread t's sums hold a chunk yet
  const T* xp = x.const_data_ptr<T>();
  const T* yp = dy.const_data_ptr<T>();
  for_chunks(tx.P, tx.K * (tx.C + O) * int64_t(sizeof(T)), chunk_bytes, [&](int64_t p0, int64_t n) {
    at::Tensor V = at::empty({tx.K, n, tx.C}, x.options()), dM = at::empty({tx.K, n, O}, x.options());
    input_tiles(xp, tx, p0, n, V.data_ptr<T>());
    output_adjoint_tiles(yp, ty, p0, n, dM.data_ptr<T>());
    const int64_t thread = at::get_thread_num();
    at::Tensor acc = sums[thread];
    if constexpr (std::is_same_v<T, float>) {  // summed by the matrix product itself
      started[thread] ? acc.baddbmm_(dM.transpose(1, 2), V) : at::bmm_out(acc, dM.transpose(1, 2), V);
    } else {
      const at::Tensor dMV = at::bmm(dM.transpose(1, 2), V);
      const T* src = dMV.const_data_ptr<T>();
      float* dst = acc.data_ptr<float>();
      for (int64_t i = 0; i < size; i += L) {
        alignas(64) float b[L];
        load(src + i, b);
        if (started[thread])
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) dst[i + l] += b[l];
        else
          std::memcpy(dst + i, b, sizeof(b));
      }
    }
    started[thread] = 1;
  });
  for (int64_t t = 0; t < threads; ++t)
    if (!started[t]) sums[t].zero_();  // a thread without a chunk (fewer tiles than threads)
  return weight_adjoint<F>(sums);
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

at::Tensor kernels_(const at::Tensor& w, int64_t m, bool rotated, at::ScalarType dtype) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.scalar_type() == at::kFloat && w.is_contiguous(at::MemoryFormat::ChannelsLast),
              "w: channels-last fp32 [O, I, 3, 3]");
  WINOGRAD_DISPATCH(m, dtype, weight_transform<F, T>(w, rotated, w.options().dtype(dtype)))
}

at::Tensor conv_(const at::Tensor& x, const at::Tensor& U, const at::Tensor& bias, int64_t m, int64_t chunk_bytes) {
  check_image(x, "x");
  const bool has_bias = bias.defined() && bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == U.size(-1) && bias.is_contiguous()), "bias: fp32, one per output channel");
  const float* bp = has_bias ? bias.const_data_ptr<float>() : nullptr;
  WINOGRAD_DISPATCH(m, x.scalar_type(), conv<F, T>(x, U, bp, chunk_bytes))
}

at::Tensor weight_grad_(const at::Tensor& x, const at::Tensor& dy, int64_t m, int64_t chunk_bytes) {
  check_image(x, "x");
  check_image(dy, "dy");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "dy: in x's dtype");
  WINOGRAD_DISPATCH(m, x.scalar_type(), weight_grad<F, T>(x, dy, chunk_bytes))
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kernels", &kernels_);
  m.def("conv", &conv_);
  m.def("weight_grad", &weight_grad_);
}
