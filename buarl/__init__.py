"""BUARL: Bidirectional Uncertainty-Aware Region Learning for semi-supervised segmentation.

Plain PyTorch: config, data, nets, method, the training loop and the evaluation protocol.
Never imports Ray or MLflow (those live in `orchestrator/`).
"""
__version__ = "0.1.0"
