"""What a trained model is used for: likelihood, samples, latents, FID and the report."""
