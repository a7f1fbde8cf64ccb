"""The model-registry boundary: the logged pyfunc model, ``ssl-ops promote`` and ``ssl-ops predict``.

Besides ``ssl_ops/tracking.py`` only ``ssl_ops.serving`` (this module and ``pyfunc_entry.py``) imports MLflow
(an import-linter contract, docs/architecture.md).

The logged model ("model" in a training run) is an MLflow **pyfunc logged as code**, not pickled:

- ``ssl_ops/serving/pyfunc_entry.py`` (copied into the model as plain text) builds :class:`ImageClassifierModel`;
  MLflow runs that file at load time instead of unpickling a ``PythonModel`` with cloudpickle;
- the weights are a bare ``state_dict`` (``weights.pt``) loaded with ``torch.load(weights_only=True)``
  (:func:`ssl_ops.io.torch_load`), which refuses anything but tensors and plain containers;
- the architecture and class names are JSON (``spec.json``; class names also in the MLmodel ``metadata``).

Why not MLflow's ``pt2`` (``torch.export``) format: ``torch.export.load`` reads the weights with
``torch.load(weights_only=False)``, i.e. it unpickles. Remaining limitation: loading still *runs code*,
the model's ``pyfunc_entry.py`` and the installed ``ssl_ops`` package (which defines the architecture),
so a model must come from a registry you trust to hold the code you reviewed; no pickle is executed.

Input contract (the model signature): float32 ``N×C×H×W`` images with pixel values in [0, 1]
(uint8 / 255, as in training; the network normalises per channel itself). Output: one row per image with
``predicted`` (class name) and ``p_<class name>`` probabilities (softmax). ``ssl-ops predict`` also takes
uint8 images and ``N×H×W×C`` arrays and converts them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import string
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ssl_ops import __version__, io, tracking
from ssl_ops.backbones import build_backbone
from ssl_ops.errors import CheckpointError, PredictInputError, RegistryError
from ssl_ops.heads import Classifier, Normalize

MODEL_CODE = Path(__file__).with_name("pyfunc_entry.py")
SPEC_FORMAT = "ssl-ops-classifier/1"
ARTIFACT_NAME = "model"  # the logged model's name inside a training run
CHALLENGER, CHAMPION = "challenger", "champion"
PREDICT_BATCH = 512  # images per forward pass inside the pyfunc (bounds memory for big requests)

logging.getLogger("alembic").setLevel(logging.WARNING)



@contextlib.contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar per artifact copy, even for local files: noise between our own outputs."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


# ---------------------------------------------------------------------------------------------------------
# the logged model: spec + state_dict -> Classifier


def model_spec(backbone: str, width: float, image_shape: tuple[int, int, int] | list[int],
               classes: list[str], neck: dict[str, int] | None = None) -> dict[str, Any]:
    """What rebuilds the classifier without pickle: registered backbone name, width, input shape, class names,
    and (only when the classifier has one) its projection-head neck (``Classifier.neck_spec``)."""
    spec = {"format": SPEC_FORMAT, "backbone": backbone, "width": float(width),
            "image_shape": [int(s) for s in image_shape], "classes": [str(c) for c in classes],
            "color_mode": color_mode(int(image_shape[0]))}
    if neck:
        spec["neck"] = {k: int(v) for k, v in neck.items()}
    return spec


def color_mode(channels: int) -> str:
    """The PIL mode every training image was converted to: ``prepare`` keeps a folder grey ("L") only when every
    image is grey, else converts all to "RGB" (ssl_ops/data/sources.py ``_load_images``); predict does the same."""
    return "L" if channels == 1 else "RGB"


def build_classifier(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Classifier:
    """The eval-mode classifier that ``spec`` describes, with ``state_dict`` loaded strictly."""
    if spec.get("format") != SPEC_FORMAT:
        raise CheckpointError(f"model spec format {spec.get('format')!r} is not {SPEC_FORMAT!r}; "
                              "log the model again with this version of ssl-ops")
    c, _, w = spec["image_shape"]
    model = Classifier(Normalize([0.0] * c, [1.0] * c),  # statistics come from the state_dict's buffers
                       build_backbone(spec["backbone"], c, width=spec["width"], image_size=w), len(spec["classes"]),
                       neck_spec=spec.get("neck"))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit the {spec['backbone']} classifier in the spec: "
                              f"{str(exc)[:300]}") from None
    return model.eval()


def _signature(spec: dict[str, Any]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *spec["image_shape"]))])  # unnamed: pyfunc gets the array
    outputs = Schema([ColSpec("string", "predicted"), *(ColSpec("double", f"p_{c}") for c in spec["classes"])])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_classifier(model: torch.nn.Module, spec: dict[str, Any], name: str = ARTIFACT_NAME) -> None:
    """Log ``model`` to the active run as the pyfunc described in this module's docstring.

    The saved weights are re-loaded into a freshly built classifier and compared with ``model`` on random
    images first, so a spec that does not describe the trained network fails here, not at serving time.
    """
    if not isinstance(model, Classifier):
        raise TypeError(f"log_classifier needs an ssl_ops.heads.Classifier (what Method.classifier() returns by "
                        f"default), got {type(model).__name__}; export this method's model differently")
    original = copy.deepcopy(model).cpu().eval()
    state = {k: v.detach().cpu().clone() for k, v in original.state_dict().items()}
    replica = build_classifier(spec, state)
    x = torch.rand((4, *spec["image_shape"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(original(x), replica(x), atol=1e-5, rtol=1e-4):
            raise RuntimeError("the classifier rebuilt from its spec disagrees with the trained one (a bug)")
    # explicit requirements: inferring them re-imports the model in a subprocess (slow, and offline-unsafe)
    reqs = [f"{pkg}=={ver}" for pkg, ver in (("torch", torch.__version__.split("+")[0]), ("numpy", np.__version__),
                                             ("pandas", pd.__version__), ("mlflow", mlflow.__version__),
                                             ("ssl-ops", __version__))]
    with tempfile.TemporaryDirectory(prefix="ssl-ops-model-") as tmp, _no_progress_bars():
        weights, spec_file = Path(tmp) / "weights.pt", Path(tmp) / "spec.json"
        io.torch_save(weights, state)
        io.write_json(spec_file, spec)
        mlflow.pyfunc.log_model(
            name=name, python_model=str(MODEL_CODE), artifacts={"weights": str(weights), "spec": str(spec_file)},
            signature=_signature(spec), pip_requirements=reqs,
            # two mid-grey images: MLflow checks the model loads and predicts, and documents a serving payload
            input_example=np.full((2, *spec["image_shape"]), 0.5, np.float32),
            metadata={"class_names": spec["classes"], "image_shape": spec["image_shape"],
                      "color_mode": spec["color_mode"],  # predict converts grey inputs to it, as prepare did
                      "input": "float32 N x C x H x W, pixel values in [0, 1] (uint8 / 255)",
                      "ssl_ops_format": SPEC_FORMAT},
        )


def _invalid(msg: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes the scoring server answer 400 with this message
    return MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """Pyfunc: float32 N×C×H×W images in [0, 1] -> DataFrame(predicted, p_<class>...)."""

    def load_context(self, context) -> None:
        self.spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.model = build_classifier(self.spec, io.torch_load(context.artifacts["weights"]))  # weights_only=True
        self.classes = self.spec["classes"]

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        x = np.asarray(model_input)
        shape = tuple(self.spec["image_shape"])
        if x.ndim != 4 or x.shape[1:] != shape:
            raise _invalid(f"expected images of shape N x {' x '.join(map(str, shape))}, got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise _invalid(f"expected float pixel values in [0, 1], got dtype {x.dtype}")
        if len(x) and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise _invalid(f"pixel values must be finite and in [0, 1] (uint8 / 255); got range "
                           f"[{np.nanmin(x):g}, {np.nanmax(x):g}]")
        probs = []
        with torch.inference_mode():
            for i in range(0, len(x), PREDICT_BATCH):
                xb = torch.from_numpy(np.ascontiguousarray(x[i : i + PREDICT_BATCH], dtype=np.float32))
                probs.append(torch.softmax(self.model(xb).float(), dim=1).double().numpy())
        p = np.concatenate(probs) if probs else np.zeros((0, len(self.classes)))
        out = pd.DataFrame(p, columns=[f"p_{c}" for c in self.classes])
        out.insert(0, "predicted", [self.classes[i] for i in p.argmax(axis=1)] if len(p) else [])
        return out


# ---------------------------------------------------------------------------------------------------------
# promote


@dataclass
class Candidate:
    version: str
    run_id: str
    method: str
    val_top1: float
    test_top1: float | None


@dataclass
class Promotion:
    name: str
    challenger: Candidate
    champion: Candidate | None  # the champion before this promotion (None: there was none)
    promoted: bool  # did the champion alias move to the challenger
    reason: str


def budget_label(labels_per_class: Any, label_fraction: Any) -> str:
    """Split budget for model names: 10 labels per class -> "10pc", 1% of labels -> "1pct"."""
    if labels_per_class not in (None, "None", ""):
        return f"{int(labels_per_class)}pc"
    return f"{float(label_fraction) * 100:g}pct"


def default_model_name(pattern: str, run_params: dict[str, str], method: str) -> str:
    """``registry.model_name`` filled in from the *run's* logged params (the task it was trained on)."""
    try:
        fields = {"dataset": run_params["data.name"], "method": method,
                  "budget": budget_label(run_params.get("split.labels_per_class"),
                                         run_params.get("split.label_fraction"))}
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"the run does not log the params that name its model ({exc}); pass --name NAME") from None
    used = {f for _, f, _, _ in string.Formatter().parse(pattern) if f}
    return pattern.format(**{k: v for k, v in fields.items() if k in used})


