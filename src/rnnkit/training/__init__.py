"""The one training toolkit every app uses: checkpoints, clipping, optimisers, progress, plots."""
