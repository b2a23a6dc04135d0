"""mmjax: vision-language models (ViT, CLIP, LLaVA) in JAX/Flax."""

__version__ = "0.1.0"
