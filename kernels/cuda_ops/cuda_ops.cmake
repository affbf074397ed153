# kernels/cuda_ops/: the GPU engine's fused non-attention kernels (RMSNorm,
# RoPE + quantizing KV write, SiLU-mul, embedding, sampling, random fills).
# include()d by worker/cuda.cmake; paths are relative to this file.
get_filename_component(STRATA_CUDA_OPS_DIR "${CMAKE_CURRENT_LIST_DIR}" ABSOLUTE)
get_filename_component(STRATA_CUDA_OPS_ROOT "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)

add_library(strata_cuda_ops STATIC
  ${STRATA_CUDA_OPS_DIR}/elementwise.cu
  ${STRATA_CUDA_OPS_DIR}/gemv.cu
  ${STRATA_CUDA_OPS_DIR}/rope_kv_write.cu
  ${STRATA_CUDA_OPS_DIR}/sampling.cu)
target_include_directories(strata_cuda_ops PUBLIC ${STRATA_CUDA_OPS_ROOT})
target_link_libraries(strata_cuda_ops PUBLIC CUDA::cudart)
# IEEE division/sqrt and no FTZ (nvcc's defaults) keep quant_math.h bit-exact.
set_target_properties(strata_cuda_ops PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)

strata_cc_test(kernels_cuda_ops_test
  SRCS ${STRATA_CUDA_OPS_DIR}/cuda_ops_test.cc
  DEPS strata_cuda_ops strata_kernels_cpu strata_sampling CUDA::cudart
  LABELS gpu)
