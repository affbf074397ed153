# Workers and tensor parallelism: sharding, collectives (Gloo on CPU, NCCL on
# GPU), the worker side of the control plane and the strata-worker process.
# include()d by worker/CMakeLists.txt. Paths are relative to this file.
get_filename_component(STRATA_TP_WORKER_DIR "${CMAKE_CURRENT_LIST_DIR}" ABSOLUTE)
get_filename_component(STRATA_TP_ROOT "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

# Shard arithmetic and shard loading (host-only).
add_library(strata_shard STATIC ${STRATA_TP_WORKER_DIR}/shard.cc)
target_include_directories(strata_shard PUBLIC ${STRATA_TP_ROOT})
target_link_libraries(strata_shard PUBLIC strata_model_io)

# The collectives interface, the in-memory store and Gloo.
add_library(strata_collectives STATIC
  ${STRATA_TP_WORKER_DIR}/collectives.cc
  ${STRATA_TP_WORKER_DIR}/collectives_gloo.cc)
target_include_directories(strata_collectives PUBLIC ${STRATA_TP_ROOT})
target_link_libraries(strata_collectives PUBLIC gloo Threads::Threads absl::status absl::statusor
                      absl::strings absl::synchronization absl::time)

# The CPU engine shards through these (its target is defined in CMakeLists.txt).
target_link_libraries(strata_cpu_engine PUBLIC strata_shard strata_collectives)

strata_cc_test(worker_shard_test
  SRCS ${STRATA_TP_WORKER_DIR}/shard_test.cc
  DEPS strata_cpu_engine strata_test_data)

# The worker side of the control plane: wire conversions, the rendezvous
# store client, the worker session.
set(STRATA_WORKER_RPC_SRCS ${STRATA_TP_WORKER_DIR}/worker_service.cc
                           ${STRATA_TP_WORKER_DIR}/worker_wire.cc
                           ${STRATA_TP_WORKER_DIR}/collectives_grpc_store.cc)
set(STRATA_WORKER_RPC_DEPS strata_cpu_engine strata_collectives strata_proto_worker strata_sampling
                           strata_block_manager spdlog::spdlog gRPC::grpc++)
add_library(strata_worker_rpc STATIC ${STRATA_WORKER_RPC_SRCS})
target_include_directories(strata_worker_rpc PUBLIC ${STRATA_TP_ROOT})
target_link_libraries(strata_worker_rpc PUBLIC ${STRATA_WORKER_RPC_DEPS})

strata_cc_test(worker_wire_test
  SRCS ${STRATA_TP_WORKER_DIR}/worker_wire_test.cc
  DEPS strata_worker_rpc)

# With CUDA, the strata-worker executable runs the GPU engine when the scheduler
# asks for --device cuda: it links a CUDA build of the same sources. The
# scheduler and the tests keep linking strata_worker_rpc, which needs no CUDA.
add_executable(strata-worker ${STRATA_TP_WORKER_DIR}/worker_main.cc)
if(STRATA_HAVE_CUDA AND NCCL_LIBRARY)
  add_library(strata_worker_rpc_cuda STATIC ${STRATA_WORKER_RPC_SRCS})
  target_include_directories(strata_worker_rpc_cuda PUBLIC ${STRATA_TP_ROOT})
  target_link_libraries(strata_worker_rpc_cuda PUBLIC ${STRATA_WORKER_RPC_DEPS} strata_cuda_engine
                        strata_collectives_nccl)
  target_compile_definitions(strata_worker_rpc_cuda PRIVATE STRATA_HAVE_CUDA=1)
  target_link_libraries(strata-worker PRIVATE strata_worker_rpc_cuda CLI11::CLI11 spdlog::spdlog absl::synchronization)
else()
  target_link_libraries(strata-worker PRIVATE strata_worker_rpc CLI11::CLI11 spdlog::spdlog absl::synchronization)
endif()

strata_cc_test(worker_collectives_test
  SRCS ${STRATA_TP_WORKER_DIR}/collectives_test.cc
  DEPS strata_collectives strata_control_plane strata_worker_rpc)

# NCCL collectives: compiled wherever CUDA is found; run by worker/tp_gpu_check.sh
# on a machine with 2 GPUs (the test skips without them).
if(STRATA_HAVE_CUDA AND NCCL_LIBRARY)
  add_library(strata_collectives_nccl STATIC ${STRATA_TP_WORKER_DIR}/collectives_nccl.cc)
  target_include_directories(strata_collectives_nccl PUBLIC ${STRATA_TP_ROOT} ${CUDAToolkit_INCLUDE_DIRS})
  target_link_libraries(strata_collectives_nccl PUBLIC strata_collectives ${NCCL_LIBRARY} CUDA::cudart)
  strata_cc_test(worker_collectives_nccl_test
    SRCS ${STRATA_TP_WORKER_DIR}/collectives_nccl_test.cc
    DEPS strata_collectives_nccl strata_control_plane strata_worker_rpc
    LABELS gpu)
endif()
