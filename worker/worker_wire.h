// Wire conversions of the control plane (proto/worker.proto) that the
// scheduler (scheduler/remote_engine.cc) and the workers (worker_service.cc)
// share: statuses, the model config, steps and their results.
// grpc::Status <-> absl::Status conversion happens here and nowhere else.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"
#include "proto/worker.pb.h"
#include "runtime/model_config.h"
#include "worker/engine.h"

namespace strata {

inline constexpr uint32_t kWorkerProtocolVersion = 2;  // 2: steps serialized once, as columns
// Metadata key carrying the shared secret on every control-plane call.
inline constexpr char kSecretMetadataKey[] = "x-strata-secret";

grpc::Status ToGrpcStatus(const absl::Status& s);
absl::Status FromGrpcStatus(const grpc::Status& s);
void StatusToProto(const absl::Status& s, worker::v1::StatusProto* out);
absl::Status StatusFromProto(const worker::v1::StatusProto& p);

void ConfigToProto(const ModelConfig& c, worker::v1::ModelConfigProto* out);
ModelConfig ConfigFromProto(const worker::v1::ModelConfigProto& p);

void StepToProto(int64_t step_id, const StepInput& in, worker::v1::Step* out);
// The step's sequences travel as columns (proto/worker.proto). StepFromProto:
// INVALID_ARGUMENT naming the column for malformed messages (column sizes,
// offsets, sampling columns, odd pair lists, unknown enums); the engine
// validates the rest against its pools.
absl::Status StepFromProto(const worker::v1::Step& p, StepInput* in);

// Rank 0's output: the logits of rows the caller asked for, and samples.
void OutputToProto(const StepOutput& out, worker::v1::StepResult* p);
absl::Status OutputFromProto(const worker::v1::StepResult& p, int32_t vocab_size, StepOutput* out);

}  // namespace strata
