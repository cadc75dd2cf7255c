"""Fast twins of method and data functions, for a run on a device: each computes what its
plain counterpart in `method/`, `data/` or a network call computes, and is tested equal to it
(tests/test_fast_paths.py, tests/test_chunk_norm.py). The engine chooses between them."""
