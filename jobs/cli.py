"""The `vidray` command line. Each subcommand parses its config, validates it, then runs a job.

Heavy libraries (ray, torch, mlflow) are imported inside the commands so `--help` stays instant.
Exit codes: 0 ok, 1 the job failed, 2 bad usage or bad config, 130 / 143 interrupted by SIGINT /
SIGTERM (after stopping what the command started).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading

import vidray
from vidray.archs import ARCH_JOBS, load
from vidray.cluster import WithoutRayNoise, verbose
from vidray.config import ConfigError

EXIT_FAILED, EXIT_USAGE = 1, 2

CONFIG_EPILOG = """\
overrides are dotted config keys, e.g.  objective.mmm_ratio=0.3  train.steps=50
values are parsed as YAML (0.3, true, null, [0.9, 0.98]); unknown keys and bad values
are rejected before any work starts. Use --print-config to see the resolved config."""


SWEEP_EPILOG = """\
e.g.  vidray sweep configs/demo/sweep.yaml pretrain.data.features=URI pretrain.data.text=URI \\
          pretrain.data.manifest=URI 'space.objective.mmm_ratio={grid: [0.0, 0.3, 0.5, 0.7]}'
      vidray sweep configs/demo/allinone_sweep.yaml pretrain.data.frames=URI pretrain.data.manifest=URI
