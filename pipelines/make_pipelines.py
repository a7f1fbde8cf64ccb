"""The one way to write the paper pipelines: ``pipelines/<name>/{dvc.yaml, params.yaml, <stage>.yaml}``.

    python pipelines/make_pipelines.py           # (re)write every pipeline folder from PIPELINES below
    python pipelines/make_pipelines.py --check   # exit 1 naming each file that differs (the tests run this)

Edit the specs here, never the generated files. Each folder's ``paper.yaml`` is NOT generated: it is the
hand-written table of the paper's values (key, value, paper, section) that ``tests/test_paper_pipelines.py``
compares with the params each stage resolves, so a drift between the two fails.

A stage whose settings differ from the shared ``train`` section only for itself (RotNet's step schedule, the
MOAM steps' warm-ups) reads an overlay ``<stage>.yaml`` next to params.yaml through ``--preset``; PAWS's
pre-training reads ``presets/paws_cifar10.yaml`` itself (one source of truth for PAWS appendix C). Overlays
never change data or split (the test checks): every stage must see the split the split stage wrote.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PAWS_PRESET = "../../presets/paws_cifar10.yaml"  # relative to a pipeline folder

# The train section every pipeline starts from (GPU-scale; a stage's own section overrides epochs, lr, ...).
TRAIN = dict(device="auto", amp=True, seed=0, epochs=100, steps_per_epoch=500, batch_size=64, eval_batch_size=1024,
             optimizer="sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
             warmup_epochs=1.0, crop_padding=4, hflip=True, progress=False)


@dataclass
class Stage:
    verb: str  # "pretrain" or "train"
    method: str  # pretext or method name; also its params section
    section: dict = field(default_factory=dict)  # params.yaml's section for it
    overlay: dict | None = None  # written to <stage>.yaml and passed with --preset (train-level settings)
    preset: str | None = None  # an existing params file passed with --preset instead (PAWS appendix C)
    needs: tuple[str, ...] = ()  # model files this stage starts from
    note: str = ""

    @property
    def name(self) -> str:
        return f"pretrain_{self.method}" if self.verb == "pretrain" else f"train_{self.method}"

    @property
    def out(self) -> str:
        return f"models/pretrain/{self.method}.pt" if self.verb == "pretrain" else f"models/{self.method}.pt"

    @property
    def presets(self) -> list[str]:
        return [self.preset] if self.preset else [f"{self.name}.yaml"] if self.overlay else []


@dataclass
class Pipeline:
    name: str
    title: str
    source: str
    target: str  # the number, its table and paper
    target_test_top1: float | None
    dataset: str
    labels_per_class: int
    backbone: str
    experiment: str
    stages: list[Stage]
    train: dict = field(default_factory=dict)  # overrides of TRAIN
    hflip: bool = True


# Rebuffi et al. §4.6: RotNet "trained for 200 epochs with a step-wise decaying learning rate starting from 0.1
# at epochs 60, 120, and 160" (§4: Nesterov). One epoch = one pass over the 50,000 train images at batch 128
# (the batch is not stated: our choice) = 391 steps. The decay factor is not stated: train.gamma, choose on val.
ROTNET = Stage("pretrain", "rotation", dict(epochs=200, steps_per_epoch=391, batch_size=128, lr=0.1, warmup_epochs=0),
               overlay={"train": {"schedule": "step", "milestones": [0.3, 0.6, 0.8], "gamma": 0.1}})
SUPERVISED = Stage("train", "supervised", {}, note="baseline: the labeled split alone, same backbone and budget")
ROT = ("models/pretrain/rotation.pt",)
# Rebuffi §3.2, phase two: "fine-tune the whole architecture on the unlabelled set" (no true-labeled batches);
# Alg. 1 l.8 re-initialises N_t, its classification layer included (only the pseudo-labels cross over)
ALTERNATING = dict(init=ROT[0], freeze_blocks=2, labeled_batch_size=0, reset_classifier=True)


def _mean_teacher_refine(name: str, dataset: str, lpc: int, top1: float, mt: str) -> Pipeline:
    table = f"Rebuffi et al. Table 1, {dataset.upper().replace('CIFAR', 'CIFAR-')}, {lpc} labels per class"
    return Pipeline(
        name=name,
        title=f"{dataset.upper().replace('CIFAR', 'CIFAR-')}, {lpc} labels per class, ResNet-18: RotNet, Mean Teacher "
              "with T.L. (first two blocks frozen), then alternating optimisation as refinement",
        source="Rebuffi et al. 2020, Semi-supervised learning with scarce annotations: §4.1 (Mean Teacher with T.L.), "
               "§4.3 and Table 1 (MT + Self-Sup + Refinement)",
        target=f"{top1 * 100:.1f}% top-1 ({table}: MT + Self-Sup + Refinement; the Mean Teacher stage alone, "
               f"MT + Self-Sup, {mt}%)",
        target_test_top1=top1, dataset=dataset, labels_per_class=lpc, backbone="resnet18_cifar",
        experiment=f"paper-rebuffi-{dataset}-{lpc}pc-refine",
        stages=[ROTNET, SUPERVISED,
                Stage("train", "mean_teacher", dict(init=ROT[0], freeze_blocks=2), needs=ROT),
                # §4.3: "we do not use the dataset random splitting ... and we choose soft labels assignment"
                # the network comes whole from the Mean Teacher (init: null; it started from the RotNet)
                Stage("train", "alternating", dict(ALTERNATING, init=None, refine=True, labels="soft", split=False,
                                                   teacher="models/mean_teacher.pt"),
                      needs=(*ROT, "models/mean_teacher.pt"))])


PIPELINES = [
    Pipeline(
        name="rebuffi_cifar10_rotnet_alternating",
        title="CIFAR-10, 10 labels per class, ResNet-18: RotNet pre-training, then alternating optimisation",
        source="Rebuffi et al. 2020, Semi-supervised learning with scarce annotations: §3 (Algorithm 1), §4 "
               "implementation details, §4.6 (RotNet schedule), Table 3",
        target="83.6% top-1 = 100% - 16.4 ± 2.6% error (Rebuffi et al. Table 3: CIFAR-10, ResNet-18, N = 10 labels "
               "per class, RotNet pre-trained, first two blocks frozen)",
        target_test_top1=0.836, dataset="cifar10", labels_per_class=10, backbone="resnet18_cifar",
        experiment="paper-rebuffi-cifar10-10pc",
        stages=[ROTNET, SUPERVISED, Stage("train", "alternating", ALTERNATING, needs=ROT)]),
    # Rebuffi et al. Table 1: MT + Self-Sup + Refinement (and MT + Self-Sup) top-1
    _mean_teacher_refine("meanteacher_cifar10_refine", "cifar10", 10, 0.877, "86.4"),
    _mean_teacher_refine("meanteacher_cifar100_refine", "cifar100", 10, 0.583, "53.7"),
    _mean_teacher_refine("meanteacher_cifar100_25pc_refine", "cifar100", 25, 0.639, "60.7"),
    Pipeline(
        name="meanteacher_svhn_1000",
        title="SVHN, 1000 labels (100 per class), WRN-28-2: Mean Teacher",
        source="Tarvainen & Valpola 2017 (Mean Teacher), SVHN with 1000 labels; not one of the five papers in "
               "shared/papers (Rebuffi et al. Fig. 3 plots Mean Teacher on SVHN, without a table)",
        target="none checkable: no table in the five papers gives SVHN at 100 labels per class; the pipeline's own "
               "supervised stage (same split, backbone and budget) is the number Mean Teacher must beat",
        target_test_top1=None, dataset="svhn", labels_per_class=100, backbone="wrn28_2",
        experiment="paper-meanteacher-svhn-1000", hflip=False,
        stages=[SUPERVISED, Stage("train", "mean_teacher")]),
    Pipeline(
        name="paws_cifar10_4000_wrn28_2",
        title="CIFAR-10, 4000 labels (400 per class), WRN-28-2: PAWS pre-training, evaluated as PAWS-NN",
        source="Assran et al. 2021 (PAWS), appendix C: recipe in presets/paws_cifar10.yaml; PAWS-NN on the 4000 "
               "labeled images as support is in the pretrain stage's metrics (paws_nn_top1)",
        target="96.0 ± 0.2% top-1 (PAWS Fig. 7 / Table 7a: PAWS-NN, WRN-28-2, CIFAR-10, 4000 labels, 600 epochs, "
               "5 seeds)",
        target_test_top1=0.96, dataset="cifar10", labels_per_class=400, backbone="wrn28_2",
        experiment="paper-paws-cifar10-4000",
        stages=[SUPERVISED, Stage("pretrain", "paws", preset=PAWS_PRESET),
                Stage("train", "paws_finetune", dict(pretrained="models/pretrain/paws.pt"),
                      needs=("models/pretrain/paws.pt",),
                      note="not in the paper (PAWS-NN only on CIFAR-10): a linear-head fine-tune for the registry")]),
    Pipeline(
        name="s4l_vat_cifar10_4000",
        title="CIFAR-10, 4000 labels (400 per class), WRN-28-2: VAT (no EntMin), S4L's check of its VAT",
        source="Zhai et al. 2019 (S4L) §4.2: 'We first verify our VAT implementation on CIFAR-10'; the network is "
               "not named there (WRN-28-2 is the one PAWS Fig. 7a's VAT + EntMin row uses)",
        target="86.41% top-1 (S4L §4.2: VAT, CIFAR-10, 4000 labels; 86.13% in the work S4L cites). VAT + EntMin on "
               "WRN-28-2: 86.9 ± 0.4% (PAWS Fig. 7 / Table 7a, 123 epochs)",
        target_test_top1=0.8641, dataset="cifar10", labels_per_class=400, backbone="wrn28_2",
        experiment="paper-s4l-vat-cifar10-4000",
        # eps and the EntMin weight are chosen on val from S4L §4.2's grids (its eps grid is in ImageNet pixels)
        stages=[SUPERVISED, Stage("train", "vat", dict(entmin_weight=0.0))]),
    Pipeline(
        name="s4l_moam_cifar10_4000",
        title="CIFAR-10, 4000 labels (400 per class), WRN-28-2: MOAM (S4L-Rotation + VAT + EntMin, retrain on "
              "pseudo-labels, fine-tune on the labels)",
        source="Zhai et al. 2019 (S4L) §5, steps 1-3 (ILSVRC-2012 recipe on CIFAR-10; S4L's network, a 4x wider "
               "ResNet50v2, is replaced by WRN-28-2 to fit one GPU)",
        target="none in S4L for CIFAR-10 (MOAM is reported on ILSVRC-2012 only, Table 2); MOAM must beat this "
               "pipeline's supervised stage and S4L §4.2's VAT on CIFAR-10 with 4000 labels, 86.41% top-1",
        target_test_top1=None, dataset="cifar10", labels_per_class=400, backbone="wrn28_2",
        experiment="paper-s4l-moam-cifar10-4000",
        stages=[SUPERVISED,
                # Step 1: batch 128, lr 0.1, wd 2e-4, 200 epochs of the labeled data (4000 / 128 -> 32 steps),
                # warm-up to epoch 10, 10-fold decays at 100, 150, 190 (moam.schedule / milestones' defaults, gamma
                # train's); w_sup 0.3, w_rot 0.7, w_vat 0.3, w_entmin 0.3, fixed (no ramp-up: not the project's
                # default); Polyak decay 0.5^(1/steps_per_epoch); §4.4: the class loss on all four rotated copies
                # (the project's default is upright only, and step 2's rotations=True assumes a classifier of them)
                Stage("train", "moam", dict(epochs=200, steps_per_epoch=32, batch_size=128, lr=0.1, weight_decay=2e-4,
                                            w_sup=0.3, w_rot=0.7, w_vat=0.3, w_entmin=0.3, rampup_epochs=0.0,
                                            class_on_rotations=True, ema_decay=None),
                      overlay={"train": {"warmup_epochs": 10}}),
                # Step 2: pseudo-labels from five crops x four rotations; "an epoch now corresponds to the full
                # dataset": 18 epochs of 50,000 / 128 -> 391 steps, decays after 6 and 12 (moam_retrain's defaults);
                # no warm-up named for this step (a choice: the overlay clears train's 1 epoch)
                Stage("train", "moam_retrain", dict(epochs=18, steps_per_epoch=391, batch_size=128, lr=0.1,
                                                    weight_decay=2e-4, crops=5, flip_crops=False, rotations=True),
                      overlay={"train": {"warmup_epochs": 0}}, needs=("models/moam.pt",)),
                # Step 3: the labels only, wd 3e-3, lr 5e-4 (set: lr_scale x train.lr assumes train.lr = 0.1), 20
                # epochs, 10-fold decay every 5 epochs, no warm-up (moam_finetune's defaults)
                Stage("train", "moam_finetune", dict(epochs=20, steps_per_epoch=32, batch_size=128, lr=5e-4,
                                                     weight_decay=3e-3), needs=("models/moam_retrain.pt",))]),
    Pipeline(
        name="simclrv2_cifar10_4000_resnet18",
        title="CIFAR-10, 4000 labels (400 per class), CIFAR ResNet-18: SimCLR pre-training, SimCLRv2 fine-tuning "
              "from the head's first layer, then self-distillation",
        source="Chen et al. 2020b (SimCLRv2) §2-§4 (ImageNet recipe: 800 epochs, LARS at 0.1 x sqrt(B), 5% warm-up, "
               "wd 1e-4; fine-tune at 0.005 x sqrt(B) without wd or warm-up; distil 400 epochs at tau 0.1); the "
               "CIFAR-10 number is quoted by PAWS",
        target="92.1% top-1 (PAWS Fig. 7 / Table 7b: SimCLRv2, ResNet-18 (+SK), 12M params, 800 epochs, CIFAR-10, "
               "4000 labels; our ResNet-18 has no selective kernels)",
        target_test_top1=0.921, dataset="cifar10", labels_per_class=400, backbone="resnet18_cifar",
        experiment="paper-simclrv2-cifar10-4000",
        # batch 1024 (SimCLRv2 uses 4096 on 128 TPUs; our choice for one GPU): 50,000 / 1024 -> 49 steps an epoch
        stages=[SUPERVISED,
                Stage("pretrain", "simclr", dict(epochs=800, steps_per_epoch=49, batch_size=1024, optimizer="lars",
                                                 lr_scale=0.1, warmup_fraction=0.05, weight_decay=1e-4,
                                                 head_layers=3)),
                # fine-tune phase: teacher_epochs x 49 steps at batch 1024 = 147 steps, ~37 passes over the 4000
                # labels (§2: 30 epochs at 10% of the labels, 60 at 1%); then 400 epochs of distillation
                Stage("train", "simclrv2", dict(pretrained="models/pretrain/simclr.pt", finetune_from=1,
                                                finetune_lr_scale=0.005, weight_decay=0.0, warmup_epochs=0.0,
                                                distill=True, teacher_epochs=3, temperature=0.1, epochs=400,
                                                steps_per_epoch=49, batch_size=1024,
                                                # §3 distillation: LARS, "the same ... weight decay ... as pretraining"
                                                distill_optimizer="lars", distill_weight_decay=1e-4),
                      needs=("models/pretrain/simclr.pt",))]),
    Pipeline(
        name="noroozi_cifar10_cluster_transfer",
        title="CIFAR-10, 4000 labels (400 per class), CIFAR ResNet-18: Jigsaw++ pre-training, k-means cluster "
              "classification, then fine-tuning on the labels",
        source="Noroozi et al. 2018, Boosting self-supervised learning via knowledge transfer: §3 (cluster "
               "classification), §4 (Jigsaw++: 701 permutations, minimum Hamming distance 3)",
        target="none in the paper for CIFAR-10 (its numbers are PASCAL VOC and ImageNet / Places linear probes, "
               "Tables 3-6); cluster transfer must beat this pipeline's supervised stage",
        target_test_top1=None, dataset="cifar10", labels_per_class=400, backbone="resnet18_cifar",
        experiment="paper-noroozi-cifar10-4000",
        # Jigsaw++'s training length is not in the paper: 100 passes over the 50,000 images at 128 puzzles (a choice);
        # nor is cluster classification's (§3 (d), "standard" ImageNet settings): 100 epochs of 500 steps at 64, as
        # long as the fine-tune after it (a choice: check its logged loss has flattened). k: null keeps §5's
        # 650 images per cluster; conv4 is the block before the last, max-pooled to 4 x 4 (feature_* defaults)
        stages=[SUPERVISED, Stage("pretrain", "jigsaw_pp", dict(epochs=100, steps_per_epoch=391, batch_size=128,
                                                                permutations=701, min_hamming=3)),
                Stage("train", "cluster_transfer", dict(source="pretext", pretrained="models/pretrain/jigsaw_pp.pt",
                                                        cluster_epochs=100),
                      needs=("models/pretrain/jigsaw_pp.pt",))]),
]


# Pipeline folders that are not paper reproductions and are written by hand (the generator leaves them alone).
NOT_GENERATED = {"fmnist_10pc": "issue 17's Fashion-MNIST campaign (every method x split), run through its run.sh"}

# ---------------------------------------------------------------------------------------------------------
# writing


def _params(p: Pipeline) -> dict:
    train = {**TRAIN, **p.train, "hflip": p.hflip}
    out = {"data": {"name": p.dataset, "download": True, "max_in_memory_gb": 8.0},
           "split": {"labels_per_class": p.labels_per_class, "val_per_class": 5, "seed": 0},
           "model": {"backbone": p.backbone, "width": 1.0},
           "train": train,
           "tracking": {"experiment": p.experiment, "log_model": True}}
    for s in p.stages:
        out[s.method] = copy.deepcopy(s.section)
    return out


def _stage_params(p: Pipeline, s: Stage) -> list:
    return ["data.name", "split", "model", "train", "tracking", s.method, *({f: None} for f in s.presets)]


def _dvc(p: Pipeline) -> dict:
    data = f"data/prepared/{p.dataset}"
    stages: dict = {
        "prepare": {"cmd": "ssl-ops prepare", "deps": ["../../ssl_ops"], "params": ["data"], "outs": [data]},
        "split": {"cmd": "ssl-ops split", "deps": ["../../ssl_ops", data], "params": ["data.name", "split"],
                  "outs": ["data/splits"]}}
    for s in p.stages:
        presets = "".join(f" --preset {f}" for f in s.presets)
        deps = ["../../ssl_ops", data, "data/splits", *s.needs]
        stage = {"cmd": f"ssl-ops {s.verb} {s.method}{presets} --no-progress", "deps": deps,
                 "params": _stage_params(p, s)}
        if s.verb == "pretrain":
            metrics = [{f"metrics/pretrain_{s.method}.json": {"cache": False}}]
            stages[s.name] = {**stage, "outs": [s.out], "metrics": metrics}
            continue
        stages[s.name] = {**stage, "outs": [s.out, {f"models/{s.method}.json": {"cache": False}}]}
        stages[f"evaluate_{s.method}"] = {
            "cmd": f"ssl-ops evaluate {s.method}{presets}", "deps": ["../../ssl_ops", s.out, data, "data/splits"],
            "params": ["data.name", "split", *({f: None} for f in s.presets)],
            "metrics": [{f"metrics/{s.method}.json": {"cache": False}}]}
    stages["report"] = {"cmd": "ssl-ops report --quiet", "deps": ["../../ssl_ops", "metrics"],
                        "params": ["data.name", "tracking"], "outs": [{"reports": {"cache": False}}]}
    return {"vars": [{"paper": {"title": p.title, "source": p.source, "target": p.target,
                                "target_test_top1": p.target_test_top1, "table": "paper.yaml"}}],
            "stages": stages}


def _dump(tree: dict) -> str:
    return yaml.safe_dump(tree, sort_keys=False, width=120, allow_unicode=True)


def _header(p: Pipeline, what: str) -> str:
    lines = [f"# GENERATED by pipelines/make_pipelines.py ({what}): edit the spec there and rerun it, not this file.",
             f"# {p.title}", f"# Reproduces: {p.source}", f"# Target: {p.target}",
             "# The paper's values these params must keep, with their sections: paper.yaml "
             "(tests/test_paper_pipelines.py)."]
    if what == "dvc.yaml":
        lines += ["# Run on a GPU machine from this folder:  dvc repro   (params: params.yaml here; data under ./data)",
                  "# Check the graph without running:       dvc repro --dry --force"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# GPU-hours estimate (no GPU was measured: an assumed throughput times the images each stage pushes through)

# Assumed: 10,000 32x32 images/s forward + backward with AMP for the CIFAR ResNet-18 / WRN-28-2 on one current
# data-centre GPU (A100 / H100 class). Not measured here; rescale the table by (10,000 / your rate).
IMAGES_PER_SECOND = 10_000
# forward+backward image-equivalents per image of a step's batch (mirrors each method's images_per_step; a
# no-grad forward counts 1/3; VAT adds a power-iteration and an adversarial pass on the unlabeled half)
COST = {"supervised": 1, "rotation": 4, "simclr": 2, "jigsaw_pp": 9 * (15 / 32) ** 2, "paws_finetune": 1,
        "mean_teacher": 2 + 1 / 3, "alternating": 1, "vat": 1 + 1 / 3 + 2, "moam": 4 + 4 + 1 / 3 + 2,
        "moam_retrain": 4 + 4 + 1 / 3 + 2, "moam_finetune": 4, "simclrv2": 1 + 1 / 3, "cluster_transfer": 1}


def estimate(p: Pipeline) -> list[tuple[str, int, int, float]]:
    """(stage, optimiser steps, batch, GPU-hours) per training stage, from the params each stage resolves."""
    sys.path.insert(0, str(HERE.parent))
    from ssl_ops.params import load_params

    out = []
    for s in p.stages:
        params = load_params(HERE / p.name / "params.yaml", presets=[HERE / p.name / f for f in s.presets])
        train = getattr(params, s.method).train_params(params.train)
        steps = train.epochs * train.steps_per_epoch
        if s.method != "paws":
            per_step = train.batch_size * COST[s.method]
        else:  # large + small crops ((18/32)^2 of a large one's cost) and the 2-view support
            sec = params.paws
            per_step = train.batch_size * (2 + sec.small_crops * (sec.small_size / 32) ** 2) \
                + (sec.support_classes or 10) * sec.support_per_class * sec.support_views
        out.append((s.name, steps, train.batch_size, steps * per_step / IMAGES_PER_SECOND / 3600))
    return out


README_HEAD = """# Paper-reproduction pipelines

