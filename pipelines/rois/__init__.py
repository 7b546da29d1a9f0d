"""The stage-2 feature cache: what the frozen detector gives the mask side, computed once.

For every training image (and, with flips, its mirrored copy) a cache holds the RoIs that
:mod:`pipelines.rois.sampling` draws (``instance``: each instance's GT box plus up to
``proposals_per_instance`` proposals; ``detectron``: the official foreground sample), for the
instances of the cached classes only, and for each RoI: RoIAligned FPN features ``[C, S, S]``
(half precision by default), the mask target ``uint8[2S, 2S]`` and the class label (1..K).

- :mod:`~pipelines.rois.extract` runs the frozen detector for RoIs;
- :mod:`~pipelines.rois.instances` says which instances are cached (the set-A rule);
- :mod:`~pipelines.rois.plan` is the size arithmetic (a cache sized to ``cache.max_gb``), and
  :mod:`~pipelines.rois.projection` the build's and training's time from measured rates;
- :mod:`~pipelines.rois.store` owns the record layout, the writer and the reader
  (:mod:`~pipelines.rois.rowfile`: the raw record file read in parallel; :mod:`~pipelines.rois.storage`:
  float16, float32 or 8-bit features);
- :mod:`~pipelines.rois.build` builds a cache, :mod:`~pipelines.rois.ensure` finds or builds one;
- :mod:`~pipelines.rois.sources` and :mod:`~pipelines.rois.streaming` give stage 2 its batches.

This package may import ``data``, ``modeling`` and ``engine``; ``engine`` does not import it.
See ``docs/cache.md``.
"""