def run_id_from_pointer(method: str, models_dir: Path = Path("models")) -> str:
    pointer = models_dir / f"{method}.json"
    if not pointer.exists():
        raise RegistryError(f"{pointer} not found: train first (`ssl-ops train {method}`) or pass --run-id ID")
    try:
        return json.loads(pointer.read_text())["mlflow_run_id"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RegistryError(f"{pointer} is corrupted (no mlflow_run_id); re-run `ssl-ops train {method}`") from None


def _client(uri: str):
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _candidate(client, version) -> Candidate:
    try:
        run = client.get_run(version.run_id)
    except MlflowException as exc:
        raise RegistryError(f"{version.name} v{version.version} points at run {version.run_id}, which cannot be "
                            f"read ({exc.message[:200]}); move the champion alias with --force") from None
    m = run.data.metrics
    return Candidate(str(version.version), version.run_id, run.data.tags.get("method", "?"),
                     float(m.get("val_top1", float("nan"))), m.get("test_top1"))


def _current_champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None  # no registered model yet, or no champion alias


def promote(method: str, uri: str, margin: float, name_pattern: str, run_id: str | None = None,
            name: str | None = None, force: bool = False) -> Promotion:
    """Register a run's model, alias it ``challenger``, and move ``champion`` to it if it wins on **val**.

    The gate: challenger val top-1 > champion val top-1 + ``margin`` (or ``force``, or no champion yet).
    Test accuracy is copied into tags for the record but never read by the decision.
    """
    run_id = run_id or run_id_from_pointer(method)
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"MLflow run {run_id} not found in {tracking.mask_uri(uri)}: {exc.message[:200]}") from None
    if "val_top1" not in run.data.metrics:
        raise RegistryError(f"run {run_id} has no val_top1 metric, which the promotion gate compares; "
                            "train with a val split (split.val_per_class > 0)")
    logged = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}' AND name = '{ARTIFACT_NAME}'",
                                         experiment_ids=[run.info.experiment_id], output_format="list",
                                         order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    if not logged:
        raise RegistryError(f"run {run_id} has no logged model {ARTIFACT_NAME!r}: train with tracking.log_model=true")
    name = name or default_model_name(name_pattern, run.data.params, method)
    previous = _current_champion(client, name)
    champion = _candidate(client, previous) if previous else None

    tags = {"method": run.data.tags.get("method", method), "run_id": run_id,
            "split_sha256": run.data.tags.get("split_sha256", ""),
            "dataset_sha256": run.data.tags.get("dataset_sha256", ""),
            "git_commit": run.data.tags.get("git_commit", "unknown"),
            **{f"metric.{k}": f"{v:.6g}" for k, v in run.data.metrics.items()}}
    try:
        version = mlflow.register_model(logged[0].model_uri, name, tags=tags)
    except MlflowException as exc:
        raise RegistryError(f"cannot register {logged[0].model_uri} as {name!r}: {exc.message[:300]}") from None
    challenger = _candidate(client, version)
    client.set_registered_model_alias(name, CHALLENGER, version.version)

    if champion is None:
        promoted, reason = True, "no champion yet"
    elif np.isnan(champion.val_top1):
        promoted, reason = True, f"champion v{champion.version} has no val_top1 to compare with"
    elif force:
        promoted, reason = True, (f"--force (val top-1 {challenger.val_top1:.4f} vs champion v{champion.version}'s "
                                  f"{champion.val_top1:.4f})")
    elif challenger.val_top1 > champion.val_top1 + margin:
        promoted, reason = True, (f"val top-1 {challenger.val_top1:.4f} > champion v{champion.version}'s "
                                  f"{champion.val_top1:.4f} + margin {margin:g}")
    else:
        promoted, reason = False, (f"val top-1 {challenger.val_top1:.4f} <= champion v{champion.version}'s "
                                   f"{champion.val_top1:.4f} + margin {margin:g}")
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    for k, v in {"promotion.decision": CHAMPION if promoted else "kept-challenger", "promotion.reason": reason,
                 "promotion.previous_champion": champion.version if champion else "none"}.items():
        client.set_model_version_tag(name, version.version, k, v)
    return Promotion(name, challenger, champion, promoted, reason)


