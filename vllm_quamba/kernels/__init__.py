"""Plain-torch reference kernels: the numerics specification of every op.

One op per module. These modules import only torch (and math/numpy); the fast
kernels elsewhere in the package are tested against them.
"""
