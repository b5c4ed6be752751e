"""The frozen CLIP: open_clip models by name, config, folder or the shipped alias; prompts; encoders."""
