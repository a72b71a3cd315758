"""The stages, one module each: plain functions over the frozen values of ``lava.types``.

``noise`` → ``prompts`` (``encode_prompt``) → ``capture`` (with ``concept``, ``processors``) →
``aggregate`` (with ``presence``) → ``refine`` (with ``propagate``) → ``mask`` (``to_mask``).
The stage functions are exported at the top (``lava.noise``, ``lava.capture``, ...); this package
holds their modules, so ``import lava.stages.capture`` is always the module.
"""
