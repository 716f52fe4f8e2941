"""Parameters, FLOPs, memory, cost and scaling laws, computed from the models' own methods."""
