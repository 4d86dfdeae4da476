"""What is decided: importance criteria, allocation, pruning state, schedule, losses. No I/O."""
