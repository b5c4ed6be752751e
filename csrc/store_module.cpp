// pybind11 bindings: cdul_fast.store._store.MappedFile (buffer protocol -> zero-copy numpy views), latent_update (the
// fused CPU latent update over numpy / memmap buffers) and ABI_VERSION, which cdul_fast._backend.store_ext checks so
// a stale build is noticed instead of used.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "label_store.hpp"
#include "latent_update.hpp"

namespace py = pybind11;

namespace {

// Bump with every change to what this module exposes; cdul_fast/_backend.py (STORE_EXT_ABI) expects the same number.
constexpr int kAbiVersion = 1;

// C order in every dimension (1-D included); a dimension of size 1 may have any stride.
bool c_contiguous(const py::buffer_info& b) {
  py::ssize_t want = b.itemsize;
  for (py::ssize_t d = b.ndim - 1; d >= 0; --d) {
    if (b.shape[d] != 1 && b.strides[d] != want) return false;
    want *= b.shape[d];
  }
  return true;
}

std::string shape_str(const py::buffer_info& b) {
  std::string s;
  for (py::ssize_t d : b.shape) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return "(" + s + (b.ndim == 1 ? ",)" : ")");
}

// A float32 (or, with half_ok, float16) C-contiguous buffer, writeable when asked; one-line ValueError otherwise.
py::buffer_info float_buffer(const py::buffer& buf, const char* name, bool writeable, bool half_ok) {
  py::buffer_info b = buf.request();
  const bool f32 = b.format == "f" && b.itemsize == 4;
  const bool f16 = half_ok && b.format == "e" && b.itemsize == 2;
  if (!f32 && !f16)
    throw py::value_error(std::string(name) + " must be float32" + (half_ok ? " or float16" : "") +
                          ", got buffer format '" + b.format + "'");
  if (!c_contiguous(b)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (writeable && b.readonly) throw py::value_error(std::string(name) + " must be writeable (it is written in place)");
  return b;
}

void same_shape(const py::buffer_info& a, const py::buffer_info& latent, const char* name) {
  if (a.shape != latent.shape)
    throw py::value_error(std::string(name) + " shape " + shape_str(a) + " != latent shape " + shape_str(latent));
}

void latent_update(const py::buffer& latent, const py::buffer& pred, double c1, double sigma, double c2, double lr,
                   bool use_psi, double eps, const std::optional<py::buffer>& labels_out, unsigned threads, bool avx2) {
  py::buffer_info lat = float_buffer(latent, "latent", true, false);
  py::buffer_info p = float_buffer(pred, "pred", false, true);
  same_shape(p, lat, "pred");
  std::optional<py::buffer_info> lab;
  if (labels_out) {
    lab = float_buffer(*labels_out, "labels_out", true, false);
    same_shape(*lab, lat, "labels_out");
  }
  const cdul::LatentStep step{c1, sigma, c2, lr, eps, use_psi};
  py::gil_scoped_release nogil;  // the buffer_info views above keep the memory alive until after the GIL is back
  cdul::latent_update(static_cast<float*>(lat.ptr), p.ptr, p.itemsize == 2,
                      lab ? static_cast<float*>(lab->ptr) : nullptr, static_cast<size_t>(lat.size), step, threads,
                      avx2);
}

}  // namespace

PYBIND11_MODULE(_store, m) {
  m.doc() = "Label store extension: locked mmap of a store file and the fused CPU latent update (docs/store_format.md)";
  m.attr("ABI_VERSION") = kAbiVersion;
  m.attr("HAS_AVX2_FMA") = cdul::has_avx2_fma();
  py::register_exception<cdul::LockedError>(m, "LockedError", PyExc_RuntimeError);
  m.def("latent_update", &latent_update, py::arg("latent"), py::arg("pred"), py::arg("c1"), py::arg("sigma"),
        py::arg("c2"), py::arg("lr") = 1.0, py::arg("use_psi") = true, py::arg("eps") = 1e-6,
        py::arg("labels_out") = py::none(), py::arg("threads") = 0, py::arg("avx2") = true,
        "Eq. 7-8 in place on a float32 buffer (pred float32/float16, same shape; labels_out optional float32 gets "
        "sigmoid of the new latent), like cdul_fast.ops.reference.latent_update_; GIL released, up to `threads` "
        "threads (0: all). avx2=False runs the baseline loop even where HAS_AVX2_FMA (tests check both).");

  py::class_<cdul::MappedFile>(m, "MappedFile", py::buffer_protocol())
      .def(py::init<const std::string&, bool, bool>(), py::arg("path"), py::arg("writable"), py::arg("lock") = true)
      .def_property_readonly("size", &cdul::MappedFile::size)
      .def_property_readonly("writable", &cdul::MappedFile::writable)
      .def("flush", &cdul::MappedFile::flush, py::arg("offset"), py::arg("length"),
           py::call_guard<py::gil_scoped_release>())
      .def("fsync", &cdul::MappedFile::fsync, py::call_guard<py::gil_scoped_release>())
      .def("unlock", &cdul::MappedFile::unlock)
      .def_buffer([](cdul::MappedFile& f) -> py::buffer_info {
        return py::buffer_info(f.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(f.size())}, {1}, !f.writable());
      });
}
