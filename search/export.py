"""`search export`: the final model as ONNX and safetensors, checked against PyTorch.

From a `retrain` output directory (its model.pt, recipe.json and test_metrics.json) or from a
trial's kept checkpoint, it writes `model.onnx` (opset 18, a dynamic batch axis; input `image`,
float32 (N, C, S, S) normalised as in training, output `logits`), `model.safetensors` (the state
dict) and `model.json`: what a caller needs (class names, input size, channels, normalisation,
how images are decoded), where the model comes from (pool entry, weight source, the recipe's
fingerprint, its metrics) and the check. The same record is in the ONNX file's metadata
(`metadata_props`, key `search`), so `search predict` needs the .onnx file alone.

The check runs onnxruntime and PyTorch on every image of the split the model was measured on
(test for a retrain output, validation for a trial) and compares the logits: a maximum absolute
difference over the tolerance is an error and nothing is written. The test split is only read
for this agreement of two copies of one final model; no metric is computed on it here.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from optuna.artifacts.exceptions import ArtifactNotFound

from search import artifacts
from search import data as datamod
from search import study as st
from search.augment import eval_input
from search.errors import SearchError
from search.files import replacing, write_text
from search.models import info_of
from search.pool import parse_entry
from search.recipe import Recipe, recipe_from_dict
from search.record import attrs, versions
from search.storage import default_storage
from search.text import command

OPSET = 18
TOLERANCE = 1e-4  # largest absolute logit difference accepted between onnxruntime and PyTorch
EXTRA = "pip install 'search[export]'"  # the optional dependencies of export and predict
CHECK_BATCH = 256


@dataclass
class Exportable:
    """A final model and what it was made from."""

    model: torch.nn.Module  # a build_model model with its checkpoint's weights (model.info set)
    recipe: Recipe
    split: str  # "test" or "val": where `metrics` were measured, and the check runs
    metrics: dict[str, Any]
    origin: str  # for people: "retrain studies/digits/retrain" or "study digits, trial 3"
    out: Path  # default output directory


def need(module: str) -> Any:
    """Import an optional dependency of export/predict, or one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SearchError(f"{module} is not installed; export and predict need it: {EXTRA}") from None


def from_retrain(run: Path) -> Exportable:
    """The model of a `retrain` output directory."""
    files = {n: run / n for n in ("model.pt", "recipe.json", "test_metrics.json")}
    lacking = [n for n, p in files.items() if not p.is_file()]
    if lacking:
        raise SearchError(
            f"{run} is not a retrain output: it lacks {', '.join(lacking)}; give the directory "
            f"`{command('retrain RECIPE')}` wrote (studies/STUDY/retrain), or STUDY --trial N"
        )
    recipe = recipe_from_dict(json.loads(files["recipe.json"].read_text()), str(files["recipe.json"]))
    model, _ = artifacts.load_checkpoint(files["model.pt"])
    record = json.loads(files["test_metrics.json"].read_text())
    metrics = {**record["test_metrics"], **{f"tta_{k}": v for k, v in record.get("test_metrics_tta", {}).items()}}
    return Exportable(model, recipe, "test", metrics, f"retrain {run}", run)


def from_trial(study_name: str, number: int, storage: str | None = None) -> Exportable:
    """The kept best-epoch checkpoint of a trial (study.top_k keeps the best trials' ones)."""
    url = storage or default_storage(study_name)
    recipe, study = st.load_stored(url, study_name)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise SearchError(f"study '{study_name}' has no trial {number}; trials: 0..{len(trials) - 1}")
    artifact = attrs(trials[number]).get("checkpoint")
    directory = artifacts.dir_of(study)
    try:
        if not artifact:
            raise ArtifactNotFound(artifact)
        with artifacts.store_for(directory).open_reader(artifact) as f:
            blob = f.read()
    except ArtifactNotFound:
        raise SearchError(
            f"trial {number} of study '{study_name}' keeps no checkpoint (only the study.top_k best "
            f"trials do); export one of those, or `{command('retrain best.yaml')}` and export that"
        ) from None
    model, ckpt = artifacts.load_checkpoint(blob)
    metrics = dict(ckpt.get("metrics") or {})  # validation metrics of its best epoch
    out = directory / "export" / f"trial-{number}"
    return Exportable(model, recipe, "val", metrics, f"study {study_name}, trial {number}", out)


