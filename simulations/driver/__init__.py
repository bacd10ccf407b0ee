"""The run driver: the federated simulation (Flower Simulation Engine or the in-process loopback
grid), the centralized reference, atomic run directories."""
