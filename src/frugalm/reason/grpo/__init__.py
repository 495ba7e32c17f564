"""GRPO: advantages (`advantages`), the clipped/KL objective (`loss`) and the training loop (`trainer`)."""
