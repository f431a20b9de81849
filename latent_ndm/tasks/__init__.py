"""What is trained: pixel NDM, VAE (stage 1), latent NDM (stages 2-3), sharing one NELBO objective; loading runs."""
