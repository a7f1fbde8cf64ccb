"""The pipeline stages, one importable function each; the CLI, Optuna, the benchmarks and the tests call these.

- ``ssl_ops.stages.train``: prepare, split, train, evaluate and report (a method's DVC stages);
- ``ssl_ops.stages.pretrain``: self-supervised pre-training of a pretext, its probes, loading the result.

Everything public is re-exported here (``from ssl_ops.stages import train_stage, pretrain_stage``).
This package sits above the params composition (``ssl_ops.params``) and the method/pretext registries;
nothing below it imports it (docs/architecture.md, enforced by tests/test_architecture.py).
"""

from ssl_ops.stages.pretrain import (PRETRAIN_MODELS, PretrainResult, build_pretext, load_pretrained_backbone,
                                     model_path, pretrain_briefly_for, pretrain_stage, probe_encoder)
from ssl_ops.stages.train import (CHECKPOINTS, METRICS, MODELS, REPORTS, TrainResult, build_method, evaluate_stage,
                                  load_data, load_trained, max_class_fraction, prepare_stage, report_stage,
                                  split_stage, train_stage)

__all__ = ["CHECKPOINTS", "METRICS", "MODELS", "PRETRAIN_MODELS", "REPORTS", "PretrainResult", "TrainResult",
           "build_method", "build_pretext", "evaluate_stage", "load_data", "load_pretrained_backbone", "load_trained",
           "max_class_fraction", "model_path", "prepare_stage", "pretrain_briefly_for", "pretrain_stage",
           "probe_encoder", "report_stage", "split_stage", "train_stage"]
