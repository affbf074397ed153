# Scheduler core: continuous batching over the block manager (host-only).
# include()d by scheduler/CMakeLists.txt.
add_library(strata_scheduler_core STATIC
  ${CMAKE_CURRENT_LIST_DIR}/scheduler_core.cc
  ${CMAKE_CURRENT_LIST_DIR}/sched_invariants.cc)
target_link_libraries(strata_scheduler_core PUBLIC strata_block_manager absl::flat_hash_map
                      absl::inlined_vector)

# Test helper: a fake worker that executes StepPlans against a shadow of the
# cache contents.
add_library(strata_sched_testing STATIC ${CMAKE_CURRENT_LIST_DIR}/sched_fake_worker.cc)
target_link_libraries(strata_sched_testing PUBLIC strata_scheduler_core)

strata_cc_test(scheduler_core_test
  SRCS ${CMAKE_CURRENT_LIST_DIR}/scheduler_core_test.cc
  DEPS strata_sched_testing)
strata_cc_test(scheduler_soak_test
  SRCS ${CMAKE_CURRENT_LIST_DIR}/sched_soak_test.cc
  DEPS strata_sched_testing
  LABELS soak)
