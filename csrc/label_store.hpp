// The systems half of the label store: a locked, memory-mapped file exposed to Python through the buffer protocol.
// The format itself (header layout, validation, CRC-32 through zlib) lives in cdul_fast/store/label_store.py so both
// backends share one definition; see docs/store_format.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace cdul {

// Thrown when the non-blocking flock fails because another open file description holds a conflicting lock; the
// bindings turn it into cdul_fast._store.LockedError so Python can tell "in use" from other I/O errors.
struct LockedError : std::runtime_error {
  explicit LockedError(const std::string& path) : std::runtime_error(path + " is locked by another process") {}
};

// A file mapped shared into memory with an advisory flock held for the mapping's lifetime (or until unlock()).
class MappedFile {
 public:
  MappedFile(const std::string& path, bool writable, bool lock);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool writable() const { return writable_; }
  const std::string& path() const { return path_; }

  void flush(size_t offset, size_t length);  // msync(MS_SYNC) of the pages covering [offset, offset + length)
  void fsync();                              // fsync of the file descriptor
  void unlock();                             // release the lock (views stay valid until the object dies)

 private:
  std::string path_;
  int fd_ = -1;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool writable_ = false;
  bool locked_ = false;
};

}  // namespace cdul
