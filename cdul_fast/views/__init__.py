"""Stage 1: decode + tile images into the whole-image view and the G x G snippets, behind one ViewSource."""
