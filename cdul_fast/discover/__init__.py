"""`cdul-fast discover`: novel category discovery (Jia et al., ICCV 2021) — the groups nobody named."""
