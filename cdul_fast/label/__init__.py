"""Stage 2: CLIP scores of the views -> aggregation -> the label store (`cdul-fast label`), and the same math from
stored view embeddings (`cdul-fast rescore`, `eval --sweep`)."""