GENERATED by `pipelines/make_pipelines.py` (the specs live there; `--check` is run by
`tests/test_paper_pipelines.py`). One folder per pipeline, each a DVC pipeline with GPU-scale params:

- `dvc.yaml` (stages; `vars: paper:` names the paper, the target number and its table), `params.yaml`,
  and `<stage>.yaml` overlays for settings one stage alone needs (passed with `--preset`; the PAWS stage reads
  `presets/paws_cifar10.yaml`);
- `paper.yaml`: hand-written table of the paper's values (key, value, paper, section), each read in
  `/work/shared/papers/`. The test resolves every stage's params and compares them, so a drift fails. Rows
  marked `pending` are paper settings that have no param yet; the test fails the day one can be set, and
  the row must then be promoted. `notes:` there says which paper settings are built in (no row to check).

Run one on a GPU machine from its folder: `cd pipelines/<name> && dvc repro` (data, models, MLflow store and
reports stay inside the folder); `dvc repro --dry --force` prints the plan. The default CPU pipeline is the
top-level `dvc.yaml`.

| pipeline | setting | target (test top-1) | source | training stages: steps x batch | GPU-hours (estimate) |
|---|---|---|---|---|---|
"""

README_TAIL = f"""
**GPU-hours are estimates, not measurements** (no GPU was available when they were written): for each training
stage, optimiser steps x batch x a per-method cost in forward+backward image-equivalents (`COST` in
`make_pipelines.py`: 4 for RotNet's four rotations, 2 + 6 x (18/32)^2 crops plus the 1,280-image support for
PAWS, VAT's extra passes, a no-grad teacher forward = 1/3, ...), divided by an assumed {IMAGES_PER_SECOND:,}
images/s for a CIFAR ResNet-18 / WRN-28-2 with AMP on one A100/H100-class GPU. Evaluation, pseudo-labelling
passes, k-means and data preparation are left out. Rescale by (10,000 / the rate you measure).

Not generated here: {", ".join(f"`{k}` ({v})" for k, v in NOT_GENERATED.items())}.

Paper settings that are choices here (not in the text; choose on val where it matters): RotNet's batch (128)
and decay factor (`train.gamma`, Rebuffi §4.6 gives the epochs only); the semi-supervised stages' schedules in
the Rebuffi pipelines; S4L's network (4x wider ResNet50v2 on ImageNet; WRN-28-2 here) and its inception crops
(our crops are pad-and-crop); SimCLRv2's batch (4096 on 128 TPUs in §4; 1024 here) and the fine-tuning length in
steps of the shared `steps_per_epoch`; Noroozi's k (2000 on ImageNet; `k: null` keeps its 650 images per
cluster), the clustered block and its pooling grid, source/target networks (AlexNet / VGG16 there; ResNet-18
here), Jigsaw++'s training length and cluster classification's (`cluster_epochs`); VAT's eps and EntMin
weight (S4L §4.2 grids, chosen on val).
"""


def readme() -> str:
    rows = []
    for p in PIPELINES:
        est = estimate(p)
        top1 = f"{p.target_test_top1:.1%}" if p.target_test_top1 is not None else "none (see target)"
        target = yaml.safe_load((HERE / p.name / "paper.yaml").read_text())["target"]
        table = f"{target['paper']}: {target['section']}"
        budget = "; ".join(f"{name.split('_', 1)[1]} {steps:,} x {batch}" for name, steps, batch, _ in est)
        rows.append(f"| `{p.name}` | {p.title} | {top1} | {table} | {budget} | {sum(h for *_, h in est):.1f} |")
    return README_HEAD + "\n".join(rows) + "\n" + README_TAIL


def render(p: Pipeline) -> dict[str, str]:
    """File name -> text for one pipeline folder."""
    files = {"dvc.yaml": _header(p, "dvc.yaml") + _dump(_dvc(p))}
    notes = [f"# {s.name}: {s.note}" for s in p.stages if s.note]
    files["params.yaml"] = (_header(p, "params.yaml") + "\n".join(notes) + ("\n" if notes else "")
                            + "# A stage's own section overrides train.<key> (epochs, steps_per_epoch, batch_size, lr);"
                            "\n# an 'epoch' is steps_per_epoch optimiser steps.\n" + _dump(_params(p)))
    for s in p.stages:
        if s.overlay:
            files[f"{s.name}.yaml"] = (_header(p, f"overlay of the {s.name} stage, passed with --preset")
                                       + "# what differs from params.yaml for this stage only\n" + _dump(s.overlay))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file differs")
    args = parser.parse_args(argv)
    stale = []
    for p in PIPELINES:
        folder = HERE / p.name
        files = render(p)
        for fname, text in files.items():
            path = folder / fname
            if path.exists() and path.read_text() == text:
                continue
            stale.append(str(path.relative_to(HERE.parent)))
            if not args.check:
                folder.mkdir(exist_ok=True)
                path.write_text(text)
        # an overlay the spec no longer writes (it would linger unread, looking like a live setting)
        for path in [*folder.glob("train_*.yaml"), *folder.glob("pretrain_*.yaml")]:
            if path.name not in files:
                stale.append(f"{path.relative_to(HERE.parent)} (no longer generated)")
                if not args.check:
                    path.unlink()
    text = readme()  # after the folders: it resolves their params
    if (HERE / "README.md").read_text() != text:
        stale.append("pipelines/README.md")
        if not args.check:
            (HERE / "README.md").write_text(text)
    known = {p.name for p in PIPELINES} | set(NOT_GENERATED)
    strays = [d.name for d in HERE.iterdir() if (d / "dvc.yaml").exists() and d.name not in known]
    if args.check and (stale or strays):
        print("out of date (run python pipelines/make_pipelines.py): " + ", ".join(stale + strays), file=sys.stderr)
        return 1
    if strays:
        print(f"folders not in PIPELINES (remove them or add a spec): {strays}", file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(PIPELINES)} pipelines; {len(stale)} files changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