# ---------------------------------------------------------------------------------------------------------
# predict

_DROP_ALPHA = {"LA": "L", "RGBA": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}  # transparency is ignored
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Loaded:
    model: Any  # mlflow.pyfunc.PyFuncModel
    image_shape: tuple[int, int, int]
    classes: list[str]
    color_mode: str = "RGB"  # PIL mode images are converted to (recorded at training; older models: by channels)


@contextlib.contextmanager
def _old_module_name():
    """A model logged before issue 19 carries the old entry point (registry_model.py), which imports this module by
    its old name ``ssl_ops.registry``: alias it while MLflow runs that file, and only then (a lasting alias would
    hide a stale import elsewhere; for `mlflow models serve`, re-log such models)."""
    added = "ssl_ops.registry" not in sys.modules
    if added:
        sys.modules["ssl_ops.registry"] = sys.modules[__name__]
    try:
        yield
    finally:
        if added and sys.modules.get("ssl_ops.registry") is sys.modules[__name__]:
            del sys.modules["ssl_ops.registry"]


def load_model(model_uri: str, uri: str) -> Loaded:
    """A registered (``models:/name@alias``) or logged model, with its input shape and class names."""
    _client(uri)
    try:
        with _no_progress_bars(), _old_module_name():
            model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        raise RegistryError(f"cannot load model {model_uri} from {tracking.mask_uri(uri)}: "
                            f"{exc.message[:300]}") from None
    meta = model.metadata.metadata or {}
    schema = model.metadata.get_input_schema()
    if meta.get("ssl_ops_format") != SPEC_FORMAT or schema is None or not schema.is_tensor_spec():
        raise RegistryError(f"{model_uri} is not an ssl-ops image classifier (no {SPEC_FORMAT} metadata); "
                            "log it with `ssl-ops train` and tracking.log_model=true")
    spec = schema.inputs[0]
    if spec.type != np.dtype(np.float32) or len(spec.shape) != 4:
        raise RegistryError(f"{model_uri} expects {spec}, not float32 N x C x H x W images")
    shape = tuple(int(s) for s in spec.shape[1:])
    return Loaded(model, shape, list(meta["class_names"]), meta.get("color_mode") or color_mode(shape[0]))


