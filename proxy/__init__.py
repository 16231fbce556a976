"""The data plane: one proxy beside every workload."""
