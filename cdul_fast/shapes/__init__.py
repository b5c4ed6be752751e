"""The embedded world: the procedural shapes dataset, the tiny CLIP trained on it (script + assets), the demo."""
