# The GPU engine, its tests and benchmark. include()d by worker/CMakeLists.txt
# when STRATA_HAVE_CUDA. Paths are relative to this file.
get_filename_component(STRATA_WORKER_DIR "${CMAKE_CURRENT_LIST_DIR}" ABSOLUTE)
get_filename_component(STRATA_ENGINE_ROOT "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

include(${STRATA_ENGINE_ROOT}/kernels/cuda_ops/cuda_ops.cmake)

add_library(strata_cuda_engine STATIC
  ${STRATA_WORKER_DIR}/cuda_engine.cc
  ${STRATA_WORKER_DIR}/cuda_forward.cc
  ${STRATA_WORKER_DIR}/cuda_weights.cc)
target_include_directories(strata_cuda_engine PUBLIC ${STRATA_ENGINE_ROOT})
target_link_libraries(strata_cuda_engine PUBLIC
  strata_engine strata_cuda_ops strata_kernels_cuda strata_kv_view_util strata_kernels_cpu
  strata_model_io strata_sampling strata_block_manager strata_shard strata_collectives
  CUDA::cudart CUDA::cublas)
# Sharded engines wait on NCCL with its deadline (worker/tp.cmake defines the target).
if(NCCL_LIBRARY)
  target_link_libraries(strata_cuda_engine PUBLIC strata_collectives_nccl)
  target_compile_definitions(strata_cuda_engine PRIVATE STRATA_HAVE_NCCL=1)
endif()

# stories15M on the GPU against the golden tokens and logits; every KV dtype;
# sampling, graphs, block moves, memory planning. Skips without a GPU.
strata_cc_test(gpu_golden_test
  SRCS ${STRATA_ENGINE_ROOT}/tests/gpu_golden_test.cc
  DEPS strata_cuda_engine strata_cpu_engine strata_test_data
  LABELS gpu)

# Decode step time at llama-2-7b shape next to the memory roofline.
add_executable(gpu_decode_bench ${STRATA_ENGINE_ROOT}/bench/gpu_decode_bench.cc)
target_link_libraries(gpu_decode_bench PRIVATE strata_cuda_engine CLI11::CLI11)

# Tensor-parallel decode step time (one thread per GPU, NCCL).
if(NCCL_LIBRARY)
  add_executable(tp_decode_bench ${STRATA_ENGINE_ROOT}/bench/tp_decode_bench.cc)
  target_link_libraries(tp_decode_bench PRIVATE strata_cuda_engine strata_collectives_nccl CLI11::CLI11)
endif()
