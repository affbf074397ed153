# Remote workers: the control plane (worker streams + rendezvous store), the
# RemoteEngine over it, the local WorkerPool, their tests and the control-plane
# benchmark. include()d by scheduler/CMakeLists.txt.
get_filename_component(STRATA_TP_SCHED_DIR "${CMAKE_CURRENT_LIST_DIR}" ABSOLUTE)
get_filename_component(STRATA_TP_SCHED_ROOT "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

add_library(strata_control_plane STATIC ${STRATA_TP_SCHED_DIR}/control_plane.cc)
target_include_directories(strata_control_plane PUBLIC ${STRATA_TP_SCHED_ROOT})
target_link_libraries(strata_control_plane PUBLIC strata_worker_rpc strata_proto_worker gRPC::grpc++
                      spdlog::spdlog absl::synchronization)

add_library(strata_remote_engine STATIC
  ${STRATA_TP_SCHED_DIR}/remote_engine.cc
  ${STRATA_TP_SCHED_DIR}/worker_pool.cc)
target_include_directories(strata_remote_engine PUBLIC ${STRATA_TP_SCHED_ROOT})
target_link_libraries(strata_remote_engine PUBLIC strata_control_plane strata_worker_rpc Threads::Threads)

# End-to-end tests with real strata-worker processes over loopback.
foreach(t tp_cpu_test worker_failure_test)
  strata_cc_test(${t}
    SRCS ${STRATA_TP_SCHED_ROOT}/tests/${t}.cc
    DEPS strata_remote_engine strata_engine_loop strata_cpu_engine strata_test_data
    LABELS tp)
  target_compile_definitions(${t} PRIVATE STRATA_WORKER_BINARY="$<TARGET_FILE:strata-worker>")
  add_dependencies(${t} strata-worker)
endforeach()

add_executable(control_plane_bench ${STRATA_TP_SCHED_ROOT}/bench/control_plane_bench.cc)
target_link_libraries(control_plane_bench PRIVATE strata_remote_engine strata_cpu_engine CLI11::CLI11)
target_compile_definitions(control_plane_bench PRIVATE STRATA_WORKER_BINARY="$<TARGET_FILE:strata-worker>")
add_dependencies(control_plane_bench strata-worker)
