// pybind11 bindings: cdul_fast._store.MappedFile (buffer protocol -> zero-copy numpy views) and crc32.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "label_store.hpp"

namespace py = pybind11;

namespace {

uint32_t crc_of(const py::buffer& b, uint32_t start) {
  py::buffer_info info = b.request();
  if (info.ndim > 1 && info.strides.back() != info.itemsize)
    throw std::invalid_argument("crc32 needs a contiguous buffer");
  const auto* p = static_cast<const uint8_t*>(info.ptr);
  const size_t n = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
  py::gil_scoped_release nogil;
  return cdul::crc32(p, n, start);
}

}  // namespace

PYBIND11_MODULE(_store, m) {
  m.doc() = "Label store extension: locked mmap of a store file and CRC-32 (see docs/store_format.md)";
  py::register_exception<cdul::LockedError>(m, "LockedError", PyExc_RuntimeError);
  m.def("crc32", &crc_of, py::arg("data"), py::arg("start") = 0,
        "CRC-32/IEEE of a contiguous buffer (equals zlib.crc32), computed without the GIL");

  py::class_<cdul::MappedFile>(m, "MappedFile", py::buffer_protocol())
      .def(py::init<const std::string&, bool, bool>(), py::arg("path"), py::arg("writable"), py::arg("lock") = true)
      .def_property_readonly("size", &cdul::MappedFile::size)
      .def_property_readonly("writable", &cdul::MappedFile::writable)
      .def("flush", &cdul::MappedFile::flush, py::arg("offset"), py::arg("length"),
           py::call_guard<py::gil_scoped_release>())
      .def("fsync", &cdul::MappedFile::fsync, py::call_guard<py::gil_scoped_release>())
      .def("unlock", &cdul::MappedFile::unlock)
      .def("crc32", [](const cdul::MappedFile& f, size_t offset, size_t length) {
             if (offset > f.size() || length > f.size() - offset) throw std::out_of_range("crc32 range outside the file");
             py::gil_scoped_release nogil;
             return cdul::crc32(f.data() + offset, length, 0);
           }, py::arg("offset"), py::arg("length"))
      .def_buffer([](cdul::MappedFile& f) -> py::buffer_info {
        return py::buffer_info(f.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(f.size())}, {1}, !f.writable());
      });
}
