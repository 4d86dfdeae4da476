"""What can be pruned: architectures, groups, masks. Reads a model, changes nothing."""
