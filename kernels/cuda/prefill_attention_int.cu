// Prefill attention instances: int formats (see kv_dispatch.h).
#include "kernels/cuda/prefill_attention.cuh"
#include "kernels/cuda/kv_dispatch.h"

namespace strata::cuda {

STRATA_INSTANTIATE_OP(PrefillOp, KvDtype::kInt8, KvScaleMode::kStatic,
                      (const AttentionArgs&, int32_t, cudaStream_t))
STRATA_INSTANTIATE_OP(PrefillOp, KvDtype::kInt8, KvScaleMode::kDynamic,
                      (const AttentionArgs&, int32_t, cudaStream_t))
STRATA_INSTANTIATE_OP(PrefillOp, KvDtype::kInt4, KvScaleMode::kDynamic,
                      (const AttentionArgs&, int32_t, cudaStream_t))

}  // namespace strata::cuda
