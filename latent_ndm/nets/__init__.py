"""Networks used as the denoiser and inside F (U-Net with its tangent pass, DiT) and the one place configs become
objects (build.py).
"""
