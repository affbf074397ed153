// Prefill attention instances: float formats (see kv_dispatch.h).
#include "kernels/cuda/prefill_attention.cuh"
#include "kernels/cuda/kv_dispatch.h"

namespace strata::cuda {

STRATA_INSTANTIATE_OP(PrefillOp, KvDtype::kFp32, KvScaleMode::kNone,
                      (const AttentionArgs&, int32_t, cudaStream_t))
STRATA_INSTANTIATE_OP(PrefillOp, KvDtype::kFp16, KvScaleMode::kNone,
                      (const AttentionArgs&, int32_t, cudaStream_t))
STRATA_INSTANTIATE_OP(PrefillOp, KvDtype::kBf16, KvScaleMode::kNone,
                      (const AttentionArgs&, int32_t, cudaStream_t))

}  // namespace strata::cuda
