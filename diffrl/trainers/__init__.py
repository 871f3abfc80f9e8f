"""diffrl.trainers: the shared numerics of ReFL, Flow-GRPO and DiffusionNFT (trainers arrive on top of them)."""
