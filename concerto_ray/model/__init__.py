"""Models: the Point Transformer V3 backbone (`ptv3`), its `Point` batch structure, and the heads."""
