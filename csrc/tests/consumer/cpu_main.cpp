// A consumer of the installed CPU API (topv::cpu, topv/topv_cpu.h) with its default runtime (OpenMP
// and the built-in GEMM).
//   topv_consumer_cpu                  prunes a built-in segment of 8 tokens and checks the budget
//   topv_consumer_cpu IN OUT           prunes the segment in IN and writes kept / scores to OUT
// IN: int64 n, d, keep, dtype (0 float32, 1 float16, 2 bfloat16); source and target (n x d of that
// dtype); positions (n x 2 float32). OUT: int64 kept[keep], then float32 scores[n].
// (tests/test_cpu_library.py builds this against an installed copy and checks OUT against the
// float64 reference.)
#include <topv/topv_cpu.h>

#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  int64_t hdr[4] = {8, 4, 3, 0};
  std::vector<char> src, tgt;
  std::vector<float> pos;
  FILE* in = argc == 3 ? std::fopen(argv[1], "rb") : nullptr;
  if (argc == 3 && (!in || std::fread(hdr, sizeof(hdr), 1, in) != 1)) {
    std::printf("topv_consumer_cpu: cannot read %s\n", argv[1]);
    return 1;
  }
  const int64_t n = hdr[0], d = hdr[1], keep = hdr[2];
  const auto dtype = static_cast<topv::DType>(hdr[3]);
  const size_t bytes = size_t(n * d) * (dtype == topv::DType::kFloat32 ? 4 : 2);
  src.resize(bytes);
  tgt.resize(bytes);
  pos.resize(size_t(2 * n));
  if (in) {
    const bool ok = std::fread(src.data(), 1, bytes, in) == bytes && std::fread(tgt.data(), 1, bytes, in) == bytes &&
                    std::fread(pos.data(), sizeof(float), pos.size(), in) == pos.size();
    std::fclose(in);
    if (!ok) {
      std::printf("topv_consumer_cpu: %s is short\n", argv[1]);
      return 1;
    }
  } else {
    auto* s = reinterpret_cast<float*>(src.data());
    auto* t = reinterpret_cast<float*>(tgt.data());
    for (int64_t i = 0; i < n * d; ++i) s[i] = float((i * 7) % 5) - 2.0f, t[i] = float((i * 3) % 7) - 3.0f;
    for (int64_t i = 0; i < n; ++i) pos[2 * i] = (i / 4 + 0.5f) / 2, pos[2 * i + 1] = (i % 4 + 0.5f) / 4;
  }
  const int64_t lens[] = {n}, keeps[] = {keep};
  topv::PruneArgs a{};
  a.source = src.data();
  a.target = tgt.data();
  a.dtype = dtype;
  a.total_rows = n;
  a.d = d;
  a.source_row_stride = d;
  a.target_row_stride = d;
  a.positions = pos.data();
  a.position_rows = n;
  a.seg_lens = lens;
  a.keep = keeps;
  a.num_segments = 1;
  std::vector<int64_t> kept(size_t(keep), -1);
  std::vector<float> scores(static_cast<size_t>(n));
  int nonfinite = -1;
  if (!topv::cpu::prune(a, kept.data(), scores.data(), &nonfinite)) {
    std::printf("topv_consumer_cpu: prune rejected its arguments\n");
    return 1;
  }
  for (int64_t k = 0; k < keep; ++k)
    if (kept[k] < 0 || kept[k] >= n || (k > 0 && kept[k] <= kept[k - 1]) || nonfinite != 0) {
      std::printf("topv_consumer_cpu: bad kept index %lld at %lld (nonfinite %d)\n", static_cast<long long>(kept[k]),
                  static_cast<long long>(k), nonfinite);
      return 1;
    }
  if (argc == 3) {
    FILE* out = std::fopen(argv[2], "wb");
    if (!out || std::fwrite(kept.data(), sizeof(int64_t), kept.size(), out) != kept.size() ||
        std::fwrite(scores.data(), sizeof(float), scores.size(), out) != scores.size()) {
      std::printf("topv_consumer_cpu: cannot write %s\n", argv[2]);
      return 1;
    }
    std::fclose(out);
  }
  std::printf("topv_consumer_cpu: kept %lld of %lld (bf16 GEMM: %s)\n", static_cast<long long>(keep),
              static_cast<long long>(n), topv::cpu::has_bf16_gemm() ? "own" : "converted to fp32");
  return 0;
}
