"""Semantic segmentation fine-tuning: segmentor, LoRA, losses, metrics, test protocol, data-efficient settings."""
