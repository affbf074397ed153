# strata-serving-bench: load generator for `strata serve` over the strata.v1 gRPC API
# (bench/WORKLOADS.md), its unit tests, and its end-to-end test against a CPU server on
# stories15M. include()d by bench/CMakeLists.txt.
add_library(strata_serving_bench_lib STATIC
  ${CMAKE_CURRENT_LIST_DIR}/serving_bench_http.cc
  ${CMAKE_CURRENT_LIST_DIR}/serving_bench_monitor.cc
  ${CMAKE_CURRENT_LIST_DIR}/serving_bench_runner.cc
  ${CMAKE_CURRENT_LIST_DIR}/serving_bench_stats.cc
  ${CMAKE_CURRENT_LIST_DIR}/serving_bench_workload.cc)
target_include_directories(strata_serving_bench_lib PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(strata_serving_bench_lib PUBLIC strata_proto_v1_generation gRPC::grpc++
  absl::status absl::statusor absl::strings absl::str_format absl::synchronization
  nlohmann_json::nlohmann_json Threads::Threads)

add_executable(strata-serving-bench ${CMAKE_CURRENT_LIST_DIR}/serving_bench.cc)
target_link_libraries(strata-serving-bench PRIVATE strata_serving_bench_lib CLI11::CLI11
  spdlog::spdlog)

strata_cc_test(serving_bench_unit_test
  SRCS ${CMAKE_CURRENT_LIST_DIR}/serving_bench_unit_test.cc
  DEPS strata_serving_bench_lib
  LABELS bench)

# Starts `strata serve --device cpu` on stories15M, runs a short fixed workload and a clipped
# ShareGPT-like one, checks the JSON and renders it with tools/bench_report.py; also checks that
# bad flags are refused.
add_test(NAME serving_bench_test
  COMMAND /usr/bin/env bash ${CMAKE_CURRENT_LIST_DIR}/serving_bench_test.sh
          $<TARGET_FILE:strata> $<TARGET_FILE:strata-serving-bench>)
set_tests_properties(serving_bench_test PROPERTIES
  LABELS "serving;bench"
  TIMEOUT 180
  ENVIRONMENT "STRATA_DATA_DIR=${STRATA_DATA_DIR};STRATA_SOURCE_DIR=${CMAKE_SOURCE_DIR};OMP_WAIT_POLICY=passive")
