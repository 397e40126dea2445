"""The one training engine every trainer shares; a trainer only supplies an Objective."""
