"""Stage 2: CLIP scores of the views -> aggregation -> the label store (`cdul-fast label`)."""
