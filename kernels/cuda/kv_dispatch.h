// Typed dispatch from a KernelDesc to one compiled kernel instance.
//
// An "op" is a struct with a member template
//   template <KvDtype D, KvScaleMode M, int HD> static cudaError_t Run(Args...);
// declared (not defined) in the op's header. Each instantiation group lives in
// its own translation unit (e.g. decode_attention_int8.cu) that defines the
// template and instantiates it explicitly for its formats, so the build stays
// parallel and this switch only references symbols. Unsupported combinations
// return cudaErrorNotSupported.
#pragma once

#include <cuda_runtime_api.h>

#include <utility>

#include "kernels/cuda/kv_cache_cuda.h"
#include "kernels/quant_math.h"

namespace strata::cuda {

// Head dims with kernel instances.
#define STRATA_FOR_EACH_HEAD_DIM(X) X(48) X(64) X(128)

template <class Op, int HD, class... Args>
cudaError_t DispatchFormat(const KernelDesc& d, Args&&... args) {
  const KvFormat f{d.dtype, d.scale_mode};
#define STRATA_DISPATCH_FORMAT_(D, M) \
  if (f == KvFormat{D, M}) return Op::template Run<D, M, HD>(std::forward<Args>(args)...);
  STRATA_FOR_EACH_KV_FORMAT(STRATA_DISPATCH_FORMAT_)
#undef STRATA_DISPATCH_FORMAT_
  return cudaErrorNotSupported;
}

// The one dispatch function: picks Op::Run<dtype, scale mode, head_dim>.
template <class Op, class... Args>
cudaError_t Dispatch(const KernelDesc& d, Args&&... args) {
  switch (d.head_dim) {
#define STRATA_DISPATCH_HD_(HD) \
  case HD: return DispatchFormat<Op, HD>(d, std::forward<Args>(args)...);
    STRATA_FOR_EACH_HEAD_DIM(STRATA_DISPATCH_HD_)
#undef STRATA_DISPATCH_HD_
    default: return cudaErrorNotSupported;
  }
}

// Explicit instantiation helpers for the instance translation units.
#define STRATA_INSTANTIATE_OP_HD_(OP, D, M, HD, SIG) template cudaError_t OP::Run<D, M, HD> SIG;
#define STRATA_INSTANTIATE_OP(OP, D, M, SIG)          \
  STRATA_INSTANTIATE_OP_HD_(OP, D, M, 48, SIG)        \
  STRATA_INSTANTIATE_OP_HD_(OP, D, M, 64, SIG)        \
  STRATA_INSTANTIATE_OP_HD_(OP, D, M, 128, SIG)

}  // namespace strata::cuda