def fingerprint(recipe: Recipe) -> str:
    """sha256 of the recipe as a study stores it (canonical JSON), first 16 hex digits."""
    text = json.dumps(st.stored_form(recipe), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def metadata(src: Exportable, classes: tuple[str, ...]) -> dict[str, Any]:
    """What model.json and the ONNX metadata hold, before the check."""
    info = info_of(src.model)
    spec = artifacts.spec_of(src.recipe, info.label)
    entry = parse_entry(spec)
    return {
        "format": "search-export/1",
        "classes": list(classes),
        "input": {
            "name": "image",
            "layout": "NCHW float32",
            "size": info.resolution,
            "channels": len(info.mean),
            "mean": list(info.mean),
            "std": list(info.std),
            "scale": "pixels / 255, then (x - mean) / std per channel",
            # decoding as the image-folder source: shorter side to `fit` px (bilinear), centre crop;
            # then bilinear to `size` (antialiased when shrinking), as training's evaluation
            "fit": src.recipe.data.resolution,
        },
        "output": {"name": "logits", "shape": ["batch", len(classes)]},
        "pool_entry": spec,
        "label": info.label,
        "weight_source": entry.source,
        "weights_file": entry.weights,
        "dataset": src.recipe.data.dataset,
        "recipe_fingerprint": fingerprint(src.recipe),
        "metrics_split": src.split,
        "metrics": src.metrics,
        "from": src.origin,
        "versions": versions(),
    }


def _inputs(x: torch.Tensor, model: torch.nn.Module) -> Callable[[int], torch.Tensor]:
    """Batch i of the split as the model's input (float, normalised), on the CPU."""
    info = info_of(model)
    return lambda i: eval_input(x[i : i + CHECK_BATCH], info.resolution, mean=info.mean, std=info.std)


def to_onnx(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The model as an ONNX graph (opset OPSET, batch axis dynamic), by the TorchScript exporter:
    it writes opset 18 without onnxscript and keeps the graph to the module's own operators."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the dynamo exporter is the default, not needed
        torch.onnx.export(
            model,
            (example,),
            f,  # type: ignore[arg-type]  # the TorchScript exporter writes to a file object too
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    return f.getvalue()


def session(blob: bytes | str, threads: int = 0) -> Any:
    ort = need("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def check(model: torch.nn.Module, blob: bytes, x: torch.Tensor, tolerance: float) -> dict[str, Any]:
    """onnxruntime against PyTorch on every image of x (uint8): max |logit difference|, argmax agreement."""
    sess = session(blob)
    batch = _inputs(x, model)
    model.eval()
    worst, agree = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), CHECK_BATCH):
            xb = batch(i)
            want = model(xb).numpy()
            got = sess.run(["logits"], {"image": xb.numpy()})[0]
            worst = max(worst, float(np.abs(got - want).max()))
            agree += int((got.argmax(1) == want.argmax(1)).sum())
    return {
        "n": len(x),
        "max_abs_logit_diff": worst,
        "argmax_agreement": agree / max(len(x), 1),
        "tolerance": tolerance,
    }


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench(model: torch.nn.Module, blob: bytes, repeats: int = 20) -> dict[str, dict[str, float]]:
    """CPU latency in ms (median of `repeats` runs) of onnxruntime and PyTorch eager, batch 1 and 32."""
    info = info_of(model)
    sess = session(blob, threads=torch.get_num_threads())  # side by side: the same threads as PyTorch
    out: dict[str, dict[str, float]] = {"onnxruntime": {}, "pytorch": {}}
    model.eval()
    for n in (1, 32):
        x = torch.randn(n, len(info.mean), info.resolution, info.resolution)
        xn = x.numpy()
        out["onnxruntime"][f"batch_{n}"] = _median_ms(lambda: sess.run(["logits"], {"image": xn}), repeats)  # noqa: B023
        with torch.no_grad():
            out["pytorch"][f"batch_{n}"] = _median_ms(lambda: model(x), repeats)  # noqa: B023
    return out


def bench_text(b: dict[str, dict[str, float]], repeats: int) -> str:
    rows = [f"CPU latency, median of {repeats} runs   batch 1     batch 32"]
    for name, label in (("onnxruntime", "onnxruntime"), ("pytorch", "PyTorch eager")):
        rows.append(f"  {label:<36}{b[name]['batch_1']:>7.2f} ms{b[name]['batch_32']:>9.2f} ms")
    ratio = [b["pytorch"][k] / b["onnxruntime"][k] for k in ("batch_1", "batch_32")]
    rows.append(f"  {'PyTorch / onnxruntime':<36}{ratio[0]:>7.2f}x{ratio[1]:>11.2f}x")
    return "\n".join(rows)


def with_metadata(blob: bytes, meta: dict[str, Any]) -> bytes:
    """The ONNX model with `meta` in its metadata_props: the whole record as JSON under `search`,
    and the keys other tools look for (classes, input size, mean, std) on their own."""
    onnx = need("onnx")
    proto = onnx.load_from_string(blob)
    flat = {
        "search": json.dumps(meta),
        "classes": json.dumps(meta["classes"]),
        "input_size": str(meta["input"]["size"]),
        "channels": str(meta["input"]["channels"]),
        "mean": json.dumps(meta["input"]["mean"]),
        "std": json.dumps(meta["input"]["std"]),
    }
    del proto.metadata_props[:]
    for k, v in flat.items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "search"
    return proto.SerializeToString()


def export(
    src: Exportable,
    out: Path | None = None,
    *,
    tolerance: float = TOLERANCE,
    bench_runs: int = 0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write model.onnx, model.safetensors and model.json under `out` (default src.out) once the
    ONNX model agrees with PyTorch on the whole split; returns model.json's record."""
    need("onnxruntime")
    need("onnx")
    from safetensors.torch import save as save_safetensors

    out = out or src.out
    data = datamod.load_data(src.recipe.data, src.recipe.study.seed)
    x = (data.test if src.split == "test" else data.val).x  # uint8 (N, C, H, W)
    model = src.model.eval()
    blob = to_onnx(model, _inputs(x[:2], model)(0))
    result = check(model, blob, x, tolerance)
    say(
        f"onnxruntime vs PyTorch on the whole {src.split} split ({result['n']} images): max |logit "
        f"difference| {result['max_abs_logit_diff']:.2e}, argmax agreement {100 * result['argmax_agreement']:.2f}%"
    )
    if not result["max_abs_logit_diff"] <= tolerance:  # NaN is refused too
        raise SearchError(
            f"export of {src.origin}: the ONNX model's logits differ from PyTorch's by up to "
            f"{result['max_abs_logit_diff']:.3g} on the {src.split} split, over the tolerance {tolerance:g}; "
            "nothing was written; report it with the pool entry, or pass --tolerance to accept it"
        )
    meta = metadata(src, data.classes)
    meta["check"] = {"split": src.split, **result, "opset": OPSET, "onnxruntime": need("onnxruntime").__version__}
    if bench_runs:
        meta["bench_ms"] = bench(model, blob, bench_runs)
        for line in bench_text(meta["bench_ms"], bench_runs).splitlines():
            say(line)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with replacing(out / "model.safetensors") as tmp:
        tmp.write_bytes(save_safetensors(state, metadata={"search": json.dumps(meta)}))
    with replacing(out / "model.onnx") as tmp:
        tmp.write_bytes(with_metadata(blob, meta))
    write_text(out / "model.json", json.dumps(meta, indent=1))
    say(f"wrote {out}/model.onnx, model.safetensors, model.json")
    say(f"predict: {command(f'predict {out}/model.onnx IMAGES_OR_FOLDER')}")
    return meta
