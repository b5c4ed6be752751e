"""Stage 3: the classifier trained on the label store (KL loss, psi-weighted latent label updates), checkpoints."""
