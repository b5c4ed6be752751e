#include "label_store.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace cdul {
namespace {

using Tables = std::array<std::array<uint32_t, 256>, 8>;

Tables make_tables() {
  Tables t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
    t[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; ++i) {
    for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFFu];
  }
  return t;
}

const Tables& tables() {
  static const Tables t = make_tables();
  return t;
}

std::string os_error(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

}  // namespace

uint32_t crc32(const uint8_t* p, size_t n, uint32_t crc) {
  const Tables& t = tables();
  uint32_t c = ~crc;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7u)) {
    c = t[0][(c ^ *p++) & 0xFFu] ^ (c >> 8);
    --n;
  }
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;  // little-endian hosts (x86-64, aarch64): byte 0 is the low byte
    c = t[7][lo & 0xFFu] ^ t[6][(lo >> 8) & 0xFFu] ^ t[5][(lo >> 16) & 0xFFu] ^ t[4][lo >> 24] ^
        t[3][hi & 0xFFu] ^ t[2][(hi >> 8) & 0xFFu] ^ t[1][(hi >> 16) & 0xFFu] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = t[0][(c ^ *p++) & 0xFFu] ^ (c >> 8);
  return ~c;
}

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
