// Invariant checks: for bugs, never for request data (which is validated at
// admission and rejected with a Status). A failed check logs the condition,
// location and message, runs the registered unhealthy hook (a worker marks
// itself not ready) and aborts.
#pragma once

#include <sstream>
#include <string>

namespace strata {

// Called once before abort() when an invariant breaks. Processes install a
// hook that flips their readiness; the default does nothing.
using CheckFailureHook = void (*)(const std::string& message);
void SetCheckFailureHook(CheckFailureHook hook);

namespace internal {

class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* condition);
  [[noreturn]] ~CheckFailure();
  std::ostream& stream() { return stream_; }

 private:
  std::ostringstream stream_;
};

// Swallows the stream expression on the success path.
struct CheckVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace internal
}  // namespace strata

#define STRATA_CHECK(cond)                  \
  (cond) ? (void)0                          \
         : ::strata::internal::CheckVoidify() & \
               ::strata::internal::CheckFailure(__FILE__, __LINE__, #cond).stream()

#define STRATA_CHECK_OP_(a, b, op) STRATA_CHECK((a)op(b)) << "(" << (a) << " vs " << (b) << ") "
#define STRATA_CHECK_EQ(a, b) STRATA_CHECK_OP_(a, b, ==)
#define STRATA_CHECK_NE(a, b) STRATA_CHECK_OP_(a, b, !=)
#define STRATA_CHECK_LT(a, b) STRATA_CHECK_OP_(a, b, <)
#define STRATA_CHECK_LE(a, b) STRATA_CHECK_OP_(a, b, <=)
#define STRATA_CHECK_GT(a, b) STRATA_CHECK_OP_(a, b, >)
#define STRATA_CHECK_GE(a, b) STRATA_CHECK_OP_(a, b, >=)

// Debug-only variant for hot paths.
#ifdef NDEBUG
#define STRATA_DCHECK(cond) \
  while (false) STRATA_CHECK(cond)
#else
#define STRATA_DCHECK(cond) STRATA_CHECK(cond)
#endif