def _read_image(path: Path, channels: int, size: tuple[int, int], resize: bool,
                converted: list[str] | None = None) -> np.ndarray:
    """One image as uint8 C×H×W. A grey image for an RGB model is converted to RGB, as ``prepare`` converted the
    grey images of a mixed training folder (the model's ``color_mode``); its name is appended to ``converted``.
    A colour image for a grey model stays an error: training never turned colour into grey."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse both (memory, decode time)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            img.load()
            if img.mode == "P":  # palette: expand to its real colours first
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            if img.mode in ("1", "I", "I;16", "F"):
                img = img.convert("L")
            if img.mode in _DROP_ALPHA:
                img = img.convert(_DROP_ALPHA[img.mode])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PredictInputError(f"image {path} is too large to decode safely ({exc}); shrink it first") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise PredictInputError(f"cannot read image {path}: {exc}") from None
    have = len(img.getbands())
    if have == 1 and channels == 3:
        img = img.convert("RGB")
        have = 3
        if converted is not None:
            converted.append(path.name)
    if have != channels:
        raise PredictInputError(f"{path} has {have} channel(s) ({img.mode}) but the model expects {channels} "
                                f"({'grey' if channels == 1 else 'RGB'}); convert the image first")
    h, w = size
    if (img.height, img.width) != (h, w):
        if not resize:
            raise PredictInputError(f"{path} is {img.height}x{img.width} (HxW) but the model expects {h}x{w}; "
                                    "pass --resize to resize images (bilinear) to the model's size")
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@dataclass
class ReadReport:
    """What ``read_inputs`` left out or changed, for the CLI to list."""

    skipped: list[str] = field(default_factory=list)  # non-image entries of a folder
    unreadable: list[str] = field(default_factory=list)  # "name: reason" of images that could not be used
    converted: list[str] = field(default_factory=list)  # grey images converted to the model's RGB


def _read_files(files: list[Path], shape: tuple[int, int, int], resize: bool, strict: bool,
                report: ReadReport) -> tuple[list[str], np.ndarray]:
    """Decode ``files``; one that cannot be used is listed in ``report.unreadable`` and left out (``strict``:
    the first one is an error). None usable is an error naming the reasons."""
    names, images = [], []
    for f in files:
        try:
            images.append(_read_image(f, shape[0], shape[1:], resize, report.converted))
            names.append(f.name)
        except PredictInputError as exc:
            if strict:
                raise PredictInputError(f"{exc} (--strict: one unusable image stops the run)") from None
            report.unreadable.append(f"{f.name}: {exc}")
    if not images:
        raise PredictInputError(f"none of the {len(files)} image(s) could be used: " + "; ".join(report.unreadable[:3])
                                + (" ..." if len(report.unreadable) > 3 else ""))
    return names, np.stack(images)


def _read_folder(folder: Path, shape: tuple[int, int, int], resize: bool, strict: bool,
                 report: ReadReport) -> tuple[list[str], np.ndarray]:
    """Every image file directly in ``folder`` (sorted); other visible entries (sub-folders, files of other
    extensions) are skipped and listed in ``report.skipped``; hidden ones are ignored."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    report.skipped += [p.name + ("/" if p.is_dir() else "") for p in entries if p not in files]
    if not files:
        others = (f"; skipped {len(report.skipped)} other entries: {', '.join(report.skipped[:5])}" if report.skipped
                  else "")
        raise PredictInputError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}){others}")
    return _read_files(files, shape, resize, strict, report)


