"""A new trust-region method in one file plus one yaml: DRPO (see ``drpo_loss``)."""
