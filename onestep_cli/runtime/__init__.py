"""Where and how the code runs: process groups (torchrun, srun), devices, precision and compilation."""
