"""Benchmark: the guides' "custom model" (new layers on a truncated, frozen backbone) against the frozen
extractor + logreg head and against fine-tuning, on ../shared/datasets/cats_vs_dogs.

Data: the manifest's split: 500 training photos (100 of them held out for validation by finetune and
custom-model; the logreg head fits on all 500) and 500 test photos, scored once at the end. Everything at
160 px (a size MobileNetV2's ImageNet weights exist for) to keep the run modest on 2 shared cores.

(a) head: ``extract`` (MobileNetV2 1.0, real weights, avg pooling) + ``fit-head logreg``; test accuracy.
(b) finetune: warm-started from (a), the last block unfrozen, augmentation on, ``--epochs`` epochs.
(c) custom-model: MobileNetV2 cut at block_6_expand_relu (20x20x192 at 160 px) and block_13_expand_relu
    (10x10x576), new layers NEW_LAYERS, no augmentation, so the frozen part's feature maps are cached;
    early stopping (patience 3) within ``--epochs-custom`` epochs.
(d) speed only: VGG16 with random weights cut at block3_pool (20x20x256): seconds per epoch with the
    feature-map cache (plus its one-off pass over train, validation and test; 3 epochs) and without it
    (every epoch through the frozen part; 1 epoch), and with augmentation (which rules the cache out; 1 epoch).

Seconds per epoch are wall times of a training pass plus a validation pass (history.csv), on a machine
shared with other jobs: compare them within this run only.

Run: python benchmarks/bench_custom_model.py [--quick]  (writes benchmarks/results/custom_model.json)

``--scratch`` (issue 33) instead measures the guides' baseline: their small CNN trained from scratch
(``custom-model --backbone none``: four conv + max-pool blocks, flatten, dense 512, dense 512; then the same
with dropout 0.3) against the frozen extractor + logreg head and the fine-tune, same photos, same split, at
128 px, up to 20 epochs (patience 4), so the whole run fits in ~10 minutes on 2 busy cores. Writes
benchmarks/results/custom_model_scratch.json and the from-scratch runs' curves under docs/figures/custom_model/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlpipe.backbones.deps import distribution_version  # noqa: E402
from tlpipe.backbones.store import ModelStore  # noqa: E402
from tlpipe.features.extract import extract  # noqa: E402
from tlpipe.pipeline.heads.fit import train_head  # noqa: E402
from tlpipe.pipeline.training.custom_model import fit_custom_model  # noqa: E402
from tlpipe.pipeline.training.finetune import finetune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MANIFEST = SHARED / "datasets" / "cats_vs_dogs" / "manifest.csv"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"
RESULTS = Path(__file__).resolve().parent / "results" / "custom_model.json"
SCRATCH_RESULTS = RESULTS.with_name("custom_model_scratch.json")
FIGURES = ROOT / "docs" / "figures" / "custom_model"
SCRATCH_SIZE = 128
SCRATCH_PATIENCE = 4  # room for the validation loss to turn up (over-fitting) before the stop
BLOCKS = "conv:32,pool,conv:64,pool,conv:128,pool,conv:128,pool,flatten"
SCRATCH_LAYERS = {"plain": f"{BLOCKS},dense:512,dense:512", "dropout 0.3": f"{BLOCKS},dense:512,dropout:0.3,dense:512"}
NEW_LAYERS = "conv:128,pool,conv:256,pool,gap,dense:64,bn,dropout:0.3"
SIZE = 160


def summary(result) -> dict:
    data = result.to_dict()
    keep = (
        "params",
        "best_epoch",
        "best_val_loss",
        "best_val_accuracy",
        "epochs_run",
        "epoch_seconds",
        "feature_maps_cached",
        "feature_map_seconds",
        "test",
        "backbone",
        "preprocessing",
        "layer",
        "new_layers",
        "unfreeze_from",
    )
    return {k: data[k] for k in keep if k in data}


def logreg_params(path: Path) -> int:
    from tlpipe.pipeline.heads.persistence import load_head

    estimator, _ = load_head(path)
    classifier = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    return int(classifier.coef_.size + classifier.intercept_.size)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": os.getloadavg(),
        "note": "2-core machine shared with other helpers: wall times are noisy; compare within the run",
    }


def scratch_main(epochs: int, ft_epochs: int) -> None:
    """From scratch (plain, dropout) vs frozen extractor + logreg vs fine-tune, at SCRATCH_SIZE px."""
    import shutil

    from tlpipe.pipeline.training.finetune import read_history

    report: dict = {
        "what": "the guides' from-scratch CNN (custom-model --backbone none) vs frozen MobileNetV2 extractor + "
        "logreg head vs fine-tune on ../shared/datasets/cats_vs_dogs (500 train photos, 100 of them held out "
        f"for validation by finetune/custom-model; 500 test photos, scored once), all at {SCRATCH_SIZE} px",
        "machine": machine(),
        "versions": {m: distribution_version(m) for m in ("tensorflow", "keras", "tf2onnx", "onnxruntime")},
        "settings": {
            "size": SCRATCH_SIZE,
            "scratch_new_layers": SCRATCH_LAYERS,
            "scratch_epochs": epochs,
            "scratch_learning_rate": 1e-3,
            "scratch_patience": SCRATCH_PATIENCE,
            "finetune_epochs": ft_epochs,
            "patience": 3,
            "batch_size": 32,
            "seed": 0,
            "augment": {"scratch": False, "finetune": True},
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-scratch-") as tmp:
        tmp = Path(tmp)
        store = ModelStore(tmp / "store")
        started = time.perf_counter()
        extract(
            MANIFEST,
            tmp / "cache.h5",
            backbone="mobilenet_v2",
            weights=WEIGHTS,
            size=SCRATCH_SIZE,
            store=store,
            device="cpu",
        )
        extracted = time.perf_counter()
        head = train_head(tmp / "cache.h5", "logreg", tmp / "logreg.joblib")
        report["head"] = {
            "test_accuracy": head.evaluation.accuracy,
            "test_log_loss": head.evaluation.to_dict().get("log_loss"),
            "trainable_params": logreg_params(tmp / "logreg.joblib"),
            "extract_seconds_1000_images": round(extracted - started, 1),
            "fit_seconds": round(time.perf_counter() - extracted, 1),
            "whole_seconds": round(time.perf_counter() - started, 1),
            "setup": head.setup,
        }
        print("head", report["head"], flush=True)

        started = time.perf_counter()
        tuned = finetune(
            MANIFEST,
            tmp / "ft",
            backbone="mobilenet_v2",
            weights=WEIGHTS,
            size=SCRATCH_SIZE,
            head=tmp / "logreg.joblib",
            unfreeze_last=1,
            epochs=ft_epochs,
            store=store,
            progress=False,
        )
        keep = (
            "best_epoch",
            "best_val_loss",
            "best_val_accuracy",
            "epochs_run",
            "epoch_seconds",
            "unfreeze_from",
            "test",
        )
        report["finetune"] = {
            **{k: v for k, v in tuned.to_dict().items() if k in keep},
            "whole_call_seconds": round(time.perf_counter() - started, 1),
        }
        print("finetune", report["finetune"], flush=True)

        report["scratch"] = {}
        FIGURES.mkdir(parents=True, exist_ok=True)
        for name, layers in SCRATCH_LAYERS.items():
            started = time.perf_counter()
            result = fit_custom_model(
                MANIFEST,
                tmp / name.replace(" ", "-"),
                backbone="none",
                size=SCRATCH_SIZE,
                new_layers=layers,
                epochs=epochs,
                patience=SCRATCH_PATIENCE,
                learning_rate=1e-3,
                progress=False,
            )
            report["scratch"][name] = {
                **summary(result),
                "history": read_history(result.history_path),
                "whole_call_seconds": round(time.perf_counter() - started, 1),
            }
            shutil.copyfile(result.curves_path, FIGURES / f"scratch-{name.split()[0]}-curves.png")
            print("scratch", name, {k: v for k, v in report["scratch"][name].items() if k != "history"}, flush=True)
    report["machine"]["load_average_after"] = os.getloadavg()
    SCRATCH_RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {SCRATCH_RESULTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 fine-tune epoch, 3 custom-model epochs")
    parser.add_argument(
        "--scratch", action="store_true", help="the from-scratch baseline vs head vs fine-tune (issue 33) instead"
    )
    parser.add_argument("--epochs-scratch", type=int, default=20, help="from-scratch epochs (early stopping)")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tune epochs")
    parser.add_argument("--epochs-custom", type=int, default=12, help="custom-model epochs (early stopping)")
    args = parser.parse_args()
    if not MANIFEST.is_file() or not WEIGHTS.is_file():
        sys.exit(f"needs {MANIFEST} and {WEIGHTS}")
    if args.scratch:
        scratch_main(args.epochs_scratch, args.epochs)
        return
    ft_epochs, custom_epochs = (1, 3) if args.quick else (args.epochs, args.epochs_custom)
    report: dict = {
        "what": "custom-model (new layers on a truncated frozen backbone) vs frozen extractor + logreg head vs "
        "finetune on ../shared/datasets/cats_vs_dogs (500 train photos, 100 of them held out for "
        "validation by finetune/custom-model; 500 test photos), all at 160 px",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": os.getloadavg(),
            "note": "2-core machine shared with other helpers: wall times are noisy; compare within the run",
        },
        "versions": {m: distribution_version(m) for m in ("tensorflow", "keras", "tf2onnx", "onnxruntime")},
        "settings": {
            "size": SIZE,
            "new_layers": NEW_LAYERS,
            "finetune_epochs": ft_epochs,
            "custom_model_epochs": custom_epochs,
            "patience": 3,
            "batch_size": 32,
            "seed": 0,
            "quick": args.quick,
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-custom-") as tmp:
        tmp = Path(tmp)
        store = ModelStore(tmp / "store")

        started = time.perf_counter()
        extract(
            MANIFEST, tmp / "cache.h5", backbone="mobilenet_v2", weights=WEIGHTS, size=SIZE, store=store, device="cpu"
        )
        extracted = time.perf_counter()
        head = train_head(tmp / "cache.h5", "logreg", tmp / "logreg.joblib")
        report["head"] = {
            "test_accuracy": head.evaluation.accuracy,
            "test_log_loss": head.evaluation.to_dict().get("log_loss"),
            "trainable_params": logreg_params(tmp / "logreg.joblib"),
            "extract_seconds_1000_images": round(extracted - started, 1),
            "fit_seconds": round(time.perf_counter() - extracted, 1),
            "setup": head.setup,
        }
        print("head", report["head"], flush=True)

        started = time.perf_counter()
        tuned = finetune(
            MANIFEST,
            tmp / "ft",
            backbone="mobilenet_v2",
            weights=WEIGHTS,
            size=SIZE,
            head=tmp / "logreg.joblib",
            unfreeze_last=1,
            epochs=ft_epochs,
            store=store,
            progress=False,
        )
        report["finetune"] = {
            **{
                k: v
                for k, v in tuned.to_dict().items()
                if k
                in (
                    "best_epoch",
                    "best_val_loss",
                    "best_val_accuracy",
                    "epochs_run",
                    "epoch_seconds",
                    "unfreeze_from",
                    "test",
                )
            },
            "whole_call_seconds": round(time.perf_counter() - started, 1),
        }
        print("finetune", report["finetune"], flush=True)

        report["custom_model"] = {}
        for layer in ("block_6_expand_relu", "block_13_expand_relu"):
            started = time.perf_counter()
            result = fit_custom_model(
                MANIFEST,
                tmp / layer,
                backbone="mobilenet_v2",
                weights=WEIGHTS,
                size=SIZE,
                layer=layer,
                new_layers=NEW_LAYERS,
                epochs=custom_epochs,
                progress=False,
            )
            report["custom_model"][f"mobilenet_v2 up to {layer}"] = {
                **summary(result),
                "whole_call_seconds": round(time.perf_counter() - started, 1),
            }
            print(layer, report["custom_model"][f"mobilenet_v2 up to {layer}"], flush=True)

        speed = {}
        for name, kwargs in (
            ("cached feature maps", {"epochs": 3}),
            ("no cache", {"cache_feature_maps": False, "epochs": 1}),
            ("augmentation (no cache)", {"augment": True, "epochs": 1}),
        ):
            started = time.perf_counter()
            result = fit_custom_model(
                MANIFEST,
                tmp / f"vgg-{len(speed)}",
                backbone="vgg16",
                weights="none",
                size=SIZE,
                layer="block3_pool",
                new_layers=NEW_LAYERS,
                patience=5,
                progress=False,
                **kwargs,
            )
            speed[name] = {**summary(result), "whole_call_seconds": round(time.perf_counter() - started, 1)}
            print("vgg16", name, speed[name], flush=True)
        report["vgg16_block3_pool_random_weights_speed_only"] = speed
    report["machine"]["load_average_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
