// Decode attention instances: int4 (one translation unit per dtype keeps the
// build parallel; see kv_dispatch.h).
#include "kernels/cuda/decode_attention.cuh"
#include "kernels/cuda/kv_dispatch.h"

namespace strata::cuda {

STRATA_INSTANTIATE_OP(DecodeOp, KvDtype::kInt4, KvScaleMode::kDynamic,
                      (const DecodeLaunch&, cudaStream_t))

}  // namespace strata::cuda
