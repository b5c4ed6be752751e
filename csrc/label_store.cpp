#include "label_store.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace cdul {
namespace {

std::string os_error(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

}  // namespace

MappedFile::MappedFile(const std::string& path, bool writable, bool lock) : path_(path), writable_(writable) {
  fd_ = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd_ < 0) throw std::runtime_error(os_error("cannot open", path));
  if (lock && ::flock(fd_, (writable ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0) {
    int err = errno;
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK) throw LockedError(path);
    errno = err;
    throw std::runtime_error(os_error("cannot lock", path));
  }
  locked_ = lock;
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    ::close(fd_);
    throw std::runtime_error(os_error("cannot stat", path));
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* m = ::mmap(nullptr, size_, writable ? (PROT_READ | PROT_WRITE) : PROT_READ, MAP_SHARED, fd_, 0);
    if (m == MAP_FAILED) {
      ::close(fd_);
      throw std::runtime_error(os_error("cannot mmap", path));
    }
    data_ = static_cast<uint8_t*>(m);
  }
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(data_, size_);
  if (fd_ >= 0) ::close(fd_);  // closing the descriptor also drops the flock
}

void MappedFile::flush(size_t offset, size_t length) {
  if (!data_ || !writable_ || length == 0) return;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  if (offset >= size_) return;
  if (offset + length > size_) length = size_ - offset;
  const size_t start = offset - offset % page;
  if (::msync(data_ + start, length + (offset - start), MS_SYNC) != 0)
    throw std::runtime_error(os_error("msync failed for", path_));
}

void MappedFile::fsync() {
  if (fd_ >= 0 && writable_ && ::fsync(fd_) != 0) throw std::runtime_error(os_error("fsync failed for", path_));
}

void MappedFile::unlock() {
  if (fd_ >= 0 && locked_) {
    ::flock(fd_, LOCK_UN);
    locked_ = false;
  }
}

}  // namespace cdul
