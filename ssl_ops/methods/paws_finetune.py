"""PAWS fine-tuning (Assran et al. 2021, §5): after ``ssl-ops pretrain paws``, the pre-trained backbone plus the
first layer of the PAWS projection head (``finetune_from``, 1 by default) and a **zero-initialised** linear
classifier are fine-tuned with cross-entropy on the labeled split (crop + flip). PAWS-NN, the evaluation that
needs no training, is :func:`ssl_ops.probes.paws_nn_accuracy` (reported by ``ssl-ops pretrain paws``
as ``paws_nn_top1``).

The PAWS checkpoint must come from the same split: its support batches were drawn from that split's labeled
images, so a checkpoint from another split would have seen other labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssl_ops import io
from ssl_ops.errors import CheckpointError, DataIntegrityError, ParamsError
from ssl_ops.heads import Classifier, Normalize
from ssl_ops.methods.base import ClassLossParams, Method, prepared_backbone, register_method


class PawsFinetuneParams(ClassLossParams):
    start_params = ("pretrained",)
    network_from = "pretrained"
    pretrained: Path = Path("models/pretrain/paws.pt")  # written by `ssl-ops pretrain paws` on this split
    finetune_from: int = Field(1, ge=0)  # projection-head layers kept (PAWS §5: the first); 0: none
    weight_decay: float | None = Field(0.0, ge=0)


def load_paws(path: Path, ctx, owner: str = "paws_finetune") -> dict[str, Any]:
    """The PAWS checkpoint ``path`` (``<owner>.pretrained``), checked: a PAWS pre-training of this split and
    dataset, with its projection head, for this run's backbone and width."""
    if not Path(path).exists():
        raise CheckpointError(f"{owner}.pretrained {path} does not exist; run `ssl-ops pretrain paws` on this "
                              "split first (it writes models/pretrain/paws.pt)")
    ck = io.torch_load(path)
    if not isinstance(ck, dict) or ck.get("pretext") != "paws" or "head" not in ck:
        raise CheckpointError(f"{owner}.pretrained {path} is not a PAWS pre-training checkpoint; run `ssl-ops pretrain "
                              "paws` to write models/pretrain/paws.pt")
    if ck.get("split_sha256") != ctx.split.sha256 or ck.get("dataset_sha256") != ctx.data.sha256:
        raise DataIntegrityError(f"{owner}.pretrained {path} was pre-trained on another split or dataset (its support "
                                 "came from that split's labels); pre-train PAWS on this split")
    m = ctx.params.model
    if (ck.get("backbone_name"), ck.get("width")) != (m.backbone, m.width):
        raise CheckpointError(f"{owner}.pretrained {path} holds a {ck.get('backbone_name')} of width "
                              f"{ck.get('width')}, "
                              f"this run builds {m.backbone} of width {m.width}")
    return ck


def paws_classifier(ck: dict[str, Any], ctx, keep: int, owner: str = "paws_finetune") -> Classifier:
    """PAWS §5's fine-tuning network from a PAWS checkpoint: the pre-trained backbone, the first ``keep``
    projection-head layers and a zero-initialised linear classifier, on ``ctx``'s device."""
    pp = ck["params"]["paws"]
    if keep > pp["head_layers"]:
        raise ParamsError(f"{owner}.finetune_from={keep} but the head has {pp['head_layers']} layers")
    neck = {"layers": pp["head_layers"], "out_dim": pp["proj_dim"], "keep": keep}
    last = f"projection.layers.{pp['head_layers'] - 1}.1.weight"  # BN after the output layer: made before
    if keep == pp["head_layers"] and last not in ck["head"]:  # appendix A's hidden-only BN
        neck["out_bn"] = False
    net = Classifier(Normalize(ctx.data.mean, ctx.data.std), ctx.build_backbone(), ctx.num_classes, neck_spec=neck)
    net.backbone.load_state_dict(ck["backbone"])
    if net.neck is not None:  # head keys "projection.layers.<i>.<j>.*" -> neck keys "<i>.<j>.*"
        prefix = "projection.layers."
        net.neck.load_state_dict({k.removeprefix(prefix): v for k, v in ck["head"].items()
                                  if k.startswith(prefix) and int(k.split(".")[2]) < keep})
    nn.init.zeros_(net.fc.weight)  # PAWS §5: zero-initialised linear classifier
    nn.init.zeros_(net.fc.bias)
    return net.to(ctx.device)


@register_method("paws_finetune")
class PawsFinetune(Method):
    Params = PawsFinetuneParams
    pretext = "paws"  # the pre-training it starts from (tests pre-train it first)

    def __init__(self, ctx, params: PawsFinetuneParams):
        super().__init__(ctx, params)
        self.model = paws_classifier(load_paws(params.pretrained, ctx), ctx, params.finetune_from)
        prepared_backbone(self.model.backbone, params, self.name)  # freeze_blocks (init is refused)

    def training_step(self, step: int) -> dict[str, Tensor]:
        x, y = self.ctx.labeled_batch(self.ctx.train.batch_size)  # crop + flip
        return {"loss": F.cross_entropy(self.model(x), y, label_smoothing=self.params.label_smoothing)}
