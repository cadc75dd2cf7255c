"""The training loop as the benches that profile it run it (G1): BUARL self-training from
scratch, as `bench/gpu.py`'s G1 (no pre-training), iterations only: no validation, and no
test evaluation at the end of each `run()`."""
from __future__ import annotations

from typing import Callable
from unittest import mock

# BUARL on the BCP base, from the first self-training iteration
G1_SETTINGS = {"base": "bcp", "url": True, "crl": True, "pretrain_iters": 0}


def iterations_only(config: str, settings: dict, engine_class=None) -> tuple[object, Callable[[int], None]]:
    """(loop, steps): the Loop of `config` with G1's settings and `settings` on top (and an
    `engine_class`, an Engine subclass, when given), and `steps(n)`, which runs n more of its
    iterations."""
    import buarl.train as train_module
    from buarl.config import load_config

    cfg = load_config(config, {**G1_SETTINGS, "iters": 10 ** 6, "eval_every": 10 ** 9, "log_every": 10 ** 6,
                               "test_cases": 1, "val_cases": 1, **settings})
    engine = None
    if engine_class is not None:
        from buarl.data import load_benchmark
        data = load_benchmark(cfg)
        engine = engine_class(cfg, data.dim)
        loop = train_module.Loop(cfg, train_module.Reporter(), lambda m: m, data, engine=engine)
    else:
        loop = train_module.Loop(cfg, train_module.Reporter(), lambda m: m)
    loop.validate = lambda stage: None

    def steps(n: int) -> None:
        loop.total = loop.step + n
        with mock.patch.object(train_module, "evaluate", lambda *args, **kwargs: {}):
            loop.run()

    return loop, steps
