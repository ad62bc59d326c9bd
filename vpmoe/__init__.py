"""vpmoe: upcycle a dense donor into an ultra-sparse MoE and distill it from GPT-OSS."""

__version__ = "0.1.0"
