// TempFolder: a fresh folder under the system's temporary folder, removed with everything in it
// when the object goes (training files, benchmark models).
#pragma once

#include <stdlib.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>

namespace arbiter {

class TempFolder {
 public:
  // `prefix`: the start of the folder's name (a random suffix follows).
  explicit TempFolder(const std::string& prefix = "arbiter") {
    std::string name = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (!::mkdtemp(name.data())) throw std::runtime_error("cannot create a temporary folder: " + std::string(std::strerror(errno)));
    path_ = name;
  }
  ~TempFolder() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempFolder(const TempFolder&) = delete;
  TempFolder& operator=(const TempFolder&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

}  // namespace arbiter
