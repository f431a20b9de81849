"""The training loop (loop.py), one step (step.py), its state (state.py), checkpoints, EMA and the guards of long
runs.
"""
