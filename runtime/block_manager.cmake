# Block manager, prefix hashing and KV capacity planning (host-only).
# include()d by runtime/CMakeLists.txt.
add_library(strata_block_manager STATIC
  ${CMAKE_CURRENT_LIST_DIR}/block_pool.cc
  ${CMAKE_CURRENT_LIST_DIR}/block_manager.cc
  ${CMAKE_CURRENT_LIST_DIR}/kv_capacity.cc
  ${CMAKE_CURRENT_LIST_DIR}/prefix_hash.cc)
target_link_libraries(strata_block_manager PUBLIC strata_base absl::flat_hash_map
                      absl::status absl::statusor absl::strings)

strata_cc_test(runtime_block_manager_test
  SRCS ${CMAKE_CURRENT_LIST_DIR}/block_pool_test.cc
       ${CMAKE_CURRENT_LIST_DIR}/block_manager_test.cc
  DEPS strata_block_manager)
strata_cc_test(runtime_kv_capacity_test
  SRCS ${CMAKE_CURRENT_LIST_DIR}/kv_capacity_test.cc
       ${CMAKE_CURRENT_LIST_DIR}/prefix_hash_test.cc
  DEPS strata_block_manager)
