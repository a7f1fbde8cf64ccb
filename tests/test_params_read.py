"""Every key of a method's or a pretext's params is read by the run it configures, or refused when set.

A key that nothing reads lets a run log a value it did not run with: mean_teacher_refine logged alternating's hard
labels and random split while it ran soft labels without one, alternating's refine mode did the same, and
simclrv2, paws_finetune and paws_distill logged ``freeze_blocks`` and trained every block. The property checked:
in a short run (``ssl-ops train`` / ``ssl-ops pretrain`` on digits, its pre-phases and evaluation included) the
method reads each field of its params section, except
- the fields shared with the ``train`` section, which reach the engine through ``MethodParams.train_params`` (a
  dump, which the spy below does not see);
- the keys of a mode (``MODES``): a second run in that mode must read them, so the list cannot go stale;
- the keys the params refuse away from their defaults (``REFUSED``): setting one must be a ``ParamsError``.
The shared ``train`` section, as the method's overrides leave it, is held to the same rule (``_train_unread``):
exemplar and S4L-Exemplar mirrored their copies whatever ``train.hflip`` said.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ssl_ops.errors import ParamsError
from ssl_ops.methods import METHODS
from ssl_ops.params import TrainParams
from ssl_ops.pretexts import PRETEXTS
from ssl_ops.stages import evaluate_stage, train_stage
from ssl_ops.stages.pretrain import pretrain_briefly_for, pretrain_stage


def _short(name: str) -> tuple[str, ...]:
    """A run of two steps: the section's own length keys win over train's (params.yaml sets some)."""
    return ("train.epochs=1", "train.steps_per_epoch=2", f"{name}.epochs=1", f"{name}.steps_per_epoch=2",
            f"{name}.batch_size=8")


# keys read only in a mode: the overrides that turn it on, the keys a run in it must read, and the keys it leaves
# unread, each of which the default run reads (so every key is read in some mode) and the mode may refuse when set
MODES: dict[str, tuple[tuple[str, ...], set[str], set[str]]] = {
    "alternating": (("alternating.refine=true", "alternating.labels=soft", "alternating.split=false",
                     "alternating.init=null"), {"teacher"},
                    {"init", "subset_fraction", "full_set_cycles"}),  # refused there when set (tests/test_alternating)
    "cluster_transfer": (("cluster_transfer.source=hog",), {"hog_orientations", "hog_cell", "hog_block", "hog_words"},
                         {"pretrained", "feature_block", "feature_grid"}),  # the pretext source's
    "paws": (("paws.supcon_steps=2",), {"supcon_lr", "supcon_classes", "supcon_per_class", "supcon_temperature"},
             set()),
    "simclr": (("simclr.memory=32",), {"ema_decay"}, set()),  # the MoCo key encoder's EMA (SimCLRv2 §2)
    "simclrv2": (("simclrv2.distill=true",), {  # the teacher's fine-tuning and the student (SimCLRv2 §3)
        "teacher", "teacher_epochs", "temperature", "alpha", "unlabeled_batch_size", "distill_labeled",
        "distill_lr", "distill_lr_scale", "distill_optimizer", "distill_trust_all", "distill_warmup_fraction",
        "distill_weight_decay", "student_backbone", "student_width", "student_init"}, set()),
}
# keys a method refuses away from their defaults (nothing would read them): a value each must be refused at
REFUSED: dict[str, dict[str, str]] = {
    "mean_teacher_refine": {"init": "models/pretrain/rotation.pt", "teacher": "models/other.pt",
                            "subset_fraction": "0.5", "full_set_cycles": "2"},
}


# where a method makes its own views (random resized crops) instead of the padded crop of `train.crop_padding`
OWN_VIEWS = {"exemplar": {"crop_padding"}, "s4l_exemplar": {"crop_padding"}, "paws": {"crop_padding"},
             "simclr": {"crop_padding"}, "jigsaw_pp": {"crop_padding", "hflip"}}  # Jigsaw++ tiles: never mirrored


def _train_unread(name: str, train: TrainParams) -> set[str]:
    """The train keys a run of ``name`` with these (merged) train settings has no use for."""
    return (OWN_VIEWS.get(name, set()) | ({"gamma"} if train.schedule != "step" else set())
            | ({"nesterov"} if train.optimizer == "lars" else set()))


# the functions that may read the precision keys: ``engine.use_amp`` reads ``train.amp`` on CUDA and ``amp_cpu`` on
# the CPU (tests/test_engine.py checks both), so a run whose every read of ``amp_cpu`` is there reads ``amp`` on CUDA
AMP_READERS = {"use_amp", "check_amp_cpu"}


@contextmanager
def _spy_reads(monkeypatch, models: list[type], amp_readers: set[str] | None = None) -> Iterator[dict[type, set[str]]]:
    """While open, the names of the fields of ``models`` read by attribute, per model; ``amp_readers`` collects the
    names of the functions that read ``train.amp_cpu``. The spies go on the classes, so set them after validation:
    validators do not count."""
    read: dict[type, set[str]] = {model: set() for model in models}

    def spy_on(model: type):
        fields = set(model.model_fields)

        def spy(self, attr: str):
            if attr in fields:
                read[model].add(attr)
                if amp_readers is not None and model is TrainParams and attr == "amp_cpu":
                    amp_readers.add(sys._getframe(1).f_code.co_name)
            return object.__getattribute__(self, attr)
        return spy

    with monkeypatch.context() as m:
        for model in read:
            m.setattr(model, "__getattribute__", spy_on(model))
        yield read


def _fields_read(name: str, params, monkeypatch, amp_readers: set[str] | None = None) -> tuple[set[str], set[str]]:
    """The fields of ``params.<name>`` and of the train settings that a short run of ``name`` reads by attribute
    (its pre-phases, training, evaluation and outputs). ``amp_readers``: as ``_spy_reads``'s."""
    cls = type(getattr(params, name))
    with _spy_reads(monkeypatch, [cls, TrainParams], amp_readers) as read:
        (pretrain_stage if name in PRETEXTS else train_stage)(name, params)
    return read[cls], read[TrainParams]