def _read_npy(path: Path, shape: tuple[int, int, int], resize: bool) -> tuple[list[str], np.ndarray]:
    c, h, w = shape
    try:
        x = np.load(path, allow_pickle=False)  # object arrays would need pickle: refused
    except (OSError, ValueError) as exc:
        raise PredictInputError(f"cannot read {path} as a numeric .npy array: {exc}") from None
    if x.ndim == 3 and c == 1:
        x = x[:, None]  # N×H×W grey
    if x.ndim != 4:
        raise PredictInputError(f"{path} has shape {x.shape}; expected N x {c} x {h} x {w} (or N x H x W x C, "
                                "or N x H x W for grey images)")
    if x.shape[1] != c and x.shape[3] == c:
        x = x.transpose(0, 3, 1, 2)  # N×H×W×C -> N×C×H×W
    if x.ndim == 4 and x.shape[1] == 1 and c == 3:
        x = np.repeat(x, 3, axis=1)  # grey for an RGB model: what prepare's "RGB" conversion does to grey images
    if x.shape[1] != c:
        raise PredictInputError(f"{path} has shape {x.shape}: {x.shape[1]} channel(s) but the model expects {c}")
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise PredictInputError(f"{path} holds NaN or infinite values; expected pixel values in [0, 1]")
        if len(x) and not (x.min() >= 0 and x.max() <= 1):
            raise PredictInputError(f"{path} holds floats in [{x.min():g}, {x.max():g}]; the model "
                                    "expects pixel values in [0, 1] (or uint8 0-255): divide by 255 or save uint8")
    else:
        raise PredictInputError(f"{path} has dtype {x.dtype}; expected uint8 (0-255) or float in [0, 1]")
    if x.shape[2:] != (h, w):
        if not resize:
            raise PredictInputError(f"{path} holds {x.shape[2]}x{x.shape[3]} (HxW) images but the model expects "
                                    f"{h}x{w}; pass --resize to resize them (bilinear)")
        t = torch.from_numpy(_to_float(x))
        x = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", antialias=True,
                                            align_corners=False).clamp_(0, 1).numpy()
    return [f"{path.name}[{i}]" for i in range(len(x))], x


