"""Data: annotation readers, the SynthPEDES generator, transforms, tokenizers and torch datasets."""
