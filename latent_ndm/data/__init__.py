"""Data: image sources, webdataset shards (images and pre-encoded latents), the keyed training and evaluation
streams.
"""
