"""The label store: one memory-mapped file (format v1), its checksums, and the optional C++ extension (the store's
locked mmap and the fused CPU latent update)."""
