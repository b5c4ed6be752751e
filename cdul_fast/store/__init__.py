"""The label store: one memory-mapped file (format v1), its checksums, and the optional C++ extension."""
