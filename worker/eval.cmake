# Accuracy tools (included at the end of worker/CMakeLists.txt): perplexity
# through the paged decode path and static KV calibration (worker/), their CLI
# (scheduler/eval_cli.cc, the `strata-eval` executable) and the accuracy CI
# test (tests/accuracy_ci_test.cc). Kept in one fragment so the feature builds
# as a unit; the scheduler and tests folders only hold the sources.
add_library(strata_eval STATIC ${CMAKE_CURRENT_LIST_DIR}/eval_ppl.cc
            ${CMAKE_CURRENT_LIST_DIR}/calibrate.cc)
target_link_libraries(strata_eval PUBLIC strata_cpu_engine strata_kv_calibration
                      nlohmann_json::nlohmann_json)

add_library(strata_eval_cli STATIC ${CMAKE_SOURCE_DIR}/scheduler/eval_cli.cc)
target_link_libraries(strata_eval_cli PUBLIC strata_eval strata_tokenizer CLI11::CLI11)

add_executable(strata-eval ${CMAKE_SOURCE_DIR}/scheduler/strata_eval_main.cc)
target_link_libraries(strata-eval PRIVATE strata_eval_cli)

strata_cc_test(accuracy_ci_test SRCS ${CMAKE_SOURCE_DIR}/tests/accuracy_ci_test.cc
               DEPS strata_eval strata_tokenizer strata_test_data)
strata_cc_test(worker_kv_calibration_test SRCS ${CMAKE_CURRENT_LIST_DIR}/kv_calibration_test.cc
               DEPS strata_kv_calibration)
