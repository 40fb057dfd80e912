"""The built-in demo movie with its ground truth, synthetic clips with known cuts, the metrics that
compare results with the truth, and ``bunny demo``.
"""
