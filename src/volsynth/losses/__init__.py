"""Loss functions: pure functions (or frozen-feature modules) with shapes and units in their docstrings."""
