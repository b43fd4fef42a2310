"""One module per model family (``fastpref.training.family.ModelFamily``); every module here is
imported by the registry, so adding a family is adding a file."""
