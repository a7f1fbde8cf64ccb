"""S4L-Exemplar (Zhai et al. 2019 §3.1): supervised classification plus the Exemplar pretext on the same
network, trained jointly.

Each step, every labeled and unlabeled image of the two batches is turned into ``instances`` (8) heavily
augmented copies (the exemplar pretext's views: Inception crop, flip, HSV jitter); an embedding head beside
the class head maps their features to ``embedding_dim``, and a batch-hard soft-margin triplet loss (Hermans
et al. 2017) treats the copies of one image as one class. The class head is trained with cross-entropy on
all ``instances`` copies of each labeled image (S4L §4.4: "we do apply the supervision loss on all copies of
the labeled images"). L = L_cls + w · L_triplet. ``class_on_views: false`` (not the paper's choice) trains
the class head on one standard crop + flip of each labeled image instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_ops.augment import ExemplarViewParams, exemplar_views, instance_labels
from ssl_ops.heads import Classifier
from ssl_ops.losses import batch_hard_triplet
from ssl_ops.methods._joint import JointMethod, JointParams
from ssl_ops.methods.base import register_method


class S4LExemplarParams(JointParams, ExemplarViewParams):
    """``unlabeled_weight`` (inherited) is w of the triplet loss; the view keys are the exemplar pretext's."""

    class_on_views: bool = True  # class loss on every exemplar copy of the labeled images (S4L §4.4)


@register_method("s4l_exemplar")
class S4LExemplar(JointMethod):
    Params = S4LExemplarParams

    def __init__(self, ctx, params: S4LExemplarParams):
        super().__init__(ctx, params)
        net: Classifier = self.build_classifier()
        self.model = nn.ModuleDict({"net": net, "embedding": nn.Linear(net.backbone.feature_dim,
                                                                       params.embedding_dim)}).to(ctx.device)

    @property
    def images_per_step(self) -> int:
        upright = 0 if self.params.class_on_views else self.ctx.train.batch_size
        return upright + self.params.instances * super().images_per_step

    def classifier(self) -> nn.Module:
        return self.model["net"]

    def training_step(self, step: int) -> dict[str, Tensor]:
        ctx, p = self.ctx, self.params
        # raw labeled images: their exemplar views are made like the unlabeled ones'
        xl, y = ctx.store.sample(ctx.pools["labeled"], ctx.train.batch_size, ctx.generator)
        images = torch.cat([xl, ctx.unlabeled_batch(self.unlabeled_batch_size)])
        views = exemplar_views(images, ctx.generator, p.instances, p.crop_scale, p.hue, p.saturation, p.value,
                               hflip=ctx.train.hflip)
        labels = instance_labels(len(images), p.instances, images.device)
        net = self.model["net"]
        if p.class_on_views:  # copy i of image j is row i * len(images) + j: labeled where j < len(xl)
            features = net.features(views)
            cls = F.cross_entropy(net.fc(features[labels < len(xl)]), y.repeat(p.instances),
                                  label_smoothing=p.label_smoothing)
        else:
            features = net.features(torch.cat([ctx.augment(xl), views]))  # one pass: shared BatchNorm statistics
            cls = F.cross_entropy(net.fc(features[: len(xl)]), y, label_smoothing=p.label_smoothing)
            features = features[len(xl):]
        # the head's output is the embedding itself (Euclidean distances, as the exemplar pretext)
        triplet = batch_hard_triplet(self.model["embedding"](features).float(), labels)
        w = self.unlabeled_weight(step)
        return {"loss": cls + w * triplet, "loss_sup": cls, "loss_triplet": triplet}
