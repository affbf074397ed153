// Prefill attention instances: fp8 formats (see kv_dispatch.h).
#include "kernels/cuda/prefill_attention.cuh"
#include "kernels/cuda/kv_dispatch.h"

namespace strata::cuda {

STRATA_INSTANTIATE_OP(PrefillOp, KvDtype::kFp8E4M3, KvScaleMode::kStatic,
                      (const AttentionArgs&, int32_t, cudaStream_t))
STRATA_INSTANTIATE_OP(PrefillOp, KvDtype::kFp8E4M3, KvScaleMode::kDynamic,
                      (const AttentionArgs&, int32_t, cudaStream_t))
STRATA_INSTANTIATE_OP(PrefillOp, KvDtype::kFp8E5M2, KvScaleMode::kNone,
                      (const AttentionArgs&, int32_t, cudaStream_t))
STRATA_INSTANTIATE_OP(PrefillOp, KvDtype::kFp8E5M2, KvScaleMode::kStatic,
                      (const AttentionArgs&, int32_t, cudaStream_t))

}  // namespace strata::cuda
