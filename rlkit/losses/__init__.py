"""Pure tensor loss functions for rlkit's trainers (no models, configs or I/O), one module per family.

This package imports none of its modules, so that `rlkit.losses.preference`, whose loss records
the `dpo` options read, loads without torch: import each function from the module defining it.
"""
