"""The data plane: one proxy beside every workload (DESIGN.md "Data plane")."""
