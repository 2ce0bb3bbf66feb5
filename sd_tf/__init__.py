"""Stable Diffusion in TensorFlow / Keras 3."""
