"""VP recipe levers, judged on the validation splits only (never a test split).

One call trains one variant of the VP recipe (``netllm adapt vp``'s fields as a JSON
object of overrides) and scores the adapter it keeps on the WHOLE valid splits of
Jin2022 and Wu2017 (windows every 15 samples, the evaluation's windows), beside
no-motion on the same windows. ``--model lstm`` trains the LSTM baseline on the same
data instead (the data fields of the overrides: dataset, step, augment). Run variants
side by side with one thread each:

    OMP_NUM_THREADS=1 NETLLM_DATA=<data folder> python benchmarks/vp_levers.py base '{"steps": 1000}'
    OMP_NUM_THREADS=1 NETLLM_DATA=<data folder> python benchmarks/vp_levers.py dense-mirror \
        '{"steps": 1000, "step": 5, "augment": "mirror"}'

Writes runs/bench-vp-levers/<name>/ (the run) and <name>.json (validation MAE per data
set, the kept step, wall time). A finished variant is not trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from netllm.recipe import stage_done
from netllm.tasks.vp.baselines import LSTM_CONFIG, LSTMPredictor, NoMotion, train_lstm
from netllm.tasks.vp.dataset import DATASETS, WindowSpec, load_samples, load_training_samples
from netllm.tasks.vp.task import NetLLMVPPolicy, VPAdaptOptions, adapt, evaluate, recipe_of
from netllm.utils import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="variant name (its run folder)")
    parser.add_argument("overrides", help="JSON object of `netllm adapt vp` fields that differ from the defaults")
    parser.add_argument("--model", choices=("netllm", "lstm"), default="netllm")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-vp-levers"))
    args = parser.parse_args()
    options = VPAdaptOptions.build(model=args.model, **json.loads(args.overrides))
    folder = args.out / args.name
    spec = options.window()
    train = load_training_samples(options.dataset, "train", spec)
    valid = load_training_samples(options.dataset, "valid", spec).subset(slice(0, None, options.valid_stride))
    t0 = time.perf_counter()
    if args.model == "lstm":
        if not (folder / LSTM_CONFIG).is_file():
            train_lstm(train, valid, options.lstm_recipe(), folder, log=print)
        policy = LSTMPredictor.load(folder)
        kept = None
    else:
        recipe = recipe_of(options)
        if not stage_done(folder, recipe.total_steps(len(train))):
            adapt(train, folder, recipe, valid=valid, resume=True)
        policy = NetLLMVPPolicy.from_adapter(folder)
        kept = json.loads((folder / "adapter_config.json").read_text())["extra"].get("best")
    wall = time.perf_counter() - t0
    scores = {}
    for dataset in DATASETS:  # the evaluation's windows (every 15 samples) of the whole valid split
        windows = load_samples(dataset, "valid", WindowSpec(hw=spec.hw, fw=spec.fw))
        scores[dataset] = {"mae_deg": evaluate(policy, windows)[0].mean,
                           "no_motion_deg": evaluate(NoMotion(spec.fw), windows)[0].mean,
                           "windows": len(windows)}
    report = {"name": args.name, "model": args.model, "overrides": json.loads(args.overrides),
              "options": dataclasses.asdict(options), "train_windows": len(train), "kept": kept,
              "wall_s": wall, "valid": scores}
    atomic_write_json(args.out / f"{args.name}.json", report)
    print(json.dumps({"name": args.name, "kept": kept,
                      **{d: round(v["mae_deg"], 3) for d, v in scores.items()}}))


if __name__ == "__main__":
    main()
