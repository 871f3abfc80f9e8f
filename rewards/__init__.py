"""diffrl.rewards: the reward zoo (the reward contract, built-in scorers, combinations).

This package is part of the layout; its contents arrive with the reward-zoo work and nothing is exported yet.
"""
