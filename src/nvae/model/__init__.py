"""The network alone, as the paper draws it (Figures 2 and 3): cells, latent groups, distributions, flows, regularisers."""
