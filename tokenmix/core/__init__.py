"""What several layers of tokenmix share, below all of them (docs/spec.md §9): argument checks
(``checks``), feeding a decoding state a chunk (``chunks``) and packed sequences (``packing``). Internal:
functional, kernels, mixers and models import from here; its names may change between versions."""
