"""The `vpmoe` command line: one entry point, one subcommand per job.

Exit codes: 0 success, 2 bad input or config (the message says what and where), 1 any other failure (an error
of the environment, such as a full disk, is one line naming the path), 141 when the reader of the output went away
(`vpmoe data inspect DIR | head`).
Under torchrun the one-line message comes from rank 0 only (torchrun itself then exits 1; see `report`).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time

from vpmoe.errors import RunError, UserError


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build and inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="source records -> dataset directory")
    build.add_argument("config")
    _add_set(build)
    inspect = data_sub.add_parser("inspect", help="counts, lengths, span shares and a rendered sample")
    inspect.add_argument("dir")
    inspect.add_argument("--split", default="train")
    inspect.add_argument("--sample", type=int, default=0, help="index of the sample to render")
    _add_set(inspect)
    verify = data_sub.add_parser("verify", help="check every file against the manifest (sizes, counts, sha256)")
    verify.add_argument("dir")

    params = sub.add_parser("params", help="parameter counts of a model config (total, active, by component) as JSON")
    params.add_argument("config")
    _add_set(params)

    teacher = sub.add_parser("teacher", help="teacher scoring")
    teacher_sub = teacher.add_subparsers(dest="teacher_command", required=True)
    teacher_score = teacher_sub.add_parser("score", help="dataset + teacher -> top-K sidecar")
    teacher_score.add_argument("config")
    _add_set(teacher_score)

    upcycle = sub.add_parser("upcycle", help="one conversion step between checkpoint objects")
    upcycle.add_argument("config")
    _add_set(upcycle)

    train = sub.add_parser("train", help="one training stage; resumes from the run directory")
    train.add_argument("config")
    _add_set(train)

    autotune = sub.add_parser("autotune", help="largest micro-batch that fits (GPU) and the accumulation for a "
                                               "target global batch")
    autotune.add_argument("config", help="a training config (configs/train/*.toml)")
    autotune.add_argument("--seq-len", type=int, help="sequence length (default: the config's data.seq_len)")
    autotune.add_argument("--target-global-batch", type=int, nargs="+", default=[256, 512], metavar="SEQUENCES")
    autotune.add_argument("--world-size", type=int, default=1, help="data-parallel ranks the plan is for")
    autotune.add_argument("--max-micro-batch", type=int, default=256)
    autotune.add_argument("--out", help="also write the report as JSON here")
    _add_set(autotune)

    prof = sub.add_parser("profile", help="profile the training step -> summary JSON (kernels, phases, memory)")
    prof.add_argument("config", help="a training config (configs/train/*.toml)")
    prof.add_argument("--out", default="reports/perf/profile.json")
    prof.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, optimizer state)")
    prof.add_argument("--steps", type=int, default=5, help="timed steps")
    prof.add_argument("--profiled-steps", type=int, default=2, help="steps under the profiler")
    _add_set(prof)

    evaluate = sub.add_parser("eval", help="core eval -> eval/<step>.{json,md} beside the checkpoint; several "
                                           "checkpoints -> also a comparison table and plot")
    evaluate.add_argument("config", nargs="?", help="an eval config (configs/eval/*.toml)")
    evaluate.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                          help="a run dir, training checkpoint or checkpoint object (repeat to compare several)")
    evaluate.add_argument("--dataset", help="a built dataset for held-out loss (default: the config's, else none)")
    evaluate.add_argument("--all-steps", action="store_true", help="evaluate every checkpoint of a run directory")
    evaluate.add_argument("--out", help="directory for the comparison of several checkpoints")
    _add_set(evaluate)

    export = sub.add_parser("export", help="checkpoint -> config.json + model safetensors + tokenizer files")
    export.add_argument("checkpoint", help="a run directory, a training checkpoint or a checkpoint object")
    export.add_argument("--out", required=True)

    demo = sub.add_parser("demo", help="the whole pipeline end to end on CPU, tiny sizes")
    demo.add_argument("--out", default="demo", help="directory for every artifact (replaced if it is a demo)")

    doctor = sub.add_parser("doctor", help="environment, asset and device checks")
    doctor.add_argument("--config", help="a training config: also report the device mesh it would build")
    doctor.add_argument("--world-size", type=int, default=1, help="ranks the mesh is for (torchrun's world size)")
    _add_set(doctor)
    return parser


_RUN_MODELS = ("train", "eval", "teacher", "demo")  # see vpmoe.hostmem


def run(args: argparse.Namespace) -> None:
    if args.command in _RUN_MODELS:
        from vpmoe.hostmem import keep_freed_memory

        keep_freed_memory()
    if args.command == "data" and args.data_command == "build":
        from vpmoe.data.build import build_from_config

        build_from_config(args.config, args.overrides)
    elif args.command == "data" and args.data_command == "inspect":
        from vpmoe.data.inspect import inspect

        inspect(args.dir, split=args.split, sample=args.sample)
    elif args.command == "data" and args.data_command == "verify":
        from vpmoe.data.verify import verify

        verify(args.dir)
    elif args.command == "params":
        import json

        from vpmoe.model.config import load_model_config
        from vpmoe.model.params import count_params

        print(json.dumps(count_params(load_model_config(args.config, args.overrides)), indent=2))
    elif args.command == "teacher" and args.teacher_command == "score":
        from vpmoe.teacher.score import score_from_config

        score_from_config(args.config, args.overrides)
    elif args.command == "upcycle":
        from vpmoe.upcycle.run import upcycle_from_config

        upcycle_from_config(args.config, args.overrides)
    elif args.command == "train":
        from vpmoe.train.trainer import train_from_config

        train_from_config(args.config, args.overrides)
    elif args.command == "autotune":
        from vpmoe.perf.autotune import autotune, print_report

        for name, value in (("--world-size", args.world_size), ("--max-micro-batch", args.max_micro_batch),
                            *(("--target-global-batch", t) for t in args.target_global_batch)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        report = autotune(args.config, args.overrides, args.seq_len, args.target_global_batch, args.world_size,
                          args.max_micro_batch)
        print_report(report)
        if args.out:
            from vpmoe.artifacts.files import write_json

            write_json(args.out, report)
            print(f"wrote {args.out}")
    elif args.command == "profile":
        from vpmoe.perf.profile import profile_config

        for name, value in (("--steps", args.steps), ("--profiled-steps", args.profiled_steps)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        profile_config(args.config, args.overrides, args.out, args.warmup, args.steps, args.profiled_steps)
    elif args.command == "eval":
        from vpmoe.eval.run import eval_from_cli

        eval_from_cli(args.config, args.checkpoint, args.dataset, args.all_steps, args.out, args.overrides)
    elif args.command == "export":
        from vpmoe.export import export

        print(f"wrote {export(args.checkpoint, args.out)}")
    elif args.command == "demo":
        from vpmoe.demo import demo

        demo(args.out)
    elif args.command == "doctor":
        from vpmoe.doctor import doctor

        if args.world_size < 1:
            raise UserError(f"--world-size must be at least 1, got {args.world_size}")
        doctor(args.config, args.overrides, args.world_size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
        sys.stdout.flush()  # here, so that a closed pipe is seen while it can still be handled
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing more, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as if killed by SIGPIPE, like any other command in a pipe
    except UserError as e:
        report(f"vpmoe: error: {e}")
        return 2
    except RunError as e:
        report(f"vpmoe: stopped: {e}")
        return 1
    except KeyboardInterrupt:
        print("vpmoe: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno is None:
            raise
        report(f"vpmoe: stopped: {os_error_message(e)}")
        return 1
    return 0


OTHER_RANK_GRACE_S = 10.0


def report(line: str) -> None:
    """The one-line error, said once per job: under torchrun every rank usually meets the same error, so rank 0
    prints it and the other ranks wait. They wait rather than exit because torchrun ends the whole job (SIGTERM) as
    soon as one rank exits, which could cut rank 0 off before it prints; a rank that is still alive after the grace
    period met an error of its own (rank 0 is stuck, e.g. in a collective) and prints it, naming itself."""
    rank = os.environ.get("RANK", "")
    if rank in ("", "0"):
        print(line, file=sys.stderr)
        return
    sys.stderr.flush()
    time.sleep(OTHER_RANK_GRACE_S)
    print(f"{line} (rank {rank})", file=sys.stderr)


def os_error_message(e: OSError) -> str:
    """One line for an error of the system that no layer below turned into a message of its own."""
    where = " and ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some space on that device and run the same command again (it resumes where it can)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "give this user write access there, or choose another path in the config"
    else:
        advice = "check that path and run the same command again"
    return f"{e.strerror or e}" + (f" ({where})" if where else "") + f": {advice}"


if __name__ == "__main__":
    sys.exit(main())
