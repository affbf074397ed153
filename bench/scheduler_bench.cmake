# Scheduler core benchmark (prints numbers; not a test). include()d by bench/CMakeLists.txt.
add_executable(scheduler_bench ${CMAKE_CURRENT_LIST_DIR}/scheduler_bench.cc)
target_link_libraries(scheduler_bench PRIVATE strata_scheduler_core CLI11::CLI11)
