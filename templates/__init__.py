"""Chat templates shipped with rlkit, as Jinja files read with importlib.resources."""
