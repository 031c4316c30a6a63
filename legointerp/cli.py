"""``legointerp``: train, evaluate and inspect LEGO transformers from the shell.

The CLI only composes the library; every sub-command takes ``--format json`` for machines.
Bad input of any kind ends in one line on stderr naming the problem and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import pandas as pd
import torch

from tqdm.auto import tqdm

from legointerp.checkpoint import BUNDLED, load_model, resolve
from legointerp.errors import LegoInterpError
from legointerp.evaluate import accuracy_by_position, predict, test_batch
from legointerp.train import PRESETS, TrainConfig, Trainer, read_log

EXIT_BAD_INPUT = 2
SAMPLES_HEADS = 300  # every head is ablated: a forward pass each
SAMPLES_PATCH = 16  # every (layer, position, head) is a patched run
SAMPLES_PROBE = SAMPLES_SHORTCUT = SAMPLES_REPORT = 1500


def _emit(args, frame: pd.DataFrame, document) -> None:
    """Print a table for people, or one JSON document / CSV for machines."""
    if args.format == "json":
        print(json.dumps(document, indent=2))
    elif args.format == "csv":
        print(frame.to_csv(index=False), end="")
    else:
        print(frame.to_string(index=False))


def _add_ckpt(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=BUNDLED, help="checkpoint file written by 'legointerp train', or bundled (the default: the shipped "
                             "model) or bundled-shortcut (a shipped model trained in the shortcut regime)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")


def _add_format(parser: argparse.ArgumentParser, csv: bool = False) -> None:
    parser.add_argument("--format", choices=["table", "json", *(["csv"] if csv else [])], default="table",
                        help="table for people, json for machines" + (", csv for spreadsheets" if csv else ""))


# ---------------------------------------------------------------------------- train
_TRAIN_HELP = {
    "group": "task group: task1 ({+,-} on {1,-1}), task2 (S3), sN or zN",
    "n": "clauses per sentence (chain length)",
    "n_tr": "supervise only the first N_TR chain positions (length extrapolation; the paper uses n=12, n_tr=6)",
    "supervised": "supervise exactly these chain positions, comma-separated (shortcut setting: 0,1,2,3,4,11)",
    "min_length": "mix chain lengths uniformly in [MIN_LENGTH, longest chain] (shorter sentences are padded)",
    "curriculum": "grow the longest training chain from --curriculum-start to n as training sentences get solved",
    "curriculum_start": "longest chain when the curriculum starts",
    "curriculum_threshold": "running fraction of solved training sentences that admits one more clause",
    "d_model": "residual width", "n_heads": "attention heads per layer", "n_layers": "layers (tied: iterations)",
    "d_mlp": "MLP hidden width", "tied": "ALBERT-like: one block applied n_layers times (--no-tied: BERT-like)",
    "min_depth": "stochastic depth (tied only): sample the depth per batch in [MIN_DEPTH, n_layers]",
    "lr": "peak learning rate (AdamW, warmup then cosine)", "weight_decay": "AdamW weight decay",
    "warmup": "warmup steps", "decay": "fraction of the steps over which the learning rate decays at the end", "batch_size": "sentences per step (split over torchrun processes)",
    "steps": "optimizer steps in total", "mimic_steps": "steps of the paper's mimicking loss on heads 0/1",
    "target_accuracy": "stop early once every chain position reaches this test accuracy",
    "seed": "seed for the weights and the data stream", "device": "cpu, cuda or auto",
    "eval_every": "steps between test evaluations (logged per chain position)", "eval_size": "test sentences",
    "save_every": "steps between checkpoint saves",
}


def _positions(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of chain positions like 0,1,2,3,4,11") from None


def _add_train(sub) -> None:
    parser = sub.add_parser("train", help="train a BERT-like or ALBERT-like model on LEGO",
                            description="Train a model; every option overrides the preset. Per-position test accuracy "
                                        "is logged to OUT.log.jsonl at every evaluation.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="starting configuration (default: tiny)")
    parser.add_argument("--out", default="model.pt", help="checkpoint path (default: model.pt)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_format(parser)
    for f in fields(TrainConfig):
        flag = "--length" if f.name == "n" else "--" + f.name.replace("_", "-")  # a bare --n would clash with torchrun's flags
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_TRAIN_HELP[f.name])
        elif f.name == "supervised":
            parser.add_argument(flag, type=_positions, default=None, help=_TRAIN_HELP[f.name])
        else:
            kind = float if "float" in f.type else str if "str" in f.type else int
            parser.add_argument(flag, type=kind, default=None, dest=f.name, help=_TRAIN_HELP[f.name])


def _train(args) -> None:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    config = replace(PRESETS[args.preset], **overrides)
    trainer = Trainer(config, args.out, resume=args.resume, progress=not args.quiet,
                      command="legointerp " + " ".join(sys.argv[1:]))
    checkpoint = trainer.fit()
    if trainer.rank == 0:
        frame = pd.DataFrame({"position": range(len(checkpoint.accuracy)), "accuracy": checkpoint.accuracy})
        print(f"saved {args.out} after {trainer.step} steps ({trainer.elapsed:.0f} s of training)", file=sys.stderr)
        _emit(args, frame, {"checkpoint": str(args.out), "steps": trainer.step, "accuracy": checkpoint.accuracy})


# ---------------------------------------------------------------------------- eval / predict / solve
def _eval(args) -> None:
    model, task, checkpoint = load_model(args.ckpt, args.device)
    accuracy = accuracy_by_position(model, test_batch(task, args.samples, seed=args.seed, heldout=args.heldout)).tolist()
    recorded = checkpoint.accuracy or [None] * len(accuracy)
    frame = pd.DataFrame({"position": range(len(accuracy)), "accuracy": accuracy, "recorded": recorded})
    _emit(args, frame, {"checkpoint": str(args.ckpt), "samples": args.samples,
                        "accuracy": {str(k): a for k, a in enumerate(accuracy)}, "mean": sum(accuracy) / len(accuracy)})


def _sentences(args) -> list[str]:
    lines = list(args.sentences)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise LegoInterpError(f"no file at {path}: --file takes a text file with one sentence per line")
        lines += [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise LegoInterpError("no sentence given: pass one in quotes, e.g. \"a=+1; b=-a\", or --file FILE")
    return lines


def _predict(args) -> None:
    model, task, _ = load_model(args.ckpt, args.device)
    texts = _sentences(args)
    sentences = [task.parse(text, max_clauses=task.config.n) for text in texts]
    batch = task.encode(sentences)
    predicted = predict(model, batch)
    rows, documents = [], []
    for b, text in enumerate(texts):
        names = task.variable_names(batch, b)
        literal = task.group.literal_names
        pairs = {name: (literal[int(predicted[b, k])], literal[int(batch.values[b, k])]) for k, name in enumerate(names)}
        documents.append({"sentence": text, "predicted": {v: p for v, (p, _) in pairs.items()},
                          "true": {v: t for v, (_, t) in pairs.items()}})
        rows += [{"sentence": b, "variable": v, "depth": int(batch.depth[b, k]), "predicted": p, "true": t,
                  "correct": p == t} for k, (v, (p, t)) in enumerate(pairs.items())]
    _emit(args, pd.DataFrame(rows), documents[0] if len(documents) == 1 else documents)


def _solve(args) -> None:
    from legointerp.task import LegoTask, TaskConfig

    task = LegoTask(TaskConfig(group=args.group, n=26))
    values = task.solve(task.parse(args.sentence, max_clauses=args.max_clauses))
    _emit(args, pd.DataFrame({"variable": list(values), "value": list(values.values())}), values)


def _add_basic(sub) -> None:
    parser = sub.add_parser("eval", help="per-chain-position accuracy on fresh sentences",
                            description="Accuracy of each chain position on freshly generated sentences, beside the "
                                        "accuracy recorded in the checkpoint.")
    _add_ckpt(parser)
    parser.add_argument("--samples", type=int, default=4000, help="fresh test sentences (default: 4000)")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the test sentences")
    parser.add_argument("--heldout", action="store_true", help="name variables from the held-out alphabet (unseen symbols)")
    _add_format(parser, csv=True)
    parser.set_defaults(run=_eval)

    parser = sub.add_parser("predict", help="the model's answer for sentences you type, beside the true one")
    _add_ckpt(parser)
    parser.add_argument("sentences", nargs="*", help='sentences like "a=+1; b=-a; c=+b"')
    parser.add_argument("--file", help="a text file with one sentence per line")
    _add_format(parser, csv=True)
    parser.set_defaults(run=_predict)

    parser = sub.add_parser("solve", help="the exact value of every variable (no model)")
    parser.add_argument("sentence", help='a sentence like "a=+1; b=-a; c=+b"')
    parser.add_argument("--group", default="task1", help="task1, task2, sN or zN (default: task1)")
    parser.add_argument("--max-clauses", type=int, default=26, help="longest sentence accepted (default: 26)")
    _add_format(parser)
    parser.set_defaults(run=_solve)


# ---------------------------------------------------------------------------- analyses
def _analysis_inputs(args):
    model, task, checkpoint = load_model(args.ckpt, args.device)
    return model, task, checkpoint, test_batch(task, args.samples, seed=args.seed).to(args.device)


def _heads(args) -> None:
    from legointerp.heads import RECORD_FIELDS, attention_view_html, classify_heads
    from legointerp.report import clearest_heads, write_html

    model, task, _, batch = _analysis_inputs(args)
    report = classify_heads(model, batch, task, ablate=not args.no_ablation)
    frame = report.to_frame()
    _emit(args, frame if args.format == "csv" else frame[[c for c in RECORD_FIELDS if c in frame]], report.to_records())
    if args.plot:
        write_html(report.plot().to_html(include_plotlyjs=True), args.plot)
    if args.view:
        heads = [_layer_head(text) for text in args.view_heads.split(",")] if args.view_heads else clearest_heads(report)
        write_html(attention_view_html(model, batch, task, heads=heads), args.view)


def _layer_head(text: str) -> tuple[int, int]:
    try:
        layer, head = text.split(".")
        return int(layer), int(head)
    except ValueError:
        raise LegoInterpError(f"{text!r} is not a head: write LAYER.HEAD, e.g. 3.1") from None


def _probe(args) -> None:
    from legointerp.probes import percolation
    from legointerp.report import write_html

    model, task, _, batch = _analysis_inputs(args)
    result = percolation(model, batch, task, control=not args.no_control, threshold=args.threshold)
    _emit(args, result.to_frame(), result.to_dict())
    if args.plot:
        write_html(result.plot().to_html(include_plotlyjs=True), args.plot)


def _report(args) -> None:
    from legointerp.heads import attention_view_html, classify_heads
    from legointerp.patching import patch
    from legointerp.probes import percolation
    from legointerp.report import clearest_heads, model_report, write_html
    from legointerp.shortcut import detect_shortcut

    model, task, checkpoint, batch = _analysis_inputs(args)
    log = read_log(resolve(args.ckpt))
    with tqdm(total=5, desc="report", disable=args.quiet, file=sys.stderr) as bar:
        accuracy = accuracy_by_position(model, batch).tolist()
        heads = classify_heads(model, batch[: args.head_samples], task)
        bar.update()
        probes = percolation(model, batch, task)
        bar.update()
        patching = patch(model, batch[: args.patch_samples], task, corruption="sign", depth=0, heads=False)
        bar.update()
        shortcut = detect_shortcut(model, batch, task, log=log, probes=probes)
        bar.update()
        config = TrainConfig.from_dict(checkpoint.train_config) if checkpoint.train_config else None
        page = model_report(
            name=str(args.ckpt), description=checkpoint.describe(), accuracy=accuracy, recorded=checkpoint.accuracy,
            log=log, supervised=config.loss_mask().nonzero().flatten().tolist() if config else None,
            heads=heads, attention_view=attention_view_html(model, batch, task, heads=clearest_heads(heads)),
            percolation=probes, patching=patching, shortcut=shortcut)
        write_html(page, args.out)
        bar.update()
    print(f"wrote {args.out}", file=sys.stderr)


def _patch(args) -> None:
    from legointerp.patching import patch
    from legointerp.report import write_html

    model, task, _, batch = _analysis_inputs(args)
    result = patch(model, batch, task, corruption=args.corrupt, depth=args.depth, heads=not args.no_heads)
    frame = result.to_frame()
    _emit(args, frame, result.to_dict())
    print(f"attribution vs exact patching: r = {result.agreement:.3f}", file=sys.stderr)
    if args.plot:
        write_html(result.plot().to_html(include_plotlyjs=True), args.plot)


def _shortcut(args) -> None:
    from legointerp.report import write_html
    from legointerp.shortcut import detect_shortcut

    model, task, _, batch = _analysis_inputs(args)
    result = detect_shortcut(model, batch, task, log=read_log(resolve(args.ckpt)))
    _emit(args, result.to_frame(), result.to_dict())
    if args.format == "table":
        print(f"verdict: {result.verdict}")
    if args.plot:
        write_html(result.plot().to_html(include_plotlyjs=True), args.plot)


def _analysis_parser(sub, name: str, run, samples: int, **kwargs) -> argparse.ArgumentParser:
    """A sub-command running ``run`` on a checkpoint and fresh sentences.  Each builds its own arguments: argparse
    parents share action objects, so a per-command default set on one would leak into the others."""
    parser = sub.add_parser(name, **kwargs)
    _add_ckpt(parser)
    parser.add_argument("--samples", type=int, default=samples, help=f"fresh sentences to analyse (default: {samples})")
    parser.add_argument("--seed", type=int, default=0, help="seed of those sentences")
    parser.set_defaults(run=run)
    return parser


def _add_analyses(sub) -> None:
    parser = _analysis_parser(sub, "heads", _heads, SAMPLES_HEADS, help="classify attention heads: association, manipulation, broadcast",
                              description="Score every head's attention by type on fresh sentences, label it, and "
                                          "mean-ablate it to see which chain positions need it.")
    parser.add_argument("--no-ablation", action="store_true", help="skip the causal check (faster)")
    parser.add_argument("--plot", help="write the layer x head map to this HTML file")
    parser.add_argument("--view", help="write a circuitsvis attention view (offline HTML) to this file")
    parser.add_argument("--view-heads", help="heads for --view as LAYER.HEAD,... (default: the clearest of each type)")
    _add_format(parser, csv=True)

    parser = _analysis_parser(sub, "probe", _probe, SAMPLES_PROBE, help="linear probes per layer: information percolation",
                              description="Fit a linear probe per layer and chain depth on the variable's residual "
                                          "stream; report held-out accuracy, resolution layers and linearity.")
    parser.add_argument("--threshold", type=float, default=0.9, help="accuracy that counts as resolved (default: 0.9)")
    parser.add_argument("--no-control", action="store_true", help="skip the randomly initialised control model")
    parser.add_argument("--plot", help="write the percolation heatmap to this HTML file")
    _add_format(parser, csv=True)

    parser = _analysis_parser(sub, "patch", _patch, SAMPLES_PATCH, help="activation patching: exact and attribution",
                              description="Corrupt one place of every sentence (an operator, or the root literal), then "
                                          "patch clean activations back in, per (layer, position) and per head.")
    parser.add_argument("--corrupt", choices=["sign", "root"], default="sign", help="what to corrupt (default: sign)")
    parser.add_argument("--depth", type=int, default=0, help="chain depth of the corrupted operator (default: 0)")
    parser.add_argument("--no-heads", action="store_true", help="patch only the residual stream (much faster)")
    parser.add_argument("--plot", help="write the patching heatmaps to this HTML file")
    _add_format(parser, csv=True)

    parser = _analysis_parser(sub, "shortcut", _shortcut, SAMPLES_SHORTCUT, help="did the model follow the chain or take the shortcut?",
                              description="Combine four pieces of evidence (training order, probes, attention onto "
                                          "operators, patching through the chain) into a verdict: shortcut, no "
                                          "shortcut or inconclusive (the paper's section 4.3).")
    parser.add_argument("--plot", help="write the evidence figure to this HTML file")
    _add_format(parser, csv=True)

    parser = _analysis_parser(sub, "report", _report, SAMPLES_REPORT, help="one self-contained HTML page about a model",
                              description="Accuracy, training curves, head map and table, attention views, the "
                                          "percolation heatmap, activation patching and the shortcut verdict in one "
                                          "offline HTML file.")
    parser.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    parser.add_argument("--head-samples", type=int, default=250, help="sentences for the head classifier and ablations (default: 250)")
    parser.add_argument("--patch-samples", type=int, default=16, help="sentence pairs for activation patching (default: 16)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="legointerp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    sub.choices["train"].set_defaults(run=_train)
    _add_basic(sub)
    _add_analyses(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except LegoInterpError as err:
        print(f"legointerp {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
