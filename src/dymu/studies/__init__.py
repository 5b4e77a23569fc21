"""Studies of DyMU on real weights and tiny towers: the logic behind measurements in docs/real_weights.md,
docs/qwen_vl.md and docs/results.md.

One module per study; the commands under ``eval_scripts/`` parse arguments and print or write the tables over
these functions. A package apart from the core because the studies need optional packages (real weights from
``dymu.weights``, easy-vqa, scikit-image, scipy, scikit-learn, matplotlib) and none is on an inference path:
nothing else in dymu imports it.

* :mod:`dymu.studies.real_images`: the real images the studies share (bundled photos, crops, easy-vqa) and the
  DINOv2 input transform they use.
* :mod:`dymu.studies.dinov2_thresholds`: DToMe thresholds found on the real DINOv2-S and tokens kept vs image
  complexity.
* :mod:`dymu.studies.vtu_kl_cases` / :mod:`dymu.studies.vtu_kl`: the prompts whose visual run is merged, and how
  far merging (with and without VTU) moves SmolLM2's next-token distribution.
* :mod:`dymu.studies.colour_probe`: linear probes of colour and shape on what the small VLM's LLM is shown.
* :mod:`dymu.studies.qwen_tower_design`: DToMe's design choices on tiny random Qwen vision towers (docs/qwen_vl.md).
"""
