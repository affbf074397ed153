# Included (OPTIONAL) by kernels/CMakeLists.txt. Paths are relative to this
# file so the same file works from any including directory.
get_filename_component(STRATA_KERNELS_DIR "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
get_filename_component(STRATA_KERNELS_ROOT "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)

# Host-side validation of cache views and batches (absl::Status, no CUDA).
add_library(strata_kv_view_util STATIC ${STRATA_KERNELS_DIR}/kv_cache_view_util.cc)
target_include_directories(strata_kv_view_util PUBLIC ${STRATA_KERNELS_ROOT})
target_link_libraries(strata_kv_view_util PUBLIC absl::status absl::statusor absl::strings)

# The CPU kernels use STRATA_CHECK (runtime/check.h) for broken invariants.
target_link_libraries(strata_kernels_cpu PUBLIC strata_base)

strata_cc_test(kernels_kv_cache_cpu_test
  SRCS ${STRATA_KERNELS_DIR}/cpu/kv_cache_cpu_test.cc
  DEPS strata_kernels_cpu strata_kv_view_util)
