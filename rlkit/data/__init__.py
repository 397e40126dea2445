"""The data layer: load records, detect their format, render templates, tokenize, pack, collate."""