@pytest.mark.parametrize("name", sorted(METHODS) + sorted(PRETEXTS))
def test_every_param_is_read_by_the_run_or_refused(workdir, tiny, monkeypatch, name):
    if name in METHODS:
        pretrain_briefly_for(name, tiny)  # the checkpoint it starts from, where it looks for it
    params = tiny(*_short(name))
    fields = set(type(getattr(params, name)).model_fields)
    mode_overrides, mode_keys, unread_in_mode = MODES.get(name, ((), set(), set()))
    refused = REFUSED.get(name, {})
    assert (mode_keys | set(refused)) <= fields, "MODES / REFUSED name a key the params do not have"
    amp_readers: set[str] = set()
    section_read, train_read = _fields_read(name, params, monkeypatch, amp_readers)
    unread = fields - section_read - set(TrainParams.model_fields)
    assert unread == mode_keys | set(refused), f"{name}: read by nothing in this run: {sorted(unread)}"
    train = getattr(params, name).train_params(params.train)
    # amp: read on CUDA only (CI has none), by use_amp; so every read of amp_cpu must go through use_amp as well, or a
    # method could pick its precision on its own and ignore train.amp on CUDA
    assert amp_readers and amp_readers <= AMP_READERS, f"{name}: train.amp_cpu read outside use_amp: {amp_readers}"
    train_unread = set(TrainParams.model_fields) - train_read - {"amp"}
    assert train_unread == _train_unread(name, train), f"{name}: train keys read by nothing: {sorted(train_unread)}"
    if mode_keys:
        if name == "alternating":  # refine mode starts from a trained Mean Teacher
            train_stage("mean_teacher", tiny(*_short("mean_teacher")))
        in_mode = fields - _fields_read(name, tiny(*_short(name), *mode_overrides), monkeypatch)[0]
        in_mode -= set(TrainParams.model_fields)
        assert not mode_keys & in_mode, f"{name} with {mode_overrides}: read by nothing there either"
        assert in_mode == unread_in_mode, f"{name} with {mode_overrides}: read by nothing there: {sorted(in_mode)}"
        assert unread_in_mode <= section_read  # each read in the default run
    for key, value in refused.items():
        with pytest.raises(ParamsError, match=key):
            tiny(f"{name}.{key}={value}")


def test_evaluate_reads_the_precision_through_use_amp(workdir, tiny, monkeypatch):
    """``ssl-ops evaluate`` picks its precision as training does, through ``engine.use_amp``: a read of
    ``train.amp_cpu`` anywhere else would ignore ``train.amp`` on CUDA. The runs above are ``ssl-ops train`` and
    ``ssl-ops pretrain``; this path is the same for every method (``Method.classifier`` then ``predict_logits``)."""
    params = tiny(*_short("supervised"))
    train_stage("supervised", params)
    amp_readers: set[str] = set()
    with _spy_reads(monkeypatch, [TrainParams], amp_readers):
        metrics = evaluate_stage("supervised", params)
    assert 0 <= metrics["test_top1"] <= 1
    assert amp_readers and amp_readers <= AMP_READERS, f"evaluate: train.amp_cpu read outside use_amp: {amp_readers}"
