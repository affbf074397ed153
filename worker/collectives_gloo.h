// Gloo collectives (CPU, TCP). Debian's Gloo has no TCP store, so the ranks
// rendezvous through a strata::KvStore (the scheduler's Rendezvous service in
// production) adapted to gloo::rendezvous::Store. Gloo reports errors by
// throwing; this file catches them and returns absl::Status, so no exception
// leaves it.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "worker/collectives.h"

namespace strata {

// Connects a full mesh of `options.world_size` ranks. Blocks until every rank
// has joined or options.timeout passes (DEADLINE_EXCEEDED / UNAVAILABLE).
// `store` is used only during the call.
absl::StatusOr<std::unique_ptr<Collectives>> CreateGlooCollectives(const CollectivesOptions& options,
                                                                   KvStore* store);

}  // namespace strata
