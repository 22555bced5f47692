"""Predict the digit (or Fashion-MNIST class) in image files with a trained model.

    python -m mnist_dist.predict my_digit.png --model outputs/latest
    python -m mnist_dist.predict scans/*.jpg --model outputs/latest/model.safetensors --json
    python -m mnist_dist.predict photo.jpg --model outputs/latest --background light   # dark ink on paper

Each image is converted the way MNIST's digits were made (grayscale, white on black, cropped,
scaled to 20 px, centred by mass in 28x28; see mnist_dist.digits) and scaled with the model's
own normalization from config.json. Runs on the CPU; no Accelerate, no distributed code.
"""

from __future__ import annotations

import argparse
import json
import sys

from .stopping import QuickExit

BACKGROUNDS = ("auto", "dark", "light")  # digits.BACKGROUNDS, named here without importing torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mnist_dist.predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, GIF, WebP, BMP, TIFF), any size and colour")
    parser.add_argument("--model", required=True,
                        help="a trained model: its directory (config.json + model.safetensors), the "
                             "model.safetensors file, or a checkpoint directory")
    parser.add_argument("--background", default="auto", choices=BACKGROUNDS,
                        help="'dark': white digit on black (like MNIST); 'light': dark ink on paper; "
                             "'auto': light when the image's border is mostly bright")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    parser.add_argument("--top", type=int, default=3, help="classes listed per image in the text output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and bad flags are answered before torch loads (seconds)
    import torch

    from .digits import ImageError, load_digit
    from .metrics import predict
    from .model import load_model

    try:
        model, config = load_model(args.model)
    except (FileNotFoundError, ValueError) as err:
        print(f"mnist_dist.predict: error: {err}", file=sys.stderr)
        return 2
    names = config.get("class_names") or [str(i) for i in range(config["num_classes"])]
    norm = config.get("normalization", {"mean": 0.5, "std": 0.5})

    digits, files, failed = [], [], 0
    for path in args.images:  # read them all first: one bad file is reported, the rest still predicted
        try:
            digits.append(load_digit(path, args.background))
            files.append(path)
        except ImageError as err:
            print(f"mnist_dist.predict: error: {err}", file=sys.stderr)
            failed += 1
    records = []
    if digits:
        probs = predict(model, torch.stack(digits), (norm["mean"], norm["std"]))
        for path, p in zip(files, probs):
            k = int(p.argmax())
            records.append({"file": path, "class_index": k, "class_name": names[k], "probability": round(float(p[k]), 6),
                            "probabilities": {name: round(float(q), 6) for name, q in zip(names, p)}})
            if not args.json:
                top = p.argsort(descending=True)[: args.top].tolist()  # by index: names are only labels
                others = ", ".join(f"{names[i]} {100 * float(p[i]):.1f}%" for i in top)
                print(f"{path}: {names[k]}  ({others})")
    if args.json:
        print(json.dumps(records, indent=2))
    return 2 if failed else 0


if __name__ == "__main__":
    QuickExit().end(main)  # made before torch loads: no teardown of it at the end (about 1 s)
