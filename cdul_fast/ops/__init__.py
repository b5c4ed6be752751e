"""CDUL's math: the pure-torch reference, the Triton kernels (ops.kernels), and the dispatch that picks one."""
