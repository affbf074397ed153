// `strata-eval`: the accuracy tools on their own, until `strata` registers
// them too (scheduler/eval_cli.h):
//
//   strata-eval eval-ppl --model M --text FILE --kv-cache-dtype int8 --context 256
//   strata-eval calibrate --model M --text FILE --out kv_params.json --per-head
#include "CLI/CLI.hpp"
#include "scheduler/eval_cli.h"

int main(int argc, char** argv) {
  CLI::App app{"Strata accuracy tools: perplexity through the paged KV cache, static KV calibration"};
  app.require_subcommand(1);
  strata::RegisterEvalCommands(app);
  CLI11_PARSE(app, argc, argv);
  if (auto rc = strata::DispatchEvalCommands()) return *rc;
  return 0;
}
