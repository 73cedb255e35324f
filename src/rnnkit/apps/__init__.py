"""Applications built on the layers and the shared training loop: one package per use."""
