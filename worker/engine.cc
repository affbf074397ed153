#include "worker/engine.h"

#include "absl/strings/str_cat.h"

namespace strata {

absl::Status ValidateBlockMoves(const StepInput& input, const EngineOptions& options) {
  auto check = [](const std::vector<KvBlockMove>& moves, int32_t src_n, int32_t dst_n,
                  const char* what) -> absl::Status {
    for (const KvBlockMove& m : moves) {
      if (m.src < 0 || m.src >= src_n || m.dst < 0 || m.dst >= dst_n) {
        return absl::InvalidArgumentError(absl::StrCat(what, " ", m.src, "->", m.dst, " out of range"));
      }
    }
    return absl::OkStatus();
  };
  const int32_t gpu = options.num_gpu_blocks, cpu = options.num_cpu_blocks;
  absl::Status s = check(input.swap_out, gpu, cpu, "swap-out");
  if (s.ok()) s = check(input.swap_in, cpu, gpu, "swap-in");
  if (s.ok()) s = check(input.copies, gpu, gpu, "copy");
  return s;
}

}  // namespace strata
