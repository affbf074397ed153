// Locating the shared test fixtures: $STRATA_DATA_DIR, else ../shared/data
// next to the source tree.
#pragma once

#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace strata::testing {

std::string DataDir();
std::string DataPath(const std::string& relative);
std::string SourceDir();
std::string BinaryDir();
nlohmann::json LoadJson(const std::string& relative);
std::vector<float> LoadF32(const std::string& relative);

}  // namespace strata::testing
