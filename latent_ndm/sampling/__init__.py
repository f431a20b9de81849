"""Samplers with one signature, the ODE solvers, the exact NLL by the probability-flow ODE, path diagnostics."""