pretrain.model.arch picks the pretrain.* and finetune.* keys (those of `vidray pretrain|finetune`).
overrides are dotted keys of the sweep config; space.<path>=SPEC sets one search-space entry.
Unknown paths and malformed entries are rejected before anything starts; a value the schema
rejects fails its own trial only (a failed trial is started again max_failures times: a lost
node). The report goes to stdout; the exit status is 1 when no trial finished.
--print-config shows the resolved sweep (with its name)."""


# Each config-taking subcommand's example preset (configs/ in the repo; `vidray demo` writes its own).
PRESET_EXAMPLES = {"clips": "configs/demo/clips.yaml", "pretrain": "configs/demo/pretrain.yaml",
                   "finetune": "configs/demo/finetune_retrieval.yaml", "sweep": "configs/demo/sweep.yaml",
                   "train-vq": "configs/demo/vq_semantic.yaml",
                   "evaluate": "a demo's configs/evaluate_pretrained.yaml",
                   "extract": "a demo's configs/extract_image2d.yaml"}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    command = p.prog.split()[-1]
    p.add_argument("config", nargs="?", help=f"YAML preset (e.g. {PRESET_EXAMPLES[command]}); "
                   "omit to start from the built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved, validated config as YAML and exit")
    _add_verbose(p)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's, Ray Data's and Tune's own logs and the workers' output (default: "
                   "their warnings, and one progress line per training job)")


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    # `vidray pretrain a.b=1` (no preset) puts the first override into `config`.
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _resolve(args: argparse.Namespace, cls: type):
    """The command's config, checked whole (required values included) before the job's own
    imports (torch, Ray: seconds); with ``--print-config`` printed, values still to set marked."""
    from vidray.config import ConfigError, dump_yaml, load_config, missing_required

    path, overrides = _split_config_and_overrides(args)
    if args.print_config:
        cfg = load_config(cls, path, overrides, validate=False)
        print(dump_yaml(cfg), end="", file=args.stdout)
        todo = [f"{key}: required ({help_text})" for key, help_text in missing_required(cfg)]
        try:
            load_config(cls, path, overrides)
        except ConfigError as err:
            todo += [] if any(line.startswith(err.key + ":") for line in todo) else [f"{err.key}: {err.message}"]
        if todo:
            print("# still to set before it runs:\n" + "\n".join(f"#   {line}" for line in todo),
                  file=args.stdout)
        raise SystemExit(0)
    cfg = load_config(cls, path, overrides)
    missing = missing_required(cfg)
    if missing:
        raise ConfigError(missing[0][0], f"is required: {missing[0][1]}")
    return cfg


def arch_of(path: str | None, overrides: list[str]) -> str:
    """``model.arch`` of a preset + overrides (``vlm`` when unset)."""
    from vidray.archs import arch_of_dict
    from vidray.config import merge, parse_overrides, read_yaml

    return arch_of_dict(merge(read_yaml(path) if path else {}, parse_overrides(overrides)))


def _print_report(args: argparse.Namespace, report: dict) -> None:
    """A job's JSON report: alone on stdout (`vidray extract ... | jq .uri`), as :func:`main` sends
    everything else a Ray job prints to stderr."""
    print(json.dumps(report, indent=2, default=str), file=args.stdout, flush=True)


def _run_training_command(args: argparse.Namespace) -> int:
    path, overrides = _split_config_and_overrides(args)
    from vidray.archs import config_class, runner

    arch = arch_of(path, overrides)
    cfg = _resolve(args, config_class(args.command, arch))
    job = runner(args.command, arch)
    report = job(cfg, say=lambda m: print(m, file=sys.stderr))
    _print_report(args, report)
    return 0


# --- subcommands -----------------------------------------------------------------------------

def cmd_synth(args: argparse.Namespace) -> int:
    from vidray.config import from_dict, merge, parse_overrides, read_yaml
    from vidray.data.synth import SynthConfig, synthesize

    flags = {"videos": args.videos, "seed": args.seed, "min_seconds": args.min_seconds,
             "max_seconds": args.max_seconds, "workers": args.workers, "style": args.style}
    base = merge(read_yaml(args.config) if args.config else {}, parse_overrides(args.overrides))
    cfg = from_dict(SynthConfig, merge(base, {k: v for k, v in flags.items() if v is not None}))
    summary = synthesize(args.out, cfg, progress=not args.quiet)
    print(json.dumps(vars(summary), indent=2, default=str))
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from vidray.config import parse_overrides
    from vidray.data.adapters import adapt, write_result

    options = parse_overrides(args.option or [])
    result = adapt(args.format, args.annotations, args.videos, split=args.split, **options)
    for problem in result.problems:
        print(f"skipped {problem}", file=sys.stderr)
    written = write_result(result, args.out)
    print(f"{result.manifest.num_rows} videos, {len(result.problems)} malformed rows skipped; "
          f"wrote {', '.join(written)}")
    return 0


def cmd_clips(args: argparse.Namespace) -> int:
    from vidray.data.clips import ClipsConfig, run_clips

    cfg = _resolve(args, ClipsConfig)
    report = run_clips(cfg)
    _print_report(args, report)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from vidray.feature_store.extract import ExtractConfig, run_extract

    cfg = _resolve(args, ExtractConfig)
    report = run_extract(cfg, progress=True, say=lambda m: print(m, file=sys.stderr))
    _print_report(args, report)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from vidray.feature_store import store

    if args.action == "ls":
        entries = store.list_sets(args.uri)
        if not entries:
            print(f"no feature sets under {args.uri}")
        for e in entries:
            state = (f"{e['rows']:>8d} rows  {e['videos']:>6d} videos  {e['quarantined']:>4d} quarantined"
                     if e["committed"] else "   (not committed: extraction unfinished)")
            print(f"{e['name']:12s} {e['version']:16s} {state}  {e['uri']}")
        return 0
    if args.action == "show":
        feature_set = store.open_version(args.uri)
        shown = {k: v for k, v in feature_set.manifest.items() if k != "schema_ipc"}
        print(json.dumps(shown, indent=2))
        quarantine = feature_set.quarantine().to_pylist()
        videos = [r for r in quarantine if r["clip_index"] is None]
        print(f"\nquarantine: {len(videos)} videos, {len(quarantine) - len(videos)} captions past the end")
        for row in quarantine:
            caption = "" if row["clip_index"] is None else f" caption {row['clip_index']}"
            print(f"  {row['video_id']}{caption}: {row['error']}  ({row['uri']})")
        return 0
    report = store.validate(args.uri)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else EXIT_FAILED


def cmd_pretrain(args: argparse.Namespace) -> int:
    return _run_training_command(args)


def cmd_finetune(args: argparse.Namespace) -> int:
    return _run_training_command(args)


def cmd_train_vq(args: argparse.Namespace) -> int:
    from vidray.config.frames import VQTokenizerConfig
    from vidray.train.frames_run import run_train_vq

    report = run_train_vq(_resolve(args, VQTokenizerConfig), say=lambda m: print(m, file=sys.stderr))
    _print_report(args, report)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vidray.config.train import EvaluateConfig

    cfg = _resolve(args, EvaluateConfig)
    from vidray.eval.evaluate import run_evaluate

    report = run_evaluate(cfg, say=lambda m: print(m, file=sys.stderr))
    _print_report(args, report)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vidray.tuning.sweep import load_sweep

    path, overrides = _split_config_and_overrides(args)
    cfg = load_sweep(path, overrides)
    if args.print_config:
        from vidray.config import dump_yaml

        print(dump_yaml(cfg), end="", file=args.stdout)
        return 0
    from vidray.tuning.sweep import run_sweep

    report = run_sweep(cfg, resume=args.resume, say=lambda m: print(m, file=sys.stderr))
    _print_report(args, report)
    return 0 if report["best"] else 1  # every trial failed: a script must not read it as done


def cmd_stack(args: argparse.Namespace) -> int:
    from vidray import stack

    if args.action == "up":
        info = stack.up(args.dir, bucket=args.bucket, mlflow_dir=args.mlflow_dir, persist=not args.no_persist)
        for name, s in info.services.items():
            print(f"# {name:6s} {s.url}  pid {s.pid}  log {s.log}", file=sys.stderr)
        print(f"# MLflow UI: {info.services['mlflow'].url}   bucket: s3://{info.bucket}"
              + (f" (its objects kept in {stack.saved_objects_dir(info)} while the stack is down)"
                 if info.persist else " (in memory: gone after `stack down`)"), file=sys.stderr)
        where = "" if os.path.abspath(args.dir) == stack.DEFAULT_DIR else f" --dir {shlex.quote(args.dir)}"
        print(f"# to use it:  eval \"$(vidray stack env{where})\"", file=sys.stderr)
        print(info.export_lines())
        return 0
    if args.action == "env":
        info = stack.load(args.dir)
        if info is None:
            print(f"no stack in {args.dir}: run `vidray stack up` first", file=sys.stderr)
            return EXIT_FAILED
        print(info.export_lines())
        return 0
    if args.action == "down":
        stopped = stack.down(args.dir)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    state = stack.status(args.dir)
    if not state:
        print(f"no stack in {args.dir}")
        return EXIT_FAILED
    for name, s in state.items():
        health = "healthy" if s["healthy"] else ("running, not answering" if s["alive"] else "dead")
        print(f"{name:6s} {s['url']:28s} pid {s['pid']:<8d} {health}")
    return 0 if all(s["healthy"] for s in state.values()) else EXIT_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    from vidray.cluster import submit

    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    report = submit(command, args.address, working_dir=args.working_dir or None, wait=not args.no_wait,
                    timeout_s=args.timeout, say=lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, indent=2))
    return 0 if args.no_wait or report["status"] == "SUCCEEDED" else EXIT_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from vidray.jobs.demo import run_demo

    return run_demo(args.workdir, videos=args.videos, keep_stack=args.keep_stack, model=args.model,
                    quick=args.quick, sweep=not args.no_sweep)


# --- parser ----------------------------------------------------------------------------------

def _config_keys(command: str) -> str:
    """The config keys of a training command, with type, default and help, for its --help."""
    from vidray.config import describe
    from vidray.config.train import EvaluateConfig, FinetuneConfig, PretrainConfig
    from vidray.data.clips import ClipsConfig
    from vidray.feature_store.extract import ExtractConfig

    from vidray.tuning.config import SweepConfig

    from vidray.config.frames import VQTokenizerConfig

    cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig,
           "sweep": SweepConfig, "train-vq": VQTokenizerConfig, "clips": ClipsConfig,
           "extract": ExtractConfig}[command]
    if command == "sweep":  # the job configs inside have their own commands' --help
        lines = ["config keys of `vidray sweep` (pretrain.*, finetune.*, evaluate.*: see those commands):"]
        for key, type_name, default, help_text in describe(cls):
            if key in ("pretrain", "finetune"):  # job configs, their schema picked by pretrain.model.arch
                shown = "default: `vidray pretrain`'s" if key == "pretrain" else "default None"
                lines.append(f"  {key} (mapping, {shown}): {help_text}")
            elif not key.startswith(("pretrain.", "finetune.", "evaluate.")):
                lines.append(f"  {key} ({type_name}, default {default!r}): {help_text}")
        return "\n".join(lines)
    lines = [f"config keys of `vidray {command}`" + (" (VLM; the frames models' model.arch has its own, "
                                                    "listed below)" if command in ARCH_JOBS else "") + ":"]
    for key, type_name, default, help_text in describe(cls):
        lines.append(f"  {key} ({type_name}, default {default!r}): {help_text}")
    frames_archs = [a for a in ARCH_JOBS.get(command, {}) if a != "vlm"]
    for config_class in dict.fromkeys(ARCH_JOBS[command][a][0] for a in frames_archs):  # one shared schema
        lines.append(f"\nconfig keys of `vidray {command}` with model.arch={'|'.join(frames_archs)}:")
        lines += [f"  {key} ({type_name}, default {default!r}): {help_text}"
                  for key, type_name, default, help_text in describe(load(config_class))]
    return "\n".join(lines)


def _default_job_address() -> str:
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):  # Ray's own order
        if os.environ.get(name, "").startswith(("http://", "https://")):
            return os.environ[name]
    return "http://127.0.0.1:8265"


def build_parser() -> argparse.ArgumentParser:
    from vidray import stack

    parser = argparse.ArgumentParser(
        prog="vidray", description="Ray-based data-and-training platform for video-language "
        "pre-training. Every path may be a local path or an s3:// URI.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vidray {vidray.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("synth", help="write a synthetic video-caption corpus (real H.264 MP4s)",
                       description="Write OUT/videos/*.mp4, OUT/manifest.parquet, OUT/qa.jsonl, "
                       "OUT/mc.jsonl and OUT/coin.json:\ncoloured shapes moving in named directions, "
                       "with timestamped captions. Deterministic per seed.\n--style asr writes a "
                       "pre-training corpus of other videos instead (HowTo100M-like\nnoisy, loosely "
                       "timed captions; videos and manifest only).",
                       epilog="overrides are SynthConfig keys, e.g.  vidray synth OUT style=asr videos=64\n"
                       "keys: videos, seed, min_seconds, max_seconds, workers, val_fraction, "
                       "test_fraction, style\n(the asr style ignores val_fraction and test_fraction: "
                       "every video is in train).\nFlags win over overrides, overrides over --config.",
                       formatter_class=fmt)
    p.add_argument("out", help="output folder or s3:// prefix")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="SynthConfig overrides")
    p.add_argument("--videos", type=int, help="number of videos (default 24)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--min-seconds", type=float, help="shortest video (default 4)")
    p.add_argument("--max-seconds", type=float, help="longest video (default 12)")
    p.add_argument("--workers", type=int, help="encoder processes (default: one per core)")
    p.add_argument("--style", choices=("clean", "asr"),
                   help="clean (default): the exactly captioned downstream set with train/val/test "
                   "splits, QA, MC and COIN files; asr: a HowTo100M-like pre-training corpus of other "
                   "videos (ids asr-*): captions with filler words and chatter, loosely timed, every "
                   "video in train, no QA/MC/COIN")
    p.add_argument("--config", help="a saved SynthConfig YAML (e.g. a demo's configs/synth.yaml); "
                   "flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_synth)

    p = sub.add_parser("adapt", help="turn annotation files (WebVid, HowTo100M, MSR-VTT, YouCook2, "
                       "QA jsonl) into a vidray manifest",
                       description="Malformed rows are reported with file and line and skipped.")
    p.add_argument("format", help="webvid | howto100m | msrvtt | youcook2 | qa | mc")
    p.add_argument("annotations", help="annotation file (local path or URI)")
    p.add_argument("--videos", required=True, help="folder or prefix holding the videos")
    p.add_argument("--out", required=True, help="manifest.parquet to write (qa/mc also write "
                   "<name>.qa.parquet beside it)")
    p.add_argument("--split", help="webvid/howto100m/qa/mc: the split of every row (default train); "
                   "msrvtt/youcook2: keep only this split")
    p.add_argument("--option", action="append", metavar="key=value",
                   help="format-specific option: layout=flat (webvid), test_csv=URI (msrvtt), "
                   "index_base=1 (mc)")
    p.set_defaults(run=cmd_adapt)

    p = sub.add_parser("clips", help="Ray Data clip pipeline: manifest -> sparsely sampled frames "
                       "(Parquet) + quarantine of bad videos", epilog=CONFIG_EPILOG + "\n\n" + _config_keys("clips"),
                       formatter_class=fmt)
    _add_config_args(p)
    p.set_defaults(run=cmd_clips)

    p = sub.add_parser("extract", help="one-time feature extraction (s3d, text, frames, vq) to a "
                       "versioned feature set, exactly once",
                       epilog=CONFIG_EPILOG + "\n\n" + _config_keys("extract"), formatter_class=fmt)
    _add_config_args(p)
    p.set_defaults(run=cmd_extract)

    commands = {
        "pretrain": ("pre-training on Ray Train: VLM (MMM + masked token loss) from S3D + text "
                     "feature sets, or with model.arch=allinone|lavender|evilm a frames model (MLM + "
                     "VTM, + MVM for evilm) from the frames feature set", cmd_pretrain),
        "finetune": ("fine-tune on Ray Train (init_from=a pre-training checkpoint): VLM for retrieval, "
                     "captioning or action segmentation; the frames models for retrieval or open-ended QA "
                     "(LAVENDER also multiple-choice QA, task=mc, and several tasks at once, task=multi)",
                     cmd_finetune),
        "train-vq": ("train E-ViLM's VQ video tokenizer on the frames feature set (model.kind=semantic: "
                     "codes that predict the caption's words; pixel: codes that reconstruct pixels); "
                     "then `vidray extract` with extractor=vq caches its codes for MVM", cmd_train_vq),
        "evaluate": ("evaluate a fine-tuned checkpoint: retrieval R@K/MdR (+ MC-QA), captioning "
                     "BLEU/METEOR/ROUGE-L/CIDEr, segmentation frame accuracy; logged to MLflow", cmd_evaluate),
    }
    for name, (help_text, run) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=fmt,
                           epilog=CONFIG_EPILOG + "\n\n" + _config_keys(name))
        _add_config_args(p)
        p.set_defaults(run=run)

    help_text = ("Ray Tune sweep over config paths (MMM ratio, masking rates, tokenizers): each "
                 "trial runs the real pre-training (+ fine-tuning and evaluation), ASHA stops "
                 "laggards, MLflow holds a parent run with one child run per trial")
    p = sub.add_parser("sweep", help=help_text, description=help_text, formatter_class=fmt,
                       epilog=SWEEP_EPILOG + "\n\n" + _config_keys("sweep"))
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of the same "
                   "name: finished trials are kept, the others run (each from its last checkpoint)")
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser("features", help="inspect the feature store",
                       description="ls ROOT: every set and version (committed or not); "
                       "show ROOT/NAME/VERSION: manifest, counts and quarantine; validate "
                       "ROOT/NAME/VERSION: check every part against the manifest (exit 1 if not ok).")
    p.add_argument("action", choices=["ls", "show", "validate"])
    p.add_argument("uri", help="feature-store root (ls) or a version's URI (show, validate)")
    p.set_defaults(run=cmd_features)

    p = sub.add_parser("stack", help="the embedded local services: S3 endpoint + MLflow server",
                       description="up: start moto (S3) and an MLflow server on 127.0.0.1 and print "
                       "the environment to export; env: print it again; status: health-check; "
                       "down: stop exactly the processes `up` started.")
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--dir", default=stack.DEFAULT_DIR,
                   help=f"state, logs, sqlite and artifacts (default {stack.DEFAULT_DIR})")
    p.add_argument("--bucket", default="vidray", help="bucket to create (default vidray)")
    p.add_argument("--mlflow-dir", help="MLflow sqlite + artifacts (default: --dir); e.g. a demo's "
                   "WORKDIR/mlflow to browse its runs")
    p.add_argument("--no-persist", action="store_true",
                   help="up: the S3 endpoint's objects only in memory (default: `down` saves them to "
                   "DIR/s3/BUCKET and the next `up` puts them back)")
    p.set_defaults(run=cmd_stack)

    p = sub.add_parser("submit", help="run a vidray command as a job on a Ray cluster",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Submits `vidray COMMAND ...` to the cluster's job server with the "
                       "working dir uploaded (.gitignore'd files stay behind) and MLFLOW_TRACKING_URI, "
                       "AWS_ENDPOINT_URL and AWS_(DEFAULT_)REGION forwarded from this shell. Credentials "
                       "are never forwarded: the nodes have their own (infra/). Streams the job's log "
                       "until it ends; exits 0 when it SUCCEEDED.",
                       epilog="e.g.  vidray submit --address http://127.0.0.1:8265 -- pretrain "
                       "configs/paper/vlm_pretrain.yaml data.features=s3://... train.storage_path=s3://...")
    p.add_argument("--address", default=_default_job_address(),
                   help="the cluster's dashboard URL (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS if http(s)://, else "
                   "http://127.0.0.1:8265, e.g. through `ray dashboard infra/cluster/aws.yaml`)")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default .; "
                   "'' to upload nothing: the code in the image runs)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--timeout", type=float, help="give up waiting after this many seconds (the job goes on)")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the vidray subcommand and its arguments")
    p.set_defaults(run=cmd_submit)

    p = sub.add_parser("demo", help="the whole path end to end on the embedded defaults",
                       description="Starts the local stack, writes a synthetic corpus, runs every "
                       "job that exists so far and logs to MLflow. Rerunning on the same workdir "
                       "reuses what is done.")
    p.add_argument("--workdir", default="demo-work", help="where everything goes (default ./demo-work)")
    p.add_argument("--videos", type=int, default=48, help="synthetic videos (default 48)")
    p.add_argument("--model", choices=["vlm", "allinone", "lavender", "evilm"], default="vlm",
                   help="vlm (default): EfficientNet-Lite0 + text features, VLM (from all-MiniLM-L6-v2) "
                   "pre-trained on an ASR-style corpus, retrieval with and without it, an MMM sweep; "
                   "allinone | lavender: frames feature set, pre-training, retrieval and QA "
                   "fine-tuning; evilm: the same after training its VQ tokenizer and caching its codes")
    p.add_argument("--quick", action="store_true",
                   help="a tenth of every training run's steps (at least 10): checks the whole path in a few "
                   "minutes; the scores it prints stay near chance")
    p.add_argument("--no-sweep", action="store_true",
                   help="leave out VLM's closing MMM-ratio sweep (its longest step after pre-training: "
                   "two trials of three Ray Train runs each)")
    p.add_argument("--keep-stack", action="store_true",
                   help="leave the S3 endpoint and MLflow server running afterwards (to browse the UI)")
    _add_verbose(p)
    p.set_defaults(run=cmd_demo)
    return parser


# Set by the SIGTERM handler: the KeyboardInterrupt it raises may come back re-raised by a library
# as a plain one, so the flag, not the exception, says which signal it was.
_TERMINATED: list[int] = []


def _raise_terminated(signum, frame) -> None:
    """SIGTERM unwinds as Ctrl-C does, from wherever the main thread is."""
    _TERMINATED.append(signum)
    raise KeyboardInterrupt()


# The commands that run Ray jobs and end with a JSON report on stdout (`vidray demo` prints its
# steps there for a person to read).
RAY_JOBS = (cmd_clips, cmd_extract, cmd_pretrain, cmd_finetune, cmd_train_vq, cmd_evaluate, cmd_sweep)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ["VIDRAY_VERBOSE"] = "1"  # read by vidray.cluster.init_ray, here and in Ray's workers
    # A SIGTERM (a `timeout` wrapper, a scheduler, `kill`) would end Python without running any
    # `finally`, leaving the local stack's servers and Ray behind: make it unwind like Ctrl-C.
    main_thread = threading.current_thread() is threading.main_thread()   # where signals can be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    args.stdout = sys.stdout  # where a command's result goes (a job's report, --print-config)
    try:
        if args.run not in RAY_JOBS:
            return args.run(args) or 0
        # Ray prints to the driver's sys.stdout from its own threads (a raylet's "worker processes
        # have been started" warning landed inside `vidray finetune`'s JSON): in a job, all of that
        # goes to stderr and stdout carries the report alone.
        with contextlib.redirect_stdout(sys.stderr):
            return args.run(args) or 0
    except ConfigError as err:
        print(f"vidray {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        terminated = bool(_TERMINATED)
        print(f"vidray {args.command}: {'terminated' if terminated else 'interrupted'}; what it started "
              "is stopped", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception as err:  # a failed job: one line for the user, the trace on request
        if os.environ.get("VIDRAY_DEBUG"):
            raise
        print(f"vidray {args.command}: {type(err).__name__}: {err}\n"
              "(set VIDRAY_DEBUG=1 for the full traceback)", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The `vidray` command: :func:`main`, then Ray's last words kept off stdout. Ray prints from
    its own threads until the process ends (a node lost mid-job: "(raylet) Raylet is terminated",
    seen after the report of a `vidray extract` on a multi-node cluster); a job's stdout is its
    report alone."""
    code = main()
    sys.stdout.flush()
    sys.stdout = sys.stderr if verbose() else WithoutRayNoise(sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    run()
