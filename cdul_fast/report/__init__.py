"""`cdul-fast report`: what a run or a label store found, as one HTML page (curves, tables, galleries, CAMs)."""
