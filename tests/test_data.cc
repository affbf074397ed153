#include "tests/test_data.h"

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace strata::testing {

std::string SourceDir() {
  const char* s = std::getenv("STRATA_SOURCE_DIR");
  return s != nullptr ? s : ".";
}

std::string BinaryDir() {
  const char* s = std::getenv("STRATA_BINARY_DIR");
  return s != nullptr ? s : ".";
}

std::string DataDir() {
  const char* d = std::getenv("STRATA_DATA_DIR");
  if (d != nullptr && *d != '\0') return d;
  return SourceDir() + "/../shared/data";
}

std::string DataPath(const std::string& relative) { return DataDir() + "/" + relative; }

nlohmann::json LoadJson(const std::string& relative) {
  std::ifstream in(DataPath(relative));
  if (!in) throw std::runtime_error("cannot open test fixture " + DataPath(relative));
  return nlohmann::json::parse(in);
}

std::vector<float> LoadF32(const std::string& relative) {
  std::ifstream in(DataPath(relative), std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open test fixture " + DataPath(relative));
  const std::streamsize n = in.tellg();
  in.seekg(0);
  std::vector<float> v(n / 4);
  in.read(reinterpret_cast<char*>(v.data()), n);
  return v;
}

}  // namespace strata::testing
