"""Short, runnable examples a researcher copies from (importable: ``examples.new_method.drpo_loss``)."""
