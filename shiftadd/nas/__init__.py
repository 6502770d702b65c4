"""Neural architecture search over multiplication-less layers.

``shiftadd.nas.cost``: the cost models — analytic compute energy from 45 nm per-operation
figures (``layer_costs``, ``model_energy``, ``energy_table``) and a measured, per-device
cached latency lookup table (``profile_latency``, ``LatencyTable``).
"""

from .cost import (  # noqa: F401
    CONVENTIONS,
    DEFAULT_SHAPES,
    ENERGY_PJ,
    LATENCY_OPS,
    PRECISIONS,
    LatencyTable,
    LayerConfig,
    LayerCost,
    device_key,
    energy_table,
    latency_cache_path,
    layer_costs,
    main_energy,
    main_profile_latency,
    model_energy,
    profile_latency,
)
