"""`clipmesh`: one CLI for the coordinator, the workers and their clients."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path

from clipmesh import faults
from clipmesh.auth import TLS
from clipmesh.client import DEFAULT_ADDRESS, REQUEST_DEFAULTS
from clipmesh.savers import AUTO, MAX_SLICE_CHUNKS, STEP_CACHES
from clipmesh.specs import STRATEGY_SPECS
from clipmesh.v1 import clipmesh_pb2 as pb


def _strategy_help() -> str:
    names = list(STRATEGY_SPECS)
    long = next(s.name for s in STRATEGY_SPECS.values() if s.for_long_videos)
    stream = next(s.name for s in STRATEGY_SPECS.values() if s.streams)
    return (f"{', '.join(names[:-1])} or {names[-1]} (default: {long} beyond the model's native length, "
            f"{stream} for --frames 0)")


def _add_option_args(p: argparse.ArgumentParser) -> None:
    """One flag per option of every strategy, from its spec; unset flags leave the option to the defaults."""
    for spec in STRATEGY_SPECS.values():
        if not spec.options_field:
            continue
        defaults = "the model's defaults" if spec.model_defaults_field else "the defaults"
        g = p.add_argument_group(f"{spec.name} ({spec.summary}; unset: {defaults})")
        for o in spec.options:
            if o.type is bool:
                # --x / --no-x: a default that is on can be turned off
                g.add_argument(o.flag, action=argparse.BooleanOptionalAction, default=None, help=o.help)
            elif o.choices:
                g.add_argument(o.flag, choices=o.choices, help=o.help)
            else:
                high = o.high if isinstance(o.high, str) else f"{o.high:g}"
                g.add_argument(o.flag, type=o.type, help=f"{o.help} (in [{o.low:g}, {high}])")


def _add_request_args(p: argparse.ArgumentParser, workers_flag: str) -> None:
    d = REQUEST_DEFAULTS
    p.add_argument("prompt")
    p.add_argument("--negative-prompt", default=d["negative_prompt"])
    p.add_argument("--frames", type=int, default=d["num_frames"],
                   help="output frames (4k+1 for Wan); 0: until cancelled (block_pipeline)")
    p.add_argument("--height", type=int, default=d["height"])
    p.add_argument("--width", type=int, default=d["width"])
    p.add_argument("--steps", type=int, default=d["num_inference_steps"])
    p.add_argument("--guidance", type=float, default=d["guidance_scale"])
    p.add_argument("--guidance-2", type=float, metavar="G",
                   help="two-expert models (Wan 2.2 A14B): the low-noise expert's guidance (unset: --guidance)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--image", type=Path, metavar="PATH",
                   help="image-to-video models: the first frame (PNG or JPEG, resized to --height x --width)")
    p.add_argument("--model", default=d["model"], help="preset (tiny-wan, bench-wan) or a local diffusers folder")
    p.add_argument("--strategy", default=d["strategy"], choices=["", *STRATEGY_SPECS], metavar="STRATEGY",
                   help=_strategy_help())
    p.add_argument(workers_flag, dest="workers", type=int, default=2 if workers_flag == "--workers" else 0)
    p.add_argument("--fps", type=float, default=d["fps"])
    g = p.add_argument_group("mesh (beside the strategy's split; unset: the planner decides and says why)")
    g.add_argument("--cfg-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="the two guidance branches on different workers: cfg 2 x N/2 (an even worker count; "
                        "exact, ulysses, clip_parallel)")
    p.add_argument("--lora", action="append", type=_lora, default=[], metavar="NAME[:SCALE]",
                   help="a LoRA the workers hold (NAME.safetensors in their --lora-dir) at SCALE (default 1); "
                        "repeat for more")
    g.add_argument("--shard-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="every transformer block's weights sharded over the workers of a branch (FSDP2), "
                        "gathered for its forward (unset: sharded where they crowd a worker's memory)")
    _add_option_args(p)
    g = p.add_argument_group("savers (Streamlined Inference; slicing with any strategy, step caches with all but "
                             "block_pipeline)")
    g.add_argument("--slice-chunks", type=_slice_chunks, metavar="N|auto",
                   help=f"feature slicer: run each sliced operator group in N chunks (exact; 0 off, "
                        f"up to {MAX_SLICE_CHUNKS}; auto: the family's default)")
    g.add_argument("--step-cache", metavar="SPEC", help="; ".join(
        ["off"] + [f"{kind}:{'K' if isinstance(rng[0], int) else 'X'} ({', '.join(fams)}): {what}"
                   for kind, (fams, rng, _, what) in STEP_CACHES.items()]) + " (approximate)")


    g.add_argument("--tiled-decode", action="store_true", default=None,
                   help="decode in blended spatial tiles where one frame does not fit (approximate)")
    g = p.add_argument_group("faults")
    g.add_argument("--checkpoint-every", type=int, metavar="K", help=(
        f"steps between step checkpoints a lost worker's job resumes from (0 = off; unset: "
        f"{faults.DEFAULT_CHECKPOINT_EVERY}; in [0, {faults.MAX_CHECKPOINT_EVERY}])"))
    g.add_argument("--max-attempts", type=int, metavar="N", help=(
        f"placements before a job whose workers fail is FAILED (unset: {faults.DEFAULT_MAX_ATTEMPTS}; "
        f"in [1, {faults.MAX_ATTEMPTS}])"))


def _lora(text: str) -> pb.LoraRef:
    name, _, scale = text.partition(":")
    try:
        return pb.LoraRef(name=name, scale=float(scale) if scale else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"NAME[:SCALE] with a number for SCALE, got {text!r}") from None


def _slice_chunks(text: str) -> int:
    return AUTO if text == "auto" else int(text)


def _request_fields(args) -> dict:
    options = {spec.options_field: spec.options_message(**{o.name: getattr(args, o.name) for o in spec.options
                                                           if getattr(args, o.name) is not None})
               for spec in STRATEGY_SPECS.values() if spec.options_field}
    return dict(negative_prompt=args.negative_prompt, num_frames=args.frames, height=args.height, width=args.width,
                num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, model=args.model,
                strategy=args.strategy, num_workers=args.workers, fps=args.fps, **options,
                savers=pb.SaverOptions(**{k: v for k, v in (("slice_chunks", args.slice_chunks),
                                                            ("step_cache", args.step_cache),
                                                            ("tiled_decode", args.tiled_decode)) if v is not None}),
                **{k: v for k, v in (("checkpoint_every", args.checkpoint_every),
                                     ("max_attempts", args.max_attempts),
                                     ("guidance_scale_2", args.guidance_2),
                                     ("cfg_parallel", args.cfg_parallel), ("shard_weights", args.shard_weights),
                                     ("loras", args.lora or None),
                                     ("image", _read_image(args.image))) if v is not None})


def _read_image(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"--image: cannot read {path}: {exc.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipmesh", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("coordinator", help="run the coordinator daemon")
    p.add_argument("--listen", default="0.0.0.0:50051")
    p.add_argument("--data", type=Path, required=True, help="folder for the SQLite store and videos")
    p.add_argument("--heartbeat-timeout", type=float, default=15.0, help="seconds before a silent worker is lost")
    p.add_argument("--collective-timeout", type=int, default=120, help="seconds a worker waits in a collective")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.add_argument("--http", default="", metavar="HOST:PORT",
                   help="also serve OpenAI's Videos API (/v1/videos) here (off by default)")
    p.add_argument("--http-port-file", type=Path, help="write the HTTP port here once serving")
    p.add_argument("--checkpoint-dir", type=Path,
                   help="where jobs' step checkpoints are kept (default: DATA/checkpoints; shared storage on a farm)")
    p.add_argument("--backfill-wait", type=float, default=30.0,
                   help="seconds a job too big for the idle workers lets later jobs that fit run first (0 = FIFO)")
    p.add_argument("--max-queued-jobs", type=int, default=10_000, help="queued jobs beyond which SubmitJob is refused")
    p.add_argument("--register-timeout", type=float, default=10.0,
                   help="seconds an Attach stream may take to register before it is closed")
    p.add_argument("--retention-hours", type=float, default=168.0,
                   help="a finished job's video and events are deleted this long after it ended (0 = kept)")
    g = p.add_argument_group("credentials (none at all: open to anyone who reaches --listen); the environment "
                             "keeps tokens out of `ps`")
    for role, env, what in (("client", "CLIPMESH_CLIENT_TOKEN", "submit and see their own jobs"),
                            ("admin", "CLIPMESH_ADMIN_TOKEN", "see, cancel and fetch every job"),
                            ("worker", "CLIPMESH_WORKER_TOKEN", "attach and upload")):
        g.add_argument(f"--{role}-token", default=os.environ.get(env, ""), metavar="[NAME:]TOKEN,...",
                       help=f"tokens of {role}s, who {what} (env {env})")

    p = sub.add_parser("worker", help="run a worker daemon")
    p.add_argument("--coordinator", default=DEFAULT_ADDRESS)
    p.add_argument("--model", default="tiny-wan")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--lora-dir", type=Path, help="LoRA files (NAME.safetensors) jobs may name with --lora NAME")
    p.add_argument("--denoiser-on", choices=("device", "host"), default="device",
                   help="where the loaded denoiser stays: host keeps it in host memory for a model the device "
                        "cannot hold whole; each job copies to the device only what its rank runs (its shards "
                        "with --shard-weights, its stage's layers under block_pipeline, else the whole)")
    p.add_argument("--advertise-host", default="127.0.0.1", help="address peers use to reach this worker")
    p.add_argument("--name", default="", help="worker id (default: host-device-pid)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--speed", type=float, default=0.0,
                   help="latent pixels per second to report instead of measuring them (clip lengths follow "
                        "the workers' ratios; equal figures give equal clips)")
    p.add_argument("--token", default=os.environ.get("CLIPMESH_WORKER_TOKEN", ""),
                   help="a worker token of the coordinator (env CLIPMESH_WORKER_TOKEN)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0 = off)")

    p = sub.add_parser("certs", help="make a CA and the certificates of a farm (TLS; mTLS for every peer)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PEM files")
    p.add_argument("--hosts", default="127.0.0.1,localhost", help="names and addresses of the coordinator")
    p.add_argument("--workers", default="", help="worker ids, comma-separated (worker/ID certificates)")
    p.add_argument("--clients", default="", help="client names, comma-separated (client/NAME certificates)")
    p.add_argument("--admins", default="", help="admin names, comma-separated (admin/NAME certificates)")
    p.add_argument("--days", type=int, default=365)

    p = sub.add_parser("submit", help="submit a job and print its id")
    _add_request_args(p, "--num-workers")
    p.add_argument("--watch", action="store_true", help="follow progress until the job ends")

    for name, text in (("watch", "follow a job's progress"), ("cancel", "cancel a job")):
        sub.add_parser(name, help=text).add_argument("job_id")
    p = sub.add_parser("fetch", help="download a finished job's video")
    p.add_argument("job_id")
    p.add_argument("--output", type=Path, required=True)
    p = sub.add_parser("jobs", help="list jobs")
    p.add_argument("--limit", type=int, default=20)
    sub.add_parser("workers", help="list workers")

    p = sub.add_parser("generate", help="render on this machine: a coordinator and local workers, then stop")
    _add_request_args(p, "--workers")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--keep-data", type=Path, help="keep the coordinator's data folder here")
    p.add_argument("--lora-dir", type=Path, help="LoRA files (NAME.safetensors) for the workers it starts")

    for name, sp in sub.choices.items():
        if name in ("generate", "certs"):
            continue
        if name not in ("coordinator", "worker"):
            sp.add_argument("--address", default=os.environ.get("CLIPMESH_COORDINATOR", DEFAULT_ADDRESS),
                            help="coordinator address")
            sp.add_argument("--token", default=os.environ.get("CLIPMESH_TOKEN", ""),
                            help="a client or admin token of the coordinator (env CLIPMESH_TOKEN)")
        tls = TLS.from_env()
        g = sp.add_argument_group("TLS")
        g.add_argument("--tls-ca", default=tls.ca, help="CA that signed the other side's certificate "
                       "(coordinator: then every peer must present one; env CLIPMESH_TLS_CA)")
        g.add_argument("--tls-cert", default=tls.cert, help="this side's certificate, PEM (env CLIPMESH_TLS_CERT)")
        g.add_argument("--tls-key", default=tls.key, help="its private key, PEM (env CLIPMESH_TLS_KEY)")
    return parser


def _tls(args) -> TLS:
    return TLS(args.tls_ca, args.tls_cert, args.tls_key)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return _run(args) or 0
    except KeyboardInterrupt:
        print("clipmesh: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        import grpc

        if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
            print(f"clipmesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
        if isinstance(exc, (TimeoutError, FileNotFoundError, ValueError)):
            print(f"clipmesh: {exc}", file=sys.stderr)
            return 2
        raise


def _needs_worker_stack(command: str) -> None:
    """`worker` and `generate` render: without the worker extra, one line saying how to get it."""
    import importlib.util

    missing = [m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"clipmesh {command}: renders with torch and diffusers, not installed here ({', '.join(missing)} "
                         f"missing): pip install 'clipmesh[worker]'")


def _check_locally(prompt: str, fields: dict) -> None:
    """`generate` runs its own coordinator: its checks of the request (and the worker count, which
    here starts that many workers) run before anything starts, so a bad flag costs no start-up."""
    from clipmesh import presets
    from clipmesh.coordinator.errors import InvalidArgument
    from clipmesh.coordinator.validate import validate_request

    if fields["num_workers"] < 1:
        raise ValueError(f"--workers: must be >= 1 (the local workers to start), got {fields['num_workers']}")
    model = pb.ModelInfo(**presets.model_limits(fields["model"]))
    try:
        validate_request(pb.SubmitJobRequest(prompt=prompt, **fields), model, [fields["model"]])
    except InvalidArgument as exc:
        raise ValueError(f"INVALID_ARGUMENT: {exc}") from None


def _run(args) -> int | None:
    from clipmesh import progress
    from clipmesh.client import Client

    if args.command == "coordinator":
        import uvloop

        from clipmesh.coordinator.access import Credentials
        from clipmesh.coordinator.limits import Limits
        from clipmesh.coordinator.server import serve

        faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints every thread's stack
        credentials = Credentials(args.client_token, args.admin_token, args.worker_token, certificates=bool(args.tls_ca))
        if credentials.open and os.environ.get("CLIPMESH_TOKEN"):  # the one shared token of old: not open by surprise
            raise SystemExit("clipmesh coordinator: CLIPMESH_TOKEN is a client's credential; the coordinator takes "
                             "CLIPMESH_CLIENT_TOKEN and CLIPMESH_WORKER_TOKEN (and CLIPMESH_ADMIN_TOKEN), one per role")
        uvloop.run(serve(args.listen, args.data, credentials, _tls(args), heartbeat_timeout=args.heartbeat_timeout,
                         collective_timeout=args.collective_timeout, port_file=args.port_file,
                         checkpoint_dir=args.checkpoint_dir, backfill_wait=args.backfill_wait,
                         limits=Limits(max_queued_jobs=args.max_queued_jobs, retention_s=args.retention_hours * 3600,
                                       register_timeout_s=args.register_timeout),
                         http_listen=args.http, http_port_file=args.http_port_file))
        return 0
    if args.command == "worker":
        _needs_worker_stack("worker")
        from clipmesh.worker.daemon import main as worker_main

        worker_main(args)
        return 0
    if args.command == "certs":
        from clipmesh.certs import make_farm

        for path in make_farm(args.out, args.hosts.split(","), *(filter(None, getattr(args, role).split(","))
                                                                 for role in ("workers", "clients", "admins")),
                              days=args.days):
            print(path)
        return 0
    if args.command == "generate":
        from clipmesh.local import generate

        fields = _request_fields(args)
        _check_locally(args.prompt, fields)
        _needs_worker_stack("generate")
        return generate(args.prompt, fields, args.output, keep_data=args.keep_data, lora_dir=args.lora_dir)

    with Client(args.address, args.token, _tls(args)) as client:
        if args.command == "submit":
            job = client.submit(args.prompt, **_request_fields(args))
            print(job.id)
            if args.watch:
                state = progress.follow(client.watch(job.id), num_frames=job.request.num_frames)
                return 0 if state == pb.SUCCEEDED else 1
        elif args.command == "watch":
            num_frames = client.get(args.job_id).request.num_frames
            state = progress.follow(client.watch(args.job_id), num_frames=num_frames)
            return 0 if state == pb.SUCCEEDED else 1
        elif args.command == "cancel":
            job = client.cancel(args.job_id)
            print(progress.STATE_NAMES[job.state] + (f" (kept {job.video_frames} frames)" if job.video_size else ""))
        elif args.command == "fetch":
            size = client.fetch(args.job_id, args.output)
            print(f"{args.output} ({size} bytes)")
        elif args.command == "jobs":
            for job in client.jobs(args.limit):
                r = job.request
                frames = r.num_frames or "∞"  # unbounded: until cancelled
                print(f"{job.id}  {progress.STATE_NAMES[job.state]:<9}  {frames:>4}f {r.width}x{r.height}  "
                      f"{job.strategy or '-':<6} {','.join(job.worker_ids) or '-'}  {r.prompt[:40]!r}"
                      + (f"  error: {job.error}" if job.error else ""))
        elif args.command == "workers":
            for w in client.workers():
                print(f"{w.id}  {pb.WorkerState.Name(w.state):<5}  {w.host:<15} {w.device:<7} "
                      f"{w.model.name}  {w.speed:.0f} tok/s  {w.current_job_id or '-'}")
    return None


if __name__ == "__main__":
    sys.exit(main())
