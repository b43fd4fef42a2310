"""Preference pairs from any pipeline: sample K images per prompt with fixed seeds, score them
with a reward, and write the trainer's Pick-a-Pic-layout parquet (``fastpref-pairs``).

- ``rewards``: the reward interface (images and prompts in, one score per image out) and its
  registry: the bundled programmatic rewards, ``module:callable``, and the CLIP-based scorers of
  ``clip_rewards`` (CLIP score, PickScore, HPSv2, the LAION aesthetic predictor) and
  ``imagereward``, each read from local weights only;
- ``prompts``: the prompts file (text, parquet or CSV);
- ``sampling``: a diffusers pipeline directory sampled offline, one seed per image;
- ``select``: which samples of a prompt make pairs (best vs worst, or every pair past a margin);
- ``writer``: the output format (images: Pick-a-Pic parquet with scores and seeds), written in
  atomic part files so a killed run resumes;
- ``generate``: the loop tying them together; ``cli``: the ``fastpref-pairs`` command.
"""
