#include "worker/collectives_grpc_store.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "grpcpp/client_context.h"
#include "worker/worker_service.h"

namespace strata {
namespace {

namespace v1 = worker::v1;

void Prepare(grpc::ClientContext* ctx, const std::string& secret, absl::Duration timeout) {
  ctx->AddMetadata(kSecretMetadataKey, secret);
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(absl::ToInt64Milliseconds(timeout)));
}

// Slack for the round trip on top of a server-side wait.
constexpr absl::Duration kRpcSlack = absl::Seconds(5);

}  // namespace

GrpcKvStore::GrpcKvStore(std::shared_ptr<grpc::Channel> channel, std::string secret)
    : stub_(v1::Rendezvous::NewStub(std::move(channel))), secret_(std::move(secret)) {}

absl::Status GrpcKvStore::Set(const std::string& key, const std::string& value) {
  grpc::ClientContext ctx;
  Prepare(&ctx, secret_, kRpcSlack);
  v1::SetRequest req;
  req.set_key(key);
  req.set_value(value);
  v1::SetResponse resp;
  return FromGrpcStatus(stub_->Set(&ctx, req, &resp));
}

absl::StatusOr<std::string> GrpcKvStore::Get(const std::string& key, absl::Duration timeout) {
  {
    absl::Status s = Wait({key}, timeout);
    if (!s.ok()) return s;
  }
  grpc::ClientContext ctx;
  Prepare(&ctx, secret_, kRpcSlack);
  v1::GetRequest req;
  req.set_key(key);
  v1::GetResponse resp;
  const grpc::Status st = stub_->Get(&ctx, req, &resp);
  if (!st.ok()) return FromGrpcStatus(st);
  return std::move(*resp.mutable_value());
}

absl::Status GrpcKvStore::Wait(const std::vector<std::string>& keys, absl::Duration timeout) {
  grpc::ClientContext ctx;
  Prepare(&ctx, secret_, timeout + kRpcSlack);
  v1::WaitRequest req;
  for (const auto& k : keys) req.add_keys(k);
  req.set_timeout_ms(absl::ToInt64Milliseconds(timeout));
  v1::WaitResponse resp;
  return FromGrpcStatus(stub_->Wait(&ctx, req, &resp));
}

}  // namespace strata
