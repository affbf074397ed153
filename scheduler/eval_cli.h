// CLI wiring of the accuracy tools (worker/eval_ppl.h, worker/calibrate.h):
//
//   strata eval-ppl --model M --text FILE --kv-cache-dtype D [--kv-scale-mode S]
//                   [--kv-quant-params-path P] --context C [--max-tokens N] [--stride S] ...
//   strata calibrate --model M --text FILE --out kv_params.json [--per-head]
//                    [--kv-cache-dtype int8|fp8_e4m3|fp8_e5m2] ...
//
// Usage from a main():
//   CLI::App app{...};
//   RegisterEvalCommands(app);
//   CLI11_PARSE(app, argc, argv);
//   if (auto rc = DispatchEvalCommands()) return *rc;
//
// `--kv-cache-dtype` of eval-ppl also takes a comma-separated list or `all`
// (every supported format); `{dtype}` in --kv-quant-params-path (and in
// calibrate's --out) is replaced by each dtype's name, so one run can use or
// write the static parameters of several dtypes. Exit status: 0 on success,
// 2 for bad flags or inputs, 1 when a run fails.
#pragma once

#include <optional>

namespace CLI {
class App;
}

namespace strata {

// Adds the `eval-ppl` and `calibrate` subcommands. Their flag values live in
// this module until the process ends; call once per process.
void RegisterEvalCommands(CLI::App& app);

// After parsing: runs the eval subcommand that was given and returns its exit
// status, or std::nullopt when neither was given.
std::optional<int> DispatchEvalCommands();

}  // namespace strata
