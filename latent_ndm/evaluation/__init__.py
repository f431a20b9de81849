"""Measuring models: test bits/dim (NELBO, ODE NLL), sample quality (FID, FD-MNIST), pictures, distances."""
