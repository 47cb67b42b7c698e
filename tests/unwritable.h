// Makes a file or folder unwritable for the test process while an Unwritable lives: its write
// permissions are removed, and where that does not stop this process (root ignores permissions)
// the file gets the immutable attribute. ok() says whether the path really is unwritable now (a
// test skips otherwise). Everything is restored on destruction, so the temporary folder can go.
#pragma once

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

namespace arbiter::testing {

class Unwritable {
 public:
  Unwritable(std::string path, bool directory) : path_(std::move(path)), directory_(directory) {
    struct stat st {};
    if (::stat(path_.c_str(), &st) != 0) return;
    mode_ = st.st_mode & 07777;
    ::chmod(path_.c_str(), mode_ & ~mode_t{0222});
    if (!writable()) return;
    if (set_immutable(true)) immutable_ = true;
  }
  ~Unwritable() {
    if (immutable_) set_immutable(false);
    if (mode_) ::chmod(path_.c_str(), mode_);
  }
  Unwritable(const Unwritable&) = delete;
  Unwritable& operator=(const Unwritable&) = delete;

  bool ok() const { return mode_ != 0 && !writable(); }

 private:
  // A folder is writable when a file can be made in it; a file when it opens for writing.
  bool writable() const {
    if (directory_) {
      const std::string probe = path_ + "/.write-probe";
      const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
      if (fd < 0) return false;
      ::close(fd);
      ::unlink(probe.c_str());
      return true;
    }
    const int fd = ::open(path_.c_str(), O_WRONLY);
    if (fd < 0) return false;
    ::close(fd);
    return true;
  }
  bool set_immutable(bool on) const {
    const int fd = ::open(path_.c_str(), O_RDONLY | O_NONBLOCK | (directory_ ? O_DIRECTORY : 0));
    if (fd < 0) return false;
    int flags = 0;
    bool done = ::ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0;
    if (done) {
      flags = on ? flags | FS_IMMUTABLE_FL : flags & ~FS_IMMUTABLE_FL;
      done = ::ioctl(fd, FS_IOC_SETFLAGS, &flags) == 0;
    }
    ::close(fd);
    return done;
  }

  std::string path_;
  bool directory_;
  mode_t mode_ = 0;
  bool immutable_ = false;
};

}  // namespace arbiter::testing
