# Serving: the strata.v1 gRPC API (`strata serve`, `strata generate --server`,
# `strata info`) and its tests. include()d at the end of
# scheduler/CMakeLists.txt. Paths are relative to this file.
set(STRATA_SERVER_DIR ${CMAKE_CURRENT_LIST_DIR}/server)

# Request handling without gRPC: validation, text helpers, the engine thread.
add_library(strata_serving_core STATIC
  ${STRATA_SERVER_DIR}/serving_engine.cc
  ${STRATA_SERVER_DIR}/request_validation.cc
  ${STRATA_SERVER_DIR}/stream_writer.cc
  ${STRATA_SERVER_DIR}/text_util.cc)
target_link_libraries(strata_serving_core PUBLIC strata_engine_loop strata_metrics strata_tokenizer
                      strata_proto_v1_generation absl::synchronization spdlog::spdlog)
target_include_directories(strata_serving_core PUBLIC ${CMAKE_SOURCE_DIR})

# The server process and the client commands.
add_library(strata_serving STATIC
  ${STRATA_SERVER_DIR}/generation_service.cc
  ${STRATA_SERVER_DIR}/serve.cc
  ${STRATA_SERVER_DIR}/model_loader.cc
  ${STRATA_SERVER_DIR}/load_progress.cc
  ${STRATA_SERVER_DIR}/client.cc)
target_link_libraries(strata_serving PUBLIC strata_serving_core strata_cpu_engine strata_model_io
                      strata_block_manager strata_remote_engine gRPC::grpc++ gRPC::grpc++_reflection
                      Threads::Threads)

target_link_libraries(strata PRIVATE strata_serving)
target_link_libraries(strata-scheduler PRIVATE strata_serving)

strata_cc_test(serving_unit_test
  SRCS ${CMAKE_SOURCE_DIR}/tests/serving_unit_test.cc
  DEPS strata_serving_core strata_serving strata_test_data
  LABELS serving)

# End to end: the built `strata serve` as a subprocess on loopback, driven by
# C++ gRPC clients.
add_library(strata_serving_test_util STATIC ${CMAKE_SOURCE_DIR}/tests/serving_test_util.cc)
target_link_libraries(strata_serving_test_util PUBLIC gRPC::grpc++)
target_include_directories(strata_serving_test_util PUBLIC ${CMAKE_SOURCE_DIR})
target_compile_definitions(strata_serving_test_util PRIVATE STRATA_CLI_PATH="$<TARGET_FILE:strata>"
                           STRATA_SOURCE_ROOT="${CMAKE_SOURCE_DIR}")
foreach(t serving_e2e_test serving_process_test)
  strata_cc_test(${t}
    SRCS ${CMAKE_SOURCE_DIR}/tests/${t}.cc
    DEPS strata_serving_test_util strata_proto_v1_generation strata_test_data
    LABELS serving)
  add_dependencies(${t} strata)
endforeach()

# `strata serve --tp 2` with real strata-worker processes (scheduler/tp.cmake).
strata_cc_test(serving_tp_test
  SRCS ${CMAKE_SOURCE_DIR}/tests/serving_tp_test.cc
  DEPS strata_serving_test_util strata_proto_v1_generation strata_test_data
  LABELS serving tp)
target_compile_definitions(serving_tp_test PRIVATE STRATA_WORKER_PATH="$<TARGET_FILE:strata-worker>")
add_dependencies(serving_tp_test strata strata-worker)

# `strata serve --device cuda` on a GPU machine (tools/gpu_session.sh runs it
# there); skips without a GPU.
strata_cc_test(serving_gpu_test
  SRCS ${CMAKE_SOURCE_DIR}/tests/serving_gpu_test.cc
  DEPS strata_serving_test_util strata_proto_v1_generation strata_test_data
  LABELS serving gpu)
target_compile_definitions(serving_gpu_test PRIVATE STRATA_WORKER_PATH="$<TARGET_FILE:strata-worker>")
add_dependencies(serving_gpu_test strata strata-worker)
target_compile_definitions(serving_process_test PRIVATE STRATA_WORKER_PATH="$<TARGET_FILE:strata-worker>")
add_dependencies(serving_process_test strata-worker)

# Host work of the serving engine per step (prints numbers; not a test).
add_executable(serving_engine_bench ${CMAKE_SOURCE_DIR}/bench/serving_engine_bench.cc)
target_link_libraries(serving_engine_bench PRIVATE strata_serving CLI11::CLI11)
