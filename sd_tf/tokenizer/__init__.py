"""CLIP BPE tokenizer for Stable Diffusion prompts (no TensorFlow needed)."""

from sd_tf.tokenizer.clip_tokenizer import END_TOKEN_ID, MAX_LENGTH, START_TOKEN_ID, VOCAB_SIZE, CLIPTokenizer

__all__ = ["CLIPTokenizer", "START_TOKEN_ID", "END_TOKEN_ID", "MAX_LENGTH", "VOCAB_SIZE"]