def _to_float(x: np.ndarray) -> np.ndarray:
    """uint8 -> float32 / 255 (as in training, ssl_ops.augment.to_float); floats -> float32."""
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def read_inputs(path: Path, shape: tuple[int, int, int], resize: bool = False,
                report: ReadReport | None = None, strict: bool = False) -> tuple[list[str], np.ndarray]:
    """Names and float32 N×C×H×W images in [0, 1] from a folder of images, one image file or a ``.npy`` array.
    A folder's non-image entries and unusable images (corrupt, too large, wrong mode or size) are listed in
    ``report`` and left out; it is an error only when no image is usable, or with ``strict`` at the first one."""
    path, report = Path(path), report if report is not None else ReadReport()
    if not path.exists():
        raise PredictInputError(f"{path} not found; pass a folder of images, an image file or a .npy array")
    if path.is_dir():
        names, x = _read_folder(path, shape, resize, strict, report)
    elif path.suffix == ".npy" and path.is_file():
        names, x = _read_npy(path, shape, resize)
    elif path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        names, x = _read_files([path], shape, resize, strict, report)
    else:
        raise PredictInputError(f"{path} is neither a folder of images, an image file "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}) nor a .npy file")
    if len(x) == 0:
        raise PredictInputError(f"{path} holds no images")
    return names, _to_float(x)


def predict(model_uri: str, path: Path, out: Path, uri: str, resize: bool = False,
            strict: bool = False) -> pd.DataFrame:
    """Class probabilities for every usable image under ``path`` -> CSV at ``out`` (written atomically); what was
    left out or converted is in ``table.attrs["report"]`` (a :class:`ReadReport`), which the CLI lists."""
    loaded = load_model(model_uri, uri)
    report = ReadReport()
    names, x = read_inputs(path, loaded.image_shape, resize, report, strict)
    table = loaded.model.predict(x)
    table.insert(0, "file", names)
    table.attrs["report"] = report
    table.attrs["color_mode"] = loaded.color_mode
    io.write_text(out, table.to_csv(index=False, float_format="%.6f"))
    return table
