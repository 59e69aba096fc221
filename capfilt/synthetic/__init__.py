"""The shapes world: a synthetic, learnable image-text world with labelled web noise (toy data).

``world`` (scenes, images, caption grammar, parser, noise model), ``splits`` (web / human / test,
in memory or on disk), ``models`` (untrained BLIP checkpoints of the right size), ``evaluate``
(filter, captioner and retrieval metrics against the ground truth) and ``bootstrap`` (BLIP's
CapFilt experiment end to end). See ``capfilt synth`` and ``capfilt bootstrap``.
"""
