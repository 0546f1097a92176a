"""The room every other module may import: the stage contract, manifests, atomic I/O and the console.

Nothing here imports the rest of tunegate (`tests/unit/test_layers.py` keeps it so).
"""
