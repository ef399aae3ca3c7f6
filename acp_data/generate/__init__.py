"""Layout-to-image generators (docs/design.md "Package layout (`acp_data/`)"), registered in
``acp_data.registry.GENERATORS``.

Built in: ``gligen`` (``acp_data.generate.gligen.GligenGenerator``: diffusers' GLIGEN pipeline, N candidates per
layout, optional img2img refiner). External layout-to-image models (InstanceDiffusion, MIGC, ...) plug in by import
path: subclass ``acp_data.stages.Generator``, implement ``generate(scene, n, seed) -> list of H x W x 3 uint8``,
set ``max_boxes`` and raise ``TooManyBoxes`` above it, return everything that changes the images from
``settings()``, and name the class as ``package.module:Class`` in the prebuild config's ``generator.name``.
``docs/plugins.md`` has the full contract and a skeleton; ``acp_data.generate.common`` has the helpers.
"""

from .common import TOO_MANY_BOXES, TooManyBoxes

__all__ = ["TOO_MANY_BOXES", "TooManyBoxes"]
