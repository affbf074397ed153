// strata.v1.Generation over gRPC's callback API. Handlers authenticate,
// validate (request_validation.h) and enqueue to the ServingEngine; they never
// block and never touch the scheduler. Streaming responses are written one
// at a time, by a writer thread for the engine's tokens; tokens that arrive
// while a write is in flight are merged into the next message.
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "proto/strata_v1_generation.grpc.pb.h"
#include "runtime/tokenizer.h"
#include "scheduler/server/request_validation.h"
#include "scheduler/server/serving_engine.h"
#include "scheduler/server/stream_writer.h"

namespace strata::serving {

class GenerationService final : public v1::Generation::CallbackService {
 public:
  // `auth_token`: when set, every call must carry `authorization: Bearer
  // <token>` metadata (UNAUTHENTICATED otherwise).
  explicit GenerationService(std::optional<std::string> auth_token)
      : auth_token_(std::move(auth_token)) {}

  // Until SetReady, every RPC answers UNAVAILABLE ("model is loading").
  // `info` holds the static fields of GetModelInfo; block and queue counts
  // are filled from the engine per call. All pointers must outlive the
  // gRPC server.
  void SetReady(ServingEngine* engine, const Tokenizer* tokenizer, ServingMetrics* metrics,
                const RequestLimits& limits, const v1::ModelInfo& info);

  // The engine thread's rounds (ServingEngineOptions::begin_round /
  // end_round): the stream writes of a round go to the writer together.
  void BeginWriteBatch() { writer_.BeginBatch(); }
  void EndWriteBatch() { writer_.EndBatch(); }

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* GenerateUnary(grpc::CallbackServerContext* context,
                                          const v1::GenerateRequest* request,
                                          v1::GenerateResponse* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;

 private:
  // The engine when ready and the caller is authenticated; else the status
  // to answer with.
  absl::StatusOr<ServingEngine*> Admit(grpc::CallbackServerContext* context) const;
  // Counts a generation refused before reaching the engine.
  void CountRejected(const absl::Status& status) const;

  const std::optional<std::string> auth_token_;
  // Runs the streams' StartWrite / Finish for the engine thread. The service,
  // and with it this thread, must outlive the gRPC server, which waits for
  // every stream's Finish.
  StreamWriter writer_;
  std::atomic<ServingEngine*> engine_{nullptr};
  // Written once before engine_ is published (release), read after (acquire).
  const Tokenizer* tokenizer_ = nullptr;
  ServingMetrics* metrics_ = nullptr;
  RequestLimits limits_;
  v1::ModelInfo info_;
};

// Appends `src`'s tokens, text and log-probs to `dst` and takes its finish
// fields (used to coalesce streamed chunks and to build unary responses).
void MergeChunk(v1::GenerateResponse* dst, v1::GenerateResponse&& src);

}  // namespace strata::serving
